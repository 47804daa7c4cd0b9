"""Training metrics: per-task averages over a logging window, written to ``metrics.jsonl`` and TensorBoard.

With unmixed sampling (Sec. 4.4) every iteration trains one task, so a loss curve is a per-task curve: the
trainer adds each iteration's loss terms to a :class:`WindowAverages` under the task that produced them, and at
every logging point writes one record per task seen in the window.

``metrics.jsonl`` holds one JSON object per line, so a notebook plots it with two lines
(``records = read_metrics(path)``, or ``pandas.read_json(path, lines=True)``). Training records:

    {"kind": "train", "iteration": 120, "task": "detection", "count": 3, "loss": 4.21,
     "loss_cls": 1.02, ..., "lr": 0.00098, "grad_norm": 3.4, "time": 61.3, "iter_time": 0.52}

* ``iteration``: optimizer steps completed when the window closed (1-based, the x axis);
* ``count``: batches of this task (micro-batches on all ranks) averaged into the record;
* ``loss`` (the task's total, w_k times its terms) and every other value the task's loss returned (terms,
  accuracies), averaged over those batches and over ranks;
* ``lr``: the base learning rate (decoder group) at the last step of the window; ``lr/<group>`` per group;
* ``grad_norm``: mean global gradient norm of this task's steps (before clipping or MT-AdamW normalisation);
* ``time``: wall-clock seconds of training so far (continued across resumes); ``iter_time``: mean seconds
  per iteration in the window (all tasks).

Evaluation records are ``{"kind": "eval", "iteration": ..., "split": ..., "task": ..., <metric>: ...}``.
The same values go to TensorBoard under ``loss/<task>``, ``<task>/<term>``, ``lr/<group>``,
``grad_norm/<task>``, ``time/iter_s`` and ``eval_<split>/<task>/<metric>``.

One point per (iteration, task): a run that starts at iteration k (k = 0 from scratch, else the checkpoint's
iteration) first moves every record of an iteration after k out of ``metrics.jsonl`` into
``metrics.jsonl.discarded`` (``cut_metrics``), so an attempt killed before its next checkpoint leaves no
repeated or out-of-order points, and nothing it logged is lost.

A process killed while appending (or a full disk) can leave a torn last line, one without its newline: readers
drop it with a warning naming the file and line; any other unreadable line is an error naming them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .checkpoint import write_text_atomic
from .distributed import get_world_size, is_distributed

__all__ = ["MetricWriter", "RESERVED_KEYS", "WindowAverages", "cut_metrics", "json_safe", "read_metrics"]

DISCARDED_SUFFIX = ".discarded"

# Keys of a training record that a task's loss term may not reuse.
RESERVED_KEYS = frozenset({"kind", "iteration", "task", "count", "lr", "grad_norm", "time", "iter_time", "split"})


class WindowAverages:
    """Running sums of per-task scalars between two logging points, on one rank.

    ``add(task, values, count)`` once per (iteration, task) with plain floats averaged over ``count`` batches;
    ``merged()`` sums the windows of all ranks (a collective: every rank must call it at the same iteration)
    and returns per-task means over batches.
    """

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, float]] = {}
        self._counts: dict[str, int] = {}
        self.iterations = 0
        self.seconds = 0.0

    def add(self, task: str, values: Mapping[str, float], count: int = 1) -> None:
        """Add one iteration's scalars of ``task``, each the mean over ``count`` batches; a reserved key is
        an error naming the task."""
        clash = RESERVED_KEYS.intersection(values).difference({"grad_norm"})
        if clash:
            raise ValueError(f"task {task!r}: loss term name(s) {sorted(clash)} are reserved metric keys")
        sums = self._sums.setdefault(task, {})
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value) * count
        self._counts[task] = self._counts.get(task, 0) + count

    def add_time(self, seconds: float, iterations: int = 1) -> None:
        """Wall-clock time of ``iterations`` completed iterations."""
        self.seconds += seconds
        self.iterations += iterations

    def __bool__(self) -> bool:
        return bool(self._counts)

    def merged(self) -> dict[str, dict[str, float]]:
        """Per task: the mean of every scalar over its iterations on all ranks, plus ``count``.

        With mixed sampling ranks see different tasks and loss terms, so the windows are exchanged as
        Python objects rather than reduced as a fixed-size tensor. Called once per logging window, this is
        a few hundred bytes per rank.
        """
        local = {"sums": self._sums, "counts": self._counts}
        if is_distributed() and get_world_size() > 1:
            gathered: list[Any] = [None] * get_world_size()
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        sums: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        for window in gathered:
            for task, values in window["sums"].items():
                task_sums = sums.setdefault(task, {})
                for key, value in values.items():
                    task_sums[key] = task_sums.get(key, 0.0) + value
                counts[task] = counts.get(task, 0) + window["counts"][task]
        # Terms that only some of a task's iterations report (none today) are averaged over those that do.
        return {
            task: {"count": counts[task], **{key: value / counts[task] for key, value in sums[task].items()}}
            for task in sorted(sums)
        }

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self.iterations = 0
        self.seconds = 0.0


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN/inf; a diverged loss is written as null so every line stays valid JSON.
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """``value`` with NaN / inf floats replaced by None, recursively through dicts and lists (strict JSON has
    neither; COCO reports NaN for, e.g., the AP of large objects when a split has none)."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class MetricWriter:
    """Appends records to ``<output_dir>/metrics.jsonl`` and mirrors them to TensorBoard (``<output_dir>/tb``).

    Only the main process creates one. ``tensorboard=False`` skips TensorBoard (e.g. in unit tests).

    ``start_iteration=k``: the run continues after iteration k (0 from scratch, the checkpoint's iteration on a
    resume). Records of later iterations that an earlier attempt wrote are first moved to
    ``metrics.jsonl.discarded`` (``cut_metrics``; their number is ``discarded``, the log's last iteration before
    the cut ``last_logged_iteration``) and hidden in TensorBoard, so this run's records take their place.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, start_iteration: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.discarded, self.last_logged_iteration = cut_metrics(self.path, start_iteration)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the writer
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides an earlier attempt's events after start_iteration in TensorBoard.
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"), purge_step=start_iteration + 1)

    def write_train(
        self,
        iteration: int,
        per_task: Mapping[str, Mapping[str, float]],
        lrs: Mapping[str, float],
        elapsed: float,
        iter_time: float,
    ) -> list[dict[str, Any]]:
        """Write one training record per task.

        Args:
            iteration: optimizer steps completed.
            per_task: task -> {"count", "loss", other terms, "grad_norm"} from ``WindowAverages.merged``.
            lrs: param-group name -> current lr; the first group is the base (decoder) lr.
            elapsed: seconds of training so far.
            iter_time: mean seconds per iteration over the window.

        Returns:
            The records written.
        """
        base_lr = next(iter(lrs.values()))
        records = []
        for task, values in per_task.items():
            record: dict[str, Any] = {"kind": "train", "iteration": int(iteration), "task": task}
            record["count"] = int(values["count"])
            record["loss"] = _finite_or_none(values["loss"])
            for key, value in values.items():
                if key not in ("count", "loss", "grad_norm"):
                    record[key] = _finite_or_none(value)
            record["lr"] = base_lr
            for group, lr in lrs.items():
                record[f"lr/{group}"] = lr
            if "grad_norm" in values:
                record["grad_norm"] = _finite_or_none(values["grad_norm"])
            record["time"] = round(elapsed, 3)
            record["iter_time"] = round(iter_time, 5)
            records.append(record)
            if self._tb is not None:
                self._tb.add_scalar(f"loss/{task}", values["loss"], iteration)
                for key, value in values.items():
                    if key not in ("count", "loss", "grad_norm"):
                        self._tb.add_scalar(f"{task}/{key}", value, iteration)
                if "grad_norm" in values:
                    self._tb.add_scalar(f"grad_norm/{task}", values["grad_norm"], iteration)
        if self._tb is not None:
            for group, lr in lrs.items():
                self._tb.add_scalar(f"lr/{group}", lr, iteration)
            self._tb.add_scalar("time/iter_s", iter_time, iteration)
        self._append(records)
        return records

    def write_eval(self, iteration: int, split: str, results: Mapping[str, Mapping[str, float]]) -> None:
        """One record per evaluated task; ``results`` is task -> {metric: value} (numbers only are logged)."""
        records = []
        for task, metrics in results.items():
            record: dict[str, Any] = {"kind": "eval", "iteration": int(iteration), "split": split, "task": task}
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    record[name] = _finite_or_none(float(value))
                    if self._tb is not None:
                        self._tb.add_scalar(f"eval_{split}/{task}/{name}", float(value), iteration)
            records.append(record)
        self._append(records)

    def _append(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        # Flushed per window so a notebook (or a crashed run's post-mortem) always sees complete lines.
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _parse_lines(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line without its newline, record) for every non-empty line of ``text``, the content of the JSON-lines
    file ``path``.

    Every record is written with its newline in one call, so a write cut short by a kill or a full disk leaves
    a last line without one: such a torn line, if it is not valid JSON, is dropped with a warning naming file
    and line. Any other invalid line (even a complete last one) is a ValueError naming them.
    """
    lines = text.split("\n")          # the last item is the unterminated rest ("" after a final newline)
    parsed = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == len(lines):
                warnings.warn(f"{path}:{line_number}: dropped a torn last line (no newline: a process killed while "
                              f"writing it, or a full disk): {line[:80]!r}", stacklevel=3)
                break
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error}); only a torn last line (one without "
                             "a newline, left by an interrupted write) is skipped") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        parsed.append((line, record))
    return parsed


def read_metrics(path: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (of one ``kind``, or all with ``kind=None``), in file order.

    A torn last line is dropped with a warning; any other unreadable line is a ValueError naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = _parse_lines(path, path.read_text(encoding="utf-8"))
    return [record for _, record in lines if kind is None or record.get("kind") == kind]


def cut_metrics(path: str | Path, iteration: int) -> tuple[int, int | None]:
    """Cut the log ``path`` back to ``iteration``: records of later iterations move to ``<path>.discarded``.

    The moved lines are appended to ``<path>.discarded`` unchanged, after one line
    ``{"kind": "discarded", "iteration": <iteration>, "records": <n>, "time_utc": ...}`` saying why; then
    ``path`` is replaced atomically with the kept lines (also when only a torn last line was dropped, so the
    next append starts on a line of its own). A missing file is left missing.

    Returns:
        (number of records moved, the highest iteration the log held before the cut or None if it held none).
    """
    path = Path(path)
    if not path.is_file():
        return 0, None
    text = path.read_text(encoding="utf-8")
    lines = _parse_lines(path, text)
    kept = [line for line, record in lines if record.get("iteration", 0) <= iteration]
    moved = [line for line, record in lines if record.get("iteration", 0) > iteration]
    last = max((record.get("iteration", 0) for _, record in lines), default=None)
    if moved:
        header = {"kind": "discarded", "iteration": int(iteration), "records": len(moved),
                  "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "reason": f"the run restarted from iteration {iteration}; these records of later iterations "
                            f"were removed from {path.name}"}
        with open(path.with_name(path.name + DISCARDED_SUFFIX), "a", encoding="utf-8") as side:
            side.write("".join(line + "\n" for line in [json.dumps(header), *moved]))
            side.flush()
            os.fsync(side.fileno())    # the moved lines are on disk before they leave the log
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        write_text_atomic(path, new_text)
    return len(moved), last
