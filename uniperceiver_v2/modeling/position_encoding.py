"""Sine positional encodings: of feature-map pixels (DETR) and of box coordinates (DINO; the paper's B in v2 eq. (2)).

Both use the Transformer's sinusoid: a scalar position p in [0, 1] scaled by 2*pi becomes
``[sin(p / T^(0/F)), cos(p / T^(0/F)), sin(p / T^(2/F)), cos(p / T^(2/F)), ...]`` with F features and T = 10000.
"""

from __future__ import annotations

import math

import torch


def _sine(positions: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) positions already scaled by 2*pi -> (..., num_feats), sin and cos interleaved."""
    if num_feats % 2:
        raise ValueError(f"sine encodings need an even number of features, got {num_feats}")
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = positions[..., None] / dim_t                                  # (..., F)
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)


def sine_position_embedding(padding_mask: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine embedding of a feature map, normalised to the unpadded region.

    Positions are the cumulative count of valid pixels divided by the valid extent, so a pixel has the same code
    whatever padding the batch adds.

    Args:
        padding_mask: (B, H, W) bool, True = padding.
        num_feats: F, features per axis; the result has 2F channels (y first, then x).

    Returns:
        (B, 2F, H, W) float.
    """
    valid = (~padding_mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + eps) * 2 * math.pi
    pos = torch.cat([_sine(y, num_feats, temperature), _sine(x, num_feats, temperature)], dim=-1)   # (B, H, W, 2F)
    return pos.permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of boxes, one block of ``num_feats`` per coordinate (DINO's query positional code).

    Args:
        boxes: (..., 4) cxcywh in [0, 1] (or (..., 2) centres).

    Returns:
        (..., 4 * num_feats) (or 2 * num_feats), in the order (cy, cx, w, h) as DINO / Mask DINO.
    """
    scaled = boxes * (2 * math.pi)
    coords = [scaled[..., 1], scaled[..., 0]] + [scaled[..., i] for i in range(2, boxes.shape[-1])]
    return torch.cat([_sine(c, num_feats, temperature) for c in coords], dim=-1)
