"""What notebooks 06-08 need beyond a call into the package: run the trainer as a subprocess and follow it, read its
logs, find its checkpoint, and collect qualitative examples and novel-category numbers from a trained model.

Training (notebook 06) runs in a separate process, exactly as from a shell, so the notebook teaches the real
command (``python -m uniperceiver_v2.train`` or ``torchrun ... -m uniperceiver_v2.train``) and a crash or an
interrupt of the trainer never takes the notebook's kernel with it. Its output is streamed into the notebook line
by line; tqdm's progress-bar redraws are thinned (:class:`ProgressFilter`) so a long run does not print thousands of
lines. A notebook can instead keep the output in the run's ``console.log`` and show a summary (``echo=False``).
The run lives in ``{run_dir}/train`` (:func:`training_dir`), where notebooks 07 and 08 find its checkpoint.
"""

from __future__ import annotations

import codecs
import copy
import fcntl
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .pipeline import project_path, read_json_record, shown_path

if TYPE_CHECKING:
    from ..config import Config

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

    from ..config import load_config
    from ..engine.backbone_pretraining import pretrain_backbone

    out = project_path(run_dir) / "backbone" / "backbone.safetensors"
    summary_path = out.with_name(out.name + ".json")
    wanted = {"preset": str(preset), "seed": seed, "iterations": iterations}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Notebooks 06 and 09 both need it and may run at once (reproduce --jobs): the second waits for the first's
    # pre-training and then reads its file instead of training a second copy over it.
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    """The newest checkpoint under ``<output_dir>/checkpoints`` and whether it has reached ``iterations``, or the
    shorter length a time budget decided for the run (``time_budget.json`` with ``iterations`` as its cap)."""
    from ..engine.checkpoint import find_latest, read_checkpoint_meta

    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    checkpoint = find_latest(checkpoints) if checkpoints.is_dir() else None
    iteration = int(read_checkpoint_meta(checkpoint)["iteration"]) if checkpoint is not None else 0
    budget = time_budget_decision(output_dir)
    target = budget["iterations"] if budget is not None and budget["cap"] == iterations else iterations
    return TrainingStatus(output_dir, checkpoint, iteration, target)


def time_budget_decision(output_dir: str | os.PathLike) -> dict | None:
    """The time budget's decision of the run in ``output_dir`` (``time_budget.json``: the length it set, the
    seconds per iteration it measured, where), or None when the run has no budget or has not decided yet."""
    from ..engine.trainer import BUDGET_FILE

    return read_json_record(Path(output_dir) / BUDGET_FILE,
                            ("iterations", "cap", "minutes", "decided_at", "seconds_per_iteration"),
                            "delete it to let the run decide again")


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


def resolve_backbone_weights(cfg: Config) -> Config:
    """A copy of a run's configuration whose ``image_encoder.backbone_weights`` file is found from a notebook.

    A run records the backbone file it started from as it was given, e.g. ``runs/backbone.safetensors`` relative
    to the folder the training command ran in (the repository root, in the README's commands). A notebook runs in
    ``notebooks/``, where that path names nothing, so rebuilding the run's starting point (notebook 08's untrained
    reference) would fail. A relative path is taken relative to the checkout (:func:`project_path`), as data roots
    are; an absolute path, ``"imagenet"`` (the packaged weights) and None are kept. A file that is not there still
    raises when the model is built, naming ``image_encoder.backbone_weights``.
    """
    from ..config import IMAGENET_WEIGHTS

    resolved = copy.deepcopy(cfg)
    weights = resolved.image_encoder.backbone_weights
    if weights is not None and weights != IMAGENET_WEIGHTS:
        resolved.image_encoder.backbone_weights = str(project_path(weights))
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
                  new_schedule: bool = True, evaluate: bool = False, split_batches: bool = False,
                  python: str | None = None) -> list[str]:
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
        split_batches: with ``nproc`` > 1, each process takes ``1/nproc`` of every enabled task's batch (overrides
            ``tasks.<name>.batch_size=B/nproc`` after ``overrides``, B the batch of the preset with ``overrides``),
            so a step averages its gradient over as many samples as the one-process run's and retrieval gathers
            its negatives from all of them; only which samples each process draws differs, so the run is the same
            recipe, not the same numbers. This is what two processes on two CPU cores need to train the preset's
            recipe faster (:func:`split_batch_overrides`). False keeps B per
            process, the paper's per-GPU batches (the global batch grows with ``nproc``).
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
    split = split_batch_overrides(preset, nproc, overrides) if split_batches and nproc > 1 else []
    return launcher + flags + settings + list(overrides) + split


def split_batch_overrides(preset: str, nproc: int, overrides: Sequence[str] = ()) -> list[str]:
    """``tasks.<name>.batch_size=B/nproc`` for every enabled task of ``preset`` with ``overrides`` (B its batch), so
    that ``nproc`` processes together take the batch one process takes. A batch that ``nproc`` does not divide is
    refused with the task's key: rounding would change the optimisation the split is meant to keep."""
    from ..config import load_config

    if nproc < 1:
        raise ValueError(f"nproc: expected at least 1 process, got {nproc}")
    cfg = load_config(preset, list(overrides))
    split = []
    for name in cfg.tasks.names():
        batch = cfg.tasks.get(name).batch_size
        if batch % nproc:
            raise ValueError(f"tasks.{name}.batch_size: {batch} does not split evenly over {nproc} processes; "
                             f"give a multiple of {nproc} or run without split_batches")
        split.append(f"tasks.{name}.batch_size={batch // nproc}")
    return split


def shell_command(command: Sequence[str], root: str | os.PathLike | None = None) -> str:
    """``command`` as one shell command, quoted, with each ``key.sub=value`` override on its own line.

    With ``root`` (the checkout), the command as typed there: paths inside ``root`` relative to it, and the
    interpreter, when it is ``sys.executable``, as ``python`` (the same on every machine, in a notebook's output)."""
    prefix = None if root is None else str(Path(root).resolve()) + os.sep
    lines = [[]]
    for index, argument in enumerate(command):
        argument = str(argument)
        if prefix is not None:
            argument = "python" if index == 0 and argument == sys.executable else argument.replace(prefix, "")
        if "=" in argument and not argument.startswith("-"):
            lines.append([])
        lines[-1].append(shlex.quote(argument))
    return " \\\n    ".join(" ".join(line) for line in lines)


def config_of_command(command: Sequence[str]):
    """The ``Config`` the trainer builds from ``command`` (its ``--config`` and overrides, parsed by ``train.py``'s
    own parser), to show in a notebook what the run will use."""
    from ..config import load_config
    from ..train import parse_args

    module = "uniperceiver_v2.train"
    if module not in command:
        raise ValueError(f"config_of_command: {module} does not appear in {list(command)}")
    args = parse_args(list(command[list(command).index(module) + 1:]))
    return load_config(args.config, args.overrides)


def unmixed_sampler(cfg):
    """The task sampler of a run with unmixed sampling, built as ``engine.trainer.Trainer`` builds it: the enabled
    tasks in config order, weights ``tasks.<name>.sampling_weight`` (normalised to s_k), seed ``run.seed``, start
    iterations ``tasks.<name>.start_iteration``."""
    from ..engine.sampling import UnmixedTaskSampler

    if cfg.run.sampling != "unmixed":
        raise ValueError(f"run.sampling is {cfg.run.sampling!r}; unmixed_sampler describes unmixed runs only")
    names = cfg.tasks.names()
    return UnmixedTaskSampler(names, {name: cfg.tasks.get(name).sampling_weight for name in names},
                              seed=cfg.run.seed,
                              start_iterations={name: cfg.tasks.get(name).start_iteration for name in names})


def task_mixture_table(cfg, iterations: int, nproc: int = 1) -> dict[str, list]:
    """The run's task mixture (v2 eq. (7), Tab. 8): per task s_k, w_k, the batch size per process and of an
    optimizer step (over the ``nproc`` processes and ``run.grad_accum`` micro-batches), and the iterations and
    samples it gets in expectation over ``iterations`` unmixed iterations (samples of all processes)."""
    sampler = unmixed_sampler(cfg)
    per_step = nproc * cfg.run.grad_accum               # micro-batches of one optimizer step
    rows = []
    for name in sampler.task_names:
        task = cfg.tasks.get(name)
        share = sampler.sampling_ratio(name)
        expected = sampler.expected_iterations(name, iterations)
        rows.append([name, round(share, 4), task.loss_weight, task.batch_size, task.batch_size * per_step,
                     round(expected, 1), round(expected * task.batch_size * per_step)])
    step = (f"{nproc} processes x {cfg.run.grad_accum} micro-batch(es)" if nproc > 1
            else f"{cfg.run.grad_accum} micro-batch(es)")
    return {"columns": ["task", "s_k", "w_k", "batch / process", f"batch of a step ({step})",
                        "expected iterations", "expected samples"],
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


def task_trends(records: Sequence[Mapping[str, Any]], window: int = 3) -> dict[str, list]:
    """Per task: how its loss and its gradient norm moved from its first ``window`` training records to its last.

    A loss that stays level (ratio near 1) while the gradient norm falls by orders of magnitude (ratio far below 1)
    is the sign of collapsed representations (every input and candidate the same vector, no gradient left).

    Returns:
        ``{"columns": [...], "rows": [[task, records, loss last / first, grad norm last / first], ...]}`` in
        task-name order; a ratio is None when the task has no such values.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values: dict[str, dict[str, list[float]]] = {}
    for record in sorted(records, key=lambda r: r["iteration"]):
        if record.get("kind", "train") != "train" or "task" not in record:
            continue
        series = values.setdefault(str(record["task"]), {"loss": [], "grad_norm": []})
        for key in series:
            if record.get(key) is not None:
                series[key].append(float(record[key]))

    def ratio(points: list[float]) -> float | None:
        if not points:
            return None
        first = sum(points[:window]) / len(points[:window])
        last = sum(points[-window:]) / len(points[-window:])
        return float(f"{last / first:.3g}") if first else None

    rows = [[task, len(series["loss"]), ratio(series["loss"]), ratio(series["grad_norm"])]
            for task, series in sorted(values.items())]
    return {"columns": ["task", "records", f"loss, last / first {window}", f"grad norm, last / first {window}"],
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


@dataclass
class TrainingLaunch:
    """One launch of the trainer by :func:`run_training`.

    Attributes:
        log: the file holding the trainer's whole console output (appended, one file for every launch).
        seconds: wall-clock time of this launch.
        lines: lines of output this launch showed or, when not echoed, would have shown (progress redraws
            thinned as :class:`ProgressFilter` does).
        last_line: the last of them: the trainer's closing line ("finished N iterations in S s; each task's last
            logged loss: ...").
    """

    log: Path
    seconds: float
    lines: int
    last_line: str

    def summary(self) -> str:
        """Two lines for a notebook: how the launch ended, and where its whole output is."""
        return (f"{self.last_line}\n{self.lines} lines of trainer output in {self.seconds:.0f} s of wall-clock time "
                f"(this launch), all of them in {shown_path(self.log)}")


def _status_line() -> Callable[[str], None]:
    """A function showing each line in place of the previous one: one output in Jupyter (``display(...,
    display_id=True)`` then ``update``), so that a finished run's summary replaces its last progress bar; nothing
    outside an IPython kernel."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:   # no IPython: a plain script gets the summary only
        return lambda line: None
    if get_ipython() is None:
        return lambda line: None
    handle = display({"text/plain": "starting the trainer ..."}, raw=True, display_id=True)

    def show(line: str) -> None:
        handle.update({"text/plain": line}, raw=True)
    return show


def run_training(command: Sequence[str], output_dir: str | os.PathLike, progress_interval: float = 10.0,
                 echo: bool = True) -> TrainingLaunch:
    """Run the trainer's ``command`` with :func:`stream_command`, appending its output to
    ``<output_dir>/console.log``, from the project checkout (so ``-m uniperceiver_v2.train`` finds the package).

    Args:
        echo: True shows every line of the trainer's output as it arrives (a terminal, or following a long run).
            False keeps the notebook short: the output goes to the log only, and a Jupyter kernel shows one line
            that each new state of the progress bar replaces while the run lasts and the launch's
            :meth:`TrainingLaunch.summary` (how it ended and where the whole output is) replaces when it ends.

    Raises:
        TrainingFailed: the trainer exited with a non-zero code (its message holds the last lines of output).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / CONSOLE_LOG
    counted = [0, ""]
    status = None if echo else _status_line()

    def emit(line: str) -> None:
        counted[0] += 1
        counted[1] = line
        if status is None:
            print(line, flush=True)
        elif _TQDM_BAR.match(line):
            status(line)                 # the progress bar; the closing line is in the launch's summary

    started = time.monotonic()
    returncode, tail = stream_command(command, log_file=log, cwd=project_path("."),
                                      progress_interval=progress_interval, emit=emit)
    if returncode != 0:
        raise TrainingFailed(command, returncode, tail, log)
    launch = TrainingLaunch(log=log, seconds=time.monotonic() - started, lines=counted[0], last_line=counted[1])
    if status is not None:
        status(launch.summary())         # the bar's last state (one rank's last batch) gives way to the summary
    return launch


# --------------------------------------------------------------------------------------------------------------
# Reading the training log (metrics.jsonl, engine/logging.py)
# --------------------------------------------------------------------------------------------------------------
def lr_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The learning rates of a training log in long format, one record per (iteration, distinct multiplier).

    The trainer logs ``lr/<group>`` for every optimizer group; groups that differ only in weight decay share the
    same learning rate, so the groups are merged by their multiplier of the base lr (``lr``) and named as the
    trainer names the groups, without the weight decay: ``{"iteration", "group": "lr x0.1", "lr"}``.
    ``viz.plot_curves(records, keys=("lr",), by="group")`` draws them.
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
            label = f"lr x{multipliers[group]:.3g}"
            out[(int(record["iteration"]), label)] = {"iteration": int(record["iteration"]), "group": label,
                                                     "lr": float(lr)}
    return sorted(out.values(), key=lambda r: (r["group"], r["iteration"]))


def longest_gaps(tasks: Sequence[str], task_names: Sequence[str],
                 start_iterations: Mapping[str, int] | None = None) -> dict[str, int]:
    """task -> the longest run of consecutive iterations in ``tasks`` (the task of each iteration) that did not
    draw it, counted from the iteration the task joins (``start_iterations``, default 0: the iterations before
    it are not gaps of the sampling); a task never drawn has the whole length after its start."""
    gaps = {}
    for name in task_names:
        longest = current = 0
        for task in tasks[(start_iterations or {}).get(name, 0):]:
            current = 0 if task == name else current + 1
            longest = max(longest, current)
        gaps[name] = longest
    return gaps


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


def compare_logged_draws(records: Sequence[Mapping[str, Any]], drawn: Sequence[str],
                         batches_per_iteration: int = 1) -> int:
    """Check a training log against a sampler's draws, for any ``run.log_every``.

    The trainer writes one record per task at the end of each logging window (every ``run.log_every`` iterations,
    and at every checkpoint), with ``count`` = the task's batches in the window: its iterations times
    ``batches_per_iteration`` (``run.grad_accum`` x processes under unmixed sampling). A window runs from the
    previous logged iteration to its own, so the draws of iterations [previous, this) (0-based) must give every
    task exactly its logged count.

    Args:
        records: the records of ``metrics.jsonl`` (evaluation records are ignored).
        drawn: the task of each iteration 0, 1, ... (``UnmixedTaskSampler.task_for_iteration``), at least as many
            as the log covers.

    Returns:
        the number of logging windows compared.

    Raises:
        ValueError: the first window whose tasks or counts differ from the draws (another seed or task mixture).
    """
    windows: dict[int, dict[str, int]] = {}
    for record in records:
        if record.get("kind", "train") == "train" and "task" in record:
            counts = windows.setdefault(int(record["iteration"]), {})
            counts[str(record["task"])] = counts.get(str(record["task"]), 0) + int(record.get("count", 1))
    if not windows:
        raise ValueError("compare_logged_draws: no training records")
    if max(windows) > len(drawn):
        raise ValueError(f"compare_logged_draws: the log reaches iteration {max(windows)}, the draws only "
                         f"{len(drawn)}")
    previous = 0
    for end in sorted(windows):
        expected: dict[str, int] = {}
        for task in drawn[previous:end]:
            expected[task] = expected.get(task, 0) + batches_per_iteration
        if expected != windows[end]:
            raise ValueError(f"compare_logged_draws: iterations {previous + 1}-{end} logged {windows[end]}, the "
                             f"sampler drew {expected}; was the run started with another seed or task mixture?")
        previous = end
    return len(windows)


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
