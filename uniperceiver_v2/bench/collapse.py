"""The collapse diagnostic: does the generalist's classification learn, or does everything become one vector?

    python -m uniperceiver_v2.bench collapse [--iterations 200] [--every 10] [--probe 32]
        [--tasks classification] [--config tiny] [key.sub=value ...]

Trains with the real trainer (``Trainer.train_step``: unmixed sampling, MT-AdamW, the config's schedule) on the
tasks named by ``--tasks`` (the others are disabled; classification must be one of them) and prints, every
``--every`` iterations, the classification loss and batch accuracy of the last classification step and three
mean pairwise cosines measured on a fixed probe batch (the first ``--probe`` validation images, the model in
evaluation mode, no gradient):

* ``img``: of the images' ``<SPE>`` outputs (``model.image_representations``, the classification attribute);
* ``cls``: of the class names' ``<SPE>`` outputs (``model.class_name_embeddings``);
* ``tok``: of the images' mean encoder tokens (``ImageEncoderOutput.tokens`` averaged over the tokens).

"Collapsed" is the state where ``img`` and ``cls`` are both near 1: every logit of v2 eq. (6) is then the same,
the cross-entropy sits exactly at ln C (ln 14 = 2.639 on the synthetic suite) and no gradient separates the
classes again (docs/benchmarks.md, "The collapse of the tiny model"). Each row is also written as one JSON
line when ``--jsonl`` names a file, so the curves can be plotted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from uniperceiver_v2.bench import TASK_NAMES, build_trainer
from uniperceiver_v2.engine.runtime import evaluation_mode


def mean_pairwise_cosine(vectors):
    """Mean cosine similarity over all ordered pairs i != j of the rows of ``vectors`` (N, D), N >= 2.

    With unit rows u_i and s = sum_i u_i: sum_{i != j} u_i . u_j = |s|^2 - N, so the mean is (|s|^2 - N) / (N (N-1)).
    """
    import torch

    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"mean_pairwise_cosine: need (N >= 2, D) vectors, got shape {tuple(vectors.shape)}")
    units = torch.nn.functional.normalize(vectors.to(torch.float64), dim=-1)
    n = units.shape[0]
    total = units.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


def probe_cosines(model, task, batch) -> dict[str, float]:
    """{"img", "cls", "tok"}: the three mean pairwise cosines of the module docstring on ``batch``."""

    with evaluation_mode(model):
        image = model.encode_images(batch.images, batch.padding_mask)
        representations = model.image_representations(image, "classification", True)[0]
        names = model.class_name_embeddings(task.class_names, "classification")
        return {"img": mean_pairwise_cosine(representations),
                "cls": mean_pairwise_cosine(names),
                "tok": mean_pairwise_cosine(image.tokens.mean(1))}


def run(args: argparse.Namespace, output_dir: str, out=sys.stdout) -> list[dict]:
    """Train and print the diagnostic table; returns the rows."""
    from uniperceiver_v2.engine.data_setup import build_task_dataset

    disabled = [f"tasks.{name}.enabled=false" for name in TASK_NAMES if name not in args.tasks]
    # every task asked for trains from the first iteration (a preset may let one join late: start_iteration)
    disabled += [f"tasks.{name}.start_iteration=0" for name in args.tasks]
    # The schedule spans --iterations unless the overrides say otherwise (run.iterations=... sets a longer one).
    trainer = build_trainer(args.config, [f"run.iterations={max(args.iterations, 1)}", *args.overrides, *disabled],
                            output_dir)
    cfg, model, task = trainer.cfg, trainer.model, trainer.tasks["classification"]
    val = build_task_dataset(cfg, "classification", cfg.data.val_split, train=False)
    probe = task.collate([val[i] for i in range(min(args.probe, len(val)))]).to(trainer.device)

    header = f"{'iteration':>9}{'loss':>9}{'accuracy':>10}{'img':>9}{'cls':>9}{'tok':>9}{'seconds':>9}"
    print(f"config {args.config} {' '.join(args.overrides)}; tasks {','.join(args.tasks)}; "
          f"ln C = {math.log(len(task.class_names)):.3f} (C = {len(task.class_names)})", file=out)
    print(header, file=out, flush=True)
    rows = []
    last = {"loss": float("nan"), "accuracy": float("nan")}
    start = time.perf_counter()
    jsonl = open(args.jsonl, "w") if args.jsonl else None
    try:
        for iteration in range(args.iterations + 1):
            if iteration % args.every == 0 or iteration == args.iterations:
                row = {"iteration": iteration, **last, **probe_cosines(model, task, probe),
                       "seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"{iteration:>9}{row['loss']:>9.3f}{row['accuracy']:>10.3f}{row['img']:>9.4f}"
                      f"{row['cls']:>9.4f}{row['tok']:>9.4f}{row['seconds']:>9.1f}", file=out, flush=True)
                if jsonl:
                    jsonl.write(json.dumps(row) + "\n")
                    jsonl.flush()
            if iteration == args.iterations:
                break
            for name, values, _ in trainer.train_step(iteration):
                if name == "classification":
                    last = {"loss": values["loss"], "accuracy": values.get("accuracy", float("nan"))}
    finally:
        if jsonl:
            jsonl.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench collapse",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or YAML (default tiny)")
    parser.add_argument("--tasks", default="classification",
                        help="comma-separated tasks to train (default classification); must include classification")
    parser.add_argument("--iterations", type=int, default=200, help="training iterations (default 200)")
    parser.add_argument("--every", type=int, default=10, help="print a row every N iterations (default 10)")
    parser.add_argument("--probe", type=int, default=32, help="validation images of the probe batch (default 32)")
    parser.add_argument("--jsonl", default=None, help="also write the rows to this JSONL file")
    parser.add_argument("--output-dir", default=None,
                        help="the trainer's run folder (default: a temporary folder, deleted afterwards)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    args.tasks = args.tasks.split(",")
    unknown = [t for t in args.tasks if t not in TASK_NAMES]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {unknown}; expected names from {TASK_NAMES}")
    if "classification" not in args.tasks:
        parser.error("--tasks must include classification (the diagnostic probes the classification attribute)")
    if args.iterations < 0 or args.every < 1 or args.probe < 2:
        parser.error("--iterations must be >= 0, --every >= 1, --probe >= 2")
    if args.output_dir is not None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        run(args, args.output_dir)
        return 0
    with tempfile.TemporaryDirectory() as output_dir:
        run(args, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
