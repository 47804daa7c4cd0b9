"""Thin helpers around torch.distributed that also work, as identities, in a single process.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them
and picks NCCL on CUDA and gloo on CPU. Without those variables (a notebook, a test, `python train.py`)
nothing is initialised and every helper falls back to the single-process answer.

`all_gather_with_grad` is the autograd-aware all-gather behind "Gather Feature" (paper Tab. 4): retrieval
negatives from all ranks, and candidate targets (class names, vocabulary) sharded across ranks and
re-assembled (docs/design.md).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedInfo",
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_dict",
]


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: its global rank, the number of processes, its rank on the node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (the process that writes checkpoints and logs)."""
    return get_rank() == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from error


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistributedInfo:
    """Initialise the default process group from torchrun's environment variables, if they are set.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, gloo otherwise.
        timeout_minutes: collective timeout.

    Returns:
        This process's DistributedInfo. On CUDA the current device is set to cuda:LOCAL_RANK. Calling it
        again, or after the group was initialised elsewhere, returns the existing group's info.
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"RANK and WORLD_SIZE are set but {name} is not; launch with torchrun")
    elif is_distributed():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = rank % max(torch.cuda.device_count(), 1)
    else:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return DistributedInfo(rank=0, world_size=1, local_rank=0, device=device)

    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear down the default process group if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks; no-op in a single process."""
    if is_distributed():
        dist.barrier()


def _gather_shapes(tensor: torch.Tensor) -> list[torch.Size]:
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    ndims = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(get_world_size())]
    dist.all_gather(ndims, torch.tensor([tensor.dim()], dtype=torch.int64, device=tensor.device))
    if len({int(n) for n in ndims}) != 1:
        raise ValueError(f"all_gather_with_grad: ranks hold tensors of different ranks {[int(n) for n in ndims]}")
    shapes = [torch.zeros_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    shapes = [torch.Size(s.tolist()) for s in shapes]
    if len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"all_gather_with_grad: shapes differ beyond dim 0 across ranks: {shapes}")
    return shapes


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the gradient over ranks (see below)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        shapes = _gather_shapes(tensor)
        sizes = [s[0] for s in shapes]
        max_size = max(sizes)
        # all_gather needs equal shapes: pad to the largest slice, trim afterwards.
        padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous())
        rank = get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.size = sizes[rank]
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph to the local slice.

    Forward: rank r holds x_r of shape (n_r, *rest) (n_r may differ between ranks, e.g. a vocabulary that does
    not split evenly); every rank returns cat([x_0, ..., x_{W-1}]) of shape (sum_r n_r, *rest), whose r-th
    slice is x_r itself for autograd.

    Backward: rank q computes its own loss L_q from the gathered tensor, so x_r influences every L_q. The
    gradient of x_r is sum_q dL_q/dx_r: each rank all-reduces (SUM) the gradient of the gathered tensor and
    keeps its own slice. DistributedDataParallel then averages parameter gradients over ranks, so the
    parameters receive the gradient of (1/W) sum_q L_q, the mean of the per-rank losses, exactly as if one
    process had computed that mean over the concatenated batch. (Averaging instead of summing here would
    shrink the cross-rank part by W; returning only the local slice of grad_output, as some "GatherLayer"s
    do, would drop the terms dL_q/dx_r for q != r.)

    Without a process group this is the identity.

    Args:
        tensor: (n_r, *rest) on this rank's device (CUDA for NCCL).

    Returns:
        (sum_r n_r, *rest).
    """
    if not is_distributed() or get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a floating-point tensor over ranks (a new tensor; the input is left unchanged)."""
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}")
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / get_world_size()


def reduce_dict(values: Mapping[str, torch.Tensor | float], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum or average a dict of scalars over ranks, e.g. losses for logging.

    Every rank must pass the same keys. Values are detached and reduced as float64 in one collective.

    Args:
        values: name -> scalar (0-d tensor or number).
        average: divide the sum by the world size.

    Returns:
        name -> 0-d float64 tensor, on every rank, in the input's key order.
    """
    names = sorted(values)
    if not names:
        return {}
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    for name in names:
        value = values[name]
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"reduce_dict: value {name!r} has {value.numel()} elements, expected a scalar")
    stacked = torch.stack(
        [torch.as_tensor(values[n]).detach().to(device=device, dtype=torch.float64).reshape(()) for n in names]
    )
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        if average:
            stacked /= get_world_size()
    reduced = dict(zip(names, stacked.unbind(0)))
    return {name: reduced[name] for name in values}
