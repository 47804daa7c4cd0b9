"""Evaluate a model on a split of each task: the inference loops and the metrics they feed.

Metrics (``evaluate``), per task, as fractions in [0, 1] (the paper reports x100):

| task           | metrics                                                                                    |
| -------------- | ------------------------------------------------------------------------------------------ |
| classification | ``top1``, ``top5`` (``metrics.classification``)                                            |
| detection      | COCO ``bbox_AP``, ``bbox_AP50``, ... and ``segm_*`` (``metrics.coco``); class-agnostic      |
|                | ``agnostic_bbox_AP`` / ``AP50``; on the novel-category scenes, restricted to the novel      |
|                | categories, ``novel_bbox_AP``, ... (:func:`evaluate_novel_detection`); with                 |
|                | ``tasks.detection.seen_penalties``, ``novel_calibrated_bbox_*`` and the gamma of each half  |
|                | (:func:`calibrated_novel_detection`)                                                        |
| captioning     | ``BLEU-4`` (and 1-3), ``CIDEr`` (``metrics.captioning``)                                   |
| retrieval      | ``i2t_R@1/5/10``, ``t2i_R@1/5/10`` over the whole split (``metrics.retrieval``)            |
| mlm            | ``accuracy`` of the masked tokens (fixed masks, ``MaskedLanguageModelingTask.predict``)    |

A task whose data is missing for the split (the synthetic suite has no test corpus for MLM) is reported as
``{"skipped": "<reason>"}`` instead of failing the whole evaluation. Under torchrun every rank evaluates a shard of
each set; predictions are gathered and the metrics computed on rank 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError
from ..data.summary import DataError
from .data_setup import EvalBatches, build_task_dataset, novel_detection_dataset
from .distributed import get_rank, get_world_size, is_distributed
from .runtime import evaluation_mode, move_to_device

__all__ = ["EVALUATORS", "CalibratedNovelResult", "NovelDetectionResult", "calibrated_novel_detection",
           "choose_on_other_folds", "evaluate", "evaluate_novel_detection", "evaluate_task", "novel_metrics"]

logger = logging.getLogger(__name__)


def _gather(items: list) -> list:
    """Concatenate every rank's list (in rank order) on every rank; the identity in a single process."""
    if not is_distributed() or get_world_size() == 1:
        return items
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _batches(task, dataset, cfg: Config, name: str) -> EvalBatches:
    return EvalBatches(dataset, task.collate, cfg.tasks.get(name).batch_size, get_rank(), get_world_size(),
                       cfg.data.num_workers)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------ per task
def _classification(model, cfg: Config, split: str) -> dict[str, float]:
    from ..metrics.classification import topk_accuracy
    from ..tasks import TASKS

    dataset = build_task_dataset(cfg, "classification", split, train=False)
    task = TASKS["classification"].from_dataset(cfg.tasks.classification, dataset)
    rows = []
    for indices, batch, filler in _batches(task, dataset, cfg, "classification"):
        logits = task.predict(model, move_to_device(batch, _device(model)))["logits"].float().cpu()
        if not filler:
            rows += list(zip(indices, logits, batch.labels.tolist()))
    rows = sorted(_gather(rows), key=lambda row: row[0])
    accuracy = topk_accuracy(torch.stack([r[1] for r in rows]), torch.tensor([r[2] for r in rows]), ks=(1, 5))
    return {"top1": accuracy[1], "top5": accuracy[5], "num_images": len(rows)}


def _coco_records(model, cfg: Config, task, dataset) -> list[dict]:
    from ..tasks import to_coco_results

    records = []
    for _, batch, filler in _batches(task, dataset, cfg, "detection"):
        predictions = task.predict(model, move_to_device(batch, _device(model)))
        if not filler:
            records += to_coco_results(predictions, batch.image_ids, batch.category_ids)
    return _gather(records)


def _coco_records_penalised(model, cfg: Config, task, dataset, penalties: Sequence[float]) -> dict[float, list[dict]]:
    """``_coco_records`` of ``task`` with each calibrated-stacking gamma of ``penalties``, one forward pass per batch
    (``DetectionTask.detect_penalised``); boxes only."""
    from ..tasks import to_coco_results

    records: dict[float, list[dict]] = {float(gamma): [] for gamma in penalties}
    for _, batch, filler in _batches(task, dataset, cfg, "detection"):
        batch = move_to_device(batch, _device(model))
        by_gamma = task.detect_penalised(model, batch.images, batch.padding_mask, batch.orig_sizes, batch.class_names,
                                         penalties)
        if not filler:
            for gamma, predictions in by_gamma.items():
                records[gamma] += to_coco_results(predictions, batch.image_ids, batch.category_ids)
    return {gamma: _gather(found) for gamma, found in records.items()}


def _coco_metrics(ground_truth: Path, records: list[dict], iou_types: tuple[str, ...], prefix: str,
                  cat_ids: list[int] | None = None, class_agnostic: bool = False,
                  img_ids: list[int] | None = None) -> dict[str, float]:
    from ..metrics.coco import evaluate_coco

    if not records:
        # pycocotools cannot load an empty result list; no detection at all is AP 0 by definition.
        return {f"{prefix}{iou}_AP": 0.0 for iou in iou_types}
    metrics = evaluate_coco(ground_truth, records, iou_types=iou_types, cat_ids=cat_ids, class_agnostic=class_agnostic,
                            img_ids=img_ids)
    return {f"{prefix}{iou}_{name}": value for iou in iou_types for name, value in metrics[iou].items()}


def _detection(model, cfg: Config, split: str) -> dict[str, float]:
    from ..tasks import TASKS

    iou_types = ("bbox", "segm") if cfg.tasks.detection.segmentation else ("bbox",)
    dataset = build_task_dataset(cfg, "detection", split, train=False)
    task = TASKS["detection"].from_dataset(cfg.tasks.detection, dataset)
    records = _coco_records(model, cfg, task, dataset)
    results: dict[str, float] = {}
    if get_rank() == 0:
        # only the images the reader kept: one it skipped (data.on_invalid=skip) would count as all misses
        kept = list(dataset.image_ids)
        results.update(_coco_metrics(dataset.ann_file, records, iou_types, "", img_ids=kept))
        results["num_images"] = len(kept)
        # Localisation alone (categories ignored, each box once with its best name's score): tells wrong boxes
        # from right boxes with wrong names.
        from ..metrics.coco import one_record_per_box

        agnostic = _coco_metrics(dataset.ann_file, one_record_per_box(records), ("bbox",), "agnostic_",
                                 class_agnostic=True, img_ids=kept)
        results.update({key: agnostic[key] for key in ("agnostic_bbox_AP", "agnostic_bbox_AP50") if key in agnostic})
    novel_file = Path(cfg.data.root) / cfg.data.novel_annotations
    if novel_file.is_file() and any(c.novel for c in novel_detection_dataset(cfg).categories):
        novel = evaluate_novel_detection(model, cfg, iou_types=iou_types)
        if get_rank() == 0:
            results.update({f"novel_{iou}_{name}": value for iou in iou_types
                            for name, value in novel.metrics["novel"][iou].items()})
        if cfg.tasks.detection.seen_penalties:
            calibrated = calibrated_novel_detection(model, cfg)
            if get_rank() == 0:
                results.update({f"novel_calibrated_bbox_{name}": value
                                for name, value in calibrated.metrics["novel"]["bbox"].items()})
                results.update({f"novel_calibrated_gamma_half{f}": gamma for f, gamma in enumerate(calibrated.chosen)})
    return results


def _captioning(model, cfg: Config, split: str) -> dict[str, float]:
    from ..metrics.captioning import caption_metrics
    from ..tasks import TASKS

    dataset = build_task_dataset(cfg, "captioning", split, train=False)
    task = TASKS["captioning"].from_dataset(cfg.tasks.captioning, dataset)
    predictions = []
    for _, batch, filler in _batches(task, dataset, cfg, "captioning"):
        outputs = task.predict(model, move_to_device(batch, _device(model)))
        if not filler:
            predictions += [(out["image_id"], out["caption"]) for out in outputs]
    predictions = dict(_gather(predictions))
    if get_rank() != 0:
        return {}
    references = {image_id: dataset.captions_of(i) for i, image_id in enumerate(dataset.image_ids)}
    return {**caption_metrics(predictions, references), "num_images": len(references)}


def _retrieval(model, cfg: Config, split: str) -> dict[str, float]:
    """R@K over the whole split: embeddings of every image and caption, then one similarity matrix per direction
    (each direction has its own query and candidate representations, see ``tasks.retrieval``)."""
    from ..metrics.retrieval import retrieval_recall
    from ..tasks import TASKS

    dataset = build_task_dataset(cfg, "retrieval", split, train=False)
    task = TASKS["retrieval"].from_dataset(cfg.tasks.retrieval, dataset)
    parts = []
    with torch.no_grad():
        for indices, batch, filler in _batches(task, dataset, cfg, "retrieval"):
            batch = move_to_device(batch, _device(model))
            embeddings, _ = task.embed(model, batch)
            if filler:
                continue
            text_image = [indices[row] for row in batch.text_image_index.tolist()]
            parts.append((indices, text_image, {key: value.float().cpu() for key, value in vars(embeddings).items()}))
    parts = sorted(_gather(parts), key=lambda part: part[0][0])
    if get_rank() != 0:
        return {}
    image_queries = torch.cat([p[2]["image_queries"] for p in parts])
    image_candidates = torch.cat([p[2]["image_candidates"] for p in parts])
    text_queries = torch.cat([p[2]["text_queries"] for p in parts])
    text_candidates = torch.cat([p[2]["text_candidates"] for p in parts])
    # Rows of the similarity matrices follow the gathered order; map each caption's image to its row.
    row_of_image = {index: row for row, index in enumerate(i for p in parts for i in p[0])}
    text_to_image = torch.tensor([row_of_image[i] for p in parts for i in p[1]])
    with torch.no_grad():
        device = _device(model)
        i2t = model.similarity(image_queries.to(device), text_candidates.to(device), "retrieval_i2t").float().cpu()
        t2i = model.similarity(text_queries.to(device), image_candidates.to(device), "retrieval_t2i").float().cpu()
    i2t_recall = retrieval_recall(i2t, text_to_image)
    t2i_recall = retrieval_recall(t2i.T, text_to_image)
    return {**{k: v for k, v in i2t_recall.items() if k.startswith("i2t")},
            **{k: v for k, v in t2i_recall.items() if k.startswith("t2i")},
            "num_images": image_queries.shape[0], "num_texts": text_queries.shape[0]}


def _mlm(model, cfg: Config, split: str) -> dict[str, float]:
    from ..tasks import TASKS

    dataset = build_task_dataset(cfg, "mlm", split, train=False)
    task = TASKS["mlm"].from_dataset(cfg.tasks.mlm, dataset)
    correct = total = 0
    for _, batch, filler in _batches(task, dataset, cfg, "mlm"):
        out = task.predict(model, move_to_device(batch, _device(model)))
        if not filler:
            correct += int((out["predicted"] == out["target"]).sum())
            total += int(out["target"].numel())
    counts = _gather([(correct, total)])
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    return {"accuracy": correct / total if total else math.nan, "num_masked": total}


EVALUATORS = {
    "classification": _classification,
    "detection": _detection,
    "captioning": _captioning,
    "retrieval": _retrieval,
    "mlm": _mlm,
}


def evaluate_task(model: nn.Module, cfg: Config, task: str, split: str) -> dict[str, float]:
    """The metrics of one task on ``split`` (every rank must call it; rank 0 gets the numbers)."""
    if task not in EVALUATORS:
        raise ConfigError(f"evaluate: unknown task {task!r}; expected one of {sorted(EVALUATORS)}")
    return EVALUATORS[task](model, cfg, split)


def evaluate(model: nn.Module, cfg: Config, tasks: Iterable[str], split: str) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on ``split`` for each task in ``tasks`` (names, or a mapping whose keys are names).

    Runs in evaluation mode without gradients and restores the model's mode. In a distributed run every rank
    must call it: each evaluates a shard, predictions are gathered, metrics are computed on rank 0 and
    broadcast, so every rank returns the same dict.

    Returns:
        task -> {metric: value} (see the module docstring), or {"skipped": reason} when the split's data of a
        task is missing.
    """
    results: dict[str, dict[str, Any]] = {}
    with evaluation_mode(model):
        for task in tasks:
            try:
                results[task] = evaluate_task(model, cfg, task, split)
            except DataError as error:
                # Every rank reads the same files, so every rank skips the same task.
                logger.warning("evaluate: %s skipped on split %s: %s", task, split, error)
                results[task] = {"skipped": str(error)}
    if is_distributed() and get_world_size() > 1:
        shared = [results]
        dist.broadcast_object_list(shared, src=0)
        results = shared[0]
    return results


# ------------------------------------------------------------------------------------------------ novel categories
@dataclass
class NovelDetectionResult:
    """Detection on the novel-category scenes (appendix C, Fig. 4), evaluated per group of categories.

    Attributes:
        class_names: the candidate names the detector chose from (every category of the file by default).
        novel_names: the categories never annotated for detection training.
        records: COCO result records of all detections (on every rank).
        metrics: ``{"novel": {"bbox": {AP, AP50, ...}, "segm": {...}}, "base": {...}}``: COCO metrics over the novel
            categories and over the seen ("base") categories of the same scenes (fractions; {} for a group without
            categories); rank 0 only, {} elsewhere.
        per_category: novel category name -> {"AP", "AP50", "instances"} (box AP; rank 0 only).
    """

    class_names: list[str]
    novel_names: list[str]
    records: list[dict]
    metrics: dict[str, dict[str, dict[str, float]]]
    per_category: dict[str, dict[str, float]]


def _novel_task(cfg: Config, dataset, names: Sequence[str], segmentation: bool, seen_penalty: float = 0.0):
    """The detection task of the novel-category scenes against ``names``: the file's seen categories are the seen
    names of calibrated stacking; a name that is not a category of the file gets the id -1 (its detections are
    dropped by the caller)."""
    from ..tasks import DetectionTask

    id_of = {category.name: category.id for category in dataset.categories}
    return DetectionTask(replace(cfg.tasks.detection, segmentation=segmentation), names,
                         category_ids=[id_of.get(name, -1) for name in names],
                         seen_names=[category.name for category in dataset.categories if not category.novel],
                         seen_penalty=seen_penalty)


def evaluate_novel_detection(model: nn.Module, cfg: Config, class_names: Sequence[str] | None = None,
                             iou_types: Sequence[str] = ("bbox",), seen_penalty: float = 0.0) -> NovelDetectionResult:
    """Detect on ``data.novel_images`` and compute AP restricted to the novel categories (appendix C, Fig. 4).

    The candidate set is ``class_names`` (default: every category of ``data.novel_annotations``, seen and novel, as
    an open-vocabulary detector would be used); the detector's labels index it. Detections of names that are not
    categories of the file cannot be evaluated and are dropped. AP over the novel categories is COCO's
    (``cat_ids``): a detection counts only for its own category, so a novel object named as a seen category is a
    miss for the novel category (and a false positive for the seen one). ``iou_types`` adds "segm" for mask AP.
    ``seen_penalty`` > 0 scores with calibrated stacking: gamma subtracted from the logits of the file's seen names.
    """

    dataset = novel_detection_dataset(cfg)
    novel = [category for category in dataset.categories if category.novel]
    if not novel:
        raise ValueError(f"{dataset.ann_file}: no category is marked \"novel\": true")
    names = list(dataset.class_names) if class_names is None else [str(name) for name in class_names]
    task = _novel_task(cfg, dataset, names, "segm" in iou_types, seen_penalty)
    with evaluation_mode(model):
        records = _coco_records(model, cfg, task, dataset)
    records = [record for record in records if record["category_id"] != -1]
    metrics: dict = {}
    per_category: dict = {}
    if get_rank() == 0:
        metrics, per_category = novel_metrics(dataset.ann_file, records, dataset.categories, iou_types)
    return NovelDetectionResult(names, [category.name for category in novel], records, metrics, per_category)


@dataclass
class CalibratedNovelResult:
    """Novel-category detection with calibrated stacking, gamma chosen on the other half of the scenes.

    Attributes:
        penalties: the candidate gammas (``tasks.detection.seen_penalties``).
        folds: the image ids of each half (scenes alternate between the halves in file order).
        fold_ap50: fold_ap50[f][i]: novel box AP50 of half f scored with penalties[i].
        chosen: chosen[f]: the gamma half f is scored with, the best on the other half (ties: the smaller).
        metrics: novel_metrics of the pooled records (``{"novel": {"bbox": ...}, "base": ...}``).
        records: the pooled records, each half's from its chosen gamma.
    """

    penalties: list[float]
    folds: list[list[int]]
    fold_ap50: list[list[float]]
    chosen: list[float]
    metrics: dict[str, dict[str, dict[str, float]]]
    records: list[dict]


def choose_on_other_folds(scores: Sequence[Sequence[float]], candidates: Sequence[float]) -> list[float]:
    """For each fold f, the candidate with the best summed score on the folds other than f (ties: the smaller).

    Args:
        scores: scores[f][i], the score of candidate i on fold f (higher is better).
        candidates: the candidate values, one per column.
    """
    if len(scores) < 2:
        raise ValueError(f"choose_on_other_folds: need at least 2 folds, got {len(scores)}")
    if any(len(row) != len(candidates) for row in scores):
        raise ValueError("choose_on_other_folds: every fold needs a score per candidate")
    chosen = []
    for fold in range(len(scores)):
        totals = [sum(scores[other][i] for other in range(len(scores)) if other != fold)
                  for i in range(len(candidates))]
        best = max(totals)
        chosen.append(min(candidates[i] for i, total in enumerate(totals) if total == best))
    return chosen


def calibrated_novel_detection(model: nn.Module, cfg: Config, penalties: Sequence[float] | None = None,
                               folds: int = 2) -> CalibratedNovelResult:
    """Box AP on the novel-category scenes with calibrated stacking, no scene scored with a gamma chosen on itself.

    The scenes are split into ``folds`` halves (alternating in file order); every candidate gamma of ``penalties``
    (default ``tasks.detection.seen_penalties``) scores all of them (the records ``evaluate_novel_detection(
    seen_penalty=)`` gives, from one forward pass per batch for all gammas); each half then keeps the records of the
    gamma that gave the best novel box AP50 on the other halves, and the pooled records are evaluated as
    ``evaluate_novel_detection`` does. Boxes only (rank 0 holds the metrics).
    """
    from ..metrics.coco import load_coco_ground_truth

    penalties = [float(g) for g in (cfg.tasks.detection.seen_penalties if penalties is None else penalties)]
    if not penalties or any(g < 0 for g in penalties):
        raise ValueError(f"calibrated_novel_detection: penalties must be a non-empty list of values >= 0, "
                         f"got {penalties}")
    dataset = novel_detection_dataset(cfg)
    image_ids = list(dataset.image_ids)
    if len(image_ids) < folds:
        raise ValueError(f"{dataset.ann_file}: {len(image_ids)} scenes cannot be split into {folds} halves")
    halves = [image_ids[f::folds] for f in range(folds)]
    task = _novel_task(cfg, dataset, list(dataset.class_names), segmentation=False)
    with evaluation_mode(model):
        by_gamma = _coco_records_penalised(model, cfg, task, dataset, penalties)
    runs = [[record for record in by_gamma[gamma] if record["category_id"] != -1] for gamma in penalties]
    if get_rank() != 0:
        return CalibratedNovelResult(penalties, halves, [], [], {}, [])
    ground_truth = load_coco_ground_truth(dataset.ann_file)
    novel_ids = [category.id for category in dataset.categories if category.novel]
    fold_ap50 = []
    for half in halves:
        members = set(half)
        row = []
        for run in runs:
            records = [record for record in run if record["image_id"] in members]
            row.append(_coco_metrics(ground_truth, records, ("bbox",), "", cat_ids=novel_ids,
                                     img_ids=half).get("bbox_AP50", 0.0) if records else 0.0)
        fold_ap50.append(row)
    chosen = choose_on_other_folds(fold_ap50, penalties)
    pooled = []
    for half, gamma in zip(halves, chosen):
        members = set(half)
        pooled += [record for record in runs[penalties.index(gamma)] if record["image_id"] in members]
    metrics, _ = novel_metrics(ground_truth, pooled, dataset.categories, ("bbox",))
    return CalibratedNovelResult(penalties, halves, fold_ap50, chosen, metrics, pooled)


def novel_metrics(ground_truth, records: Sequence[Mapping[str, Any]], categories: Sequence[Any],
                  iou_types: Sequence[str] = ("bbox",)
                  ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """COCO metrics of ``records`` over the novel and over the seen ("base") categories, and box AP per novel category.

    Args:
        ground_truth: the instances file (path, dict or pycocotools COCO).
        records: COCO result records.
        categories: the file's categories (``data.coco.Category``: ``id``, ``name``, ``novel``).
        iou_types: "bbox" and / or "segm".

    Returns:
        ({"novel": {iou_type: {AP, AP50, ...}}, "base": {...} or {} without base categories},
         {novel name: {"AP", "AP50", "instances"}}). No detection at all is AP 0.
    """
    from ..metrics.coco import evaluate_coco, load_coco_ground_truth

    ground_truth = load_coco_ground_truth(ground_truth)
    novel = [category for category in categories if category.novel]
    base = [category for category in categories if not category.novel]

    def group_metrics(subset) -> dict[str, dict[str, float]]:
        if not subset:
            return {}
        if not records:   # pycocotools cannot load an empty result list
            return {iou: {"AP": 0.0, "AP50": 0.0} for iou in iou_types}
        return evaluate_coco(ground_truth, list(records), iou_types=tuple(iou_types), cat_ids=[c.id for c in subset])

    per_category = {}
    for category in novel:
        values = group_metrics([category])["bbox"] if "bbox" in iou_types else group_metrics([category])[iou_types[0]]
        per_category[category.name] = {"AP": values["AP"], "AP50": values["AP50"],
                                       "instances": len(ground_truth.getAnnIds(catIds=[category.id]))}
    return {"novel": group_metrics(novel), "base": group_metrics(base)}, per_category
