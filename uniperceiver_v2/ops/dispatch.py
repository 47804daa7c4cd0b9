"""The public multi-scale deformable attention entry point: validation and choice of implementation.

Three implementations compute the same function (Deformable-DETR eq. (3)):

    "cuda"     compiled CUDA kernels (float64/32/16, bfloat16), for CUDA tensors;
    "cpp"      compiled C++ kernels parallelised with OpenMP, for CPU tensors;
    "pytorch"  `grid_sample`-based reference, for any device (slow, memory hungry).

`impl=None` takes the fastest one available for the tensors' device ("cuda" or "cpp", else
"pytorch"), unless the environment variable UNIPERCEIVER_MSDA_IMPL names one. A compiled
implementation that fails to build makes the automatic choice fall back to "pytorch" with one
warning; asking for it by name raises instead.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import NoReturn

import torch

from uniperceiver_v2.ops import extension
from uniperceiver_v2.ops.function import CompiledMSDeformAttn
from uniperceiver_v2.ops.reference import ms_deform_attn_pytorch

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("cuda", "cpp", "pytorch")  # fastest first
ENV_VAR = "UNIPERCEIVER_MSDA_IMPL"
# The device type each compiled implementation runs on, and the reverse; "pytorch" runs everywhere.
_COMPILED_DEVICE = {"cuda": "cuda", "cpp": "cpu"}
_COMPILED_FOR_DEVICE = {device_type: impl for impl, device_type in _COMPILED_DEVICE.items()}

_logged_choices: set[tuple[str, str]] = set()
_warned_fallbacks: set[str] = set()


def _compiled_extension(impl: str) -> extension.CompiledExtension:
    # Looked up at call time so that tests can substitute an extension.
    return extension.CUDA_EXTENSION if impl == "cuda" else extension.CPU_EXTENSION


def unavailable_reason(impl: str, device: torch.device | str | None = None) -> str | None:
    """Why `impl` cannot run (on `device`, if given), or None if it can.

    Checking a compiled implementation builds it on first use (up to a minute, then cached).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown ms_deform_attn implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl == "pytorch":
        return None
    if device is not None and torch.device(device).type != _COMPILED_DEVICE[impl]:
        return (
            f"the {impl!r} implementation runs on {_COMPILED_DEVICE[impl]} tensors, not on {torch.device(device)}"
        )
    return _compiled_extension(impl).unavailable_reason()


def available_implementations(device: torch.device | str | None = None) -> list[str]:
    """Implementations that run on this machine (for tensors on `device`, if given), fastest first.

    Checking a compiled implementation builds it on first use (up to a minute, then cached).
    """
    return [impl for impl in IMPLEMENTATIONS if unavailable_reason(impl, device) is None]


def _requested_implementation(requested: str, origin: str, device: torch.device) -> str:
    """`requested` if it can run on `device`; otherwise an error naming where the request came from."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"ms_deform_attn: unknown implementation {requested!r} (from the {origin}); "
            f"choose one of {IMPLEMENTATIONS}"
        )
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise RuntimeError(
            f"ms_deform_attn: implementation {requested!r} (from the {origin}) is unavailable: {reason}"
        )
    return requested


def _fastest_implementation(device: torch.device) -> str:
    """The compiled implementation for `device` if it builds, else "pytorch" (warning once why)."""
    candidate = _COMPILED_FOR_DEVICE.get(device.type)
    if candidate is None:
        return "pytorch"
    reason = unavailable_reason(candidate)
    if reason is None:
        return candidate
    if candidate not in _warned_fallbacks:
        _warned_fallbacks.add(candidate)
        warnings.warn(
            f"ms_deform_attn: the compiled {candidate!r} implementation is unavailable, falling back "
            f"to the slow pure-PyTorch one. Reason: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
    return "pytorch"


def _choose_implementation(impl: str | None, device: torch.device) -> str:
    if impl is not None:
        return _requested_implementation(impl, "impl argument", device)
    if os.environ.get(ENV_VAR):
        chosen = _requested_implementation(os.environ[ENV_VAR], f"environment variable {ENV_VAR}", device)
        how = f"set by {ENV_VAR}"
    else:
        chosen = _fastest_implementation(device)
        how = "fastest available"
    if (chosen, device.type) not in _logged_choices:
        _logged_choices.add((chosen, device.type))
        logger.info("ms_deform_attn: using the %r implementation for %s tensors (%s)", chosen, device.type, how)
    return chosen


def _validate(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument at fault if the inputs do not fit together."""

    def fail(message: str) -> NoReturn:
        raise ValueError(f"ms_deform_attn: {message}")

    arguments = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in arguments.items():
        if not isinstance(tensor, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if not arguments[name].is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {arguments[name].dtype}")
        if arguments[name].device != value.device:
            fail(f"{name} is on {arguments[name].device} but value is on {value.device}")
    for name in ("spatial_shapes", "level_start_index"):
        if arguments[name].is_floating_point() or arguments[name].is_complex() or arguments[name].dtype == torch.bool:
            fail(f"{name} must be an integer tensor, got {arguments[name].dtype}")

    if value.dim() != 4:
        fail(f"value must be (N, S, heads, C), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        fail(f"sampling_locations must be (N, Lq, heads, L, P, 2), got shape {tuple(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        fail(f"attention_weights must be (N, Lq, heads, L, P), got shape {tuple(attention_weights.shape)}")
    batch, num_value, heads, _ = value.shape
    num_levels = sampling_locations.shape[3]
    if sampling_locations.shape[0] != batch:
        fail(f"sampling_locations has batch size {sampling_locations.shape[0]} but value has {batch}")
    if sampling_locations.shape[2] != heads:
        fail(f"sampling_locations has {sampling_locations.shape[2]} heads but value has {heads}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        fail(
            f"attention_weights shape {tuple(attention_weights.shape)} does not match sampling_locations "
            f"shape {tuple(sampling_locations.shape)} without its last dimension"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        fail(f"spatial_shapes must be (L, 2) rows of (H, W), got shape {tuple(spatial_shapes.shape)}")
    if num_levels == 0:
        fail("sampling_locations has no levels (L = 0); at least one feature level is needed")
    if spatial_shapes.shape[0] != num_levels:
        fail(f"spatial_shapes has {spatial_shapes.shape[0]} levels but sampling_locations has {num_levels}")
    if tuple(level_start_index.shape) != (num_levels,):
        fail(f"level_start_index must be ({num_levels},), got shape {tuple(level_start_index.shape)}")

    # Reading the level layout on the host costs a small device sync for CUDA tensors: the price of
    # catching a wrong S before a kernel reads out of bounds.
    shapes = [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
    if any(height <= 0 or width <= 0 for height, width in shapes):
        fail(f"spatial_shapes must be positive, got {shapes}")
    sizes = [height * width for height, width in shapes]
    if sum(sizes) != num_value:
        fail(f"value has S = {num_value} positions but spatial_shapes {shapes} give sum(H * W) = {sum(sizes)}")
    expected_starts = [sum(sizes[:level]) for level in range(num_levels)]
    if level_start_index.tolist() != expected_starts:
        fail(
            f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
            f"(expected {expected_starts})"
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention, Deformable-DETR eq. (3), with its tensor conventions.

        out[n, q, m] = sum_{l, p} attention_weights[n, q, m, l, p]
                       * bilinear(value of level l, head m; sampling_locations[n, q, m, l, p])

    Bilinear sampling matches `grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=False)`: location (0, 0) is the top-left corner of a level's map, (1, 1) its
    bottom-right corner, and points (partly) outside the map read zeros there.

    Args:
        value: (N, S, M, C) values of all levels stacked along S = sum_l H_l * W_l (row-major within
            a level), M heads of C channels.
        spatial_shapes: (L, 2) integer (H_l, W_l) of each level.
        level_start_index: (L,) integer offset of each level along S (0, H_0 * W_0, ...).
        sampling_locations: (N, Lq, M, L, P, 2) sampling points as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P) weight of each point (usually softmax over L * P).
        impl: "cuda", "cpp", "pytorch", or None for the fastest available on the tensors' device
            (overridable with the environment variable UNIPERCEIVER_MSDA_IMPL).

    Returns:
        (N, Lq, M * C) attended values, heads concatenated along the last dimension.

    Floating inputs of different dtypes are promoted to a common dtype (as under autocast, where the
    value may be half precision and the locations float32). Gradients flow to the value, the
    sampling locations and the attention weights in every implementation.
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        tensor.to(dtype).contiguous() for tensor in (value, sampling_locations, attention_weights)
    )
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
    level_start_index = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()

    chosen = _choose_implementation(impl, value.device)
    if chosen == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    kernels = _compiled_extension(chosen).load()
    return CompiledMSDeformAttn.apply(
        kernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
