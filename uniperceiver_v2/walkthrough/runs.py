"""What notebooks 06-08 need beyond a call into the package: run the trainer as a subprocess and follow it, read its
logs, find its checkpoint, and collect qualitative examples and novel-category numbers from a trained model.

Training (notebook 06) runs in a separate process, exactly as from a shell, so the notebook teaches the real
command (``python -m uniperceiver_v2.train`` or ``torchrun ... -m uniperceiver_v2.train``) and a crash or an
interrupt of the trainer never takes the notebook's kernel with it. Its output is streamed into the notebook line
by line; tqdm's progress-bar redraws are thinned (:class:`ProgressFilter`) so a long run does not print thousands of
lines. The run lives in ``{run_dir}/train`` (:func:`training_dir`), where notebooks 07 and 08 find its checkpoint.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .reproduce import project_path

__all__ = [
    "CONSOLE_LOG",
    "pretrained_backbone",
    "NovelDetectionResult",
    "ProgressFilter",
    "RetrievalExamples",
    "TrainingFailed",
    "TrainingStatus",
    "best_proposal_logits",
    "category_exposure",
    "chance_levels",
    "config_of_command",
    "default_log_every",
    "distinct_detections",
    "evaluate_novel_detection",
    "fill_mask_examples",
    "loss_summary",
    "lr_records",
    "mask_one_word",
    "metrics_table",
    "novel_ap_table",
    "novel_box_metrics",
    "novel_category_names",
    "param_group_table",
    "per_category_table",
    "representation_similarity",
    "require_checkpoint",
    "resolve_device",
    "retrieval_examples",
    "run_training",
    "shell_command",
    "stream_command",
    "task_mixture_table",
    "task_sequence_from_records",
    "train_command",
    "training_dir",
    "training_status",
    "unmixed_sampler",
]

# The trainer's console output, appended by :func:`run_training` next to its own files.
CONSOLE_LOG = "console.log"


# --------------------------------------------------------------------------------------------------------------
# The run directory and its checkpoint
# --------------------------------------------------------------------------------------------------------------
def training_dir(run_dir: str | os.PathLike) -> Path:
    """``{run_dir}/train``: the trainer's ``run.output_dir`` for a profile's run (notebook 06 writes it, 07 and 08
    read it). A relative ``run_dir`` is taken relative to the project checkout (``reproduce.project_path``)."""
    return project_path(run_dir) / "train"


def pretrained_backbone(preset: str, run_dir: str | os.PathLike, iterations: int, *, data_root: str | os.PathLike,
                        data_profile: str | None, device: str = "auto", seed: int = 0,
                        progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The backbone weights of a profile's run, ``{run_dir}/backbone/backbone.safetensors``: pre-trained here
    (``pretrain_backbone``, the stand-in for ImageNet weights) unless a file of the same preset, seed and length is
    already there.

    Returns:
        (path of the weights, the summary written next to them: validation top-1, loss history, seconds).
    """
    import json

    from .config import load_config
    from .pretrain_backbone import pretrain_backbone

    out = project_path(run_dir) / "backbone" / "backbone.safetensors"
    summary_path = out.with_name(out.name + ".json")
    wanted = {"preset": str(preset), "seed": seed, "iterations": iterations}
    if out.is_file() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if {key: summary.get(key) for key in wanted} == wanted:
            return out, summary
    cfg = load_config(str(preset), [f"data.root={project_path(data_root)}", f"run.seed={seed}",
                                    f"run.device={device}",
                                    f"data.synthetic_profile={'null' if data_profile is None else data_profile}"])
    summary = pretrain_backbone(cfg, out, iterations=iterations, progress=progress)
    summary.update(wanted)
    summary_path.write_text(json.dumps(summary, indent=1))
    return out, summary


@dataclass
class TrainingStatus:
    """Where a training run stands.

    Attributes:
        output_dir: the run's ``run.output_dir``.
        checkpoint: its newest complete checkpoint, or None.
        iteration: the iteration of that checkpoint (0 without one).
        target: the number of iterations asked for.
    """

    output_dir: Path
    checkpoint: Path | None
    iteration: int
    target: int

    @property
    def finished(self) -> bool:
        """True when the newest checkpoint has reached the target: there is nothing left to train."""
        return self.checkpoint is not None and self.iteration >= self.target


def training_status(output_dir: str | os.PathLike, iterations: int) -> TrainingStatus:
    """The newest checkpoint under ``<output_dir>/checkpoints`` and whether it has reached ``iterations``."""
    from .engine.checkpoint import find_latest, read_checkpoint_meta

    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    checkpoint = find_latest(checkpoints) if checkpoints.is_dir() else None
    iteration = int(read_checkpoint_meta(checkpoint)["iteration"]) if checkpoint is not None else 0
    return TrainingStatus(output_dir, checkpoint, iteration, iterations)


def require_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of the run of notebook 06 (``{run_dir}/train/checkpoints``).

    Raises:
        FileNotFoundError: there is none yet; the message says to run notebook 06 first (nothing is trained here).
    """
    output_dir = training_dir(run_dir)
    status = training_status(output_dir, iterations=0)
    if status.checkpoint is None:
        raise FileNotFoundError(
            f"no trained model in {output_dir / 'checkpoints'}: run notebooks/06_multitask_training.ipynb first "
            f"with the same run_dir (python -m uniperceiver_v2.reproduce --profile <profile> --only 06 runs it); "
            f"this notebook evaluates a checkpoint and does not train one")
    return status.checkpoint


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the first GPU when there is one, else the CPU; anything else as ``torch.device`` reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='auto' or 'cpu'")
    return resolved


# --------------------------------------------------------------------------------------------------------------
# Launching the trainer
# --------------------------------------------------------------------------------------------------------------
def default_log_every(iterations: int) -> int | None:
    """``run.log_every`` for a notebook run: every iteration for short runs (<= 200), so each unmixed iteration
    is its own record and the sampled task sequence can be read from the log; None (the preset's) otherwise."""
    return 1 if iterations <= 200 else None


def train_command(preset: str, output_dir: str | os.PathLike, iterations: int, *, data_root: str | os.PathLike,
                  data_profile: str | None, nproc: int = 1, device: str = "auto", seed: int = 0,
                  log_every: int | None = None, overrides: Sequence[str] = (), resume: bool = True,
                  new_schedule: bool = True, evaluate: bool = False, python: str | None = None) -> list[str]:
    """The command line that trains ``preset`` into ``output_dir``.

    One process: ``python -m uniperceiver_v2.train ...``; several: ``python -m torch.distributed.run --standalone
    --nproc_per_node=N -m uniperceiver_v2.train ...`` (what the ``torchrun`` script runs, started from this
    interpreter so the workers use the same environment; ``--standalone`` picks a free rendezvous port).

    Args:
        preset: config preset or YAML file (``--config``).
        output_dir: ``run.output_dir``.
        iterations: ``run.iterations``.
        data_root: ``data.root``.
        data_profile: ``data.synthetic_profile``: the synthetic suite to generate if missing, None for real data.
        nproc: processes (one per GPU).
        device: ``run.device``.
        seed: ``run.seed``.
        log_every: ``run.log_every``; None keeps the preset's.
        overrides: further ``key.sub=value`` overrides, applied last.
        resume: ``--resume``: continue from the newest checkpoint of ``output_dir`` (from scratch without one).
        new_schedule: with ``resume``, ``--new-schedule``: the lr follows this ``iterations``' schedule from the
            checkpoint on, so rerunning with a larger ``iterations`` extends the run properly (with the same
            ``iterations`` it is the saved schedule); False keeps the schedule saved in the checkpoint.
        evaluate: False adds ``--no-eval`` (notebook 07 evaluates the checkpoint).
        python: the interpreter; default this one.

    Returns:
        argv for ``subprocess``.
    """
    if nproc < 1:
        raise ValueError(f"nproc: expected at least 1 process, got {nproc}")
    if iterations < 1:
        raise ValueError(f"iterations: expected at least 1, got {iterations}")
    python = python or sys.executable
    launcher = [python, "-m", "uniperceiver_v2.train"] if nproc == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "uniperceiver_v2.train"]
    flags = ["--config", str(preset)]
    if resume:
        flags.append("--resume")
        if new_schedule:
            flags.append("--new-schedule")
    if not evaluate:
        flags.append("--no-eval")
    settings = [
        f"data.root={data_root}",
        f"data.synthetic_profile={'null' if data_profile is None else data_profile}",
        f"run.iterations={iterations}",
        f"run.output_dir={output_dir}",
        f"run.device={device}",
        f"run.seed={seed}",
    ]
    if log_every is not None:
        settings.append(f"run.log_every={log_every}")
    return launcher + flags + settings + list(overrides)


def shell_command(command: Sequence[str]) -> str:
    """``command`` as one shell command, quoted, with each ``key.sub=value`` override on its own line."""
    lines = [[]]
    for argument in command:
        if "=" in argument and not argument.startswith("-"):
            lines.append([])
        lines[-1].append(shlex.quote(str(argument)))
    return " \\\n    ".join(" ".join(line) for line in lines)


def config_of_command(command: Sequence[str]):
    """The ``Config`` the trainer builds from ``command`` (its ``--config`` and overrides, parsed by ``train.py``'s
    own parser), to show in a notebook what the run will use."""
    from .config import load_config
    from .train import parse_args

    module = "uniperceiver_v2.train"
    if module not in command:
        raise ValueError(f"config_of_command: {module} does not appear in {list(command)}")
    args = parse_args(list(command[list(command).index(module) + 1:]))
    return load_config(args.config, args.overrides)


def unmixed_sampler(cfg):
    """The task sampler of a run with unmixed sampling, built as ``engine.trainer.Trainer`` builds it: the enabled
    tasks in config order, weights ``tasks.<name>.sampling_weight`` (normalised to s_k), seed ``run.seed``."""
    from .engine.sampling import UnmixedTaskSampler

    if cfg.run.sampling != "unmixed":
        raise ValueError(f"run.sampling is {cfg.run.sampling!r}; unmixed_sampler describes unmixed runs only")
    names = cfg.tasks.names()
    return UnmixedTaskSampler(names, {name: cfg.tasks.get(name).sampling_weight for name in names},
                              seed=cfg.run.seed)


def task_mixture_table(cfg, iterations: int) -> dict[str, list]:
    """The run's task mixture (eq. (7), Tab. 8): per task s_k, w_k, the batch size per process and the
    iterations and samples it gets in expectation over ``iterations`` unmixed iterations."""
    sampler = unmixed_sampler(cfg)
    rows = []
    for name in sampler.task_names:
        task = cfg.tasks.get(name)
        share = sampler.sampling_ratio(name)
        rows.append([name, round(share, 4), task.loss_weight, task.batch_size, round(share * iterations, 1),
                     round(share * iterations * task.batch_size)])
    return {"columns": ["task", "s_k", "w_k", "batch / process", "expected iterations", "expected samples / process"],
            "rows": rows}


def loss_summary(records: Sequence[Mapping[str, Any]], window: int = 3) -> dict[str, list]:
    """Per task: how many training records it has, and its mean loss over its first and last ``window`` records.

    Returns:
        ``{"columns": [...], "rows": [[task, records, first, last, last / first], ...]}`` in task-name order.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    losses: dict[str, list[float]] = {}
    for record in sorted(records, key=lambda r: r["iteration"]):
        if record.get("kind", "train") == "train" and record.get("loss") is not None:
            losses.setdefault(str(record["task"]), []).append(float(record["loss"]))
    rows = []
    for task in sorted(losses):
        values = losses[task]
        first = sum(values[:window]) / len(values[:window])
        last = sum(values[-window:]) / len(values[-window:])
        rows.append([task, len(values), round(first, 4), round(last, 4), round(last / first, 3) if first else None])
    return {"columns": ["task", "records", f"loss, first {window}", f"loss, last {window}", "last / first"],
            "rows": rows}


class TrainingFailed(RuntimeError):
    """The trainer exited with a non-zero code; the message holds the code and the last lines of its output."""

    def __init__(self, command: Sequence[str], returncode: int, tail: Sequence[str], log: Path | None):
        self.returncode = returncode
        where = f"\n  full output in {log}" if log is not None else ""
        meaning = {2: " (bad command line or configuration)"}.get(returncode, "")
        if returncode > 128:
            meaning = f" (stopped by signal {returncode - 128} after saving a checkpoint; rerun to resume)"
        super().__init__(f"the trainer exited with code {returncode}{meaning}: {' '.join(command)}\n"
                         + "\n".join(f"  | {line}" for line in tail) + where)


# tqdm's bar ends with "n/total [elapsed<remaining, rate, postfix]"; text after it is another writer's output
# (a log line printed while the bar was on screen).
_TQDM_BAR = re.compile(r"^(.*\d+/\d+ \[[^\]]*\])(.*)$")


class ProgressFilter:
    """Turns a process's raw console output into lines for a notebook.

    Ordinary lines (ended by ``\\n``) pass through. A progress bar redraws itself in place: tqdm writes ``\\r`` and
    the new bar; every such redraw is a *progress line*. A progress line is shown when at least ``interval``
    seconds have passed since the last one shown; otherwise it is held back, and shown only if it is the last one
    before an ordinary line or the end of the output (so the final state, e.g. 100 %, always appears).

    Args:
        emit: called with each line to show.
        interval: seconds between two progress lines shown.
        clock: time source (seconds), replaceable in tests.
    """

    def __init__(self, emit: Callable[[str], None], interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self._buffer = ""
        self._after_carriage_return = False
        self._pending: str | None = None
        self._last_shown = -math.inf
        self._handled = ""   # a complete bar at the end of the buffer, already handled by ``feed``

    def feed(self, text: str) -> None:
        """Process a chunk of output (any size; a line may be split across chunks)."""
        self._buffer += text
        while True:
            match = re.search(r"[\r\n]", self._buffer)
            if match is None:
                break
            segment = self._buffer[:match.start()]
            self._buffer = self._buffer[match.end():]
            self._segment(segment, progress=self._after_carriage_return)
            self._after_carriage_return = match.group() == "\r"
        # tqdm ends a redraw with nothing: the bar is only terminated by the next redraw, which for a slow iteration
        # comes many seconds later. A complete bar at the end of the output is therefore handled now.
        bar = _TQDM_BAR.fullmatch(self._buffer)
        if self._after_carriage_return and bar is not None and not bar.group(2) and not self._handled:
            self._progress(self._buffer)
            self._handled = self._buffer

    def close(self) -> None:
        """End of the output: show what is left, including a held-back progress line."""
        if self._buffer:
            self._segment(self._buffer, progress=self._after_carriage_return)
            self._buffer = ""
        self._flush_pending()

    def _segment(self, text: str, progress: bool) -> None:
        handled, self._handled = self._handled, ""
        if progress and handled and text.startswith(handled):
            text, progress = text[len(handled):], False   # the bar was handled; what follows it is a line
        if not text.strip():
            return
        if not progress:
            self._line(text)
            return
        match = _TQDM_BAR.match(text)
        bar, rest = (match.group(1), match.group(2)) if match else (text, "")
        self._progress(bar)
        if rest.strip():
            self._line(rest)

    def _progress(self, bar: str) -> None:
        now = self.clock()
        if now - self._last_shown >= self.interval:
            self._pending = None
            self._last_shown = now
            self.emit(bar.strip())
        else:
            self._pending = bar.strip()

    def _line(self, text: str) -> None:
        self._flush_pending()
        self.emit(text.rstrip())

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self.emit(self._pending)
            self._pending = None
            self._last_shown = self.clock()


def stream_command(command: Sequence[str], *, log_file: str | os.PathLike | None = None,
                   cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                   progress_interval: float = 10.0, emit: Callable[[str], None] | None = None,
                   keep_tail: int = 25) -> tuple[int, list[str]]:
    """Run ``command``, showing its output (stdout and stderr merged) line by line as it arrives.

    Args:
        command: argv.
        log_file: the raw output is appended here as well (progress redraws included).
        cwd, env: of the process; ``PYTHONUNBUFFERED=1`` is added to ``env`` (default this process's environment)
            so a Python child prints as it goes instead of in 8 kB blocks.
        progress_interval: seconds between two progress-bar lines shown (:class:`ProgressFilter`).
        emit: called with each shown line; default ``print(line, flush=True)``.
        keep_tail: how many of the last shown lines to return.

    Returns:
        (exit code, the last ``keep_tail`` lines shown).

    An interrupt (Ctrl-C, or "interrupt kernel" in Jupyter) is passed on to the process as one SIGINT, which the
    trainer answers by saving a checkpoint after its current iteration; once the process has exited the interrupt
    is re-raised. The process runs in its own session, so a Ctrl-C in a terminal reaches it only through this
    forwarding and not twice (a second SIGINT makes the trainer stop at once, without a checkpoint). A second
    interrupt while waiting kills the process.
    """
    tail: list[str] = []

    def show(line: str) -> None:
        tail.append(line)
        del tail[:-keep_tail]
        (emit or (lambda text: print(text, flush=True)))(line)

    environment = dict(os.environ if env is None else env)
    environment["PYTHONUNBUFFERED"] = "1"
    progress = ProgressFilter(show, progress_interval)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    log = open(log_file, "a", encoding="utf-8") if log_file is not None else None  # noqa: SIM115 - closed below
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                               env=environment, start_new_session=True)
    try:
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            if log is not None:
                log.write(text)
                log.flush()
            progress.feed(text)
        progress.feed(decoder.decode(b"", final=True))
        progress.close()
        return process.wait(), tail
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    finally:
        process.stdout.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        if log is not None:
            log.close()


def run_training(command: Sequence[str], output_dir: str | os.PathLike, progress_interval: float = 10.0) -> None:
    """Run the trainer's ``command`` with :func:`stream_command`, appending its output to
    ``<output_dir>/console.log``, from the project checkout (so ``-m uniperceiver_v2.train`` finds the package).

    Raises:
        TrainingFailed: the trainer exited with a non-zero code.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / CONSOLE_LOG
    returncode, tail = stream_command(command, log_file=log, cwd=project_path("."),
                                      progress_interval=progress_interval)
    if returncode != 0:
        raise TrainingFailed(command, returncode, tail, log)


# --------------------------------------------------------------------------------------------------------------
# Reading the training log (metrics.jsonl, engine/logging.py)
# --------------------------------------------------------------------------------------------------------------
def lr_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The learning rates of a training log in long format, one record per (iteration, distinct multiplier).

    The trainer logs ``lr/<group>`` for every optimizer group; groups that differ only in weight decay share the
    same learning rate, so the groups are merged by their multiplier of the base lr (``lr``):
    ``{"iteration", "group": "base lr x0.1", "lr"}``. ``viz.plot_curves(records, keys=("lr",), by="group")`` draws
    them.
    """
    out: dict[tuple[int, str], dict[str, Any]] = {}
    multipliers: dict[str, float] = {}
    for record in records:
        base = record.get("lr")
        groups = {key[3:]: value for key, value in record.items() if key.startswith("lr/") and value is not None}
        if base is None or not groups:
            continue
        for group, lr in groups.items():
            if group not in multipliers and base > 0:
                multipliers[group] = lr / base
            if group not in multipliers:
                continue   # an lr of 0 (first warm-up step) says nothing about the multiplier
            label = f"base lr x{multipliers[group]:.3g}"
            out[(int(record["iteration"]), label)] = {"iteration": int(record["iteration"]), "group": label,
                                                     "lr": float(lr)}
    return sorted(out.values(), key=lambda r: (r["group"], r["iteration"]))


def task_sequence_from_records(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task trained at each iteration 1..N, read from a log written with ``run.log_every=1``.

    With unmixed sampling and one record per iteration, record ``iteration=i`` names the task of iteration i.

    Raises:
        ValueError: the log does not have exactly one record (of one batch) for every iteration 1..N, e.g. it was
            written with a larger ``run.log_every``.
    """
    by_iteration: dict[int, list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("kind", "train") == "train":
            by_iteration.setdefault(int(record["iteration"]), []).append(record)
    if not by_iteration:
        raise ValueError("task_sequence_from_records: no training records")
    last = max(by_iteration)
    missing = [i for i in range(1, last + 1) if i not in by_iteration]
    crowded = [i for i, rows in by_iteration.items() if len(rows) != 1 or rows[0].get("count", 1) != 1]
    if missing or crowded:
        raise ValueError(f"task_sequence_from_records: the log has no single record for iteration(s) "
                         f"{(missing + sorted(crowded))[:5]}...; it needs run.log_every=1")
    return [str(by_iteration[i][0]["task"]) for i in range(1, last + 1)]


def param_group_table(model: torch.nn.Module, optimizer: torch.optim.Optimizer, depth: int = 2
                      ) -> dict[str, list]:
    """The optimizer's parameter groups as a table: name, lr, weight decay, parameters, and the modules in it.

    Args:
        depth: how many leading name components identify a module (2: ``image_encoder.backbone``).

    Returns:
        ``{"columns": [...], "rows": [[group, lr, weight decay, tensors, parameters, modules], ...]}``.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    rows = []
    for index, group in enumerate(optimizer.param_groups):
        modules = sorted({".".join(names[id(p)].split(".")[:depth]) for p in group["params"]})
        rows.append([group.get("name", str(index)), group["lr"], group["weight_decay"], len(group["params"]),
                     sum(p.numel() for p in group["params"]), ", ".join(modules)])
    return {"columns": ["group", "lr", "weight decay", "tensors", "parameters", "modules"], "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Evaluation results
# --------------------------------------------------------------------------------------------------------------
# The headline metric(s) of every task, in the paper's order (plus the class-agnostic box AP, which separates
# localisation errors from naming errors).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5"),
    "detection": ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "agnostic_bbox_AP", "agnostic_bbox_AP50"),
    "captioning": ("BLEU-4", "CIDEr"),
    "retrieval": ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"),
    "mlm": ("accuracy",),
}


def _percent(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(100.0 * value, 2)


def chance_levels(results: Mapping[str, Mapping[str, Any]], num_classes: int | None = None,
                  vocabulary_size: int | None = None) -> dict[tuple[str, str], float]:
    """What a model that ranks the candidates at random scores, in expectation, for the metrics that have a
    closed form: classification top-k = k / C; retrieval text->image R@K = K / I and image->text
    R@K = 1 - C(T - c, K) / C(T, K) (at least one of the image's c = T / I captions among K random texts);
    masked-token accuracy = 1 / V. Detection AP and caption scores have no such baseline (about 0).

    Args:
        results: ``evaluate``'s results (retrieval's ``num_images`` and ``num_texts`` are read from it).
        num_classes: C, the classification candidates; vocabulary_size: V, the MLM candidates.

    Returns:
        (task, metric) -> chance value as a fraction.
    """
    chance: dict[tuple[str, str], float] = {}
    if num_classes:
        for k in (1, 5):
            chance[("classification", f"top{k}")] = min(k, num_classes) / num_classes
    retrieval = results.get("retrieval", {})
    if "num_images" in retrieval and "num_texts" in retrieval:
        images, texts = int(retrieval["num_images"]), int(retrieval["num_texts"])
        per_image = texts // images
        for k in (1, 5, 10):
            chance[("retrieval", f"t2i_R@{k}")] = min(k, images) / images
            miss = math.comb(texts - per_image, k) / math.comb(texts, k) if k <= texts else 0.0
            chance[("retrieval", f"i2t_R@{k}")] = 1.0 - miss
    if vocabulary_size:
        chance[("mlm", "accuracy")] = 1.0 / vocabulary_size
    return chance


def metrics_table(results: Mapping[str, Mapping[str, Any]], split: str,
                  metrics: Mapping[str, Sequence[str]] = HEADLINE_METRICS,
                  chance: Mapping[tuple[str, str], float] | None = None) -> dict[str, list]:
    """``evaluate``'s results as a table with one row per (task, metric), values x100 as the paper reports them.

    A task reported as ``{"skipped": reason}`` gets one row with the reason; a metric that is None or NaN (COCO's
    "no ground truth in this setting") is shown as None. With ``chance`` (:func:`chance_levels`) a column gives
    each metric's random-ranking level where it has one.

    Returns:
        ``{"columns": ["task", "split", "metric", "value (x100)"(, "chance (x100)")], "rows": [...]}``.
    """

    columns = ["task", "split", "metric", "value (x100)"] + (["chance (x100)"] if chance is not None else [])
    rows = []
    for task, values in results.items():
        if "skipped" in values:
            rows.append([task, split, "skipped", str(values["skipped"])] + ([None] if chance is not None else []))
            continue
        for name in metrics.get(task, ()):
            row = [task, split, name, _percent(values.get(name))]
            if chance is not None:
                row.append(_percent(chance.get((task, name))))
            rows.append(row)
    return {"columns": columns, "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Qualitative examples
# --------------------------------------------------------------------------------------------------------------
def distinct_detections(detections: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The ``count`` best detections of *different* proposals, each with its best class.

    ``api.detect`` ranks (proposal, class) pairs, so one proposal can appear several times with different classes
    (DETR-style evaluation); for a picture, one box per proposal is clearer. Proposals are told apart by their box.

    Args:
        detections: one image's result of ``model.detect``: ``boxes`` (K, 4), ``scores`` (K,) sorted best first,
            ``labels`` (K,), optional ``masks`` (K, H, W) and ``names`` (K strings).
        count: how many to keep.

    Returns:
        the same keys, restricted to the kept detections, in score order.
    """
    boxes = detections["boxes"]
    keep: list[int] = []
    seen: set[tuple[float, ...]] = set()
    for index in range(boxes.shape[0]):
        key = tuple(boxes[index].tolist())
        if key not in seen:
            seen.add(key)
            keep.append(index)
        if len(keep) == count:
            break
    rows = torch.tensor(keep, dtype=torch.long)
    return {key: [value[i] for i in keep] if isinstance(value, list) else value[rows]
            for key, value in detections.items()}


@dataclass
class RetrievalExamples:
    """Image-text similarities of a set of images and all their captions, for drawing rankings.

    Attributes:
        texts: the T captions; text_image: (T,) the image index of each caption.
        i2t: (I, T) logits ranking the texts for each image; t2i: (T, I) ranking the images for each text.
    """

    texts: list[str]
    text_image: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor

    def texts_for_image(self, image: int, top: int = 5) -> tuple[list[str], list[bool], list[float]]:
        """The ``top`` best texts for image ``image``: (texts, whether each is one of its captions, logits)."""
        scores, order = self.i2t[image].topk(min(top, self.i2t.shape[1]))
        return ([self.texts[t] for t in order.tolist()], [int(self.text_image[t]) == image for t in order.tolist()],
                scores.tolist())

    def images_for_text(self, text: int, top: int = 5) -> tuple[list[int], list[bool], list[float]]:
        """The ``top`` best images for text ``text``: (image indices, whether each is its image, logits)."""
        scores, order = self.t2i[text].topk(min(top, self.t2i.shape[1]))
        return order.tolist(), [i == int(self.text_image[text]) for i in order.tolist()], scores.tolist()

    def recall_at(self, k: int) -> dict[str, float]:
        """R@k of these examples in both directions (image->text: any of its captions in the top k)."""
        top_texts = self.i2t.topk(min(k, self.i2t.shape[1]), dim=1).indices                  # (I, k)
        i2t = (self.text_image[top_texts] == torch.arange(self.i2t.shape[0])[:, None]).any(dim=1)
        top_images = self.t2i.topk(min(k, self.t2i.shape[1]), dim=1).indices                 # (T, k)
        t2i = (top_images == self.text_image[:, None]).any(dim=1)
        return {f"i2t_R@{k}": float(i2t.float().mean()), f"t2i_R@{k}": float(t2i.float().mean())}


def retrieval_examples(model, images: Sequence[Any], captions: Sequence[Sequence[str]]) -> RetrievalExamples:
    """Score ``images`` against all their captions with ``model.retrieve`` (eq. (6) in both directions).

    Args:
        images: I images (PIL or (3, H, W) tensors); captions: per image its reference captions.
    """
    if len(images) != len(captions):
        raise ValueError(f"retrieval_examples: {len(images)} images but {len(captions)} caption lists")
    texts = [text for per_image in captions for text in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image], dtype=torch.long)
    scores = model.retrieve(list(images), texts)
    return RetrievalExamples(texts, text_image, scores["i2t"].float(), scores["t2i"].float())


def representation_similarity(model, images: Sequence[Any], texts: Sequence[str]) -> dict[str, float]:
    """How alike the model's ``<SPE>`` representations g(f(.)) of *different* inputs are: the mean and the minimum
    cosine similarity over all pairs of ``images`` (as image-to-text queries) and over all pairs of ``texts`` (as
    text-to-image queries).

    A healthy model spreads different inputs apart; values near 1 mean the representations have collapsed (every
    input gives nearly the same vector, so every candidate gets the same score and the gradients of eq. (7) vanish).

    Returns:
        ``{"images_mean", "images_min", "texts_mean", "texts_min"}``.
    """
    from .api import prepare_whole_images
    from .tasks import RetrievalTask

    if len(images) < 2 or len(texts) < 2:
        raise ValueError("representation_similarity: needs at least two images and two texts")
    task = RetrievalTask(model.config.tasks.retrieval)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pixels, padding_mask = prepare_whole_images(model, list(images), "retrieval")
            image_queries = task.embed_images(model, pixels, padding_mask)[0]
            text_queries = task.embed_texts(model, list(texts))[0]
    finally:
        model.train(was_training)
    out = {}
    for name, vectors in (("images", image_queries), ("texts", text_queries)):
        unit = torch.nn.functional.normalize(vectors.float(), dim=1)
        cosine = unit @ unit.T                                                     # (N, N)
        pairs = cosine[~torch.eye(len(unit), dtype=torch.bool, device=cosine.device)]
        out[f"{name}_mean"], out[f"{name}_min"] = float(pairs.mean()), float(pairs.min())
    return out


def mask_one_word(sentence: str, tokenizer, rng: random.Random, mask: str = "<mask>") -> tuple[str, str] | None:
    """Hide one word of ``sentence`` behind ``mask`` for ``api.fill_mask``.

    Only a word that the tokenizer keeps as a single token can be hidden (``fill_mask`` predicts one token per
    mask); among those one is drawn with ``rng``.

    Returns:
        (the sentence with the word replaced by ``mask``, the word as the tokenizer writes it), or None when no
        word of the sentence is a single token.
    """
    words = sentence.split()
    candidates = []
    for index, word in enumerate(words):
        core = word.strip(".,;:!?\"'")
        if not core.isalpha():
            continue
        tokens = tokenizer.tokenize(core)
        if len(tokens) == 1 and tokens[0] != tokenizer.unk_token:
            candidates.append((index, core, tokens[0]))
    if not candidates:
        return None
    index, core, token = rng.choice(candidates)
    words[index] = words[index].replace(core, mask, 1)
    return " ".join(words), token


def fill_mask_examples(model, sentences: Sequence[str], count: int, seed: int = 0, top_k: int = 5
                       ) -> dict[str, list]:
    """Masked language modelling on ``count`` sentences, one hidden word each (:func:`mask_one_word`).

    Returns:
        ``{"columns": ["masked sentence", "hidden word", "top-k predictions", "hit@1"], "rows": [...]}``; the
        predictions as "word (probability)".
    """
    from .api import MASK

    rng = random.Random(seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    masked, truths = [], []
    for index in order:
        hidden = mask_one_word(sentences[index], model.text_encoder.tokenizer, rng, MASK)
        if hidden is not None:
            masked.append(hidden[0])
            truths.append(hidden[1])
        if len(masked) == count:
            break
    if not masked:
        raise ValueError("fill_mask_examples: no sentence has a word the tokenizer keeps as one token")
    predictions = model.fill_mask(masked, top_k=top_k)
    rows = []
    for text, truth, prediction in zip(masked, truths, predictions):
        candidates = prediction["candidates"][0]
        rows.append([text, truth, ", ".join(f"{c['token']} ({c['score']:.2f})" for c in candidates),
                     candidates[0]["token"] == truth])
    return {"columns": ["masked sentence", "hidden word", f"top-{top_k} predictions", "hit@1"], "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Novel-category detection (appendix C)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class NovelDetectionResult:
    """Detection on the novel-category scenes, evaluated on the novel categories only.

    Attributes:
        class_names: the candidate names the detector chose from (every category of the file by default).
        novel_names: the categories never annotated for detection training.
        records: COCO result records of all detections.
        metrics: ``{"novel": {AP, AP50, ...}, "base": {...}}`` bbox metrics over the novel categories and over the
            seen ("base") categories of the same scenes (fractions in [0, 1]; NaN where there is no ground truth).
        per_category: novel category name -> {"AP", "AP50", "instances"}.
    """

    class_names: list[str]
    novel_names: list[str]
    records: list[dict]
    metrics: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, float]]


def novel_category_names(cfg) -> list[str]:
    """The categories marked ``"novel": true`` in ``data.novel_annotations``; [] when the file does not exist (real
    data without a novel-category set)."""
    from .data.coco import load_json, parse_categories

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
    from .data import ImageFolderClassification, TextCorpus
    from .data.coco import load_json, parse_categories

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
    rows = [[c.name, c.novel, boxes.get(c.name, 0), images.get(c.name, 0), sentences.get(c.name, 0)]
            for c in categories]
    return {"columns": ["category", "novel", "detection boxes", "classification images", "corpus sentences"],
            "rows": rows}


def evaluate_novel_detection(model, cfg, class_names: Sequence[str] | None = None) -> NovelDetectionResult:
    """Detect on ``data.novel_images`` and compute box AP restricted to the novel categories (appendix C, Fig. 4).

    The candidate set is ``class_names`` (default: every category of ``data.novel_annotations``, seen and novel,
    as an open-vocabulary detector would be used); the detector's labels index it. Detections of names that are
    not categories of the file cannot be evaluated and are dropped. AP over the novel categories is COCO's
    (``evaluation.coco.evaluate_coco(cat_ids=...)``): a detection counts only for its own category, so a novel
    object named as a seen category is a miss for the novel category (and a false positive for the seen one).
    """
    from .engine.data_setup import EvalBatches, novel_detection_dataset
    from .tasks import DetectionTask, to_coco_results

    dataset = novel_detection_dataset(cfg)
    names = list(dataset.class_names) if class_names is None else [str(name) for name in class_names]
    id_of = {category.name: category.id for category in dataset.categories}
    novel = [category for category in dataset.categories if category.novel]
    if not novel:
        raise ValueError(f"{dataset.ann_file}: no category is marked \"novel\": true")
    # Boxes only (masks would cost an RLE per detection for nothing here). A name that is not a category of the
    # file gets the id -1; its detections are dropped below.
    task = DetectionTask(replace(cfg.tasks.detection, segmentation=False), names,
                         category_ids=[id_of.get(name, -1) for name in names])
    device = next(model.parameters()).device
    records = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, batch, _ in EvalBatches(dataset, task.collate, cfg.tasks.detection.batch_size):
                predictions = task.predict(model, batch.to(device))
                records += to_coco_results(predictions, batch.image_ids, batch.category_ids)
    finally:
        model.train(was_training)
    records = [record for record in records if record["category_id"] != -1]
    metrics, per_category = novel_box_metrics(dataset.ann_file, records, dataset.categories)
    return NovelDetectionResult(names, [category.name for category in novel], records, metrics, per_category)


def novel_box_metrics(ground_truth, records: Sequence[Mapping[str, Any]], categories: Sequence[Any]
                      ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """COCO box AP of ``records`` over the novel and over the seen ("base") categories, and per novel category.

    Args:
        ground_truth: the instances file (path, dict or pycocotools COCO).
        records: COCO result records.
        categories: the file's categories (``data.coco.Category``: ``id``, ``name``, ``novel``).

    Returns:
        ({"novel": {AP, AP50, ...}, "base": {...} or {} without base categories},
         {novel name: {"AP", "AP50", "instances"}}).
    """
    from .evaluation.coco import evaluate_coco, load_coco_ground_truth

    ground_truth = load_coco_ground_truth(ground_truth)
    novel = [category for category in categories if category.novel]
    base = [category for category in categories if not category.novel]

    def box_metrics(subset) -> dict[str, float]:
        if not subset:
            return {}
        return evaluate_coco(ground_truth, records, iou_types=("bbox",), cat_ids=[c.id for c in subset])["bbox"]

    per_category = {}
    for category in novel:
        values = box_metrics([category])
        per_category[category.name] = {"AP": values["AP"], "AP50": values["AP50"],
                                       "instances": len(ground_truth.getAnnIds(catIds=[category.id]))}
    return {"novel": box_metrics(novel), "base": box_metrics(base)}, per_category


def novel_ap_table(rows: Sequence[tuple[str, str, NovelDetectionResult]]) -> dict[str, list]:
    """Box AP / AP50 (x100) of several :func:`evaluate_novel_detection` results, one row per (model label,
    candidate-list label, result): over the novel categories and over the seen ones of the same scenes."""
    return {"columns": ["model", "candidates", "novel AP", "novel AP50", "seen AP", "seen AP50"],
            "rows": [[model, candidates, _percent(r.metrics["novel"].get("AP")),
                      _percent(r.metrics["novel"].get("AP50")), _percent(r.metrics["base"].get("AP")),
                      _percent(r.metrics["base"].get("AP50"))] for model, candidates, r in rows]}


def per_category_table(result: NovelDetectionResult) -> dict[str, list]:
    """Box AP / AP50 (x100) and ground-truth instances of every novel category of one result."""
    return {"columns": ["novel category", "instances", "AP", "AP50"],
            "rows": [[name, values["instances"], _percent(values["AP"]), _percent(values["AP50"])]
                     for name, values in result.per_category.items()]}


def best_proposal_logits(model, sample, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every ground-truth object of one scene, the eq. (6) logits of its best-overlapping proposal.

    The sample must come through the evaluation transform (normalised image, boxes in its pixels).

    Returns:
        logits (K, C) of the proposal with the highest IoU with each of the K objects against ``class_names``, and
        that IoU (K,).
    """
    from .modeling.box_ops import box_cxcywh_to_xyxy, box_iou
    from .tasks import DetectionTask

    task = DetectionTask(model.config.tasks.detection, class_names)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image = model.encode_images(sample.image[None].to(device),
                                        torch.zeros(1, *sample.image.shape[-2:], dtype=torch.bool, device=device))
            logits, _ = task.region_logits(model, image, list(class_names))                      # (1, O, C)
    finally:
        model.train(was_training)
    height, width = sample.image.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=image.boxes.dtype, device=device)
    proposals = box_cxcywh_to_xyxy(image.boxes[0]) * scale                                      # (O, 4)
    iou = box_iou(sample.boxes.to(device, proposals.dtype), proposals)                           # (K, O)
    best_iou, best = iou.max(dim=1)
    return logits[0, best].cpu(), best_iou.cpu()
