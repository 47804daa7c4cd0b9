"""Top-k classification accuracy (ImageNet-1k top-1 in the paper's Tab. 2-6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose target class is among the k highest-scoring classes.

    In Uni-Perceiver v2 the scores are the cosine similarities / tau between each image's <SPE> output and
    every class name's (v2 eq. 5-6); any monotone score (logits, probabilities) gives the same result.

    Args:
        scores: (N, C) class scores.
        targets: (N,) integer class indices in [0, C).
        ks: the k values. A k larger than C counts as C (every sample is then correct).

    Returns:
        {k: accuracy in [0, 1]}. Ties are broken by torch.topk (arbitrary but deterministic).
    """
    if scores.dim() != 2:
        raise ValueError(f"topk_accuracy: scores must be (N, C), got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape[:1]:
        raise ValueError(f"topk_accuracy: targets must be ({scores.shape[0]},), got shape {tuple(targets.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    num_classes = scores.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"topk_accuracy: targets must lie in [0, {num_classes}), got [{targets.min()}, {targets.max()}]"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"topk_accuracy: ks must be >= 1, got {list(ks)}")
    max_k = min(max(ks), num_classes)
    top = scores.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = top == targets.to(top.device).unsqueeze(1)  # (N, max_k)
    return {k: hits[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in ks}
