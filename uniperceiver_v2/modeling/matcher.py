"""Hungarian matching of class-agnostic proposals to ground-truth objects (DETR / Mask DINO, binary objectness).

For one image with N predictions and K ground-truth objects, the cost of assigning prediction i to object j is

    C[i, j] = c_cls * focal(i) + c_L1 * |b_i - b_j|_1 - c_giou * GIoU(b_i, b_j)
              + c_mask * BCE(m_i, m_j) + c_dice * (1 - dice(m_i, m_j))

with Tab. 7's coefficients (cls 2, bbox 5, giou 2, mask 5, dice 5). The objectness cost is the focal loss of
calling i an object minus that of calling it background (DINO):
    focal(i) = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)),   p = sigmoid(objectness_i).
Boxes are cxcywh for L1 and xyxy for GIoU. Mask costs compare the mask logits with the GT masks at P points drawn
uniformly once per image and shared by all pairs (Mask2Former); BCE is averaged over the points. The assignment
minimising the summed cost (each object gets one prediction, min(N, K) pairs) is found by scipy's
``linear_sum_assignment`` without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from uniperceiver_v2.modeling.point_sampling import point_sample


def pairwise_focal_cost(logits: torch.Tensor, alpha: float, gamma: float = 2.0) -> torch.Tensor:
    """(N,) objectness logits -> (N,) focal cost of labelling each prediction "object" rather than "background"."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -F.logsigmoid(-logits)
    pos = alpha * (1 - prob) ** gamma * -F.logsigmoid(logits)
    return pos - neg


def pairwise_mask_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) mask logits at points, (K, P) binary targets at the same points -> (N, K) mean BCE over points."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) mask logits, (K, P) binary targets -> (N, K) 1 - dice, dice = (2 |p t| + 1) / (|p| + |t| + 1)."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher:
    """One-to-one assignment of predictions to GT objects per image (see the module docstring)."""

    def __init__(self, cost_objectness: float, cost_bbox: float, cost_giou: float, cost_mask: float,
                 cost_dice: float, num_points: int, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        self.cost_objectness, self.cost_bbox, self.cost_giou = cost_objectness, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.num_points, self.focal_alpha, self.focal_gamma = num_points, focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None,
                    gt_boxes: torch.Tensor, gt_masks: torch.Tensor | None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Cost of every (prediction, GT) pair of one image.

        Args:
            logits: (N,) objectness logits; boxes: (N, 4) cxcywh; masks: (N, Hm, Wm) logits or None.
            gt_boxes: (K, 4) cxcywh; gt_masks: (K, H, W) {0, 1} on the same canvas as ``masks``, or None.

        Returns:
            (N, K) float cost.
        """
        cost = self.cost_objectness * pairwise_focal_cost(logits.float(), self.focal_alpha, self.focal_gamma)[:, None]
        cost = cost + self.cost_bbox * torch.cdist(boxes.float(), gt_boxes.float(), p=1)
        cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()),
                                                           box_cxcywh_to_xyxy(gt_boxes.float()))
        if masks is not None and gt_masks is not None and (self.cost_mask or self.cost_dice):
            points = torch.rand(1, self.num_points, 2, device=masks.device, generator=generator)
            pred = point_sample(masks[:, None].float(), points.expand(masks.shape[0], -1, -1))[:, 0]      # (N, P)
            gt = point_sample(gt_masks[:, None].float(), points.expand(gt_masks.shape[0], -1, -1))[:, 0]  # (K, P)
            cost = cost + self.cost_mask * pairwise_mask_bce_cost(pred, gt)
            cost = cost + self.cost_dice * pairwise_dice_cost(pred, gt)
        return cost

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None, targets: list[dict],
                 generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match a batch.

        Args:
            logits: (B, N) objectness logits; boxes: (B, N, 4) cxcywh; masks: (B, N, Hm, Wm) logits or None.
            targets: per image ``boxes`` (K, 4) cxcywh and, when masks are matched, ``masks`` (K, H, W).

        Returns:
            per image (prediction indices, GT indices), two (min(N, K),) long tensors on the CPU.
        """
        indices = []
        for b, t in enumerate(targets):
            if t["boxes"].shape[0] == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], None if masks is None else masks[b], t["boxes"],
                                    t.get("masks"), generator)
            if not torch.isfinite(cost).all():
                raise FloatingPointError(f"matching cost of image {b} is not finite (NaN/inf predictions?)")
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices
