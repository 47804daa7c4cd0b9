"""Contrastive query denoising (DINO Sec. 3.3, used by Mask DINO and by the paper's appendix A), training only.

Besides the N matching queries, the decoder receives groups of *denoising* queries built from the ground truth:
for every GT box a **positive** query whose box is the GT box with small noise, and a **negative** query whose
box is noised further. Positives are supervised to reconstruct their GT box and mask with objectness 1,
negatives to predict objectness 0; they need no Hungarian matching, which stabilises early training, and the
negatives teach the decoder to reject near-miss anchors.

Box noise (``dn_box_noise_scale`` = lambda): each corner of the xyxy box moves by
``sign * u * lambda * (w/2 or h/2)``, with u ~ U[0, 1) for positives and u ~ U[1, 2) for negatives, i.e. a
positive's corners stay within lambda half-sizes of the GT and a negative's lie between lambda and 2 lambda
half-sizes. Boxes are then kept valid: clipped to [0, 1], corners re-ordered if they crossed (a heavily shrunk
negative), and widened to at least ``MIN_BOX_SIZE``.

Content embedding with binary objectness (``dn_label_noise_ratio``): DINO feeds the embedding of the GT *class*
and flips it to a random wrong class ("label noise") so that the decoder learns to correct labels. A class-agnostic
proposal network has a single class, so we keep two learned embeddings: "object" (index 0) and "noise" (index 1).
Every denoising query starts from "object", replaced by "noise" with probability ``dn_label_noise_ratio / 2``
(DINO and Mask DINO flip with half the configured ratio; Tab. 7's 0.5 therefore flips 25 %). The targets do not
change: a positive with the "noise" content must still say "object" and reconstruct its box and mask, so the
decoder learns not to trust the content prior blindly and to look at the image.

Layout (D = num_groups * group_size denoising queries placed *before* the N matching queries):
  group g occupies [g * 2M, (g + 1) * 2M) with M = the largest GT count of the batch: slots [0, M) of the group are
  positives of GT 0..M-1, slots [M, 2M) negatives of GT 0..M-1; an image with K < M boxes leaves padded slots.
  ``num_groups = dn_num_queries // (2 M)``, at least 1 when the batch has any GT.
Self-attention mask (True = blocked): matching queries cannot see denoising queries (they would copy the GT);
a denoising group cannot see other groups (each group is an independent reconstruction task); padded slots are
invisible to every query but themselves. Denoising queries may look at matching queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

MIN_BOX_SIZE = 1e-3          # smallest width / height of a noised box, in normalised units
OBJECT, NOISE = 0, 1         # rows of the denoising content embedding


@dataclass
class DenoisingQueries:
    """The denoising part of the decoder input (D queries) and its supervision.

    content: (B, D, d) content embeddings; boxes: (B, D, 4) noised cxcywh reference boxes;
    objectness_target: (B, D) float, 1 for positives and 0 for negatives;
    gt_index: (B, D) long, the GT index a positive reconstructs, -1 for negatives and padded slots;
    valid: (B, D) bool, False for padded slots (excluded from every loss);
    attn_mask: (B, D + N, D + N) bool self-attention mask over [denoising, matching] queries, True = blocked.
    """

    content: torch.Tensor
    boxes: torch.Tensor
    objectness_target: torch.Tensor
    gt_index: torch.Tensor
    valid: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def noise_boxes(boxes: torch.Tensor, noise_scale: float, negative: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Contrastively noised copies of boxes.

    Args:
        boxes: (K, 4) cxcywh in [0, 1].
        noise_scale: lambda.
        negative: False -> corner shifts in [0, lambda) half-sizes; True -> in [lambda, 2 lambda) half-sizes.

    Returns:
        (K, 4) valid cxcywh boxes in [0, 1] (x1 < x2, y1 < y2, size >= MIN_BOX_SIZE).
    """
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:], boxes[:, 2:]], dim=1) * 0.5               # (K, 4) w/2 h/2 w/2 h/2
    sign = torch.randint(0, 2, xyxy.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    magnitude = torch.rand(xyxy.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    if negative:
        magnitude = magnitude + 1.0
    xyxy = (xyxy + sign * magnitude * half * noise_scale).clamp(0.0, 1.0)
    x1, x2 = torch.minimum(xyxy[:, 0], xyxy[:, 2]), torch.maximum(xyxy[:, 0], xyxy[:, 2])
    y1, y2 = torch.minimum(xyxy[:, 1], xyxy[:, 3]), torch.maximum(xyxy[:, 1], xyxy[:, 3])
    out = box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], dim=1))
    wh = out[:, 2:].clamp(min=MIN_BOX_SIZE)
    centre = torch.minimum(torch.maximum(out[:, :2], wh * 0.5), 1.0 - wh * 0.5)
    return torch.cat([centre, wh], dim=1)


def denoising_attention_mask(num_groups: int, group_size: int, num_matching: int, valid: torch.Tensor
                             ) -> torch.Tensor:
    """Self-attention mask over [D denoising queries, N matching queries] (see the module docstring).

    Args:
        num_groups, group_size: D = num_groups * group_size.
        num_matching: N.
        valid: (B, D) bool, False for padded denoising slots.

    Returns:
        (B, D + N, D + N) bool, True where query i (row) may not attend to query j (column).
    """
    batch, num_dn = valid.shape
    total = num_dn + num_matching
    device = valid.device
    blocked = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    blocked[:, num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // group_size
    blocked[:, :num_dn, :num_dn] = group[:, None] != group[None, :]
    eye = torch.eye(num_dn, dtype=torch.bool, device=device)
    padded_key = ~valid[:, None, :] & ~eye                                     # (B, D, D)
    blocked[:, :, :num_dn] |= torch.cat([padded_key, (~valid)[:, None, :].expand(-1, num_matching, -1)], dim=1)
    return blocked


def build_denoising_queries(targets: list[dict], num_matching: int, content_embedding: torch.Tensor,
                            dn_num_queries: int, box_noise_scale: float, label_noise_ratio: float,
                            generator: torch.Generator | None = None) -> DenoisingQueries | None:
    """Denoising queries for a batch, or None when there is nothing to denoise (no GT, or dn_num_queries = 0).

    Args:
        targets: per image, ``boxes`` (K_i, 4) cxcywh normalised (``box_ops.normalize_targets``).
        num_matching: N, the number of matching queries that follow the denoising ones.
        content_embedding: (2, d) learned embeddings, row OBJECT and row NOISE.
        dn_num_queries: budget of denoising queries per image (``image_encoder.dn_num_queries``).
        box_noise_scale, label_noise_ratio: ``image_encoder.dn_box_noise_scale`` / ``dn_label_noise_ratio``.
    """
    max_gt = max((t["boxes"].shape[0] for t in targets), default=0)
    if max_gt == 0 or dn_num_queries <= 0:
        return None
    device = content_embedding.device
    batch = len(targets)
    group_size = 2 * max_gt
    num_groups = max(dn_num_queries // group_size, 1)
    num_dn = num_groups * group_size
    # Filled through (B, groups, 2M, ...) views of the flat (B, D, ...) tensors.
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(batch, num_dn, 1)   # padded slots: whole image
    objectness = torch.zeros(batch, num_dn, device=device)
    gt_index = torch.full((batch, num_dn), -1, dtype=torch.long, device=device)
    valid = torch.zeros(batch, num_dn, dtype=torch.bool, device=device)

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, num_groups, group_size, *x.shape[2:])

    for b, t in enumerate(targets):
        gt = t["boxes"].to(device=device, dtype=torch.float32)
        k = gt.shape[0]
        if k == 0:
            continue
        repeated = gt.repeat(num_groups, 1)                                              # (groups * k, 4)
        grouped(boxes)[b, :, :k] = noise_boxes(repeated, box_noise_scale, False, generator).view(num_groups, k, 4)
        grouped(boxes)[b, :, max_gt:max_gt + k] = noise_boxes(repeated, box_noise_scale, True,
                                                              generator).view(num_groups, k, 4)
        grouped(objectness)[b, :, :k] = 1.0
        grouped(gt_index)[b, :, :k] = torch.arange(k, device=device)
        grouped(valid)[b, :, :k] = True
        grouped(valid)[b, :, max_gt:max_gt + k] = True
    flip = torch.rand(batch, num_dn, generator=generator, device=device) < label_noise_ratio * 0.5
    content = content_embedding[flip.long()]                                    # (B, D, d)
    attn_mask = denoising_attention_mask(num_groups, group_size, num_matching, valid)
    return DenoisingQueries(content=content, boxes=boxes, objectness_target=objectness, gt_index=gt_index,
                            valid=valid, attn_mask=attn_mask, num_groups=num_groups, group_size=group_size)
