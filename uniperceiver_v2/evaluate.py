"""Evaluate a checkpoint: ``python -m uniperceiver_v2.evaluate --checkpoint DIR --tasks t1,t2 [--split test]``.

``DIR`` is a run directory (``runs/tiny``), its ``checkpoints`` folder (the newest checkpoint is used) or one
checkpoint (``runs/tiny/checkpoints/iter_0000200``); the model is rebuilt from the config recorded in the
checkpoint and its weights are loaded without unpickling anything. Under torchrun every rank evaluates a
shard of each set. The results go to ``--out`` (default ``<run dir>/eval_<split>_<iteration>.json``).

Metrics (``evaluate``), per task, as fractions in [0, 1] (the paper reports x100):

| task           | metrics                                                                                   |
| -------------- | ----------------------------------------------------------------------------------------- |
| classification | ``top1``, ``top5`` (``evaluation.classification``)                                        |
| detection      | COCO ``bbox_AP``, ``bbox_AP50``, ... and ``segm_*`` (``evaluation.coco``); the same on the |
|                | novel-category scenes restricted to the novel categories: ``novel_bbox_AP``, ...          |
| captioning     | ``BLEU-4`` (and 1-3), ``CIDEr`` (``evaluation.captioning``)                                |
| retrieval      | ``i2t_R@1/5/10``, ``t2i_R@1/5/10`` over the whole split (``evaluation.retrieval``)          |
| mlm            | ``accuracy`` of the masked tokens (fixed masks, ``MaskedLanguageModelingTask.predict``)     |

A task whose data is missing for the split (the synthetic suite has no test corpus for MLM) is reported as
``{"skipped": "<reason>"}`` instead of failing the whole evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, ConfigError
from .data.summary import DataError
from .engine.data_setup import EvalBatches, build_task_dataset, novel_detection_dataset
from .engine.distributed import get_rank, get_world_size, is_distributed
from .engine.logging import json_safe
from .engine.trainer import move_to_device

__all__ = ["evaluate", "evaluate_task", "main"]

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
    from .evaluation.classification import topk_accuracy
    from .tasks import TASKS

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
    from .tasks import to_coco_results

    records = []
    for _, batch, filler in _batches(task, dataset, cfg, "detection"):
        predictions = task.predict(model, move_to_device(batch, _device(model)))
        if not filler:
            records += to_coco_results(predictions, batch.image_ids, batch.category_ids)
    return _gather(records)


def _coco_metrics(ground_truth: Path, records: list[dict], iou_types: tuple[str, ...], prefix: str,
                  cat_ids: list[int] | None = None, class_agnostic: bool = False) -> dict[str, float]:
    from .evaluation.coco import evaluate_coco

    if not records:
        # pycocotools cannot load an empty result list; no detection at all is AP 0 by definition.
        return {f"{prefix}{iou}_AP": 0.0 for iou in iou_types}
    metrics = evaluate_coco(ground_truth, records, iou_types=iou_types, cat_ids=cat_ids, class_agnostic=class_agnostic)
    return {f"{prefix}{iou}_{name}": value for iou in iou_types for name, value in metrics[iou].items()}


def _detection(model, cfg: Config, split: str) -> dict[str, float]:
    from .tasks import TASKS

    iou_types = ("bbox", "segm") if cfg.tasks.detection.segmentation else ("bbox",)
    dataset = build_task_dataset(cfg, "detection", split, train=False)
    task = TASKS["detection"].from_dataset(cfg.tasks.detection, dataset)
    records = _coco_records(model, cfg, task, dataset)
    results: dict[str, float] = {}
    if get_rank() == 0:
        results.update(_coco_metrics(dataset.ann_file, records, iou_types, ""))
        # Localisation alone (categories ignored, each box once with its best name's score): tells wrong boxes
        # from right boxes with wrong names.
        from .evaluation.coco import one_record_per_box

        agnostic = _coco_metrics(dataset.ann_file, one_record_per_box(records), ("bbox",), "agnostic_",
                                 class_agnostic=True)
        results.update({key: agnostic[key] for key in ("agnostic_bbox_AP", "agnostic_bbox_AP50") if key in agnostic})
    novel_file = Path(cfg.data.root) / cfg.data.novel_annotations
    if novel_file.is_file():
        novel = novel_detection_dataset(cfg)
        novel_ids = [c.id for c in novel.categories if c.novel]
        if novel_ids:
            # Candidates: every category name of the file (seen and novel), as for open-vocabulary detection;
            # AP is computed over the novel categories only (appendix C, Fig. 4).
            novel_task = TASKS["detection"].from_dataset(cfg.tasks.detection, novel)
            novel_records = _coco_records(model, cfg, novel_task, novel)
            if get_rank() == 0:
                results.update(_coco_metrics(novel.ann_file, novel_records, iou_types, "novel_", novel_ids))
    return results


def _captioning(model, cfg: Config, split: str) -> dict[str, float]:
    from .evaluation.captioning import caption_metrics
    from .tasks import TASKS

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
    from .evaluation.retrieval import retrieval_recall
    from .tasks import TASKS

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
    from .tasks import TASKS

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
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad():
            for task in tasks:
                try:
                    results[task] = evaluate_task(model, cfg, task, split)
                except DataError as error:
                    # Every rank reads the same files, so every rank skips the same task.
                    logger.warning("evaluate: %s skipped on split %s: %s", task, split, error)
                    results[task] = {"skipped": str(error)}
    finally:
        model.train(was_training)
    if is_distributed() and get_world_size() > 1:
        shared = [results]
        dist.broadcast_object_list(shared, src=0)
        results = shared[0]
    return results


# ------------------------------------------------------------------------------------------------ command line
def _checkpoint_dir(path: Path) -> Path:
    """A run directory stands for its ``checkpoints`` folder."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory, its checkpoints folder or a checkpoint")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: the tasks enabled in the checkpoint's config)")
    parser.add_argument("--split", default=None, help="data split (default: the config's data.val_split)")
    parser.add_argument("--out", default=None, help="results JSON (default: <run dir>/eval_<split>_<iteration>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. data.root=data/real tasks.captioning.beam_size=3")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .api import build_model
    from .config import apply_overrides, config_from_dict
    from .engine.checkpoint import CheckpointError, find_latest, read_checkpoint_meta
    from .engine.distributed import destroy_distributed, init_distributed
    from .engine.trainer import fail_fast, resolve_device

    try:
        location = _checkpoint_dir(Path(args.checkpoint))
        checkpoint = location if (location / "meta.json").is_file() else find_latest(location)
        if checkpoint is None:
            raise CheckpointError(f"{args.checkpoint}: no checkpoint found")
        meta = read_checkpoint_meta(checkpoint)
        if meta.get("config") is None:
            raise CheckpointError(f"{checkpoint}/meta.json records no config")
        cfg = apply_overrides(config_from_dict(meta["config"]), args.overrides)
        tasks = args.tasks.split(",") if args.tasks else cfg.tasks.names()
        unknown = [t for t in tasks if t not in EVALUATORS]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {unknown}; expected names from {sorted(EVALUATORS)}")
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    split = args.split or cfg.data.val_split

    with fail_fast():
        info = init_distributed()
        model = build_model(cfg, checkpoint).to(resolve_device(cfg, info.device))
        results = evaluate(model, cfg, tasks, split)
        if get_rank() == 0:
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            out = Path(args.out) if args.out else run_dir / f"eval_{split}_{meta['iteration']:07d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            record = {"iteration": meta["iteration"], "split": split, "checkpoint": str(checkpoint),
                      "results": results}
            out.write_text(json.dumps(json_safe(record), indent=2) + "\n")
            print(json.dumps(json_safe(results), indent=2))
            print(f"wrote {out}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
