"""Point sampling for the mask losses and matching costs (Mask2Former's point loss, used by the paper's appendix B).

Instead of comparing whole mask maps, the matcher and the criterion compare predicted and ground-truth masks at a
few thousand points (the paper: 112 x 112 = 12544 points per mask). Matching uses points drawn uniformly;
the loss uses importance sampling: ``oversample_ratio * P`` random candidates, of which the
``importance_sample_ratio * P`` most uncertain ones (logit closest to 0) are kept and the rest drawn uniformly.
Coordinates are (x, y) in [0, 1] of the map, read with ``grid_sample(align_corners=False)``, so the same point
addresses the same image location in a stride-4 logit map and a full-resolution target mask of the same canvas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(inputs: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read maps at normalised points.

    Args:
        inputs: (N, C, H, W) maps.
        point_coords: (N, P, 2) points, (x, y) in [0, 1] of the map extent.

    Returns:
        (N, C, P) values.
    """
    grid = (2.0 * point_coords - 1.0).unsqueeze(2)            # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: -|logit|, highest where the prediction is closest to 0.5."""
    return -logits.abs()


@torch.no_grad()
def sample_uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance-sampled point coordinates (Mask2Former / PointRend training-time sampling).

    Args:
        mask_logits: (N, 1, H, W) predicted mask logits.
        num_points: P, points per mask.
        oversample_ratio: k >= 1, ``k * P`` random candidates are scored.
        importance_sample_ratio: beta in [0, 1], the fraction of the P points taken from the most uncertain
            candidates; the remaining ``(1 - beta) * P`` are uniform.
        generator: optional RNG for reproducible sampling.

    Returns:
        (N, P, 2) point coordinates (x, y) in [0, 1].
    """
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_sampled, 2, device=device, generator=generator)
    uncertainty = mask_uncertainty(point_sample(mask_logits, candidates)).squeeze(1)     # (N, kP)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = uncertainty.topk(num_uncertain, dim=1).indices                                  # (N, beta P)
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=device, generator=generator)], dim=1)
    return coords
