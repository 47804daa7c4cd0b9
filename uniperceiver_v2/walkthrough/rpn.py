"""The region proposal network on its own: a short class-agnostic training, its AP50, and a look inside one forward
pass (notebooks 01 and 02).

Training (``train_region_proposals``). The image encoder alone, without the unified decoder or any class name,
trained with the region proposal losses of appendix A (``modeling.proposal_criterion``: focal objectness, L1 +
GIoU boxes, BCE + dice masks on the query-selection set and every decoder layer, plus the contrastive denoising
sets). This is the "class-agnostic" half of the detection task: ``tasks.detection`` adds the naming of each
proposal (v2 eq. (5)).
Plain AdamW is enough here: MT-AdamW's normalisation and sampling compensation (Sec. 4.4) only matter when several
tasks share the parameters. One log record per iteration goes to a JSON-lines file that ``viz.plot_curves`` reads.

Evaluation (``evaluate_region_proposals``). Class-agnostic COCO AP with pycocotools (``evaluation.coco``): every
ground-truth object becomes category "object", every one of the O proposals a detection of it scored by
sigmoid(objectness), with its box and its mask (``ImageEncoder.postprocess``). AP50 asks "is each object found by a
proposal with IoU >= 0.5, ranked above the false ones?", which is what the proposal network is trained for.

Tracing (``trace_forward``). ``ImageEncoderOutput`` carries what the model needs plus a few visualisation extras
(encoder objectness maps, all N boxes, the last decoder layer's sampling locations, attention-pool weights). To
teach the forward pass we also want the backbone maps, the projected levels F'_l, the query-selection reference
boxes, and the deformable attention *weights* of an encoder and a decoder layer. They are read with forward hooks
during one ordinary forward call, so the model code stays as it is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from uniperceiver_v2.data.collate import collate_detection
from uniperceiver_v2.data.samples import DetectionBatch, DetectionSample
from uniperceiver_v2.engine.runtime import evaluation_mode
from uniperceiver_v2.metrics.coco import evaluate_coco
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou
from uniperceiver_v2.modeling.denoising import DenoisingQueries
from uniperceiver_v2.modeling.image_encoder import ImageEncoder, ImageEncoderOutput, postprocess
from uniperceiver_v2.modeling.matcher import HungarianMatcher
from uniperceiver_v2.modeling.region_proposal import ANCHOR_BASE_SIZE, RegionProposals
from uniperceiver_v2.tasks.detection import to_coco_results

__all__ = [
    "anchor_size_deviation",
    "LOSS_TERMS",
    "OBJECT_CATEGORY_ID",
    "DeformableAttentionTrace",
    "ForwardTrace",
    "boxes_to_pixels",
    "class_agnostic_ground_truth",
    "denoising_groups",
    "denoising_mask_segments",
    "detection_targets",
    "evaluate_region_proposals",
    "fusion_gradient_norms",
    "loss_table",
    "matching_costs",
    "objectness_inside_boxes",
    "position_levels",
    "predict_proposals",
    "proposal_recall",
    "trace_forward",
    "train_region_proposals",
]

LOSS_TERMS = ("focal", "l1", "giou", "mask", "dice")     # the criterion's five terms, in its order
OBJECT_CATEGORY_ID = 1                                   # the single category of class-agnostic evaluation


# --------------------------------------------------------------------------------------------------------------
# Batches and boxes
# --------------------------------------------------------------------------------------------------------------
def detection_targets(batch: DetectionBatch) -> list[dict[str, torch.Tensor]]:
    """A collated detection batch -> the image encoder's targets (xyxy pixels, masks, labels, size per image)."""
    if batch.masks is None:
        raise ValueError("detection batch has no masks: the region proposal losses need instance masks "
                         "(build CocoInstances with with_masks=True)")
    return [{"boxes": boxes, "masks": masks, "labels": labels, "size": size}
            for boxes, masks, labels, size in zip(batch.boxes, batch.masks, batch.labels, batch.image_sizes)]


def boxes_to_pixels(boxes: torch.Tensor, size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh normalised to an image of ``size`` = (h, w) -> (..., 4) xyxy in its pixels."""
    height, width = (float(v) for v in torch.as_tensor(size).tolist())
    return box_cxcywh_to_xyxy(boxes) * boxes.new_tensor([width, height, width, height])


def anchor_size_deviation(boxes: torch.Tensor, num_levels: int, levels: torch.Tensor | None = None) -> torch.Tensor:
    """How far each box's width and height are from a query-selection anchor side ``ANCHOR_BASE_SIZE * 2^l``
    (``RegionProposalNetwork.anchors``), relative to that side: 0 for a bare anchor, as the untrained box head (zero
    deltas) leaves the reference boxes.

    Args:
        boxes: (..., 4) normalised (cx, cy, w, h), e.g. ``ForwardTrace.query_boxes``.
        num_levels: the feature levels L (``image_encoder.num_feature_levels``).
        levels: optional (...) level of each box's own anchor (``position_levels`` of the selected positions).
            None (default): the nearest of the L anchor sides, which caps the deviation of a square box at about
            1/3 (the sides are a factor 2 apart); given: the box's own anchor side, which the box head refines.

    Returns:
        (...) max(|w - s|, |h - s|) / s, with s the own anchor side or (min over l) the nearest one.
    """
    sides = ANCHOR_BASE_SIZE * 2.0 ** torch.arange(num_levels, dtype=boxes.dtype, device=boxes.device)   # (L,)
    sizes = boxes[..., None, 2:]                                                          # (..., 1, 2)
    deviation = (sizes - sides[:, None]).abs().amax(-1) / sides                           # (..., L)
    if levels is None:
        return deviation.amin(-1)
    levels = torch.as_tensor(levels, device=boxes.device).long()
    if levels.shape != deviation.shape[:-1]:
        raise ValueError(f"levels: expected shape {tuple(deviation.shape[:-1])} (one per box), "
                         f"got {tuple(levels.shape)}")
    if levels.numel() and (levels.min() < 0 or levels.max() >= num_levels):
        raise ValueError(f"levels: expected values in [0, {num_levels}), got {levels.min()}..{levels.max()}")
    return deviation.gather(-1, levels[..., None])[..., 0]


def objectness_inside_boxes(maps: Sequence[torch.Tensor], boxes: torch.Tensor,
                            image_size: Sequence[int]) -> list[tuple[float | None, float | None]]:
    """Per level map, the mean value at the positions whose cell centre lies inside any of ``boxes`` and at the
    others: whether a level's objectness is brighter on the objects than around them.

    Args:
        maps: per level an (H_l, W_l) map (e.g. sigma(objectness)) covering the whole (padded) image.
        boxes: (K, 4) x1 y1 x2 y2 in the image's pixels.
        image_size: (height, width) of the image the maps cover.

    Returns:
        per level (mean inside, mean outside); None where no cell centre falls on that side.
    """
    height, width = (float(v) for v in image_size)
    boxes = boxes.reshape(-1, 4).float()
    out: list[tuple[float | None, float | None]] = []
    for level in maps:
        rows, cols = level.shape[-2:]
        ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * height / rows
        xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * width / cols
        y, x = torch.meshgrid(ys, xs, indexing="ij")                                      # (H_l, W_l) each
        inside = ((x[..., None] >= boxes[:, 0]) & (x[..., None] <= boxes[:, 2])
                  & (y[..., None] >= boxes[:, 1]) & (y[..., None] <= boxes[:, 3])).any(-1)
        values = level.reshape(rows, cols).float()
        out.append(tuple(float(values[side].mean()) if side.any() else None for side in (inside, ~inside)))
    return out


def position_levels(positions: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """The feature level of each flattened encoder position (levels stacked along S, row-major within a level),
    e.g. of ``RegionProposals.selected_positions``.

    Args:
        positions: (...) indices into S = sum_l H_l W_l; spatial_shapes: (L, 2) (H_l, W_l).

    Returns:
        (...) int64 level indices l.
    """
    sizes = torch.as_tensor(spatial_shapes).long().prod(-1)                                 # (L,)
    ends = sizes.cumsum(0).to(positions.device)                                            # (L,) exclusive ends
    if positions.numel() and (positions.min() < 0 or positions.max() >= ends[-1]):
        raise ValueError(f"positions: expected indices in [0, {int(ends[-1])}), got "
                         f"{int(positions.min())}..{int(positions.max())}")
    return torch.bucketize(positions.long(), ends, right=True)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
def _index_batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of dataset indices: epochs of seeded permutations, an epoch's tail continued by the next."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(size, generator=generator).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _term(key: str) -> str:
    """``rpn_{set}_{term}`` -> term."""
    term = key.rsplit("_", 1)[-1]
    if not key.startswith("rpn_") or term not in LOSS_TERMS:
        raise ValueError(f"unexpected region proposal loss name {key!r}: expected rpn_<set>_<term> with term in "
                         f"{LOSS_TERMS}")
    return term


def train_region_proposals(encoder: ImageEncoder, dataset: Dataset, iterations: int, batch_size: int = 4,
                           lr: float = 1e-3, weight_decay: float = 1e-4, grad_clip: float = 0.1, seed: int = 0,
                           log_path: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Train the image encoder's region proposal network alone, class-agnostically (appendix A losses).

    Args:
        encoder: an ``ImageEncoder`` with ``use_regional`` on; trained in place (left in training mode).
        dataset: detection samples with masks (``CocoInstances`` with the detection training transform).
        iterations: optimizer steps; 0 trains nothing.
        batch_size: images per step.
        lr, weight_decay: AdamW's.
        grad_clip: maximum global gradient norm (0 = no clipping). The DETR family clips at 0.1: the one-to-one
            matching makes early gradients jumpy (an object switches query from one step to the next).
        seed: seeds the batch order and torch's global generator, which the augmentation, the denoising noise and
            the mask-loss points draw from, so that a run is repeatable.
        log_path: JSON-lines file written from scratch, one record per iteration; None = no file.
        progress: show a tqdm progress bar (on stderr).

    Returns:
        one record per iteration: ``kind`` ("train"), ``iteration`` (1-based), ``loss`` (the summed weighted losses),
        one entry per term of ``LOSS_TERMS`` (summed over the prediction sets), ``grad_norm`` (before clipping),
        ``lr`` and ``seconds`` (wall time of the step).
    """
    if encoder.region_proposals is None:
        raise ValueError("train_region_proposals: the encoder was built with image_encoder.use_regional=false; "
                         "there is no proposal network to train")
    if iterations < 0:
        raise ValueError(f"train_region_proposals: iterations must be >= 0, got {iterations}")
    if batch_size < 1:
        raise ValueError(f"train_region_proposals: batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("train_region_proposals: the dataset is empty")
    device = _device(encoder)
    torch.manual_seed(seed)
    order = _index_batches(len(dataset), batch_size, torch.Generator().manual_seed(seed))
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    encoder.train()

    records: list[dict] = []
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
    bar = tqdm(range(1, iterations + 1), desc="region proposals", disable=not progress, mininterval=5.0)
    try:
        for iteration in bar:
            start = time.perf_counter()
            batch = collate_detection([dataset[i] for i in next(order)]).to(device)
            out = encoder(batch.images, batch.padding_mask, detection_targets(batch))
            loss = sum(out.losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train_region_proposals: loss is {loss.item()} at iteration {iteration} "
                                         f"(terms: { {k: round(v.item(), 4) for k, v in out.losses.items()} })")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
            optimizer.step()

            record = {"kind": "train", "iteration": iteration, "loss": loss.item()}
            record.update(dict.fromkeys(LOSS_TERMS, 0.0))
            for key, value in out.losses.items():
                record[_term(key)] += value.item()
            record.update(grad_norm=norm.item(), lr=lr, seconds=time.perf_counter() - start)
            records.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.2f}", refresh=False)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return records


def loss_table(losses: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """The weighted losses of one forward pass as a table: one row per prediction set, one column per term.

    Args:
        losses: ``ImageEncoderOutput.losses`` (keys ``rpn_{set}_{term}``).

    Returns:
        ``{"columns": ["set", *LOSS_TERMS, "total"], "rows": [[set, ...], ...]}`` with the sets in the order
        query selection (``enc``), decoder layers (``dec0``, ...), denoising (``dn0``, ...).
    """
    sets: dict[str, dict[str, float]] = {}
    for key, value in losses.items():
        term = _term(key)
        sets.setdefault(key[len("rpn_"):-len(term) - 1], {})[term] = value.item()

    def order(name: str) -> tuple[int, int]:
        rank = {"enc": 0, "dec": 1, "dn": 2}
        prefix = name.rstrip("0123456789")
        return rank.get(prefix, 3), int(name[len(prefix):] or 0)

    rows = []
    for name in sorted(sets, key=order):
        values = [round(sets[name].get(term, 0.0), 4) for term in LOSS_TERMS]
        rows.append([name, *values, round(sum(values), 4)])
    return {"columns": ["set", *LOSS_TERMS, "total"], "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Class-agnostic evaluation
# --------------------------------------------------------------------------------------------------------------
def class_agnostic_ground_truth(ann_file: str | Path) -> dict:
    """A COCO instances file with every category merged into one, ``OBJECT_CATEGORY_ID`` = "object"."""
    with open(ann_file) as handle:
        data = json.load(handle)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_file}: not a COCO instances file (no {key!r})")
    annotations = [dict(annotation, category_id=OBJECT_CATEGORY_ID) for annotation in data["annotations"]]
    return {"images": data["images"], "annotations": annotations,
            "categories": [{"id": OBJECT_CATEGORY_ID, "name": "object"}]}


@torch.no_grad()
def predict_proposals(encoder: ImageEncoder, samples: Sequence[DetectionSample], in_original_pixels: bool = True
                      ) -> list[dict[str, torch.Tensor]]:
    """The O proposals of each sample, best first.

    Args:
        encoder: the image encoder (run in evaluation mode; its mode is restored afterwards).
        samples: detection samples whose images are resizes of the originals (the evaluation transform).
        in_original_pixels: boxes and masks in the pixels of the original image (for COCO evaluation), or, when
            False, of the sample's (transformed) image (to draw them on it).

    Returns:
        per sample ``boxes`` (O, 4) float xyxy, ``scores`` (O,) sigmoid(objectness), ``masks`` (O, H, W) bool and
        ``labels`` (O,) zeros (the one class "object").
    """
    if encoder.region_proposals is None:
        raise ValueError("predict_proposals: the encoder was built with image_encoder.use_regional=false")
    with evaluation_mode(encoder):
        batch = collate_detection(samples).to(_device(encoder))
        out = encoder(batch.images, batch.padding_mask)
    sizes = (torch.as_tensor(batch.orig_sizes, dtype=torch.long, device=out.boxes.device) if in_original_pixels
             else out.image_sizes)
    located = postprocess(out.boxes, out.masks, out.image_sizes, sizes)
    scores = out.objectness.sigmoid()
    return [{"boxes": place["boxes"], "scores": scores[b], "masks": place["masks"],
             "labels": torch.zeros_like(scores[b], dtype=torch.long)} for b, place in enumerate(located)]


def evaluate_region_proposals(encoder: ImageEncoder, dataset: Dataset, ann_file: str | Path,
                              batch_size: int = 8) -> dict:
    """Class-agnostic COCO AP of the proposals on ``dataset`` (see the module docstring).

    Args:
        dataset: detection samples (evaluation transform) whose ``image_id``s are those of ``ann_file``.
        ann_file: the dataset's COCO instances file.

    Returns:
        ``{"bbox": {AP, AP50, ...}, "segm": {...}, "recall50": ``proposal_recall``, "images": n,
        "proposals": total}`` (fractions in [0, 1]).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate_region_proposals: the dataset is empty")
    records = []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        predictions = predict_proposals(encoder, samples)
        records += to_coco_results(predictions, [s.image_id for s in samples], [OBJECT_CATEGORY_ID])
    ground_truth = class_agnostic_ground_truth(ann_file)
    metrics = evaluate_coco(ground_truth, records, ("bbox", "segm"))
    return {"bbox": metrics["bbox"], "segm": metrics["segm"], "recall50": proposal_recall(ground_truth, records),
            "images": len(dataset), "proposals": len(records)}


def proposal_recall(ground_truth: Mapping, records: Sequence[Mapping], iou_threshold: float = 0.5) -> float:
    """Fraction of the (non-crowd) ground-truth objects covered by at least one proposal with box IoU >=
    ``iou_threshold``, whatever its score: how much the proposals *can* find, before ranking matters.

    Args:
        ground_truth: COCO instances dict; records: COCO result records with ``bbox`` [x, y, w, h].
    """
    def xyxy(boxes: list) -> torch.Tensor:
        b = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
        return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)

    proposals: dict[int, list] = {}
    for record in records:
        proposals.setdefault(record["image_id"], []).append(record["bbox"])
    objects: dict[int, list] = {}
    for annotation in ground_truth["annotations"]:
        if not annotation.get("iscrowd", 0):
            objects.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    found = total = 0
    for image_id, boxes in objects.items():
        total += len(boxes)
        if proposals.get(image_id):
            iou = box_iou(xyxy(boxes), xyxy(proposals[image_id]))                  # (K, O)
            found += int((iou.max(dim=1).values >= iou_threshold).sum())
    return found / total if total else math.nan


# --------------------------------------------------------------------------------------------------------------
# Looking inside one forward pass
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DeformableAttentionTrace:
    """One multi-scale deformable attention call (Deformable-DETR eq. (3)), as the op sees it.

    reference: (B, Q, L, 2) points (x, y) or (B, Q, L, 4) boxes (cx, cy, w, h);
    locations: (B, Q, heads, L, P, 2) sampling points (x, y);
    weights: (B, Q, heads, L, P), softmax-normalised over the L * P points of each head.
    All coordinates are in [0, 1] of each level's map, i.e. of the *padded* image (valid ratios applied).
    """

    reference: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor

    def select(self, queries: slice) -> DeformableAttentionTrace:
        return DeformableAttentionTrace(self.reference[:, queries], self.locations[:, queries],
                                        self.weights[:, queries])


@dataclass
class ForwardTrace:
    """One forward pass of the image encoder with its intermediate results.

    output: the ``ImageEncoderOutput``.
    backbone_features: F_0..F_3, (B, C_l, H/s, W/s) for s = 4, 8, 16, 32.
    levels: F'_1..F'_L, (B, d, H_l, W_l) at strides 8, 16, 32, 64: the deformable encoder's input.
    proposals: the proposal network's ``RegionProposals`` (with ``predictions`` when targets were given).
    query_boxes: (B, N, 4) cxcywh normalised to the unpadded image: the query-selection reference boxes.
    query_objectness: (B, N) encoder objectness logits of the selected positions.
    encoder_attention: the last encoder layer's self-attention over all S positions.
    decoder_attention: the last decoder layer's cross-attention of the N matching queries.
    """

    output: ImageEncoderOutput
    backbone_features: list[torch.Tensor]
    levels: list[torch.Tensor]
    proposals: RegionProposals
    query_boxes: torch.Tensor
    query_objectness: torch.Tensor
    encoder_attention: DeformableAttentionTrace
    decoder_attention: DeformableAttentionTrace


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


@torch.no_grad()
def trace_forward(encoder: ImageEncoder, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                  targets: list[dict] | None = None) -> ForwardTrace:
    """Run the encoder once (in its current mode) and keep the intermediate results of ``ForwardTrace``.

    Args:
        images: (B, 3, H, W) normalised; padding_mask: (B, H, W) True = padding, or None.
        targets: optional targets as for ``ImageEncoder.forward`` (then ``output.losses`` and
            ``proposals.predictions`` are filled; in training mode the decoder also gets denoising queries).
    """
    if encoder.region_proposals is None:
        raise ValueError("trace_forward: the encoder was built with image_encoder.use_regional=false; "
                         "there are no proposals to trace")
    rpn = encoder.region_proposals
    seen: dict[str, object] = {}

    def keep_output(name):
        def hook(module, args, output):
            seen[name] = output
        return hook

    def keep_attention(name):
        def hook(module, args, kwargs, output):
            _, locations, weights = output
            seen[name] = (_argument(args, kwargs, 1, "reference_points"), locations, weights)
        return hook

    def keep_reference(module, args, kwargs):
        seen["reference"] = _argument(args, kwargs, 1, "reference_boxes")

    handles = [
        encoder.backbone.register_forward_hook(keep_output("backbone")),
        rpn.register_forward_hook(keep_output("proposals")),
        rpn.decoder.register_forward_pre_hook(keep_reference, with_kwargs=True),
        rpn.encoder.layers[-1].self_attn.register_forward_hook(keep_attention("encoder"), with_kwargs=True),
        rpn.decoder.layers[-1].cross_attn.register_forward_hook(keep_attention("decoder"), with_kwargs=True),
    ]
    try:
        output = encoder(images, padding_mask, targets)
    finally:
        for handle in handles:
            handle.remove()

    proposals: RegionProposals = seen["proposals"]
    features = list(seen["backbone"])
    num_dn = 0 if proposals.denoising is None else proposals.denoising.num_queries
    matching = slice(num_dn, None)
    flat_objectness = torch.cat([m.flatten(1) for m in proposals.encoder_objectness], dim=1)   # (B, S)
    return ForwardTrace(
        output=output,
        backbone_features=features,
        levels=rpn.input_levels(features),
        proposals=proposals,
        query_boxes=seen["reference"][:, matching],
        query_objectness=flat_objectness.gather(1, proposals.selected_positions),
        encoder_attention=DeformableAttentionTrace(*seen["encoder"]),
        decoder_attention=DeformableAttentionTrace(*seen["decoder"]).select(matching),
    )


def matching_costs(matcher: HungarianMatcher, objectness: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                   target: Mapping[str, torch.Tensor], seed: int = 0
                   ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The matching cost of one image split into its weighted terms, and the Hungarian assignment it gives.

    Args:
        matcher: the criterion's ``HungarianMatcher`` (its coefficients and point count are used).
        objectness: (N,) logits; boxes: (N, 4) cxcywh; masks: (N, Hm, Wm) logits of one image's predictions.
        target: one normalised target (``normalize_targets`` with the padded size): ``boxes`` (K, 4), ``masks``.
        seed: seeds the mask points, the same for every term, so that the terms add up to the total.

    Returns:
        ``{"total": C, "objectness": ..., "L1": ..., "GIoU": ..., "mask BCE": ..., "dice": ...}``, each (N, K)
        and already multiplied by its coefficient, and (prediction indices, GT indices) of the assignment that
        ``matcher`` makes with the same points.
    """
    weights = {"objectness": "cost_objectness", "L1": "cost_bbox", "GIoU": "cost_giou", "mask BCE": "cost_mask",
               "dice": "cost_dice"}
    extra = {"num_points": matcher.num_points, "focal_alpha": matcher.focal_alpha, "focal_gamma": matcher.focal_gamma}

    def cost(kept: set[str]) -> torch.Tensor:
        only = HungarianMatcher(**{attr: getattr(matcher, attr) if attr in kept else 0.0
                                   for attr in weights.values()}, **extra)
        generator = torch.Generator(device=boxes.device).manual_seed(seed)
        return only.cost_matrix(objectness, boxes, masks, target["boxes"], target["masks"], generator)

    costs = {"total": cost(set(weights.values()))}
    costs.update({name: cost({attr}) for name, attr in weights.items()})
    generator = torch.Generator(device=boxes.device).manual_seed(seed)
    (assignment,) = matcher(objectness[None], boxes[None], masks[None], [dict(target)], generator)
    return costs, assignment


def denoising_groups(denoising: DenoisingQueries, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised boxes of one image, group by group.

    Returns:
        positives (G, K, 4) and negatives (G, K, 4), cxcywh normalised; row k of a group noises GT k.
    """
    half = denoising.group_size // 2
    num_gt = int((denoising.gt_index[image, :half] >= 0).sum())
    boxes = denoising.boxes[image].view(denoising.num_groups, denoising.group_size, 4)
    return boxes[:, :num_gt], boxes[:, half:half + num_gt]


def denoising_mask_segments(denoising: DenoisingQueries, num_matching: int) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of every denoising group and of the matching queries along the decoder's queries
    (the ``segment_labels`` of ``viz.plot_attention_mask``)."""
    size = denoising.group_size
    segments = [(f"dn group {g + 1}", g * size, (g + 1) * size) for g in range(denoising.num_groups)]
    return segments + [("matching", denoising.num_queries, denoising.num_queries + num_matching)]


# --------------------------------------------------------------------------------------------------------------
# v2 eq. (2): what the detach does
# --------------------------------------------------------------------------------------------------------------
def fusion_gradient_norms(encoder: ImageEncoder, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                          tokens: str = "regional") -> dict[str, float]:
    """Gradient norm reaching each part of the image encoder from a loss on the regional tokens alone (or on the
    global ones: ``tokens="global"``).

    q^proposal = q^sem + B(box.detach()) + M(mask.detach())   (v2 eq. (2) / (9)). A stand-in for the unified decoder's
    loss, mean(q^proposal ** 2), is back-propagated and the L2 norm of the gradient of every part is returned.
    Parts that produce only the box, the mask or the (non-differentiable) top-k choice get exactly zero: the
    unified decoder trains the proposal network only through q^sem, while the boxes and masks are trained by the
    proposal losses alone. With ``tokens="global"`` the loss is mean(g ** 2) over the global tokens (v2 eq. (1)).
    Gradients are cleared before and after.

    Returns:
        ``{"backbone": norm, "global_representations": norm, "region_proposals.<child>": norm, ...}`` with the
        proposal network's direct children (input_proj, encoder, decoder, box_head, mask_head, fusion, ...).
    """
    if tokens not in ("regional", "global"):
        raise ValueError(f"fusion_gradient_norms: tokens={tokens!r}, expected 'regional' or 'global'")
    if encoder.region_proposals is None:
        raise ValueError("fusion_gradient_norms: the encoder was built with image_encoder.use_regional=false")
    if tokens == "global" and encoder.global_representations is None:
        raise ValueError("fusion_gradient_norms: tokens='global', but the encoder was built with "
                         "image_encoder.use_global=false")
    parts: dict[str, nn.Module | nn.Parameter] = {"backbone": encoder.backbone}
    if encoder.global_representations is not None:
        parts["global_representations"] = encoder.global_representations
    for name, child in encoder.region_proposals.named_children():
        parts[f"region_proposals.{name}"] = child
    for name, parameter in encoder.region_proposals.named_parameters(recurse=False):
        parts[f"region_proposals.{name}"] = parameter

    encoder.zero_grad(set_to_none=True)
    out = encoder(images, padding_mask)
    chosen = out.tokens[:, out.num_global:] if tokens == "regional" else out.tokens[:, :out.num_global]
    chosen.square().mean().backward()
    norms = {}
    for name, part in parts.items():
        parameters = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        squares = [p.grad.double().square().sum() for p in parameters if p.grad is not None]
        norms[name] = math.sqrt(float(sum(squares))) if squares else 0.0
    encoder.zero_grad(set_to_none=True)
    return norms
