"""COCO detection and instance-segmentation AP with pycocotools' COCOeval.

The numbers are pycocotools' own (the paper's "mAP" is AP averaged over IoU 0.50:0.95); this module only
prepares the inputs, silences pycocotools' progress prints, optionally restricts the evaluation to a subset
of categories (e.g. the novel categories of the synthetic suite, paper appendix C) and returns plain floats.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["STAT_NAMES", "evaluate_coco", "load_coco_ground_truth"]

# Order of COCOeval.stats after summarize() for "bbox" and "segm".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_coco_ground_truth(ground_truth: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools COCO object from a path to an instances JSON, an already-parsed dict, or a COCO."""
    if isinstance(ground_truth, COCO):
        return ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, Mapping):
            for key in ("images", "annotations", "categories"):
                if key not in ground_truth:
                    raise ValueError(f"COCO ground truth dict has no {key!r} key")
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(ground_truth))
            coco.createIndex()
            return coco
        path = os.fspath(ground_truth)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"COCO ground-truth file {path} does not exist")
        return COCO(path)


def _validate_results(results: Sequence[Mapping[str, Any]], gt: COCO, iou_types: Iterable[str]) -> None:
    image_ids, category_ids = set(gt.getImgIds()), set(gt.getCatIds())
    for index, result in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in result:
                raise ValueError(f"detection result #{index} has no {key!r}")
        if result["image_id"] not in image_ids:
            raise ValueError(f"detection result #{index}: image_id {result['image_id']} is not in the ground truth")
        if result["category_id"] not in category_ids:
            raise ValueError(
                f"detection result #{index}: category_id {result['category_id']} is not in the ground truth"
            )
        if "segm" in iou_types and "segmentation" not in result:
            raise ValueError(f"detection result #{index} has no 'segmentation' (RLE) but 'segm' AP was asked for")
        if "bbox" in iou_types and "bbox" not in result and "segmentation" not in result:
            raise ValueError(f"detection result #{index} has neither 'bbox' nor 'segmentation'")


def _load_results(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes(results)
        # loadRes cannot take an empty list; no detections at all is a valid (AP 0) submission.
        empty = COCO()
        empty.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        empty.createIndex()
        return empty


def one_record_per_box(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The highest-scoring record of each distinct (image, box), the others dropped.

    Detection predictions list one proposal under several names (the top scores over proposals x names), so the
    same box appears several times with different ``category_id``. Class-agnostic AP needs each box once:
    otherwise its second name would count as a false positive on an object already matched.
    """
    best: dict[tuple, dict[str, Any]] = {}
    for record in results:
        key = (record["image_id"], tuple(float(v) for v in record["bbox"]))
        if key not in best or record["score"] > best[key]["score"]:
            best[key] = dict(record)
    return list(best.values())


def _check_subset(ids: Sequence[int] | None, known: Sequence[int], name: str, what: str) -> None:
    """A non-empty subset of the ground truth's ids (or None)."""
    if ids is None:
        return
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise ValueError(f"{name} {unknown[:10]} are not {what} of the ground truth")
    if not ids:
        raise ValueError(f"{name} is empty")


def evaluate_coco(
    ground_truth: str | os.PathLike | Mapping[str, Any] | COCO,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    cat_ids: Sequence[int] | None = None,
    verbose: bool = False,
    class_agnostic: bool = False,
    img_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO AP / AR of detection results.

    Args:
        ground_truth: instances JSON path, its parsed dict, or a pycocotools COCO object.
        results: COCO result records, one per detection: {"image_id", "category_id", "score",
            "bbox": [x, y, w, h] (absolute pixels), "segmentation": RLE dict with "size" and "counts"}
            ("segmentation" needed for "segm"; "bbox" may be left out when a mask is given). With
            ``class_agnostic``, pass each box once (:func:`one_record_per_box`).
        iou_types: any of "bbox", "segm".
        cat_ids: evaluate only these categories (COCOeval's params.catIds), e.g. the novel ones;
            default all categories of the ground truth.
        verbose: also print pycocotools' summary table.
        class_agnostic: ignore the categories (COCOeval's params.useCats = 0): a detection may match a ground-truth
            object of any category, so AP measures localisation alone; with the class-aware AP it separates
            "the boxes are wrong" from "the boxes are right but the names are wrong".
        img_ids: evaluate only these images (COCOeval's params.imgIds), e.g. the images a reader kept when it
            skipped unreadable ones (``data.on_invalid=skip``); default all images of the ground truth.

    Returns:
        {iou_type: {name: value for name in STAT_NAMES}, "summary": {iou_type: pycocotools' summary text}}.
        Values are fractions in [0, 1] (the paper reports x100); NaN where pycocotools reports -1, i.e. no
        ground truth in that setting (e.g. APs when there are no small objects).
    """
    gt = load_coco_ground_truth(ground_truth)
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_types: unsupported {iou_type!r}, expected 'bbox' or 'segm'")
    _validate_results(results, gt, iou_types)
    _check_subset(cat_ids, gt.getCatIds(), "cat_ids", "categories")
    _check_subset(img_ids, gt.getImgIds(), "img_ids", "images")
    if img_ids is not None:
        outside = sorted({r["image_id"] for r in results} - set(img_ids))
        if outside:
            raise ValueError(f"results name images outside img_ids: {outside[:10]}")

    metrics: dict[str, Any] = {"summary": {}}
    for iou_type in iou_types:
        records = [dict(r) for r in results]
        if iou_type == "segm":
            # With a "bbox" present loadRes takes the box area as the instance area, which changes what
            # counts as small / medium / large; without it the mask area is used, as for the ground truth.
            for record in records:
                record.pop("bbox", None)
        detections = _load_results(gt, records)
        evaluator = COCOeval(gt, detections, iouType=iou_type)
        if cat_ids is not None:
            evaluator.params.catIds = sorted(cat_ids)
        if class_agnostic:
            evaluator.params.useCats = 0
        if img_ids is not None:
            evaluator.params.imgIds = sorted(img_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
        metrics["summary"][iou_type] = summary.getvalue()
        if verbose:
            print(f"COCO {iou_type} evaluation:\n{summary.getvalue()}", end="")
        metrics[iou_type] = {
            name: (math.nan if value == -1 else float(value)) for name, value in zip(STAT_NAMES, evaluator.stats)
        }
    return metrics
