"""Image-text retrieval recall R@K in both directions (COCO / Flickr30k protocol, 5 captions per image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["retrieval_recall"]


def retrieval_recall(
    similarity: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """R@K for image->text and text->image retrieval from an image-text similarity matrix.

    Image->text: an image's query succeeds at K if ANY of its captions is among the K highest-scoring texts.
    Text->image: a caption's query succeeds at K if its own image is among the K highest-scoring images.

    Ties are counted pessimistically: the rank of the correct item is the number of wrong items scoring at
    least as high. A model that gives every pair the same score therefore gets R@K = 0 unless K exceeds
    the number of wrong items, instead of an optimistic 100 %.

    Args:
        similarity: (num_images, num_texts) scores, higher = more similar.
        text_to_image: (num_texts,) index of each caption's image.
        ks: the K values.
        chunk_size: rows processed at once, to bound memory on 5k x 25k matrices.

    Returns:
        {"i2t_R@K": ..., "t2i_R@K": ... for K in ks}, fractions in [0, 1] (the paper reports x100).
    """
    if similarity.dim() != 2:
        raise ValueError(f"retrieval_recall: similarity must be (num_images, num_texts), got {tuple(similarity.shape)}")
    num_images, num_texts = similarity.shape
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=similarity.device)
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"retrieval_recall: text_to_image must be ({num_texts},), got {tuple(text_to_image.shape)}")
    if num_texts == 0 or num_images == 0:
        raise ValueError("retrieval_recall: empty similarity matrix")
    if torch.isnan(similarity).any():
        raise ValueError("retrieval_recall: similarity contains NaN")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"retrieval_recall: text_to_image values must lie in [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if (captions_per_image == 0).any():
        image = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"retrieval_recall: image {image} has no caption; its image->text query has no answer")
    if any(k < 1 for k in ks):
        raise ValueError(f"retrieval_recall: ks must be >= 1, got {list(ks)}")

    # Image -> text: rank of the best-scoring correct caption among the wrong ones.
    i2t_ranks = []
    for start in range(0, num_images, chunk_size):
        rows = similarity[start : start + chunk_size]  # (n, num_texts)
        image_ids = torch.arange(start, start + rows.shape[0], device=similarity.device)
        correct = text_to_image.unsqueeze(0) == image_ids.unsqueeze(1)  # (n, num_texts)
        best_correct = rows.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (n, 1)
        i2t_ranks.append(((rows >= best_correct) & ~correct).sum(dim=1))
    i2t_rank = torch.cat(i2t_ranks)  # (num_images,), 0 = first

    # Text -> image: rank of the caption's own image among the other images.
    t2i_ranks = []
    for start in range(0, num_texts, chunk_size):
        columns = similarity[:, start : start + chunk_size].t()  # (n, num_images)
        own = text_to_image[start : start + columns.shape[0]]  # (n,)
        own_score = columns.gather(1, own.unsqueeze(1))  # (n, 1)
        others = torch.ones_like(columns, dtype=torch.bool).scatter_(1, own.unsqueeze(1), False)
        t2i_ranks.append(((columns >= own_score) & others).sum(dim=1))
    t2i_rank = torch.cat(t2i_ranks)  # (num_texts,)

    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    return metrics
