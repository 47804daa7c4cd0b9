"""What the image backbone's features know about each object: ``python -m uniperceiver_v2.bench probe``.

A linear probe on the annotated objects of the detection scenes of a split (the first ``--scenes`` scenes with an
object, by image id). Every scene is read at its stored size with the package's reader and ImageNet
normalisation (``data/images.py``, ``data/transforms.py``), run through the backbone alone (evaluation mode), and
each ground-truth box is RoI-aligned (``torchvision.ops.roi_align``, ``aligned=True``, 2 x 2 cells) on the first
three feature levels (strides 4, 8, 16); the concatenated cells are the object's features. A logistic regression
(scikit-learn, C=0.1, max_iter=500) on the features standardised with the training half's statistics is trained on
the first half of the objects and scored on the second half, for two labels:

* ``colour``: the annotation's ``attributes.colour`` (written by the synthetic suite; real data has none);
* ``category``: its category.

It prints, per label, the accuracy, the number of classes, the majority-class rate (the test-half share of the
training half's most frequent class: what a probe that learnt nothing scores) and the number of objects. A high
colour and a low category accuracy say the backbone's features keep the colour of an object but not its shape.

    python -m uniperceiver_v2.bench probe --checkpoint runs/small/train data.root=data/synthetic_small
    python -m uniperceiver_v2.bench probe --backbone-weights runs/backbone/tiny_convnet.safetensors \\
        data.root=data/synthetic_small
    python -m uniperceiver_v2.bench probe --random [--seed 0] [--split val] [--scenes 300] data.root=...

``--tokens`` (with ``--checkpoint``) asks the same of what the unified decoder is given: for every object a kept
proposal covers (IoU >= 0.5, the proposal of highest IoU), the probe reads its colour and category from the
backbone's RoI-aligned features (as above), from the regional token of that proposal and from the flattened global
token of the ``F_L`` cell at the box's centre, all on the same objects. A colour the backbone keeps and the tokens
lose is one no task can name.

    python -m uniperceiver_v2.bench probe --checkpoint runs/small/train --tokens data.root=data/synthetic_small

``--backbone-weights`` and ``--random`` build the backbone ``image_encoder.backbone`` of ``--config`` (default the
tiny preset); with ``--backbone-weights FILE`` the backbone and its widths are those ``FILE.json`` records when
``pretrain_backbone`` wrote one next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["LABELS", "TOKEN_SOURCES", "load_backbone", "main", "object_features", "probe_accuracy", "linear_probe",
           "token_features", "token_probe"]

LABELS = ("colour", "category")


def probe_accuracy(features: np.ndarray, labels, C: float = 0.1, max_iter: int = 500) -> dict:
    """Linear probe of ``labels`` from ``features``: fit on the first half of the rows, score on the second.

    Args:
        features: (N, D) object features.
        labels: N labels (any hashable values).
        C, max_iter: of scikit-learn's ``LogisticRegression``.

    Returns:
        ``{"accuracy", "classes" (distinct labels of all N), "majority" (test-half share of the training half's
        most frequent label), "objects": N, "converged"}``. Features are standardised with the training half's
        mean and standard deviation. A training half with a single label gives the constant prediction.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"probe_accuracy: expected (N, D) features and N labels, got {x.shape} and {len(y)}")
    if len(y) < 2:
        raise ValueError(f"probe_accuracy: need at least 2 objects, got {len(y)}")
    half = len(y) // 2
    train_x, test_x, train_y, test_y = x[:half], x[half:], y[:half], y[half:]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    train_x, test_x = (train_x - mean) / (std + 1e-6), (test_x - mean) / (std + 1e-6)
    values, counts = np.unique(train_y, return_counts=True)
    majority_label = values[counts.argmax()]
    converged = True
    if len(values) < 2:
        predicted = np.full(len(test_y), majority_label)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            classifier = LogisticRegression(C=C, max_iter=max_iter).fit(train_x, train_y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        predicted = classifier.predict(test_x)
    return {"accuracy": float(np.mean(predicted == test_y)), "classes": len(np.unique(y)),
            "majority": float(np.mean(test_y == majority_label)), "objects": len(y), "converged": converged}


def _scene_objects(ann_file: Path) -> tuple[list[dict], dict[int, list[tuple[list[float], str, str]]]]:
    """(image records with an object, sorted by id; {image id: [(xyxy box, colour, category name)]}) of a COCO
    instances file with the synthetic suite's attributes."""
    from uniperceiver_v2.data.coco import load_json, require_keys
    from uniperceiver_v2.data.summary import DataError

    data = load_json(ann_file)
    require_keys(data, ("images", "annotations", "categories"), ann_file, "top level")
    names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    records = {int(r["id"]): r for r in data["images"]}
    objects: dict[int, list[tuple[list[float], str, str]]] = {}
    for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
        attributes = annotation.get("attributes")
        if not isinstance(attributes, dict) or "colour" not in attributes:
            raise DataError(f"{ann_file}: annotation id={annotation.get('id')} has no attributes.colour; the probe "
                            f"needs the synthetic suite's annotations (data.root of a generated suite)")
        if annotation.get("iscrowd", 0):
            continue
        record = records.get(int(annotation["image_id"]))
        if record is None:
            raise DataError(f"{ann_file}: annotation id={annotation['id']} refers to the unknown image "
                            f"{annotation['image_id']}")
        x, y, w, h = (float(v) for v in annotation["bbox"])
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(record["width"])), min(y + h, float(record["height"]))
        if x1 <= x0 or y1 <= y0:
            continue
        objects.setdefault(int(record["id"]), []).append(
            ([x0, y0, x1, y1], str(attributes["colour"]), names[int(annotation["category_id"])]))
    return [records[i] for i in sorted(objects)], objects


def _scene_batches(cfg, split: str, scenes: int, batch_size: int, device):
    """(images (B, 3, H, W), [boxes (G_b, 4) xyxy pixels], [[(colour, category)]]) of the first ``scenes`` detection
    scenes of ``split`` with an object; consecutive scenes of one size form a batch (no padding, which would change
    the features)."""
    from uniperceiver_v2.data.images import read_image
    from uniperceiver_v2.data.transforms import Normalize

    d = cfg.data
    ann_file, image_dir = d.path(d.detection_annotations, split), d.path(d.detection_images, split)
    records, objects = _scene_objects(ann_file)         # read now: a bad file is an error before any model runs
    records = records[:scenes]
    normalize = Normalize()

    def batches():
        start = 0
        while start < len(records):
            size = (records[start]["height"], records[start]["width"])
            stop = start
            while (stop < len(records) and stop - start < batch_size
                   and (records[stop]["height"], records[stop]["width"]) == size):
                stop += 1
            chunk = records[start:stop]
            images = torch.stack([normalize(read_image(image_dir / r["file_name"], f"image id={r['id']} in {ann_file}"))
                                  for r in chunk]).to(device)
            boxes = [torch.tensor([box for box, _, _ in objects[int(r["id"])]], dtype=torch.float32, device=device)
                     for r in chunk]
            labels = [[(colour, category) for _, colour, category in objects[int(r["id"])]] for r in chunk]
            yield images, boxes, labels
            start = stop

    return batches()


def _roi_cells(maps, boxes, image_width: int, levels: int) -> torch.Tensor:
    """2 x 2 RoI-aligned cells of each of the first ``levels`` maps, concatenated: (objects, D)."""
    from torchvision.ops import roi_align

    return torch.cat([roi_align(m.float(), boxes, output_size=2, spatial_scale=m.shape[-1] / image_width,
                                aligned=True).flatten(1) for m in list(maps)[:levels]], dim=1)


@torch.no_grad()
def object_features(backbone, cfg, split: str, scenes: int, levels: int = 3, batch_size: int = 16
                    ) -> tuple[np.ndarray, dict[str, list[str]]]:
    """RoI-aligned backbone features of every annotated object of the first ``scenes`` detection scenes of ``split``.

    Returns:
        ((objects, D) float32 features: 2 x 2 cells of each of the first ``levels`` feature maps, concatenated;
        {"colour": [...], "category": [...]} the objects' labels, in the same order: scene by scene, by image id).

    Raises:
        DataError: a missing file, or annotations without ``attributes.colour`` (named).
    """
    device = next(backbone.parameters()).device if backbone is not None else torch.device("cpu")
    scene_batches = _scene_batches(cfg, split, scenes, batch_size, device)
    was_training = backbone.training
    backbone.eval()
    features: list[torch.Tensor] = []
    labels: dict[str, list[str]] = {"colour": [], "category": []}
    try:
        for images, boxes, scene_labels in scene_batches:
            features.append(_roi_cells(backbone(images), boxes, images.shape[-1], levels).cpu())
            for objects in scene_labels:
                for colour, category in objects:
                    labels["colour"].append(colour)
                    labels["category"].append(category)
    finally:
        backbone.train(was_training)
    return (torch.cat(features).numpy() if features else np.zeros((0, 0), np.float32)), labels


TOKEN_SOURCES = ("backbone", "regional token", "global token")


@torch.no_grad()
def token_features(model, cfg, split: str, scenes: int, iou: float = 0.5, levels: int = 3, batch_size: int = 16
                   ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], int]:
    """What the unified decoder is given about each object, next to what the backbone has.

    For every annotated object that a kept proposal covers with IoU >= ``iou`` (the proposal of highest IoU is
    taken): its backbone features as :func:`object_features` computes them, the regional token of that proposal
    (v2 eq. (9), what detection names and what captioning and retrieval read per object) and the flattened global
    token of the cell of ``F_L`` that holds the box's centre. The model runs in evaluation mode on the scenes at
    their stored size.

    Returns:
        ({source: (found, D) features} for ``TOKEN_SOURCES``, {"colour", "category"} labels of the found objects,
        the number of annotated objects).
    """
    from uniperceiver_v2.engine.runtime import evaluation_mode
    from uniperceiver_v2.modeling import TOKEN_TYPES
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou

    features: dict[str, list[torch.Tensor]] = {name: [] for name in TOKEN_SOURCES}
    labels: dict[str, list[str]] = {"colour": [], "category": []}
    objects = 0
    with evaluation_mode(model):
        for images, boxes, scene_labels in _scene_batches(cfg, split, scenes, batch_size, model.device):
            padding = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
            backbone_maps = model.image_encoder.backbone(images)
            encoded = model.encode_images(images, padding)
            if encoded.boxes is None or encoded.num_global == 0:
                raise ValueError("bench probe --tokens: the model needs both global and regional tokens")
            height, width = images.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=encoded.boxes.dtype, device=images.device)
            proposals = box_cxcywh_to_xyxy(encoded.boxes) * scale                                  # (B, O, 4)
            flat = encoded.token_types[0] == TOKEN_TYPES["global_flattened"]
            first_cell = int(torch.nonzero(flat)[0])
            rows, cols = encoded.global_map_size
            for b, (gt, found_labels) in enumerate(zip(boxes, scene_labels)):
                objects += len(found_labels)
                overlaps = box_iou(gt.to(proposals.dtype), proposals[b])                          # (G, O)
                best_iou, best = overlaps.max(dim=1)
                keep = best_iou >= iou
                if not bool(keep.any()):
                    continue
                kept_boxes = gt[keep]
                features["backbone"].append(_roi_cells([m[b:b + 1] for m in backbone_maps], [kept_boxes],
                                                       images.shape[-1], levels).cpu())
                features["regional token"].append(encoded.tokens[b, encoded.num_global + best[keep]].float().cpu())
                centre_x = ((kept_boxes[:, 0] + kept_boxes[:, 2]) / 2 / width * cols).long().clamp(0, cols - 1)
                centre_y = ((kept_boxes[:, 1] + kept_boxes[:, 3]) / 2 / height * rows).long().clamp(0, rows - 1)
                features["global token"].append(
                    encoded.tokens[b, first_cell + centre_y * cols + centre_x].float().cpu())
                for (colour, category), kept in zip(found_labels, keep.tolist()):
                    if kept:
                        labels["colour"].append(colour)
                        labels["category"].append(category)
    arrays = {name: (torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32))
              for name, parts in features.items()}
    return arrays, labels, objects


def linear_probe(backbone, cfg, split: str = "val", scenes: int = 300) -> dict[str, dict]:
    """``{label: probe_accuracy(...)}`` for ``LABELS`` on the objects of ``object_features``."""
    from uniperceiver_v2.data.summary import DataError

    features, labels = object_features(backbone, cfg, split, scenes)
    if len(features) < 2:
        raise DataError(f"{cfg.data.path(cfg.data.detection_annotations, split)}: {len(features)} objects in the "
                        f"first {scenes} scenes; the probe needs at least 2")
    return {name: probe_accuracy(features, labels[name]) for name in LABELS}


def load_backbone(checkpoint: str | None = None, weights: str | None = None, config="tiny",
                  overrides: list[str] | None = None, seed: int = 0):
    """(backbone module, description, config) for the probe.

    With ``checkpoint``: the model's image backbone and its config with ``overrides``. Otherwise the backbone
    ``image_encoder.backbone`` of ``config`` (a preset, YAML file or ``Config``) with ``overrides``, loaded from
    ``weights`` (its name and widths from ``<weights>.json`` when ``pretrain_backbone`` wrote one) or initialised
    at random after ``torch.manual_seed(seed)``.
    """
    from uniperceiver_v2.config import Config, apply_overrides, load_config
    from uniperceiver_v2.modeling.backbone import build_backbone

    overrides = list(overrides or [])
    if checkpoint is not None:
        from uniperceiver_v2.bench import model_of_checkpoint

        model, cfg = model_of_checkpoint(checkpoint, overrides)
        return model.image_encoder.backbone, f"{cfg.image_encoder.backbone} of {checkpoint}", cfg
    if isinstance(config, Config):
        cfg = apply_overrides(config, overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    name, channels, origin = cfg.image_encoder.backbone, list(cfg.image_encoder.backbone_channels), "the config"
    if weights is not None:
        sidecar = Path(f"{weights}.json")
        if sidecar.is_file():
            recorded = json.loads(sidecar.read_text())
            if "backbone" in recorded:
                name = recorded["backbone"]
                channels = list(recorded.get("backbone_channels", channels))
                origin = sidecar.name
    else:
        torch.manual_seed(seed)
    backbone = build_backbone(name, channels, weights)
    widths = f" {channels}" if name == "tiny_convnet" else ""
    source = f"weights {weights}" if weights is not None else f"random (seed {seed})"
    return backbone, f"{name}{widths} (from {origin}), {source}", cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run folder, checkpoints folder or checkpoint: its image backbone")
    source.add_argument("--backbone-weights", metavar="FILE", help="a backbone state dict (pretrain_backbone's)")
    source.add_argument("--random", action="store_true", help="a randomly initialised backbone")
    parser.add_argument("--config", default="tiny", help="preset or YAML for --backbone-weights / --random "
                                                         "(default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of --random (default 0)")
    parser.add_argument("--split", default="val", help="data split (default val)")
    parser.add_argument("--scenes", type=int, default=300, help="scenes to take the objects of (default 300)")
    parser.add_argument("--tokens", action="store_true",
                        help="with --checkpoint: also probe the regional and global tokens the unified decoder is "
                             "given, on the objects a proposal covers")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=...")
    args = parser.parse_intermixed_args(argv)
    if args.scenes < 1:
        parser.error(f"--scenes: expected at least 1, got {args.scenes}")
    if args.tokens and args.checkpoint is None:
        parser.error("--tokens needs --checkpoint (the tokens come from a trained model's image encoder)")
    if args.tokens:
        return _main_tokens(args)

    from uniperceiver_v2.config import ConfigError
    from uniperceiver_v2.data.summary import DataError

    try:
        backbone, described, cfg = load_backbone(args.checkpoint, args.backbone_weights, args.config,
                                                 args.overrides, args.seed)
        results = linear_probe(backbone, cfg, args.split, args.scenes)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    objects = results[LABELS[0]]["objects"]
    print(f"backbone {described}")
    print(f"split {args.split} of {cfg.data.root}, first {args.scenes} scenes: {objects} objects (probe trained on "
          f"the first {objects // 2}, scored on the other {objects - objects // 2}); RoI-align 2x2 of feature "
          f"levels 1-3")
    for name in LABELS:
        r = results[name]
        note = "" if r["converged"] else "  (not converged in 500 iterations)"
        print(f"{name:<9} accuracy {r['accuracy']:.3f}  classes {r['classes']:>3}  majority {r['majority']:.3f}  "
              f"objects {r['objects']}{note}")
    return 0


def token_probe(model, cfg, split: str = "val", scenes: int = 300) -> tuple[dict[str, dict[str, dict]], int]:
    """``({source: {label: probe_accuracy(...)}}, annotated objects)`` for the sources of :func:`token_features`,
    all on the same objects (those a proposal covers)."""
    from uniperceiver_v2.data.summary import DataError

    features, labels, objects = token_features(model, cfg, split, scenes)
    found = len(labels["colour"])
    if found < 2:
        raise DataError(f"{cfg.data.path(cfg.data.detection_annotations, split)}: {found} of {objects} objects in "
                        f"the first {scenes} scenes are covered by a proposal; the probe needs at least 2")
    return {source: {name: probe_accuracy(features[source], labels[name]) for name in LABELS}
            for source in TOKEN_SOURCES}, objects


def _main_tokens(args) -> int:
    from uniperceiver_v2.bench import model_of_checkpoint
    from uniperceiver_v2.config import ConfigError
    from uniperceiver_v2.data.summary import DataError

    try:
        model, cfg = model_of_checkpoint(args.checkpoint, args.overrides)
        results, objects = token_probe(model, cfg, args.split, args.scenes)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    found = results[TOKEN_SOURCES[0]][LABELS[0]]["objects"]
    print(f"{args.checkpoint}, split {args.split} of {cfg.data.root}, first {args.scenes} scenes: {found} of "
          f"{objects} objects covered by a proposal (IoU >= 0.5); probe trained on the first {found // 2}, scored "
          f"on the other {found - found // 2}")
    print("| features | " + " | ".join(f"{name} accuracy (majority)" for name in LABELS) + " |")
    print("| --- | " + " | ".join("---" for _ in LABELS) + " |")
    for source in TOKEN_SOURCES:
        cells = [f"{results[source][name]['accuracy']:.3f} ({results[source][name]['majority']:.3f})"
                 + ("" if results[source][name]["converged"] else " *") for name in LABELS]
        print(f"| {source} | " + " | ".join(cells) + " |")
    print("backbone: RoI-align 2x2 of feature levels 1-3; regional token: the covering proposal's (v2 eq. (9)); "
          "global token: the flattened F_L cell of the box centre; * = not converged in 500 iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
