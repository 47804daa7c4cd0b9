"""Novel-category detection (appendix C) as notebook 08 teaches it: which categories are novel, where each category
appears in training, tables of the evaluation (``engine.evaluation.evaluate_novel_detection``) and the logits of
the best proposal of each object."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch

from ..engine.evaluation import NovelDetectionResult
from ..engine.runtime import evaluation_mode
from .results import _percent


# --------------------------------------------------------------------------------------------------------------
# Novel-category detection (appendix C)
# --------------------------------------------------------------------------------------------------------------
def novel_category_names(cfg) -> list[str]:
    """The categories marked ``"novel": true`` in ``data.novel_annotations``; [] when the file does not exist (real
    data without a novel-category set)."""
    from ..data.coco import load_json, parse_categories

    path = Path(cfg.data.root) / cfg.data.novel_annotations
    if not path.is_file():
        return []
    return [category.name for category in parse_categories(load_json(path), path) if category.novel]


def category_exposure(cfg) -> dict[str, list]:
    """Where each category of the novel-scene file appears in training: boxes in the detection training split,
    images in the classification training split, sentences of the training corpus that name it.

    A novel category (``"novel": true``) should have no detection box; the model meets it only through
    classification and text (appendix C). Missing training data of a task counts as 0 (e.g. no corpus).

    Returns:
        ``{"columns": ["category", "novel", "detection boxes", "classification images", "corpus sentences"],
        "rows": [...]}`` in the file's category order.
    """
    from ..data import ImageFolderClassification, TextCorpus
    from ..data.coco import load_json, parse_categories

    d = cfg.data
    categories = parse_categories(load_json(Path(d.root) / d.novel_annotations), Path(d.root) / d.novel_annotations)
    train_instances = d.path(d.detection_annotations, d.train_split)
    data = load_json(train_instances)
    names_by_id = {category["id"]: category["name"] for category in data["categories"]}
    boxes: dict[str, int] = {}
    for annotation in data["annotations"]:
        name = names_by_id.get(annotation["category_id"])
        boxes[name] = boxes.get(name, 0) + 1
    images: dict[str, int] = {}
    classification_root = d.path(d.classification_root, d.train_split)
    if classification_root.is_dir():
        classification = ImageFolderClassification(classification_root)
        for label in classification.labels:
            images[classification.class_names[label]] = images.get(classification.class_names[label], 0) + 1
    sentences: dict[str, int] = {}
    corpus_path = d.path(d.corpus, d.train_split)
    if corpus_path.is_file():
        patterns = {c.name: re.compile(rf"\b{re.escape(c.name.lower())}s?\b") for c in categories}
        corpus = TextCorpus(corpus_path)
        for index in range(len(corpus)):
            sentence = corpus[index].lower()
            for name, pattern in patterns.items():
                if pattern.search(sentence):
                    sentences[name] = sentences.get(name, 0) + 1
    rows = [[c.name, "yes" if c.novel else "no", boxes.get(c.name, 0), images.get(c.name, 0), sentences.get(c.name, 0)]
            for c in categories]
    return {"columns": ["category", "novel", "detection boxes", "classification images", "corpus sentences"],
            "rows": rows}


def novel_ap_table(rows: Sequence[tuple[str, str, NovelDetectionResult]]) -> dict[str, list]:
    """Box AP / AP50 (x100) of several ``engine.evaluation.evaluate_novel_detection`` results, one row per (model label,
    candidate-list label, result): over the novel categories and over the seen ones of the same scenes."""
    return {"columns": ["model", "candidates", "novel AP", "novel AP50", "seen AP", "seen AP50"],
            "rows": [[model, candidates, *(_percent(r.metrics[group].get("bbox", {}).get(name))
                                           for group in ("novel", "base") for name in ("AP", "AP50"))]
                     for model, candidates, r in rows]}


def per_category_table(result: NovelDetectionResult, reference: NovelDetectionResult | None = None,
                       reference_label: str = "untrained") -> dict[str, list]:
    """Box AP / AP50 (x100) and ground-truth instances of every novel category of one result; with ``reference``
    (e.g. the untrained model's result), its AP / AP50 of the same category next to them."""
    columns = ["novel category", "instances", "AP", "AP50"]
    if reference is not None:
        columns += [f"{reference_label} AP", f"{reference_label} AP50"]
    rows = []
    for name, values in result.per_category.items():
        row = [name, values["instances"], _percent(values["AP"]), _percent(values["AP50"])]
        if reference is not None:
            other = reference.per_category.get(name, {})
            row += [_percent(other.get("AP")), _percent(other.get("AP50"))]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def above_reference(result: NovelDetectionResult, reference: NovelDetectionResult) -> dict[str, bool]:
    """Per novel category: is the box AP of ``result`` above that of ``reference`` (e.g. the untrained model)? A
    missing or undefined AP counts as 0."""
    def ap(values) -> float:
        value = _percent((values or {}).get("AP"))
        return 0.0 if value is None else value

    return {name: ap(values) > ap(reference.per_category.get(name)) for name, values in result.per_category.items()}


def images_with_novel_names(records: Sequence[Mapping], novel_ids: Collection[int], count: int) -> list[int]:
    """The images where a novel category is among the ``count`` best *distinct boxes* of COCO result records
    (``NovelDetectionResult.records``): each box counted once, with its best-scoring name, as
    ``walkthrough.distinct_detections`` keeps them for a figure (so a record scoring 0, a suppressed proposal, counts
    for none). Image ids in increasing order."""
    best: dict[int, dict[tuple[float, ...], int]] = {}
    for record in sorted(records, key=lambda r: -r["score"]):
        if record["score"] <= 0.0:
            break
        boxes = best.setdefault(record["image_id"], {})
        key = tuple(record["bbox"])
        if key not in boxes and len(boxes) < count:
            boxes[key] = record["category_id"]
    novel = set(novel_ids)
    return sorted(image for image, boxes in best.items() if novel & set(boxes.values()))


def novel_naming(shown: Sequence[Mapping], samples: Sequence, class_names: Sequence[str],
                 novel_names: Collection[str], min_iou: float = 0.5) -> dict[str, int]:
    """What a figure of detections shows of novel categories.

    Args:
        shown: per sample, the drawn detections (``distinct_detections`` of ``api.detect``: ``boxes`` xyxy in the
            sample's pixels, ``labels`` indexing ``class_names``).
        samples: the scenes (``boxes`` xyxy and ``labels`` indexing ``class_names``, same pixels).
        class_names, novel_names: the candidates, and which of them are novel.
        min_iou: the overlap with a ground-truth object of the same name that makes a detection right.

    Returns:
        ``{"shown": all detections, "novel": those with a novel name, "correct": those of them on a ground-truth
        object of that name (IoU >= min_iou)}``.
    """
    from ..modeling.box_ops import box_iou

    counts = {"shown": 0, "novel": 0, "correct": 0}
    for found, sample in zip(shown, samples):
        labels = [int(label) for label in found["labels"]]
        counts["shown"] += len(labels)
        for index, label in enumerate(labels):
            if class_names[label] not in novel_names:
                continue
            counts["novel"] += 1
            truth = [i for i, truth_label in enumerate(sample.labels.tolist())
                     if truth_label == label]
            if truth:
                box = torch.as_tensor(found["boxes"][index]).detach().cpu().to(torch.float32)[None]
                iou = box_iou(torch.as_tensor(sample.boxes)[truth].cpu().to(torch.float32), box)
                counts["correct"] += int(iou.max().item() >= min_iou)
    return counts


def novel_objects_named(records: Sequence[Mapping], cfg, min_iou: float = 0.5) -> dict[str, int]:
    """How the detections of COCO result records (``NovelDetectionResult.records``) name the novel objects of the
    novel scenes, over every scene: for each ground-truth object of a novel category (``data.novel_annotations``),
    the best-scoring detection with box IoU >= ``min_iou`` is the one that finds it, and its name is right when it
    is the object's category. Unlike a figure of scenes picked for their novel names, this counts them all.

    Returns:
        ``{"objects": novel objects, "found": those with a detection on them, "named": those named right}``.
    """
    from torchvision.ops import box_convert, box_iou

    from ..data.coco import load_json, parse_categories

    path = Path(cfg.data.root) / cfg.data.novel_annotations
    data = load_json(path)
    novel_ids = {category.id for category in parse_categories(data, path) if category.novel}
    by_image: dict[int, list[Mapping]] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)

    def xyxy(boxes: list[list[float]]) -> torch.Tensor:
        return box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")

    counts = {"objects": 0, "found": 0, "named": 0}
    for annotation in data["annotations"]:
        if annotation["category_id"] not in novel_ids or annotation.get("iscrowd", 0):
            continue
        counts["objects"] += 1
        found = by_image.get(annotation["image_id"], [])
        if not found:
            continue
        iou = box_iou(xyxy([r["bbox"] for r in found]), xyxy([annotation["bbox"]]))[:, 0]
        on_it = [(r["score"], r["category_id"]) for r, overlap in zip(found, iou.tolist()) if overlap >= min_iou]
        if on_it:
            counts["found"] += 1
            counts["named"] += int(max(on_it)[1] == annotation["category_id"])
    return counts


def best_proposal_logits(model, sample, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every ground-truth object of one scene, the v2 eq. (6) logits of its best-overlapping proposal.

    The sample must come through the evaluation transform (normalised image, boxes in its pixels).

    Returns:
        logits (K, C) of the proposal with the highest IoU with each of the K objects against ``class_names``, and
        that IoU (K,).
    """
    from ..modeling.box_ops import box_cxcywh_to_xyxy, box_iou
    from ..tasks import DetectionTask

    task = DetectionTask(model.config.tasks.detection, class_names)
    device = next(model.parameters()).device
    with evaluation_mode(model):
        image = model.encode_images(sample.image[None].to(device),
                                    torch.zeros(1, *sample.image.shape[-2:], dtype=torch.bool, device=device))
        logits, _ = task.region_logits(model, image, list(class_names))                      # (1, O, C)
    height, width = sample.image.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=image.boxes.dtype, device=device)
    proposals = box_cxcywh_to_xyxy(image.boxes[0]) * scale                                      # (O, 4)
    iou = box_iou(sample.boxes.to(device, proposals.dtype), proposals)                           # (K, O)
    best_iou, best = iou.max(dim=1)
    return logits[0, best].cpu(), best_iou.cpu()
