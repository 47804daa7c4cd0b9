"""Response time of the interactive explorers (``uniperceiver_v2.viz.explore``): one control change at a time.

    python -m uniperceiver_v2.bench explore [--data data/synthetic] [--threads 1] [--checkpoint RUN_OR_FOLDER]

Builds the model as training does (``engine.build.build_training`` on the synthetic suite, untrained unless
``--checkpoint``), records one batch of every task through the decoder as notebook 04 does, writes a folder of three
fake training runs (five tasks, 500 iterations each) for the curves, then builds each explorer and changes its
controls one after another, as a user would. Each line is the wall-clock time of one change, from setting the
control's value to the new PNG in the widget (inference when the change needs it, the figure, the PNG encoding);
"first draw" is the explorer's construction. The target is under 2 s per change on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGET_SECONDS = 2.0


def fake_runs(folder: Path, iterations: int = 500) -> Path:
    """Three runs of five tasks' training records, like the trainer's ``metrics.jsonl``."""
    tasks = ("classification", "detection", "captioning", "mlm", "retrieval")
    for run, slope in (("train", 1.0), ("ablations/no_moe", 0.8), ("ablations/mixed", 0.6)):
        path = folder / run / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for iteration in range(1, iterations + 1):
                for k, task in enumerate(tasks):
                    loss = (4.0 + k) / (1.0 + slope * iteration / 100)
                    handle.write(json.dumps({"kind": "train", "iteration": iteration, "task": task, "count": 1,
                                             "loss": loss, "lr": 1e-4, "grad_norm": 1.0 + loss}) + "\n")
    return folder


def time_changes(name: str, build, changes: list[tuple[str, dict | Callable]], out) -> dict[str, float]:
    """Build the explorer, apply each change (control values, or a function of the explorer that returns them;
    one redraw each) and print the times."""
    start = time.perf_counter()
    explorer = build()
    times = {"first draw": time.perf_counter() - start}
    print(f"{name:<11}{'first draw':<44}{times['first draw']:>7.2f}  {explorer.error or ''}", file=out)
    for label, values in changes:
        values = values(explorer) if callable(values) else values
        start = time.perf_counter()
        explorer.set(**values)
        times[label] = time.perf_counter() - start
        flag = "" if times[label] < TARGET_SECONDS else "  > target"
        print(f"{'':<11}{label:<44}{times[label]:>7.2f}{flag}  {explorer.error or ''}", file=out)
    return times


def run(data_root: str, checkpoint: str | None = None, out=sys.stdout) -> dict[str, dict[str, float]]:
    """Print and return {explorer: {change: seconds}}."""
    from uniperceiver_v2 import api
    from uniperceiver_v2.config import get_preset
    from uniperceiver_v2.data import CocoCaptions
    from uniperceiver_v2.engine.build import build_training
    from uniperceiver_v2.engine.data_setup import ensure_data
    from uniperceiver_v2.viz import explore
    from uniperceiver_v2.walkthrough import gating

    cfg = get_preset("tiny")
    cfg.data.root = data_root
    ensure_data(cfg)
    model, tasks, datasets = build_training(cfg)
    if checkpoint is not None:
        api.load_weights(model, checkpoint)
    model.eval()
    batches = gating.task_batches(tasks, datasets, batch_size=4, seed=0)
    _, recorder = gating.run_tasks(model, tasks, batches, seed=0, keep_inputs=True)
    scenes = explore.split_images(cfg, ["val"], limit=12)
    names = list(scenes)
    test = CocoCaptions(cfg.data.path(cfg.data.caption_images, cfg.data.test_split),
                        cfg.data.path(cfg.data.caption_annotations, cfg.data.test_split), iterate="image")
    every_image = [test[i] for i in range(test.num_images)]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {torch.get_num_threads()} torch "
          f"thread(s); tiny preset, {'trained' if checkpoint else 'untrained'}; {len(recorder.calls)} recorded decoder "
          f"calls; {len(every_image)} test images for retrieval", file=out)
    print(f"{'explorer':<11}{'change':<44}{'seconds':>7}", file=out)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        runs = fake_runs(Path(folder))
        results["detections"] = time_changes("detections", lambda: explore.detections(
            model, scenes, ["circle", "square", "triangle"]), [
            ("threshold 0.02 (cached detections)", {"threshold": 0.02}),
            ("at most 5 boxes", {"boxes": 5}),
            ("proposals on (first time for the image)", {"proposals": True}),
            ("class names: circle, hexagon, zebra", {"classes": "circle, hexagon, zebra"}),
            ("next image", {"image": names[1]}),
            ("proposals off", {"proposals": False}),
            ("back to the first image (cached)", {"image": names[0]}),
        ], out)
        results["gating"] = time_changes("gating", lambda: explore.gating(model.decoder, recorder.calls), [
            ("layer 1", {"layer": 1}),
            ("layer 2", {"layer": 2}),
            ("task captioning (first time)", {"task": "captioning"}),
            ("one attribute combination", lambda e: {"kind": e.controls["kind"].options[1][1]}),
            ("task mlm (first time)", {"task": "mlm"}),
            ("task classification (cached)", {"task": "classification"}),
        ], out)
        results["captions"] = time_changes("captions", lambda: explore.captions(model, scenes), [
            ("beam width 3 (one new search)", {"beam_size": 3}),
            ("beam width 2 (cached)", {"beam_size": 2}),
            ("beam width 5 (one new search)", {"beam_size": 5}),
            ("next image (one search)", {"image": names[1]}),
            ("maximum length 8 (one search)", {"max_length": 8}),
        ], out)
        results["retrieval"] = time_changes("retrieval", lambda: explore.retrieval(
            model, [s.image for s in every_image], [s.captions for s in every_image]), [
            ("a new sentence", {"sentence": "a small red circle next to a square"}),
            ("top 3", {"top": 3}),
            ("image -> text", {"direction": explore.IMAGE_TO_TEXT}),
            ("another image (cached scores)", {"image": 3}),
            ("back to text -> image (cached)", {"direction": explore.TEXT_TO_IMAGE}),
        ], out)
        results["curves"] = time_changes("curves", lambda: explore.curves(runs), [
            ("one run", {"runs": ("train",)}),
            ("two tasks", {"tasks": ("captioning", "detection")}),
            ("metric grad_norm", {"metric": "grad_norm"}),
            ("smoothing 20", {"smooth": 20}),
            ("log scale", {"logy": True}),
        ], out)
    print(f"{'explorer':<11}{'first draw':>11}{'median change':>15}{'slowest change':>16}", file=out)
    for name, times in results.items():
        changes = [seconds for label, seconds in times.items() if label != "first draw"]
        print(f"{name:<11}{times['first draw']:>11.2f}{statistics.median(changes):>15.2f}{max(changes):>16.2f}",
              file=out)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench explore",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="the synthetic suite (generated if missing)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--checkpoint", default=None, help="weights to load (run or checkpoint folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.data, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
