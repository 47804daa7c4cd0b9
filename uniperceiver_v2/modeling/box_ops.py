"""Box conversions, (generalised) IoU and the conversion of annotated targets to the region proposal network's form.

Conventions used throughout the image encoder:
  * ``cxcywh``: (centre x, centre y, width, height), normalised to [0, 1] by the width and height of the
    *unpadded* image (as Deformable-DETR: padding is excluded through the valid ratios).
  * ``xyxy``: (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, either normalised or in absolute pixels.
IoU and GIoU come from ``torchvision.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.ops as tv_ops


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M)."""
    return tv_ops.box_iou(boxes1, boxes2)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M) in [-1, 1]."""
    return tv_ops.generalized_box_iou(boxes1, boxes2)


def generalized_box_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Element-wise 1 - GIoU of two aligned (N, 4) xyxy box sets -> (N,)."""
    return tv_ops.generalized_box_iou_loss(boxes1, boxes2, reduction="none")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), clamped so that boxes at the border (0 or 1) give finite values."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def normalize_targets(targets: list[dict], padded_size: tuple[int, int] | None = None,
                      device: torch.device | str | None = None) -> list[dict]:
    """Annotated targets -> the region proposal network's internal form.

    Args:
        targets: one dict per image with
            ``boxes`` (K, 4) float, xyxy in absolute pixels of the (transformed, unpadded) image,
            ``masks`` (K, h, w) bool/uint8 of the unpadded image size (optional when ``padded_size`` is None),
            ``labels`` (K,) long (class ids; the class-agnostic proposal network ignores them),
            ``size`` (2,) = (h, w) of the unpadded image.
        padded_size: (H, W) of the padded batch; when given, masks are zero-padded to it (bottom/right), so that
            they cover the same canvas as the mask logits (which are predicted on the padded image).
        device: where the returned tensors live (default: where the given ones are).

    Returns:
        one dict per image with ``boxes`` (K, 4) cxcywh normalised by (w, h), ``labels`` (K,), ``size`` (2,),
        and, when ``padded_size`` is given, ``masks`` (K, H, W) float in {0, 1}.
    """
    out = []
    for i, t in enumerate(targets):
        for key in ("boxes", "labels", "size"):
            if key not in t:
                raise KeyError(f"targets[{i}]: missing key {key!r} (expected boxes, masks, labels, size)")
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes']: expected shape (K, 4) xyxy, got {tuple(boxes.shape)}")
        h, w = (int(v) for v in torch.as_tensor(t["size"]).tolist())
        scale = boxes.new_tensor([w, h, w, h])
        entry = {"boxes": box_xyxy_to_cxcywh(boxes / scale),
                 "labels": torch.as_tensor(t["labels"], device=boxes.device),
                 "size": torch.as_tensor([h, w], device=boxes.device)}
        if padded_size is not None:
            if "masks" not in t:
                raise KeyError(f"targets[{i}]: missing key 'masks' (K, h, w), needed for the mask losses")
            masks = torch.as_tensor(t["masks"], device=boxes.device)
            if masks.ndim != 3 or masks.shape[0] != boxes.shape[0] or tuple(masks.shape[1:]) != (h, w):
                raise ValueError(f"targets[{i}]['masks']: expected shape ({boxes.shape[0]}, {h}, {w}) "
                                 f"(K boxes, size h x w), got {tuple(masks.shape)}")
            pad_h, pad_w = padded_size[0] - h, padded_size[1] - w
            if pad_h < 0 or pad_w < 0:
                raise ValueError(f"targets[{i}]['size'] = ({h}, {w}) is larger than the padded batch {padded_size}")
            entry["masks"] = F.pad(masks.to(torch.float32), (0, pad_w, 0, pad_h))
        out.append(entry)
    return out
