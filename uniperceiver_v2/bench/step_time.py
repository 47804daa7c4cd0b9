"""Does a trained model train slower than a fresh one? Time per task, fresh model vs a checkpoint, side by side.

    python -m uniperceiver_v2.bench step_time --checkpoint RUN/checkpoints/iter_0002000 [--iterations 40]
        [--config CONFIG] [key.sub=value ...]

Builds two trainers from the same config (default: the config saved in the checkpoint), one freshly initialised
and one restored from ``--checkpoint``, and times ``Trainer.train_step`` of the same iterations (same tasks, same
batches: both data streams are at the same position) alternately, one step of one then the same step of the
other, so that a change in the machine's load hits both columns alike. Printed per task: the number of steps
timed, the median seconds of each and their ratio (checkpoint / fresh). A ratio near 1 says a slowdown seen
during a long run comes from the machine, not from the state of the model (denormal numbers, longer outputs...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from uniperceiver_v2.bench import build_trainer


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, dict[str, float]]:
    """Time both trainers; print and return {task: {"steps", "fresh_s", "checkpoint_s", "ratio"}}."""
    from uniperceiver_v2.engine.checkpoint import read_checkpoint_meta

    checkpoint = Path(args.checkpoint)
    config = args.config
    if config is None:
        config = checkpoint.parent.parent / "config.yaml"
        if not config.is_file():
            raise SystemExit(f"--config not given and {config} does not exist; pass the run's config")
    start = int(read_checkpoint_meta(checkpoint)["iteration"])
    with tempfile.TemporaryDirectory() as fresh_dir, tempfile.TemporaryDirectory() as trained_dir:
        fresh = build_trainer(config, args.overrides, fresh_dir)
        trained = build_trainer(config, args.overrides, trained_dir)
        trained.resume(checkpoint)
        # Same data for both: move the fresh trainer's streams to where the checkpoint's are.
        for name, stream in fresh.streams.items():
            stream.load_state_dict(trained.streams[name].state_dict())
        times: dict[str, dict[str, list[float]]] = {}
        for iteration in range(start, start + args.warmup + args.iterations):
            task = trained.plan(iteration)[0]
            for label, trainer in (("fresh", fresh), ("checkpoint", trained)):
                tick = time.perf_counter()
                trainer.train_step(iteration)
                seconds = time.perf_counter() - tick
                if iteration >= start + args.warmup:
                    times.setdefault(task, {"fresh": [], "checkpoint": []})[label].append(seconds)
    rows = {}
    print(f"checkpoint {checkpoint} (iteration {start}); {args.iterations} steps timed after {args.warmup} "
          f"warm-up, alternating", file=out)
    print(f"{'task':<16}{'steps':>6}{'fresh s':>10}{'checkpoint s':>14}{'ratio':>8}", file=out)
    for task in sorted(times):
        fresh_s = statistics.median(times[task]["fresh"])
        trained_s = statistics.median(times[task]["checkpoint"])
        rows[task] = {"steps": len(times[task]["fresh"]), "fresh_s": fresh_s, "checkpoint_s": trained_s,
                      "ratio": trained_s / fresh_s}
        print(f"{task:<16}{rows[task]['steps']:>6}{fresh_s:>10.3f}{trained_s:>14.3f}{rows[task]['ratio']:>8.2f}",
              file=out, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench step_time",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (RUN/checkpoints/iter_NNNNNNN)")
    parser.add_argument("--config", default=None,
                        help="preset or YAML (default: config.yaml of the run the checkpoint belongs to)")
    parser.add_argument("--iterations", type=int, default=40, help="timed steps (default 40)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
