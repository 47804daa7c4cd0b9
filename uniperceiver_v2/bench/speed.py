"""Training speed of two configs side by side: seconds per iteration per task and for the mix, and where they go.

    python -m uniperceiver_v2.bench speed --old docs/configs/tiny_2026-12-02.yaml --new tiny \\
        [--iterations 40] [--warmup 2] [key.sub=value ...]

Builds one trainer per config (same overrides, e.g. the data suite) and times ``Trainer.train_step`` of the same
iterations alternately, one step of the old config then the same step of the new one, so that a change in the
machine's load hits both alike. The unmixed plan of the *new* config decides each iteration's task for both.
Printed: per task the median seconds per iteration of each config and their ratio (old / new, > 1 = faster), the
mix (mean seconds over all timed iterations, the quantity that decides a run's length, and the per-task medians
weighted by the sampling ratios s_k, what a long run averages to), and for each config the
median time per part of the iteration: data (next batch), forward of the image encoder / text encoder / unified
decoder (summed over calls), the rest of the forward (losses, matching, target encoding glue), backward, optimizer
step, and what is left (gradient norm, zero_grad, logging).

Run it with one torch thread (``OMP_NUM_THREADS=1``, as the small reproduction trains) and nothing else on the core.
``--threads OLD NEW`` instead gives each side its own number of torch threads (``torch.set_num_threads`` before each
of its steps), e.g. ``--old tiny --new tiny --threads 2 1``: the same config with two threads against one, the
question of how to use a small CPU.

    python -m uniperceiver_v2.bench speed --runs OLD_RUN[,OLD_RUN2] NEW_RUN[,NEW_RUN2] [--at 100 200 400]
        [--window 50] [--plot FILE]

compares the learning of training runs of the two configs (same seeds and data): per task, the mean training
loss over the ``window`` iterations up to each iteration of ``--at`` (from each run's ``metrics.jsonl``, averaged
over the runs of a side), the new / old ratio, and the spread between the old runs (their seed noise); ``--plot``
draws the first run of each side's per-task curves.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch

from uniperceiver_v2.bench import build_trainer

PARTS = ("data", "image_encoder", "text_encoder", "decoder", "forward_rest", "backward", "optimizer", "other")


class _Clock:
    """Accumulates seconds per part while one iteration runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - tick)


class _TimedStream:
    """A task stream whose ``next`` is timed as "data"."""

    def __init__(self, stream, clock: _Clock) -> None:
        self.stream, self.clock = stream, clock

    def __iter__(self):
        return self

    def __next__(self):
        with self.clock.part("data"):
            return next(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _instrument(trainer, clock: _Clock) -> None:
    """Time the parts of ``trainer.train_step`` without changing what it computes."""
    model = trainer.model
    for name in ("image_encoder", "text_encoder", "decoder"):
        module = getattr(model, name)
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_, starts=starts: starts.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_, starts=starts, name=name: clock.add(name, time.perf_counter() - starts.pop()))
    starts: list[float] = []
    trainer.loss_module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    trainer.loss_module.register_forward_hook(lambda *_: clock.add("forward", time.perf_counter() - starts.pop()))
    trainer.streams = {task: _TimedStream(stream, clock) for task, stream in trainer.streams.items()}
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):
        with clock.part("optimizer"):
            return step(*args, **kwargs)

    trainer.optimizer.step = timed_step
    # torch warns when optimizer.step is replaced after the lr scheduler was built; the wrapper only times it.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")


@contextlib.contextmanager
def _timed_backward(clock_of) -> Iterator[None]:
    """``Tensor.backward`` timed as "backward" on the clock of the trainer that is stepping."""
    backward = torch.Tensor.backward

    def timed(self, *args, **kwargs):
        with clock_of().part("backward"):
            return backward(self, *args, **kwargs)

    torch.Tensor.backward = timed
    try:
        yield
    finally:
        torch.Tensor.backward = backward




def _parts(seconds: dict[str, float], total: float) -> dict[str, float]:
    """The iteration split into PARTS (the forward's rest is the forward minus the three modules)."""
    modules = sum(seconds.get(name, 0.0) for name in ("image_encoder", "text_encoder", "decoder"))
    parts = {name: seconds.get(name, 0.0) for name in ("data", "image_encoder", "text_encoder", "decoder",
                                                       "backward", "optimizer")}
    parts["forward_rest"] = max(seconds.get("forward", 0.0) - modules, 0.0)
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return parts


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, dict[str, float]]:
    """Time both configs; print and return {task or "mix": {"old_s", "new_s", "ratio"}} (plus the parts)."""
    labels = ("old", "new")
    threads = None if getattr(args, "threads", None) is None else dict(zip(labels, args.threads))
    previous_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as old_dir, tempfile.TemporaryDirectory() as new_dir:
        trainers = {"old": build_trainer(args.old, args.overrides, old_dir),
                     "new": build_trainer(args.new, args.overrides, new_dir)}
        sampling_weights = {task: trainers["new"].cfg.tasks.get(task).sampling_weight
                            for task in trainers["new"].task_names}
        clocks = {label: _Clock() for label in labels}
        for label in labels:
            _instrument(trainers[label], clocks[label])
        stepping = ["old"]
        totals: dict[str, dict[str, list[float]]] = {}
        parts: dict[str, dict[str, list[dict[str, float]]]] = {}
        with _timed_backward(lambda: clocks[stepping[0]]):
            for iteration in range(args.warmup + args.iterations):
                task = trainers["new"].plan(iteration)[0]
                for label in labels:
                    stepping[0] = label
                    if threads is not None:
                        torch.set_num_threads(threads[label])
                    clocks[label].seconds = {}
                    tick = time.perf_counter()
                    trainers[label].train_step(iteration)
                    seconds = time.perf_counter() - tick
                    if iteration >= args.warmup:
                        totals.setdefault(task, {"old": [], "new": []})[label].append(seconds)
                        parts.setdefault(task, {"old": [], "new": []})[label].append(
                            _parts(clocks[label].seconds, seconds))
    torch.set_num_threads(previous_threads)
    rows: dict[str, dict[str, float]] = {}
    print(f"old: {args.old}   new: {args.new}   overrides: {' '.join(args.overrides) or '-'}", file=out)
    thread_note = (f"{torch.get_num_threads()} torch thread(s)" if threads is None
                   else f"torch threads: old {threads['old']}, new {threads['new']}")
    print(f"{args.iterations} iterations timed after {args.warmup} warm-up, alternating old / new, {thread_note}",
          file=out)
    print(f"{'task':<16}{'iters':>6}{'old s/it':>10}{'new s/it':>10}{'old/new':>9}", file=out)
    for task in sorted(totals):
        old_s, new_s = (statistics.median(totals[task][label]) for label in labels)
        rows[task] = {"iterations": len(totals[task]["old"]), "old_s": old_s, "new_s": new_s, "ratio": old_s / new_s}
        print(f"{task:<16}{rows[task]['iterations']:>6}{old_s:>10.3f}{new_s:>10.3f}{rows[task]['ratio']:>9.2f}",
              file=out)
    mix = {label: statistics.fmean(s for task in totals for s in totals[task][label]) for label in labels}
    rows["mix"] = {"iterations": args.iterations, "old_s": mix["old"], "new_s": mix["new"],
                   "ratio": mix["old"] / mix["new"]}
    print(f"{'mix (mean)':<16}{args.iterations:>6}{mix['old']:>10.3f}{mix['new']:>10.3f}{rows['mix']['ratio']:>9.2f}",
          file=out)
    # The expected mix: each task's median weighted by its sampling ratio s_k (the timed iterations drew the tasks
    # only approximately in those proportions).
    weights = {task: sampling_weights[task] for task in totals}
    total_weight = sum(weights.values())
    expected = {label: sum(weights[t] * rows[t][f"{label}_s"] for t in weights) / total_weight for label in labels}
    rows["mix_expected"] = {"iterations": args.iterations, "old_s": expected["old"], "new_s": expected["new"],
                            "ratio": expected["old"] / expected["new"]}
    print(f"{'mix (s_k-weighted)':<22}{expected['old']:>10.3f}{expected['new']:>10.3f}"
          f"{rows['mix_expected']['ratio']:>9.2f}", file=out)
    print("\nmedian seconds per part of an iteration", file=out)
    print(f"{'task':<16}{'config':<7}" + "".join(f"{name:>14}" for name in PARTS), file=out)
    for task in sorted(parts):
        for label in labels:
            medians = {name: statistics.median(p[name] for p in parts[task][label]) for name in PARTS}
            rows[task][f"{label}_parts"] = medians
            print(f"{task:<16}{label:<7}" + "".join(f"{medians[name]:>14.3f}" for name in PARTS), file=out)
    out.flush()
    return rows


def _window_mean(records: list[dict], task: str, end: int, window: int, source: str) -> float:
    values = [r["loss"] for r in records
              if r.get("task") == task and end - window < r["iteration"] <= end and r.get("loss") is not None]
    if not values:
        raise ValueError(f"{source}: no {task} record in iterations ({end - window}, {end}]")
    return statistics.fmean(values)


def loss_table(old_runs: str, new_runs: str, at: tuple[int, ...] = (100, 200, 400), window: int = 50,
               out=sys.stdout) -> dict[str, dict[int, dict[str, float]]]:
    """Per task and iteration t of ``at``: the mean training loss of the records in (t - window, t] of each run.

    ``old_runs`` / ``new_runs`` are run folders, several separated by commas (e.g. two seeds), whose window means
    are averaged; with several old runs, "old spread" is the largest minus the smallest of them (the seed noise).

    Returns:
        task -> t -> {"old", "new", "old_spread"}.
    """
    from pathlib import Path

    from uniperceiver_v2.engine.logging import read_metrics

    runs = {label: [Path(run) for run in spec.split(",")] for label, spec in (("old", old_runs), ("new", new_runs))}
    records = {label: [(str(run), read_metrics(run / "metrics.jsonl")) for run in paths]
               for label, paths in runs.items()}
    tasks = sorted(set.intersection(*({r["task"] for r in recs} for label in records for _, recs in records[label])))
    table: dict[str, dict[int, dict[str, float]]] = {}
    print(f"mean training loss over the {window} iterations up to each point, averaged over the runs of a side",
          file=out)
    print(f"old: {old_runs}\nnew: {new_runs}", file=out)
    print(f"{'task':<16}" + "".join(f"{f'it {t} old':>13}{'new':>8}{'new/old':>9}{'old spread':>12}" for t in at),
          file=out)
    for task in tasks:
        table[task] = {}
        cells = []
        for t in at:
            means = {label: [_window_mean(recs, task, t, window, source) for source, recs in records[label]]
                     for label in ("old", "new")}
            row = {"old": statistics.fmean(means["old"]), "new": statistics.fmean(means["new"]),
                   "old_spread": max(means["old"]) - min(means["old"])}
            table[task][t] = row
            cells.append(f"{row['old']:>13.3f}{row['new']:>8.3f}{row['new'] / row['old']:>9.3f}"
                         f"{row['old_spread']:>12.3f}")
        print(f"{task:<16}" + "".join(cells), file=out)
    return table


def plot_runs(old_run: str, new_run: str, path: str, smooth: int = 5) -> None:
    """Both runs' per-task training losses, one panel per task, old dashed and new solid."""
    from pathlib import Path

    import numpy as np
    from matplotlib.figure import Figure

    from uniperceiver_v2.engine.logging import read_metrics
    from uniperceiver_v2.viz.curves import moving_average

    records = {label: read_metrics(Path(run) / "metrics.jsonl") for label, run in (("old", old_run), ("new", new_run))}
    tasks = sorted({r["task"] for r in records["old"]})
    fig = Figure(figsize=(3.2 * len(tasks), 2.8), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for label, style in (("old", "--"), ("new", "-")):
            points = np.array([(r["iteration"], r["loss"]) for r in records[label] if r["task"] == task])
            ax.plot(points[:, 0], moving_average(points[:, 1], smooth), style, label=label)
        ax.set_title(task)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    axes[0].legend()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="preset or YAML of the reference config")
    parser.add_argument("--new", help="preset or YAML of the config to compare with it")
    parser.add_argument("--runs", nargs=2, metavar=("OLD_RUNS", "NEW_RUNS"),
                        help="compare the training losses of finished runs instead of timing (each side a run "
                             "folder, or several separated by commas, e.g. two seeds, averaged)")
    parser.add_argument("--at", nargs="+", type=int, default=[100, 200, 400], help="iterations to compare losses at")
    parser.add_argument("--window", type=int, default=50, help="iterations averaged up to each --at point")
    parser.add_argument("--plot", help="with --runs: a PNG of both runs' per-task curves")
    parser.add_argument("--iterations", type=int, default=40, help="timed iterations (default 40)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--threads", nargs=2, type=int, metavar=("OLD", "NEW"),
                        help="torch threads of each side (default: both the process's, OMP_NUM_THREADS)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied to both configs")
    args = parser.parse_intermixed_args(argv)
    if args.runs:
        loss_table(*args.runs, at=tuple(args.at), window=args.window)
        if args.plot:
            plot_runs(*(spec.split(",")[0] for spec in args.runs), args.plot)
        return 0
    if not (args.old and args.new):
        parser.error("give --old and --new (or --runs OLD_RUN NEW_RUN)")
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if args.threads is not None and min(args.threads) < 1:
        parser.error(f"--threads: expected two numbers >= 1, got {args.threads}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
