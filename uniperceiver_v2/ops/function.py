"""Autograd wrapper around the compiled (CPU or CUDA) multi-scale deformable attention kernels."""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable


class CompiledMSDeformAttn(torch.autograd.Function):
    """Deformable-DETR eq. (3) through a compiled extension's `forward` / `backward` kernels.

    The kernels never materialise the (N * M, C, Lq, L * P) tensor of sampled values that the
    pure-PyTorch reference keeps for its backward pass: the backward kernel re-samples the value
    maps instead. Double backward is not supported (`once_differentiable`).

    `apply(kernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`
    takes the extension module first, then contiguous tensors with the shapes documented in
    `uniperceiver_v2.ops.ms_deform_attn`, and returns (N, Lq, M * C).
    """

    @staticmethod
    def forward(
        ctx,
        kernels: ModuleType,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.kernels = kernels
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return kernels.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.kernels.backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
        )
        needs = ctx.needs_input_grad
        return (
            None,
            grad_value if needs[1] else None,
            None,
            None,
            grad_locations if needs[4] else None,
            grad_weights if needs[5] else None,
        )
