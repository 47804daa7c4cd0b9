"""Batching: pad images of different sizes into one tensor with a padding mask; keep targets per image.

Images are padded at the bottom and right with zeros (after ``Normalize`` zero is the data-set mean).
The padding mask follows the DETR convention: True marks padding, i.e. positions attention must ignore.
Text stays as raw strings: the model's text encoder tokenises it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .samples import (
    CaptionBatch,
    CaptionSample,
    ClassificationBatch,
    ClassificationSample,
    DetectionBatch,
    DetectionSample,
    ImageCaptionsSample,
)

# The backbone's coarsest stride; padding to a multiple of it keeps every feature map aligned with
# the pixels it came from.
DEFAULT_SIZE_DIVISIBILITY = 32


def pad_images(
    images: Sequence[torch.Tensor], size_divisibility: int = DEFAULT_SIZE_DIVISIBILITY
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (C, H_b, W_b) images into one batch.

    Args:
        images: B tensors (C, H_b, W_b) with the same C and dtype.
        size_divisibility: the padded H and W are the batch maxima rounded up to a multiple of this
            (1 pads to the batch maximum only).

    Returns:
        batch: (B, C, H_pad, W_pad), zero where padded.
        padding_mask: (B, H_pad, W_pad) bool, True at padded positions.
        image_sizes: (B, 2) int64, (H_b, W_b) of every image.
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    channels = images[0].shape[0]
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    max_h, max_w = (int(v) for v in sizes.max(dim=0).values)
    pad_h = -(-max_h // size_divisibility) * size_divisibility
    pad_w = -(-max_w // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), channels, pad_h, pad_w))
    padding_mask = torch.ones((len(images), pad_h, pad_w), dtype=torch.bool)
    for b, image in enumerate(images):
        if image.shape[0] != channels:
            raise ValueError(f"image {b} has {image.shape[0]} channels, image 0 has {channels}")
        height, width = image.shape[-2:]
        batch[b, :, :height, :width] = image
        padding_mask[b, :height, :width] = False
    return batch, padding_mask, sizes


def collate_detection(
    samples: Sequence[DetectionSample], size_divisibility: int = DEFAULT_SIZE_DIVISIBILITY
) -> DetectionBatch:
    """Batch detection samples; boxes, labels and masks stay lists of per-image tensors."""
    images, padding_mask, sizes = pad_images([s.image for s in samples], size_divisibility)
    with_masks = all(s.masks is not None for s in samples)
    return DetectionBatch(
        images=images,
        padding_mask=padding_mask,
        image_sizes=sizes,
        boxes=[s.boxes for s in samples],
        labels=[s.labels for s in samples],
        masks=[s.masks for s in samples] if with_masks else None,
        image_ids=[s.image_id for s in samples],
        orig_sizes=[s.orig_size for s in samples],
    )


def collate_classification(
    samples: Sequence[ClassificationSample], size_divisibility: int = DEFAULT_SIZE_DIVISIBILITY
) -> ClassificationBatch:
    """Batch classification samples (images of one size need no padding: the mask is then all False
    as long as the size is a multiple of ``size_divisibility``)."""
    images, padding_mask, sizes = pad_images([s.image for s in samples], size_divisibility)
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    return ClassificationBatch(images, padding_mask, sizes, labels, [s.path for s in samples])


def collate_captions(
    samples: Sequence[CaptionSample | ImageCaptionsSample], size_divisibility: int = DEFAULT_SIZE_DIVISIBILITY
) -> CaptionBatch:
    """Batch caption pairs (one caption per image) or images with all their captions (flattened, with
    ``caption_image_index`` giving each caption's image row)."""
    images, padding_mask, sizes = pad_images([s.image for s in samples], size_divisibility)
    captions: list[str] = []
    index: list[int] = []
    for row, sample in enumerate(samples):
        texts = [sample.caption] if isinstance(sample, CaptionSample) else sample.captions
        captions.extend(texts)
        index.extend([row] * len(texts))
    return CaptionBatch(
        images=images,
        padding_mask=padding_mask,
        image_sizes=sizes,
        captions=captions,
        caption_image_index=torch.tensor(index, dtype=torch.int64),
        image_ids=[s.image_id for s in samples],
    )


def collate_text(samples: Sequence[str]) -> list[str]:
    """Batch raw sentences (tokenisation and masking happen in the model's text pipeline)."""
    for i, text in enumerate(samples):
        if not isinstance(text, str):
            raise TypeError(f"collate_text expects strings, sample {i} is {type(text).__name__}")
    return list(samples)
