"""Where a model runs: the device a config asks for, moving batches there, and evaluation mode for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..config import ConfigError

__all__ = ["evaluation_mode", "move_to_device", "native_bf16", "resolve_device", "resolve_precision"]


def resolve_device(device: str, default: torch.device | None = None, key: str = "run.device") -> torch.device:
    """The ``torch.device`` that ``device`` names.

    Args:
        device: "auto", or anything ``torch.device`` reads ("cpu", "cuda:1").
        default: what "auto" means (e.g. cuda:LOCAL_RANK under torchrun); None: the first GPU when there is one,
            else the CPU.
        key: the config key or parameter ``device`` came from, named in the error.

    Raises:
        ConfigError: a CUDA device is asked for and CUDA is not available.
    """
    if device == "auto":
        if default is not None:
            return default
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {device!r} but CUDA is not available; use 'auto' or 'cpu'")
    return resolved


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA device with bf16 support, or a CPU whose
    flags (``/proc/cpuinfo``) include AVX-512 BF16 or AMX-BF16. Elsewhere bf16 autocast is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``run.precision`` for ``device``: "auto" becomes "bf16" where :func:`native_bf16` holds, else "fp32"."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, objects with ``.to(device)`` (the data module's batch dataclasses), and containers of them."""
    if isinstance(batch, torch.Tensor) or (hasattr(batch, "to") and callable(batch.to) and not isinstance(batch, type)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(item, device) for item in batch)
    return batch


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no gradients for the block, then the model's previous mode (also after an error)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
