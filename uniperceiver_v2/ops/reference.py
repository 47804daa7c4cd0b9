"""Pure-PyTorch multi-scale deformable attention: the reference and the fallback on every device.

Deformable-DETR's multi-scale deformable attention (its eq. (3)) combines, for every query q and
head m, P sampled points on each of the L feature levels:

    out[n, q, m, :] = sum_{l=1..L} sum_{p=1..P} A[n, q, m, l, p] * V_l(n, m)(loc[n, q, m, l, p])

where V_l(n, m)(x, y) is level l's value map of head m read by bilinear interpolation at the
normalised location (x, y) in [0, 1]^2, with zeros outside the map. Here the sampling itself is done
by `torch.nn.functional.grid_sample` (bilinear, zero padding, align_corners=False), whose backward
gives the gradients with respect to the value, the locations and the weights for free. The price is
memory: every level produces an (N * M, C, Lq, P) tensor of sampled values that autograd keeps for the
backward pass, which is what the compiled kernels avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR eq. (3)) with `grid_sample`.

    Args:
        value: (N, S, M, C) values of all levels stacked along S = sum_l H_l * W_l, row-major within
            a level; M heads of C channels each.
        spatial_shapes: (L, 2) integer (H_l, W_l) of each level.
        level_start_index: (L,) offset of each level along S. Unused here (the levels are split by
            their sizes), accepted so that every implementation has the same signature.
        sampling_locations: (N, Lq, M, L, P, 2) sampling points as (x, y), normalised so that (0, 0)
            is the top-left corner and (1, 1) the bottom-right corner of the map.
        attention_weights: (N, Lq, M, L, P) weight of each sampled point.

    Returns:
        (N, Lq, M * C) attended values, heads concatenated along the last dimension.

    Inputs are not validated here; `uniperceiver_v2.ops.ms_deform_attn` does that.
    """
    del level_start_index  # the split sizes below carry the same information
    batch, _, heads, channels = value.shape
    _, num_queries, _, _, num_points, _ = sampling_locations.shape
    shapes = [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    # grid_sample's grid spans [-1, 1]; with align_corners=False, -1 and 1 are the outer edges of the
    # border pixels, exactly as 0 and 1 are for the sampling locations.
    grids = 2 * sampling_locations - 1

    output = None
    for level, (height, width) in enumerate(shapes):
        # (N, H*W, M, C) -> (N, M, C, H*W) -> (N*M, C, H, W)
        level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(
            batch * heads, channels, height, width
        )
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(
            batch * heads, num_queries, num_points, 2
        )
        # (N*M, C, Lq, P)
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # (N, Lq, M, P) -> (N, M, Lq, P) -> (N*M, 1, Lq, P)
        level_weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(
            batch * heads, 1, num_queries, num_points
        )
        # (N*M, C, Lq)
        contribution = (sampled * level_weights).sum(-1)
        output = contribution if output is None else output + contribution

    # (N*M, C, Lq) -> (N, M*C, Lq) -> (N, Lq, M*C)
    return output.view(batch, heads * channels, num_queries).transpose(1, 2).contiguous()
