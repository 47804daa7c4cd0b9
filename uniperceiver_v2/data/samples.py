"""Typed samples returned by the readers and batches built by the collate functions.

Images are float32 tensors (3, H, W) in [0, 1] until a ``Normalize`` transform is applied. Boxes are
absolute pixel coordinates (x0, y0, x1, y1) on a continuous grid where pixel (row i, column j) covers
[j, j + 1) x [i, i + 1); a mask pixel set at column j therefore extends a box to x1 = j + 1, the same
convention as pycocotools' ``toBbox`` (width = last column - first column + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class DetectionSample:
    """One image with its instance annotations.

    Attributes:
        image: (3, H, W) float32.
        boxes: (K, 4) float32, xyxy absolute pixels in the current image.
        labels: (K,) int64, index into the dataset's ``class_names`` (not the COCO category id).
        masks: (K, H, W) bool instance masks, or None when the reader was built with ``with_masks=False``.
        image_id: the id of the image record in the annotation file.
        orig_size: (height, width) of the image as stored, before any transform, to map predictions back.
        file_name: the image's file name as written in the annotation file.
    """

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    image_id: int
    orig_size: tuple[int, int]
    file_name: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the current (possibly transformed) image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def select(self, keep: torch.Tensor) -> DetectionSample:
        """The same sample with only the instances where the (K,) bool ``keep`` is True."""
        return replace(
            self,
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            masks=None if self.masks is None else self.masks[keep],
        )


@dataclass
class ClassificationSample:
    """image: (3, H, W) float32; label: index into the dataset's ``class_names``; path: the image file."""

    image: torch.Tensor
    label: int
    path: str


@dataclass
class CaptionSample:
    """One (image, caption) pair, the unit of caption training. image: (3, H, W) float32."""

    image: torch.Tensor
    caption: str
    image_id: int
    file_name: str


@dataclass
class ImageCaptionsSample:
    """One image with all its reference captions, the unit of retrieval and caption evaluation."""

    image: torch.Tensor
    captions: list[str]
    image_id: int
    file_name: str


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (K, 4) float32 of bool masks (K, H, W), in the convention above.

    An empty mask gives the box (0, 0, 0, 0). (torchvision's ``masks_to_boxes`` returns the last pixel
    index as x1, i.e. one pixel less than the continuous-coordinate convention used here.)
    """
    num, height, width = masks.shape
    boxes = torch.zeros((num, 4), dtype=torch.float32)
    if num == 0:
        return boxes
    rows = masks.any(dim=2)  # (K, H): which rows hold a mask pixel
    cols = masks.any(dim=1)  # (K, W)
    nonempty = rows.any(dim=1)
    # argmax returns the first maximal index: the first True from the front, and from the back on flips.
    boxes[:, 0] = cols.int().argmax(dim=1)
    boxes[:, 1] = rows.int().argmax(dim=1)
    boxes[:, 2] = width - cols.flip(1).int().argmax(dim=1)
    boxes[:, 3] = height - rows.flip(1).int().argmax(dim=1)
    boxes[~nonempty] = 0.0
    return boxes


def _batch_to(batch, device: torch.device | str):
    """Move every tensor field (and tensors inside list fields) of a batch dataclass to ``device``."""
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            changes[f.name] = [item.to(device) for item in value]
    return replace(batch, **changes)


@dataclass
class DetectionBatch:
    """A padded batch of detection samples; targets stay per image because K differs between images.

    Attributes:
        images: (B, 3, H_pad, W_pad) float32, zero-padded at the bottom and right.
        padding_mask: (B, H_pad, W_pad) bool, True where a pixel is padding.
        image_sizes: (B, 2) int64, (height, width) of each image before padding.
        boxes: B tensors (K_b, 4) xyxy absolute pixels.
        labels: B tensors (K_b,) int64.
        masks: B tensors (K_b, H_b, W_b) bool at each image's own (unpadded) size, or None.
        image_ids: B annotation-file image ids.
        orig_sizes: B (height, width) of the stored images.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    image_sizes: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: list[torch.Tensor] | None
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str) -> DetectionBatch:
        return _batch_to(self, device)


@dataclass
class ClassificationBatch:
    """images: (B, 3, H_pad, W_pad); padding_mask: (B, H_pad, W_pad) bool; image_sizes: (B, 2); labels: (B,)."""

    images: torch.Tensor
    padding_mask: torch.Tensor
    image_sizes: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def to(self, device: torch.device | str) -> ClassificationBatch:
        return _batch_to(self, device)


@dataclass
class CaptionBatch:
    """Images and raw caption strings (tokenisation happens in the model's text encoder).

    Attributes:
        images: (B, 3, H_pad, W_pad) float32.
        padding_mask: (B, H_pad, W_pad) bool, True = padding.
        image_sizes: (B, 2) int64.
        captions: T raw strings; T = B for caption pairs, T = sum of captions per image otherwise.
        caption_image_index: (T,) int64, the batch row of the image each caption belongs to (the ground
            truth of text-to-image retrieval).
        image_ids: B annotation-file image ids.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    image_sizes: torch.Tensor
    captions: list[str]
    caption_image_index: torch.Tensor
    image_ids: list[int]

    def to(self, device: torch.device | str) -> CaptionBatch:
        return _batch_to(self, device)
