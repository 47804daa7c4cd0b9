"""Object detection and instance segmentation by decoding the regional representations (v2 Sec. 4.3, "Tasks with
Localization").

    input x   = [<SPE>, f_image(x)] = [<SPE>, global tokens, q^proposal_1 .. q^proposal_O]     (v2 eq. (1), (2))
    targets Y = { [<SPE>, f_text(class name)] }
    logits[j, c] = cos(g(x)_{proposal j}, g(y_c)_<SPE>) / tau_det                                (v2 eq. (5), (6))

"for each region proposal q_j^proposal, its outputted feature from the unified decoder g will be compared with class
embeddings to obtain the class prediction ... The corresponding bounding box q_j^box and segmentation mask q_j^mask
will serve as the localization predictions." There is no box or class head here: boxes, masks and objectness come
from the region proposal network, which the image encoder trains with its own (class-agnostic) losses; those
losses are added to this task's loss, times ``tasks.detection.proposal_loss_weight`` (1 = their plain sum; the
logged ``loss_rpn`` is the unweighted sum).

Class labels of the proposals (our choice; the paper does not say). The proposal network already decides which
proposals are objects: its objectness is trained with one-to-one Hungarian matching, so duplicates and background
get low objectness. The class loss only has to name the objects, so each of the O proposals takes the class of the
ground-truth box it overlaps most when that IoU is >= 0.5 (``IOU_THRESHOLD``), and every ground-truth box also
names its best-overlapping proposal (the "low-quality match" of Faster R-CNN, so that each object teaches its
class from the first step, before the proposals are good). Other proposals get no class loss (background is the
objectness' job). This gives the class embeddings more supervision than a one-to-one match would.

Score of a detection (proposal j, class c): sigmoid(objectness_j) * softmax_c(logits_j), the probability that j is
an object times the probability that it is a c. The ``max_detections`` best (j, c) pairs of an image are kept
(a proposal may appear with more than one class, as in DETR-style evaluation; no NMS: duplicates have low
objectness).

Boxes from masks (``tasks.detection.mask_box_iou``, our addition, inference only): the mask head is read at full
resolution while the box head regresses four numbers, so a mask's tight box is often the better box; a detection's
box becomes its mask's tight box when the two overlap with IoU >= ``mask_box_iou`` (a mask far from its box is
left alone: it is more often a mask that missed than a box that did). Mask DINO initialises its decoder's boxes from
its masks for the same reason.

Calibrated stacking (Chao et al., ECCV 2016; evaluation only, our addition): a detector trained on seen names only
gives them higher logits than the names it never trained on, whatever the object. ``seen_penalty`` gamma is
subtracted from the logits of ``seen_names`` before the softmax, so a novel object's novel name can win.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision.ops import nms

from uniperceiver_v2.data.collate import collate_detection
from uniperceiver_v2.data.samples import DetectionSample
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou
from uniperceiver_v2.modeling.decoder_inputs import build_sequence, image_segment, spe_segment
from uniperceiver_v2.modeling.image_encoder import ImageEncoderOutput, postprocess
from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.losses import IGNORE_INDEX, unified_loss

__all__ = ["IOU_THRESHOLD", "DetectionTask", "DetectionTaskBatch", "assign_proposal_labels", "mask_tight_box",
           "region_logits", "suppress_duplicates", "to_coco_results"]

IOU_THRESHOLD = 0.5


@dataclass
class DetectionTaskBatch:
    """A detection batch with its candidate class names.

    Attributes:
        images: (B, 3, H, W) normalised, padded; padding_mask: (B, H, W) bool; image_sizes: (B, 2) (h, w) unpadded.
        boxes: B tensors (K_b, 4) xyxy absolute pixels of the transformed image (None at inference).
        labels: B tensors (K_b,) long indices into ``class_names`` (None at inference).
        masks: B tensors (K_b, h, w) bool, or None.
        image_ids: B dataset image ids; orig_sizes: (B, 2) long (H0, W0) of the images before the transform.
        class_names: the C candidate names; category_ids: the dataset's category id of each name.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    image_sizes: torch.Tensor
    boxes: list[torch.Tensor] | None
    labels: list[torch.Tensor] | None
    masks: list[torch.Tensor] | None
    image_ids: list[int]
    orig_sizes: torch.Tensor
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def to(self, device: torch.device | str) -> DetectionTaskBatch:
        def move(items):
            return None if items is None else [t.to(device) for t in items]

        return replace(self, images=self.images.to(device), padding_mask=self.padding_mask.to(device),
                       image_sizes=self.image_sizes.to(device), boxes=move(self.boxes), labels=move(self.labels),
                       masks=move(self.masks), orig_sizes=self.orig_sizes.to(device))


def assign_proposal_labels(proposal_boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                           iou_threshold: float = IOU_THRESHOLD) -> torch.Tensor:
    """Class label of every proposal of one image (see the module docstring).

    Args:
        proposal_boxes: (O, 4) xyxy; gt_boxes: (K, 4) xyxy, same coordinates; gt_labels: (K,) long.
        iou_threshold: minimum IoU with a ground-truth box to take its class.

    Returns:
        (O,) long class index, ``IGNORE_INDEX`` for proposals without a class loss.
    """
    labels = torch.full((proposal_boxes.shape[0],), IGNORE_INDEX, dtype=torch.long, device=proposal_boxes.device)
    if gt_boxes.shape[0] == 0 or proposal_boxes.shape[0] == 0:
        return labels
    iou = box_iou(proposal_boxes, gt_boxes)                                  # (O, K)
    best_iou, best_gt = iou.max(dim=1)
    matched = best_iou >= iou_threshold
    labels[matched] = gt_labels[best_gt[matched]]
    best_proposal_iou, best_proposal = iou.max(dim=0)                        # per ground truth
    overlapping = best_proposal_iou > 0
    labels[best_proposal[overlapping]] = gt_labels[overlapping]
    return labels


def suppress_duplicates(boxes: torch.Tensor, objectness: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-agnostic non-maximum suppression of proposals (``tasks.detection.nms_threshold``).

    The overlaps are those of the boxes clipped to the image, as ``modeling.image_encoder.postprocess`` returns
    them and the evaluator scores them: two proposals that reach past an edge can overlap more once clipped than
    before. The boxes are normalised to the unpadded image, so clipping to [0, 1] is clipping to the image, and IoU
    does not change when each axis is scaled to pixels.

    Args:
        boxes: (B, O, 4) cxcywh normalised to the unpadded image; objectness: (B, O) probabilities;
            iou_threshold: a proposal overlapping a higher-scoring one with IoU above it is suppressed.

    Returns:
        (B, O) objectness with the suppressed proposals' set to 0 (they drop to the bottom of the ranking).
    """
    kept = torch.zeros_like(objectness)
    xyxy = box_cxcywh_to_xyxy(boxes.float()).clamp(0.0, 1.0)                        # clipped to the image
    for b in range(boxes.shape[0]):
        keep = nms(xyxy[b], objectness[b].float(), iou_threshold)
        kept[b, keep] = objectness[b, keep]
    return kept


def region_logits(model, image: ImageEncoderOutput, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The detection task's naming of proposals: v2 eq. (6) logits (B, O, C) of every kept proposal's regional token
    (decoded as ``[<SPE>, image tokens]`` with the detection task's attributes) against every class name's
    ``g(f(name))`` under the detection task, and the decoder's MoE auxiliary loss. Shared by ``DetectionTask`` and
    by the classification task's region-naming term (``tasks.classification.region_name_weight``)."""
    if image.boxes is None:
        raise ValueError("detection needs regional representations: image_encoder.use_regional=true")
    segments = [spe_segment(model.decoder, image.tokens.shape[0]),
                image_segment(model.decoder, image.tokens, image.token_types, image.token_padding_mask)]
    out = build_sequence(segments, DetectionTask.name, is_input=True).run(model.decoder)
    num_proposals = image.boxes.shape[1]
    regional = out.hidden[:, -num_proposals:]                                 # the regional tokens are the last O
    classes = model.class_name_embeddings(class_names, DetectionTask.name)   # (C, d)
    logits = model.similarity(regional.flatten(0, 1), classes, DetectionTask.name)
    return logits.view(*regional.shape[:2], -1), out.aux_loss


def mask_tight_box(mask: torch.Tensor) -> torch.Tensor | None:
    """The tight xyxy box (4,) float of a (H, W) bool mask in pixel edges (a mask of the single pixel (y, x) gives
    [x, y, x + 1, y + 1], as pycocotools' ``toBbox``), or None for an empty mask."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()


def to_coco_results(predictions: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int]
                    ) -> list[dict]:
    """Per-image predictions (``DetectionTask.predict``) -> COCO result records.

    Returns:
        one dict per detection: ``image_id``, ``category_id`` (the dataset's id of the class), ``bbox``
        [x, y, w, h] in original pixels, ``score``, and ``segmentation`` (compressed RLE with a str ``counts``)
        when the prediction has masks. ``pycocotools.COCO.loadRes`` accepts the list.
    """
    results = []
    for prediction, image_id in zip(predictions, image_ids):
        boxes = prediction["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = prediction["scores"].detach().cpu().tolist()
        labels = prediction["labels"].detach().cpu().tolist()
        masks = prediction.get("masks")
        rles = None
        if masks is not None:
            array = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(array)
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            record = {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box,
                      "score": float(score)}
            if rles is not None:
                # pycocotools returns the counts as bytes; JSON (and loadRes after a round trip) needs str
                record["segmentation"] = {"size": [int(s) for s in rles[k]["size"]],
                                          "counts": rles[k]["counts"].decode("ascii")}
            results.append(record)
    return results


class DetectionTask(Task):
    """Detection and instance segmentation against ``class_names``.

    Args:
        config: ``tasks.detection`` (``segmentation``: return masks; ``max_detections`` per image).
        class_names: the dataset's class names (``CocoInstances.class_names``), label order.
        category_ids: the dataset's category id of each class (``CocoInstances.label_to_category_id``); default
            the label index itself.
        seen_names, seen_penalty: calibrated stacking at inference: ``detect`` subtracts ``seen_penalty`` from the
            logits of the candidate names in ``seen_names`` (the names detection trained on); 0 = plain scores.
    """

    name = "detection"

    def __init__(self, config, class_names: Sequence[str] = (), category_ids: Sequence[int] | None = None,
                 seen_names: Sequence[str] = (), seen_penalty: float = 0.0):
        super().__init__(config)
        if seen_penalty < 0:
            raise ValueError(f"DetectionTask: seen_penalty must be >= 0, got {seen_penalty}")
        self.seen_names, self.seen_penalty = frozenset(seen_names), float(seen_penalty)
        self.class_names = tuple(class_names)
        self.category_ids = tuple(range(len(class_names)) if category_ids is None else category_ids)
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(f"DetectionTask: {len(self.category_ids)} category ids for {len(self.class_names)} "
                             f"class names")

    @classmethod
    def from_dataset(cls, config, dataset) -> DetectionTask:
        return cls(config, class_names=dataset.class_names, category_ids=dataset.label_to_category_id)

    def collate(self, samples: Sequence[DetectionSample]) -> DetectionTaskBatch:
        if not self.class_names:
            raise ValueError("DetectionTask: no class names; build the task with class_names= or from_dataset")
        batch = collate_detection(samples)
        return DetectionTaskBatch(batch.images, batch.padding_mask, batch.image_sizes, batch.boxes, batch.labels,
                                  batch.masks, batch.image_ids, torch.tensor(batch.orig_sizes, dtype=torch.long),
                                  self.class_names, self.category_ids)

    def region_logits(self, model, image: ImageEncoderOutput, class_names: Sequence[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """v2 eq. (6) logits (B, O, C) of every kept proposal against every class name, and the MoE aux loss."""
        return region_logits(model, image, class_names)

    def loss(self, model, batch: DetectionTaskBatch) -> dict[str, torch.Tensor]:
        if batch.boxes is None or batch.labels is None:
            raise ValueError("DetectionTask.loss: the batch has no boxes / labels")
        if batch.masks is None:
            raise ValueError("DetectionTask.loss: the batch has no instance masks; the region proposal network is "
                             "trained with mask losses (read the data with CocoInstances(with_masks=True))")
        targets = [{"boxes": boxes, "masks": masks, "labels": labels, "size": size}
                   for boxes, masks, labels, size in zip(batch.boxes, batch.masks, batch.labels, batch.image_sizes)]
        image = model.encode_images(batch.images, batch.padding_mask, targets)
        logits, aux = self.region_logits(model, image, batch.class_names)
        with torch.no_grad():
            height, width = image.image_sizes[:, 0], image.image_sizes[:, 1]
            scale = torch.stack([width, height, width, height], dim=1).to(image.boxes.dtype)       # (B, 4)
            proposals = box_cxcywh_to_xyxy(image.boxes) * scale[:, None]                         # (B, O, 4)
            labels = torch.stack([assign_proposal_labels(p, b.to(p.dtype), gt_labels)
                                  for p, b, gt_labels in zip(proposals, batch.boxes, batch.labels)])
        loss_rpn = torch.stack(list(image.losses.values())).sum()
        terms = {"loss_cls": unified_loss(logits.flatten(0, 1), labels.flatten(), self.config.label_smoothing),
                 "loss_rpn": loss_rpn, "loss_moe_aux": aux}
        weighted = {**terms, "loss_rpn": self.config.proposal_loss_weight * loss_rpn}
        rpn_terms = {name: value.detach() for name, value in image.losses.items()}
        return {**rpn_terms, **terms, "loss": self.weighted_total(weighted)}

    @torch.no_grad()
    def detect(self, model, images: torch.Tensor, padding_mask: torch.Tensor | None, orig_sizes: torch.Tensor,
               class_names: Sequence[str], score_threshold: float = 0.0,
               encode_mask: Callable[[torch.Tensor], object] | None = None) -> list[dict]:
        """Detections of B images.

        Masks are pasted at the original resolution one proposal at a time, and only for the detections that are
        kept (a proposal kept with several classes is pasted once): upsampling all K mask logits at once would
        hold two float copies, 8 * K * H0 * W0 bytes (2.9 GB for the 40 masks of a 3000 x 3000 image).

        Args:
            images: (B, 3, H, W) normalised, padded; padding_mask: (B, H, W) bool or None.
            orig_sizes: (B, 2) (H0, W0) of the original images (boxes and masks are returned in their pixels; the
                transformed image must be a resize of the original, as in evaluation).
            class_names: the C candidate names.
            score_threshold: detections scoring below it are dropped (before their masks are pasted).
            encode_mask: applied to each kept detection's mask (H0, W0) bool as soon as it is pasted; ``masks`` is
                then the list of its K results instead of a (K, H0, W0) tensor, and at most one full-resolution
                mask exists at a time.

        Returns:
            per image, sorted by score: ``boxes`` (K, 4) float xyxy original pixels, ``scores`` (K,),
            ``labels`` (K,) long indices into ``class_names``, and ``masks`` (K, H0, W0) bool (or the list of
            ``encode_mask`` results) when ``tasks.detection.segmentation``; K <= min(max_detections, O * C).
        """
        image = model.encode_images(images, padding_mask)
        logits, _ = self.region_logits(model, image, class_names)
        return self.select_detections(image, logits, orig_sizes, class_names, self.seen_penalty, score_threshold,
                                      encode_mask, self.config.segmentation, {})

    @torch.no_grad()
    def detect_penalised(self, model, images: torch.Tensor, padding_mask: torch.Tensor | None,
                         orig_sizes: torch.Tensor, class_names: Sequence[str],
                         penalties: Sequence[float]) -> dict[float, list[dict]]:
        """``detect``'s boxes once per calibrated-stacking gamma of ``penalties``, from one forward pass.

        The penalty acts on the logits after the network (``seen_penalty``), so the image encoder and the region
        logits are computed once and only the selection (softmax, top-k, boxes from masks) is repeated; a proposal's
        box-from-mask is computed once for all gammas. Boxes, scores and labels only (no masks).

        Returns:
            {gamma: per-image results as ``detect`` returns them with ``seen_penalty=gamma``}.
        """
        if any(float(gamma) < 0 for gamma in penalties):
            raise ValueError(f"DetectionTask.detect_penalised: penalties must be >= 0, got {list(penalties)}")
        image = model.encode_images(images, padding_mask)
        logits, _ = self.region_logits(model, image, class_names)
        tight_boxes: dict[tuple[int, int], torch.Tensor | None] = {}
        return {float(gamma): self.select_detections(image, logits, orig_sizes, class_names, float(gamma), 0.0, None,
                                                     False, tight_boxes)
                for gamma in penalties}

    def select_detections(self, image, logits: torch.Tensor, orig_sizes: torch.Tensor, class_names: Sequence[str],
                          seen_penalty: float, score_threshold: float, encode_mask, segmentation: bool,
                          tight_boxes: dict[tuple[int, int], torch.Tensor | None]) -> list[dict]:
        """The detections of an encoded batch (``image``, the image encoder's output) from its region logits
        (B, O, C): what ``detect`` does after the network (calibrated stacking with ``seen_penalty``, v2 eq. (5)'s
        softmax times objectness, top-k, boxes from masks, masks when ``segmentation``). ``tight_boxes`` caches each
        proposal's box-from-mask by (image, proposal) across calls on the same batch."""
        if seen_penalty and self.seen_names:
            seen = torch.tensor([name in self.seen_names for name in class_names], device=logits.device)
            logits = logits - seen_penalty * seen.to(logits.dtype)                           # calibrated stacking
        num_classes = logits.shape[-1]
        objectness = image.objectness.sigmoid()                                               # (B, O)
        if self.config.nms_threshold > 0:
            objectness = suppress_duplicates(image.boxes, objectness, self.config.nms_threshold)
        scores = objectness[..., None] * logits.softmax(dim=-1)                               # (B, O, C)
        top_scores, flat = scores.flatten(1).topk(min(self.config.max_detections, scores[0].numel()), dim=1)
        proposal = torch.div(flat, num_classes, rounding_mode="floor")                        # (B, K)
        labels = flat % num_classes
        boxes = torch.gather(image.boxes, 1, proposal[..., None].expand(-1, -1, 4))          # (B, K, 4) cxcywh
        located = postprocess(boxes, None, image.image_sizes, orig_sizes)
        mask_boxes = self.config.mask_box_iou > 0 and image.masks is not None
        results = []
        for b, place in enumerate(located):
            keep = top_scores[b] >= score_threshold                                          # (K,), a prefix
            result = {"boxes": place["boxes"][keep], "scores": top_scores[b][keep], "labels": labels[b][keep]}
            if segmentation or mask_boxes:
                kept = proposal[b][keep]                                                     # (K',)
                height, width = (int(v) for v in orig_sizes[b].tolist())
                masks = ([None] * len(kept) if encode_mask is not None or not segmentation else
                         torch.zeros(len(kept), height, width, dtype=torch.bool, device=logits.device))
                for j in kept.unique().tolist():
                    rows = (kept == j).nonzero().flatten().tolist()
                    mask = None
                    if segmentation or (b, j) not in tight_boxes:
                        mask = postprocess(image.boxes[b:b + 1, j:j + 1], image.masks[b:b + 1, j:j + 1],
                                           image.image_sizes[b:b + 1], orig_sizes[b:b + 1])[0]["masks"][0]  # (H0, W0)
                    if mask_boxes:
                        if (b, j) not in tight_boxes:
                            tight_boxes[(b, j)] = mask_tight_box(mask)
                        tight = tight_boxes[(b, j)]
                        box = result["boxes"][rows[0]]
                        if tight is not None and box_iou(tight[None], box[None].to(tight.dtype))[0, 0] >= \
                                self.config.mask_box_iou:
                            result["boxes"][rows] = tight.to(result["boxes"].dtype)
                    if segmentation:
                        encoded = mask if encode_mask is None else encode_mask(mask)
                        for row in rows:
                            masks[row] = encoded
                if segmentation:
                    result["masks"] = masks
            results.append(result)
        return results

    def predict(self, model, batch: DetectionTaskBatch) -> list[dict[str, torch.Tensor]]:
        """``detect`` on the batch's images against its class names; ``to_coco_results(predictions,
        batch.image_ids, batch.category_ids)`` gives the COCO result records."""
        return self.detect(model, batch.images, batch.padding_mask, batch.orig_sizes, batch.class_names)
