"""The unified loss of every task (v2 eq. (7)) and the two shapes it takes: one positive target per input
(classification, detection, captioning, MLM) and several possible positives per input (retrieval).

v2 eq. (7) for the task k sampled in a step (the sampling ratio s_k is realised by the sampler,
not by the loss):

    L_k = E_{(x, y)} [ -w_k log( P(x, y) / sum_{z in Y_k} P(x, z) ) ],   P(x, z) ~ exp(cos(g(f(x)), g(f(z))) / tau)

i.e. w_k times the cross-entropy of softmax(logits) over the candidate set Y_k, where ``logits[n, z]`` =
cos / tau. With label smoothing eps (0.1 for every task but language modelling, v1 appendix E) the one-hot
target is replaced by (1 - eps) * one_hot + eps / |Y_k|, torch's convention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "contrastive_loss", "unified_loss", "uniformity_loss", "uniformity_lower_bound",
           "vocabulary_uniformity_term", "vocabulary_uniformity_terms"]

# Targets equal to this index contribute neither to the loss nor to its mean (torch's default ignore_index).
IGNORE_INDEX = -100


def unified_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    loss_weight: float = 1.0,
) -> torch.Tensor:
    """w_k * mean cross-entropy of softmax(logits) against the ground-truth target index (v2 eq. (7)).

    Args:
        logits: (N, |Y|) scaled cosine similarities cos(g(f(x_n)), g(f(y))) / tau between N inputs and the
            candidate targets.
        targets: (N,) long, the index of each input's ground-truth target in Y, or ``IGNORE_INDEX`` for an
            input without one (e.g. a proposal that overlaps no object, a word outside the vocabulary).
        label_smoothing: eps in [0, 1).
        loss_weight: w_k.

    Returns:
        0-d tensor. When every target is ignored, 0 (still connected to ``logits``, so backward works).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"unified_loss: expected logits (N, |Y|) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    valid = targets != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits[valid], targets[valid], label_smoothing=label_smoothing)
    return loss_weight * loss


def contrastive_loss(
    logits: torch.Tensor,
    positives: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(logits) over the candidates, with the target mass spread evenly over every
    positive candidate of the row (one direction of image-text retrieval).

    A batch may hold two captions of the same image: both texts are correct answers for that image, and
    treating one of them as a negative would push apart a true pair. The target distribution of row n is
    (1 - eps) * positives[n] / |positives[n]| + eps / |Y|, which is the usual one-hot target with label smoothing
    when each row has one positive.

    Args:
        logits: (N, M) scaled cosine similarities between N queries and M candidates.
        positives: (N, M) bool, True where candidate m is a correct answer for query n; every row needs one.
        label_smoothing: eps in [0, 1).

    Returns:
        0-d tensor, the mean over the N rows.
    """
    if logits.shape != positives.shape or positives.dtype != torch.bool:
        raise ValueError(f"contrastive_loss: expected logits (N, M) and a bool positives mask of the same shape, "
                         f"got {tuple(logits.shape)} and {positives.dtype} {tuple(positives.shape)}")
    counts = positives.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts[:, 0] == 0).flatten().tolist()
        raise ValueError(f"contrastive_loss: query rows {rows} have no positive candidate")
    target = positives.to(logits.dtype) / counts.to(logits.dtype)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def uniformity_loss(embeddings: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's (2020) uniformity of candidate targets on the unit sphere (lower = more spread out):

        L_uniform = log mean_{i != j} exp(-t * || z_i / |z_i| - z_j / |z_j| ||^2)

    It is 0 when all targets coincide and -2 t when every pair is orthogonal.

    Args:
        embeddings: (M, d) targets, M >= 2 (normalised here).
        t: the kernel's sharpness (2, as in the paper).

    Returns:
        0-d tensor.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"uniformity_loss: expected (M >= 2, d) embeddings, got {tuple(embeddings.shape)}")
    z = F.normalize(embeddings if embeddings.dtype == torch.float64 else embeddings.float(), dim=1)
    squared = (2 - 2 * z @ z.T).clamp_min(0)                       # |z_i - z_j|^2 of unit vectors
    off_diagonal = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * squared[off_diagonal], dim=0) - math.log(int(off_diagonal.sum()))


def uniformity_lower_bound(count: int, t: float = 2.0) -> float:
    """The smallest value :func:`uniformity_loss` can take for ``count`` unit vectors: -t * 2 M / (M - 1).

    By Jensen, log mean exp(-t d^2) >= -t mean d^2, and over the pairs i != j of M unit vectors
    mean |z_i - z_j|^2 = (2 M^2 - 2 |sum_i z_i|^2) / (M (M - 1)) <= 2 M / (M - 1); both hold with equality for the
    vertices of a regular simplex centred on the origin (M <= d + 1).
    """
    if count < 2:
        raise ValueError(f"uniformity_lower_bound: expected at least 2 vectors, got {count}")
    return -t * 2 * count / (count - 1)


def vocabulary_uniformity_term(vocabulary: torch.Tensor, weight: float, t: float = 2.0) -> torch.Tensor:
    """``decoder.vocabulary_uniformity``'s term of the captioning and MLM losses: ``weight`` times the uniformity
    of the vocabulary's targets above its lower bound (:func:`uniformity_lower_bound`). The shift is a constant, so
    the gradient is :func:`uniformity_loss`'s; it keeps the term, and so the logged language losses, >= 0 (0 only
    for targets on a regular simplex), which their logarithmic curves need."""
    return weight * (uniformity_loss(vocabulary, t) - uniformity_lower_bound(vocabulary.shape[0], t))


def vocabulary_uniformity_terms(vocabulary: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """The language tasks' ``loss_uniformity`` entry: ``{"loss_uniformity": vocabulary_uniformity_term(...)}``, or
    no entry when ``weight`` (``decoder.vocabulary_uniformity``) is 0."""
    return {"loss_uniformity": vocabulary_uniformity_term(vocabulary, weight)} if weight > 0 else {}
