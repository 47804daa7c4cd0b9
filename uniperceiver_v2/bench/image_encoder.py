"""Image encoder benchmarks: does the region proposal network learn, and what does the encoder cost on a CPU?

    python -m uniperceiver_v2.bench image_encoder train-rpn [--data /tmp/synth] [--minutes 4] [--threads 2]
    python -m uniperceiver_v2.bench image_encoder speed [--preset tiny] [--batch-size 4] [--size 128] [--threads 1]

``train-rpn``: the region proposal network of the chosen preset (``use_global=false``: backbone + RPN only) is
trained alone, class-agnostic, on the synthetic suite's detection scenes (generated with
``python -m uniperceiver_v2.data.synthetic --out <data> --profile quick`` when missing), with the tiny preset's
detection augmentation, AdamW (the preset's lr and weight decay) and gradient clipping at 0.1 (DINO), for a
wall-clock budget. Before and after training it reports class-agnostic COCO metrics from pycocotools (every
category merged into one "object"; box and mask AP, AP50, AR@100) of the top-O proposals, scored by their
objectness, on the train and val scenes.

``speed``: wall-clock time per training iteration (forward with targets + region-proposal losses + backward) and
per inference forward of the full image encoder (global + regional tokens), median over ``--iters`` after 2
warm-up iterations, and the process's peak resident set size (``ru_maxrss``, which includes the Python
interpreter, torch and the model).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from uniperceiver_v2.config import get_preset
from uniperceiver_v2.data.coco import CocoInstances
from uniperceiver_v2.data.collate import collate_detection
from uniperceiver_v2.data.transforms import detection_eval_transform, detection_train_transform
from uniperceiver_v2.modeling import ImageEncoder, postprocess

GRAD_CLIP = 0.1


def _targets(batch) -> list[dict]:
    return [{"boxes": boxes, "masks": masks, "labels": labels, "size": size}
            for boxes, masks, labels, size in zip(batch.boxes, batch.masks, batch.labels, batch.image_sizes)]


def ensure_synthetic_data(root: Path, profile: str) -> None:
    if (root / "annotations" / "instances_train.json").is_file():
        return
    command = [sys.executable, "-m", "uniperceiver_v2.data.synthetic", "--out", str(root), "--profile", profile]
    print("generating the synthetic suite:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def class_agnostic_coco(ann_file: Path) -> COCO:
    """The COCO ground truth with every category merged into one (id 1)."""
    data = json.loads(ann_file.read_text())
    data["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    for annotation in data["annotations"]:
        annotation["category_id"] = 1
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


@torch.no_grad()
def evaluate(model: ImageEncoder, dataset: CocoInstances, ann_file: Path, batch_size: int) -> dict[str, float]:
    """Class-agnostic box and mask metrics of the top-O proposals (score = sigmoid(objectness))."""
    model.eval()
    results = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection):
        out = model(batch.images, batch.padding_mask)
        detections = postprocess(out.boxes, out.masks, out.image_sizes, torch.tensor(batch.orig_sizes))
        for image_id, det, scores in zip(batch.image_ids, detections, out.objectness.sigmoid()):
            for box, mask, score in zip(det["boxes"].tolist(), det["masks"].numpy(), scores.tolist()):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                results.append({"image_id": image_id, "category_id": 1, "score": score, "segmentation": rle,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    model.train()
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):          # pycocotools prints every step
        gt = class_agnostic_coco(ann_file)
        for iou_type, name in (("bbox", "box"), ("segm", "mask")):
            evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
            evaluator.params.imgIds = sorted(dataset.image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats = evaluator.stats
            metrics.update({f"{name}_AP": stats[0], f"{name}_AP50": stats[1], f"{name}_AR100": stats[8]})
    return metrics


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items())


def train_rpn(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset)
    encoder_cfg = dataclasses.replace(cfg.image_encoder, use_global=False)
    data, root = cfg.data, Path(args.data)
    ensure_synthetic_data(root, args.profile)
    train_ann = root / "annotations" / "instances_train.json"
    val_ann = root / "annotations" / "instances_val.json"
    train_set = CocoInstances(root / "scenes" / "train", train_ann,
                              detection_train_transform(data.det_min_size, data.det_max_size, data.det_max_long,
                                                        data.det_crop_size))
    eval_transform = detection_eval_transform(data.det_eval_size, data.det_eval_max_long)
    eval_sets = {"train": (CocoInstances(root / "scenes" / "train", train_ann, eval_transform), train_ann),
                 "val": (CocoInstances(root / "scenes" / "val", val_ann, eval_transform), val_ann)}
    model = ImageEncoder(encoder_cfg).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} (use_global=false): {params / 1e6:.2f} M parameters, {torch.get_num_threads()} "
          f"thread(s), data {root} ({len(train_set)} train / {len(eval_sets['val'][0])} val scenes), "
          f"batch {args.batch_size}, lr {cfg.optim.lr}, budget {args.minutes} min, seed {args.seed}")
    before = {split: evaluate(model, ds, ann, args.batch_size) for split, (ds, ann) in eval_sets.items()}
    for split, metrics in before.items():
        print(f"untrained  {split:5s}  {_format(metrics)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_detection, generator=generator)
    start, iteration, window = time.time(), 0, []
    while time.time() - start < 60 * args.minutes:
        for batch in loader:
            out = model(batch.images, batch.padding_mask, _targets(batch))
            loss = sum(out.losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            iteration += 1
            window.append(loss.item())
            if iteration % args.log_every == 0:
                print(f"iter {iteration:5d}  {time.time() - start:6.0f} s  loss {statistics.mean(window):7.2f} "
                      f"(mean of the last {len(window)})", flush=True)
                window = []
            if time.time() - start >= 60 * args.minutes:
                break
    elapsed = time.time() - start
    print(f"trained {iteration} iterations in {elapsed:.0f} s ({elapsed / max(iteration, 1):.2f} s/iter)")
    for split, (ds, ann) in eval_sets.items():
        after = evaluate(model, ds, ann, args.batch_size)
        print(f"trained    {split:5s}  {_format(after)}")
        print(f"box AP50 {split}: untrained {100 * before[split]['box_AP50']:.1f} -> trained "
              f"{100 * after['box_AP50']:.1f}")
    return 0


def _random_targets(batch: int, size: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        k = int(torch.randint(1, 6, (1,), generator=generator))
        xy = torch.randint(0, size // 2, (k, 2), generator=generator)
        wh = torch.randint(8, size // 2, (k, 2), generator=generator)
        boxes = torch.cat([xy, xy + wh], 1).float()
        masks = torch.zeros(k, size, size, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[j, y1:y2, x1:x2] = True
        targets.append({"boxes": boxes, "masks": masks, "labels": torch.zeros(k, dtype=torch.long),
                        "size": torch.tensor([size, size])})
    return targets


def speed(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset).image_encoder
    model = ImageEncoder(cfg)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.size, args.size, generator=generator)
    targets = _random_targets(args.batch_size, args.size, generator)
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {params / 1e6:.2f} M parameters, batch {args.batch_size} x {args.size}x{args.size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.iters} after 2 warm-up iterations")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def train_step() -> None:
        out = model(images, None, targets)
        model.zero_grad(set_to_none=True)
        (sum(out.losses.values()) + out.tokens.square().mean()).backward()

    def inference() -> None:
        with torch.no_grad():
            model(images)

    for name, step, mode in (("train (fwd + losses + bwd)", train_step, True), ("inference (fwd)", inference, False)):
        model.train(mode)
        times = []
        for i in range(args.iters + 2):
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        print(f"{name:28s} {1000 * statistics.median(times):8.1f} ms/iter  (min {1000 * min(times):.1f}, "
              f"max {1000 * max(times):.1f})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (after building the model and inputs: {rss_before:.0f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench image_encoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-rpn", help="train the region proposal network alone; AP50 before / after")
    train.add_argument("--data", default="/tmp/synth", help="synthetic suite root (generated if missing)")
    train.add_argument("--profile", default="quick", help="synthetic profile used when generating")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--log-every", type=int, default=25)
    train.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    train.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("speed", help="time and peak memory of forward + backward")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--size", type=int, default=128, help="square image side")
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    bench.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train_rpn(args) if args.command == "train-rpn" else speed(args)


if __name__ == "__main__":
    sys.exit(main())
