"""Losses of the region proposal network (appendix A "Loss Function", Tab. 7 coefficients).

"We predict objectness, bounding box, and segmentation mask for each proposal at the outputs of Transformer
encoder and each Transformer decoder layer, and detection losses with binary classification are applied to each
output as an intermediate supervision." For every prediction set (the top-N encoder proposals ``enc``, every
decoder layer ``dec{i}``) the predictions are Hungarian-matched to the GT (``matcher.HungarianMatcher``), then

    focal  = sum over all queries of sigmoid_focal(objectness, matched ? 1 : 0)     (alpha = focal_alpha, gamma = 2)
    l1     = sum over matched pairs of |b - b_gt|_1 (cxcywh)
    giou   = sum over matched pairs of 1 - GIoU(b, b_gt)
    mask   = sum over matched pairs of mean BCE at P importance-sampled points
    dice   = sum over matched pairs of 1 - dice at the same points

each divided by the number of GT objects in the global batch (summed over ranks, at least 1) and multiplied by its
coefficient (cls_loss_coef, bbox_loss_coef, giou_loss_coef, mask_loss_coef, dice_loss_coef). Points: Mask2Former's
point loss with ``oversample_ratio`` and ``importance_sample_ratio`` (uncertainty = -|logit|), ``mask_points`` per
mask (112 x 112 in the paper).

Denoising sets (``dn{i}``, one per decoder layer) need no matching: positives reconstruct their GT, negatives
(and, through the focal term only, nothing else) predict background; padded slots are ignored; the normaliser is
multiplied by the number of denoising groups (DINO). An image without objects contributes only the focal term,
which pushes every objectness down.

The returned dict holds one weighted scalar per (set, term), e.g. ``rpn_enc_focal``, ``rpn_dec1_giou``,
``rpn_dn0_dice``; callers sum them (and may log them separately).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.ops as tv_ops

from uniperceiver_v2.config import ImageEncoderConfig
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou_loss
from uniperceiver_v2.modeling.denoising import DenoisingQueries
from uniperceiver_v2.modeling.matcher import HungarianMatcher
from uniperceiver_v2.modeling.point_sampling import point_sample, sample_uncertain_points


@dataclass
class PredictionSet:
    """One set of class-agnostic predictions: objectness (B, Q) logits, boxes (B, Q, 4) cxcywh normalised to the
    unpadded image, masks (B, Q, Hm, Wm) logits at stride 4 of the padded image."""

    objectness: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor

    def select(self, index: slice) -> PredictionSet:
        """The queries ``index`` (a slice along Q) of every tensor."""
        return PredictionSet(self.objectness[:, index], self.boxes[:, index], self.masks[:, index])


def num_objects_global(targets: list[dict], device: torch.device, synchronize: bool = True) -> float:
    """GT objects in the batch averaged over ranks (all-reduced when torch.distributed is initialised and
    ``synchronize``; otherwise this rank's own count), >= 1."""
    count = torch.tensor([float(sum(t["boxes"].shape[0] for t in targets))], device=device)
    if synchronize and dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(count.item(), 1.0)


class RegionProposalCriterion:
    """Weighted region-proposal losses of all prediction sets (see the module docstring)."""

    def __init__(self, cfg: ImageEncoderConfig):
        self.cfg = cfg
        # Average the object count over ranks (Deformable DETR / Mask DINO). Only safe when every rank computes these
        # losses in the same micro-batch: under mixed sampling another rank may be running another task, and this
        # all-reduce would meet its gradient all-reduce (the model switches it off then, ``UniPerceiverV2``).
        self.synchronize_counts = True
        self.matcher = HungarianMatcher(cfg.cls_cost_coef, cfg.bbox_cost_coef, cfg.giou_cost_coef,
                                        cfg.mask_cost_coef, cfg.dice_cost_coef, cfg.mask_points, cfg.focal_alpha)
        self.weights = {"focal": cfg.cls_loss_coef, "l1": cfg.bbox_loss_coef, "giou": cfg.giou_loss_coef,
                        "mask": cfg.mask_loss_coef, "dice": cfg.dice_loss_coef}

    # -- the five terms -----------------------------------------------------------------------------------------
    def focal_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                   normalizer: float) -> torch.Tensor:
        """logits, target (B, Q) (target in {0, 1}), weight (B, Q) or None -> scalar."""
        loss = tv_ops.sigmoid_focal_loss(logits, target, alpha=self.cfg.focal_alpha, gamma=2.0, reduction="none")
        if weight is not None:
            loss = loss * weight
        return loss.sum() / normalizer

    @staticmethod
    def box_losses(boxes: torch.Tensor, gt_boxes: torch.Tensor, normalizer: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched (M, 4) predicted and GT cxcywh boxes -> (L1, GIoU) scalars."""
        l1 = F.l1_loss(boxes, gt_boxes, reduction="sum") / normalizer
        giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes)).sum() / normalizer
        return l1, giou

    def mask_losses(self, masks: torch.Tensor, gt_masks: torch.Tensor, normalizer: float,
                    points: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched (M, Hm, Wm) mask logits and (M, H, W) GT masks of the same canvas -> (BCE, dice) scalars.

        ``points`` (M, P, 2) overrides the importance sampling (tests compare against dense computations).
        """
        if masks.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        cfg = self.cfg
        if points is None:
            points = sample_uncertain_points(masks[:, None], cfg.mask_points, cfg.oversample_ratio,
                                             cfg.importance_sample_ratio)                        # (M, P, 2)
        with torch.no_grad():
            gt = point_sample(gt_masks[:, None].to(masks.dtype), points)[:, 0]                  # (M, P)
        logits = point_sample(masks[:, None], points)[:, 0]                                      # (M, P)
        bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none").mean(1).sum() / normalizer
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * gt).sum(-1) + 1) / (prob.sum(-1) + gt.sum(-1) + 1)
        return bce, dice.sum() / normalizer

    # -- one prediction set --------------------------------------------------------------------------------------
    def _set_losses(self, name: str, preds: PredictionSet, targets: list[dict],
                    pred_index: list[torch.Tensor], gt_index: list[torch.Tensor], objectness_target: torch.Tensor,
                    objectness_weight: torch.Tensor | None, normalizer: float) -> dict[str, torch.Tensor]:
        device = preds.boxes.device
        batch_idx = torch.cat([torch.full_like(p, b) for b, p in enumerate(pred_index)]).to(device)
        src = torch.cat(pred_index).to(device)
        boxes = preds.boxes[batch_idx, src]
        gt_boxes = torch.cat([t["boxes"][g.to(device)] for t, g in zip(targets, gt_index)])
        masks = preds.masks[batch_idx, src]
        gt_masks = torch.cat([t["masks"][g.to(device)] for t, g in zip(targets, gt_index)])
        l1, giou = self.box_losses(boxes, gt_boxes, normalizer)
        bce, dice = self.mask_losses(masks, gt_masks, normalizer)
        raw = {"focal": self.focal_loss(preds.objectness, objectness_target, objectness_weight, normalizer),
               "l1": l1, "giou": giou, "mask": bce, "dice": dice}
        return {f"rpn_{name}_{term}": self.weights[term] * value for term, value in raw.items()}

    def matched_losses(self, name: str, preds: PredictionSet, targets: list[dict], normalizer: float
                       ) -> dict[str, torch.Tensor]:
        """Hungarian-match one set to the targets and compute its five weighted terms."""
        indices = self.matcher(preds.objectness, preds.boxes, preds.masks, targets)
        objectness_target = torch.zeros_like(preds.objectness)
        for b, (src, _) in enumerate(indices):
            objectness_target[b, src.to(objectness_target.device)] = 1.0
        return self._set_losses(name, preds, targets, [i for i, _ in indices], [j for _, j in indices],
                                objectness_target, None, normalizer)

    def denoising_losses(self, name: str, preds: PredictionSet, denoising: DenoisingQueries, targets: list[dict],
                         normalizer: float) -> dict[str, torch.Tensor]:
        """One decoder layer's denoising queries: positives reconstruct their GT, negatives predict background."""
        positive = denoising.gt_index >= 0
        pred_index = [positive[b].nonzero().flatten().cpu() for b in range(len(targets))]
        gt_index = [denoising.gt_index[b, positive[b]].cpu() for b in range(len(targets))]
        return self._set_losses(name, preds, targets, pred_index, gt_index, denoising.objectness_target,
                                denoising.valid.to(preds.objectness.dtype), normalizer * denoising.num_groups)

    def __call__(self, predictions: dict[str, PredictionSet], targets: list[dict],
                 denoising: DenoisingQueries | None = None,
                 denoising_predictions: dict[str, PredictionSet] | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            predictions: named matching sets, e.g. {"enc": ..., "dec0": ..., "dec1": ...}.
            targets: per image ``boxes`` (K, 4) cxcywh normalised and ``masks`` (K, H, W) on the padded canvas
                (``box_ops.normalize_targets`` with ``padded_size``).
            denoising, denoising_predictions: the denoising queries and their per-layer predictions, or None.

        Returns:
            weighted scalar losses keyed ``rpn_{set}_{term}``.
        """
        device = next(iter(predictions.values())).boxes.device
        normalizer = num_objects_global(targets, device, self.synchronize_counts)
        losses: dict[str, torch.Tensor] = {}
        for name, preds in predictions.items():
            losses.update(self.matched_losses(name, preds, targets, normalizer))
        if denoising is not None and denoising_predictions:
            for name, preds in denoising_predictions.items():
                losses.update(self.denoising_losses(name, preds, denoising, targets, normalizer))
        return losses
