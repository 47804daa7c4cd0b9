"""The multi-task trainer: unmixed (or mixed) task sampling, MT-AdamW, DDP, checkpoints and exact resume.

One iteration of ``Trainer.train_step`` (v2 paper Sec. 4.4)::

    k = sampler.task_for_iteration(i)                 the same task on every rank (same seed, no communication)
    for each of run.grad_accum micro-batches:
        L = tasks[k].loss(model, next batch of k)["loss"]   = w_k * (sum of the task's loss terms), v2 eq. (7)
        backward(L / grad_accum)                      DDP averages gradients over ranks on the last micro-batch
    clip the global gradient norm (optim.grad_clip)
    MT-AdamW: step(sampling_ratio=s_k, task_weight=w_k)     AdamW: step()
    lr schedule step (warm-up, x decay_factor at decay_at fractions of run.iterations)

Entry points: ``Trainer`` (``train``, ``train_step``, ``save``, ``resume``, ``evaluate``), ``build_optimizer``
(parameter groups: encoders at a reduced lr, no weight decay for norms, biases, embeddings, logit scales and
gates), ``seed_iteration`` and ``write_run_files`` (``config.yaml`` and ``run_info.json`` of a run).

Conventions: a task's ``"loss"`` already holds w_k, and the trainer never multiplies it again; under MT-AdamW
with gradient normalisation the optimizer divides the scale out and applies ``task_weight=w_k`` instead. Every
iteration reseeds all generators from (seed, rank, iteration), so a resumed run reproduces an uninterrupted one
bit for bit on the CPU. SIGTERM / SIGINT save a checkpoint after the current iteration; ``fail_fast`` ends a
failing rank at once so that torchrun stops the others. Where w_k goes under each optimizer and sampling mode,
the mixed-sampling slot layout, and why resume is exact: docs/design.md, "Training loop".

A time budget (``run.time_budget_minutes``) replaces a fixed length by the wall time of the training loop: at
iteration ``run.budget_check_at`` the trainer measures the seconds per iteration of the last ``BUDGET_WINDOW``
iterations and ends the run where the budget runs out (``fit_to_budget``; ``run.iterations`` is then the most it
trains). The decision is written to ``time_budget.json`` and saved in every later checkpoint, so a resumed run
keeps its length and its lr schedule; a run stopped before the decision decides from its new attempt's clock.

Every start of ``train`` is an attempt: it cuts the run's records back to the iteration it starts from (0 from
scratch), moving later ``metrics.jsonl`` records to ``metrics.jsonl.discarded`` and later
``eval_<split>_<iteration>.json`` files to ``<name>.discarded``, and adds itself to ``run_info.json``, which keeps
every earlier attempt and how each ended.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, ConfigError
from .checkpoint import find_latest, load_checkpoint, read_checkpoint_meta, save_checkpoint, write_text_atomic
from .data_setup import TaskStream
from .distributed import get_rank, get_world_size, init_distributed, is_distributed
from .logging import MetricWriter, WindowAverages, json_safe
from .optim import MTAdamW, build_param_groups
from .runtime import move_to_device, resolve_device, resolve_precision
from .sampling import MixedTaskSampler, UnmixedTaskSampler
from .schedule import WarmupStepSchedule, build_lr_scheduler

__all__ = [
    "BUDGET_FILE",
    "Trainer",
    "TrainResult",
    "budget_check_iteration",
    "build_optimizer",
    "fail_fast",
    "fit_to_budget",
    "no_weight_decay",
    "record_run_end",
    "seed_iteration",
    "set_aside_evaluations",
    "write_run_files",
]

# Prefixes (on module-name boundaries) of the image backbone and the text encoder inside the model.
BACKBONE_PREFIX = "image_encoder.backbone"
TEXT_ENCODER_PREFIX = "text_encoder"

EvaluateFn = Callable[[nn.Module, Config, Mapping[str, Any], str], dict]

BUDGET_FILE = "time_budget.json"   # the time budget's decision, written by rank 0 when it is taken
EVAL_FILE = re.compile(r"^eval_(.+)_(\d{7,})\.json$")   # eval_<split>_<iteration:07d>.json


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def seed_iteration(seed: int, rank: int, iteration: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python generators from (seed, rank, iteration)."""
    state = np.random.SeedSequence([seed, rank, iteration]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))




BUDGET_WINDOW = 200   # iterations whose wall time sets the seconds per iteration of a time budget's decision


def budget_check_iteration(run: Any) -> int:
    """The iteration at which a time budget is turned into a length: ``run.budget_check_at``, or a tenth of
    ``run.iterations`` (at least 1) when that is 0."""
    return run.budget_check_at if run.budget_check_at > 0 else max(1, round(0.1 * run.iterations))


def fit_to_budget(budget_seconds: float, spent_seconds: float, seconds_per_iteration: float, at: int, cap: int,
                  multiple: int = 1, warmup: int = 0, first_decay: float | None = None) -> int:
    """The run's length when ``at`` iterations took ``spent_seconds`` and each further one takes
    ``seconds_per_iteration``: the last iteration the budget reaches,

        length = at + floor((budget_seconds - spent_seconds) / seconds_per_iteration)

    then at most ``cap``, rounded down to a multiple of ``multiple`` (the checkpoint interval, so the last checkpoint
    is the run's end) unless that falls below ``at``, and at least ``at`` (an exhausted budget ends the run now) and
    long enough for the lr schedule (warm-up, then the first decay at ``first_decay`` x length, not inside it).
    """
    if not seconds_per_iteration > 0:
        raise ValueError(f"fit_to_budget: seconds_per_iteration must be > 0, got {seconds_per_iteration}")
    length = at + max(0, math.floor((budget_seconds - spent_seconds) / seconds_per_iteration))
    length = min(length, cap)
    if length < cap and multiple > 1 and length - length % multiple >= at:
        length -= length % multiple
    length = max(length, at, warmup, 1)
    while first_decay is not None and round(first_decay * length) < warmup:
        length += 1
    return length


def no_weight_decay(model: nn.Module) -> Callable[[str, nn.Parameter], bool]:
    """Predicate (name, parameter) -> True for parameters trained without weight decay.

    1-d parameters (norm scales and shifts, biases, scalar logit scales), ``nn.Embedding`` weights,
    parameters whose own attribute name contains "embed" (learned position / <SPE> / query embeddings held
    as bare ``nn.Parameter``), logit scales, and MoE gate parameters (any name containing "gate").
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}

    def predicate(name: str, param: nn.Parameter) -> bool:
        own_name = name.rsplit(".", 1)[-1]
        return (param.ndim <= 1 or id(param) in embedding_params or "embed" in own_name
                or "logit_scale" in name or "gate" in name)

    return predicate


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """MT-AdamW or AdamW over the model's parameter groups (see the module docstring for the groups)."""
    o = cfg.optim
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    def has_params(prefix: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for name in trainable)

    multipliers = {}
    if has_params(BACKBONE_PREFIX):
        multipliers[BACKBONE_PREFIX] = o.encoder_lr_mult
    if has_params(TEXT_ENCODER_PREFIX):
        multipliers[TEXT_ENCODER_PREFIX] = cfg.text_encoder.lr_mult
    groups = build_param_groups(model, o.lr, o.weight_decay, multipliers, no_weight_decay(model))
    # The first group is the base-lr group (the unified decoder's), so logs can call its lr "the" lr.
    groups.sort(key=lambda g: (g["lr"] != o.lr, g["weight_decay"] == 0))
    if o.name == "mt_adamw":
        return MTAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                       normalize=o.normalize, compensate=o.compensate, task_moments=o.task_moments)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _set_aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to ``<name><suffix>`` (``<name><suffix>2``, ... if taken) and return the new path."""
    target, number = path.with_name(path.name + suffix), 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{suffix}{number}")
    os.replace(path, target)
    return target


def _read_run_info(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is no file. An unreadable file (written by a version that
    did not replace it atomically and killed mid-write) is renamed to ``run_info.json.unreadable`` with a warning:
    it must not block a resume."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(info, dict) else f"expected a JSON object, got {type(info).__name__}"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"not valid JSON: {error}"
    if problem is None:
        return info
    aside = _set_aside(path, ".unreadable")
    warnings.warn(f"{path}: {problem}; moved to {aside}; the earlier attempts it recorded are not carried over",
                  stacklevel=3)
    return None


def write_run_files(cfg: Config, output_dir: Path, argv: list[str] | None, resumed_from: int | None,
                    precision: str | None = None, *, discarded: Mapping[str, Any] | None = None,
                    last_logged_iteration: int | None = None) -> None:
    """``config.yaml`` (the full config used) and ``run_info.json`` (this attempt: command, git commit, seed, start
    time, the autocast precision ``run.precision`` resolved to on this machine), both replaced atomically.

    ``run_info.json`` holds one record per attempt: this one at the top level, the earlier ones (oldest first)
    under ``previous_sessions``, whether this attempt resumes a checkpoint or starts from scratch. Each record has
    ``attempt`` (1, 2, ...), ``command`` and ``argv``, ``start_time``, ``start_iteration`` and
    ``resumed_from_iteration`` (the checkpoint's iteration, None from scratch), ``discarded`` (what earlier
    attempts logged after that iteration, set aside by this one) and ``end``: None while the attempt runs, then
    ``{"status": "finished" | "stopped" | "failed", "iteration", "time", ...}`` (``record_run_end``). An attempt
    that ended without recording it (SIGKILL, out of memory, power loss) is marked ``{"status": "unknown",
    "last_logged_iteration": ...}`` by the next one.

    Args:
        argv: the arguments of ``python -m uniperceiver_v2.train`` (recorded as that command; under torchrun
            ``world_size`` says how many processes ran it), or None for this process's own ``sys.argv``.
        resumed_from: the checkpoint's iteration, or None when starting from scratch.
        discarded: e.g. ``{"metrics_records": 12, "eval_files": [...]}``.
        last_logged_iteration: the last iteration in ``metrics.jsonl`` before this attempt cut it (goes into the
            previous attempt's "unknown" end).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "config.yaml", cfg.to_yaml())
    argv = list(sys.argv) if argv is None else ["python", "-m", "uniperceiver_v2.train", *argv]
    path = output_dir / "run_info.json"
    old = _read_run_info(path)
    previous = []
    if old is not None:
        previous = old.pop("previous_sessions", []) + [old]
        if old.get("end") is None:
            old["end"] = {"status": "unknown", "last_logged_iteration": last_logged_iteration,
                          "note": "the process ended without recording how (killed by SIGKILL, out of memory, "
                                  "power loss, or written by a version that did not record ends)"}
    session = {
        "attempt": len(previous) + 1,
        "command": shlex.join(argv),
        "argv": argv,
        "git_commit": _git_commit(),
        "seed": cfg.run.seed,
        "start_time": _now(),
        "world_size": get_world_size(),
        "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "resumed_from_iteration": resumed_from,
        "start_iteration": resumed_from or 0,
        "config_hash": cfg.hash(),
        "precision": precision or cfg.run.precision,
        "torch_version": torch.__version__,
        "hostname": os.uname().nodename,
        "discarded": dict(discarded) if discarded else None,
        "end": None,
    }
    write_text_atomic(path, json.dumps({**session, "previous_sessions": previous}, indent=2) + "\n")


def record_run_end(output_dir: Path, end: Mapping[str, Any]) -> None:
    """Set ``end`` of the current attempt in ``<output_dir>/run_info.json`` (written by ``write_run_files``)."""
    path = Path(output_dir) / "run_info.json"
    info = _read_run_info(path)
    if info is None:
        raise FileNotFoundError(f"{path}: no run record to add the end of this attempt to")
    info["end"] = {**end, "time": _now()}
    write_text_atomic(path, json.dumps(info, indent=2) + "\n")


def set_aside_evaluations(output_dir: Path, iteration: int) -> list[str]:
    """Rename every ``eval_<split>_<i>.json`` of ``output_dir`` with i > ``iteration`` to ``<name>.discarded``
    (results of weights that a run restarting from ``iteration`` replaces); returns the new names."""
    moved = []
    for path in sorted(Path(output_dir).glob("eval_*.json")):
        match = EVAL_FILE.match(path.name)
        if match and int(match.group(2)) > iteration:
            moved.append(_set_aside(path, ".discarded").name)
    return moved


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """In a distributed run, turn an exception on any rank into an immediate exit of the whole job.

    The traceback is printed with the rank, then the process ends with ``os._exit(1)`` (no clean-up that
    could block on a collective). torchrun sees the failed worker, stops the others and exits non-zero.
    Without a process group the exception propagates normally.
    """
    try:
        yield
    except BaseException as error:
        if not is_distributed() or get_world_size() == 1 or isinstance(error, SystemExit):
            raise
        print(f"[rank {get_rank()}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


class _TaskLosses(nn.Module):
    """``forward(task, batch) = tasks[task].loss(model, batch)``, so DistributedDataParallel sees the task's
    whole forward pass (its hooks only synchronise gradients of computations inside ``forward``)."""

    def __init__(self, model: nn.Module, tasks: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.tasks = dict(tasks)

    def forward(self, task: str, batch: Any) -> dict[str, torch.Tensor]:
        return self.tasks[task].loss(self.model, batch)


@dataclass
class TrainResult:
    """What ``Trainer.train`` returns.

    Attributes:
        iteration: optimizer steps completed.
        interrupted_by: the signal number that stopped training early, or None.
        checkpoint: the last checkpoint written, or None.
        final_losses: task -> mean loss over that task's iterations in the last logging window.
        eval_results: split -> task -> metrics of the last evaluation (empty without an evaluate_fn).
    """

    iteration: int
    interrupted_by: int | None = None
    checkpoint: Path | None = None
    final_losses: dict[str, float] = field(default_factory=dict)
    eval_results: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``model`` on ``tasks`` as ``cfg`` says (see the module docstring).

    Args:
        cfg: the run's config (tasks, optimizer, schedule, run and data sections are read here).
        model: the model; the trainer moves it to the run's device and wraps it in DDP when distributed.
        tasks: task name -> task object (``tasks.base.Task``) with ``collate(samples)``,
            ``loss(model, batch) -> dict`` (key "loss" = w_k times the sum of its terms; the other keys are
            logged) and ``predict``.
            Every enabled task of ``cfg.tasks`` needs an entry.
        datasets: task name -> training dataset (map-style) for every enabled task.
        evaluate_fn: ``evaluate(model, cfg, tasks, split) -> {task: {metric: value}}``, called on every rank
            at ``run.eval_every`` and at the end; None disables evaluation.
        progress: show a tqdm bar on rank 0.
        tensorboard: mirror metrics to TensorBoard (``<output_dir>/tb``).
        argv: the command line recorded in run_info.json (default ``sys.argv``).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        tasks: Mapping[str, Any],
        datasets: Mapping[str, Any],
        *,
        evaluate_fn: EvaluateFn | None = None,
        progress: bool = True,
        tensorboard: bool = True,
        argv: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.task_names = cfg.tasks.names()
        for name in self.task_names:
            if name not in tasks:
                raise ConfigError(f"tasks.{name}: enabled in the config but no task object was given")
            if name not in datasets:
                raise ConfigError(f"tasks.{name}: enabled in the config but no training dataset was given")
        info = init_distributed()
        self.rank, self.world_size = info.rank, info.world_size
        self.device = resolve_device(cfg.run.device, info.device)
        self.output_dir = Path(cfg.run.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.evaluate_fn = evaluate_fn
        self.progress = progress
        self.tensorboard = tensorboard
        self.argv = argv

        run = cfg.run
        self.precision = resolve_precision(run.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("run.precision: fp16 needs a CUDA device; use bf16 (or fp32) on the CPU")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.model = model.to(self.device)
        # the tasks whose steps tune the text encoder (None: all; config validation keeps it off a frozen one)
        tuned_by = cfg.text_encoder.tuned_by
        self.text_tuned_by = None if tuned_by is None else set(tuned_by)
        if self.text_tuned_by is not None and not hasattr(self.model, "text_encoder"):
            raise ConfigError("text_encoder.tuned_by: the model has no text_encoder")
        self.tasks = {name: tasks[name] for name in self.task_names}
        self.task_configs = {name: cfg.tasks.get(name) for name in self.task_names}
        weights = {name: self.task_configs[name].sampling_weight for name in self.task_names}
        starts = {name: self.task_configs[name].start_iteration for name in self.task_names}
        if run.sampling == "unmixed":
            self.sampler: UnmixedTaskSampler | MixedTaskSampler = UnmixedTaskSampler(
                self.task_names, weights, seed=run.seed, start_iterations=starts)
        else:
            self.sampler = MixedTaskSampler(self.task_names, weights, seed=run.seed,
                                            num_slots=self.world_size * run.grad_accum, start_iterations=starts)
        self.total_iterations = run.iterations    # the run's length: run.iterations, or the time budget's
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_lr_scheduler(self.optimizer, self._config_schedule())
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

        self.streams = {
            name: TaskStream(name, datasets[name], self.tasks[name].collate, self.task_configs[name].batch_size,
                             rank=self.rank, world_size=self.world_size, seed=cfg.run.seed,
                             num_workers=cfg.data.num_workers)
            for name in self.task_names
        }

        self.loss_module: nn.Module = _TaskLosses(self.model, self.tasks)
        if self.world_size > 1:
            # Each task uses a subset of the parameters (MLM never touches the image encoder), hence
            # find_unused_parameters. Globally unused parameters keep grad None, so MT-AdamW skips them.
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

        self.iteration = 0
        self.elapsed = 0.0
        self.clock: Callable[[], float] = time.perf_counter   # the loop's clock (a test gives it a fake one)
        self.loop_seconds = 0.0                   # wall time of the training loop over all attempts (time budget)
        self.budget: dict[str, Any] | None = None  # the time budget's decision once taken (saved in checkpoints)
        self.resumed_from: int | None = None
        self._stop_signal: int | None = None
        self._writer: MetricWriter | None = None

    def _config_schedule(self) -> WarmupStepSchedule:
        """A new ``WarmupStepSchedule`` object for this config (LambdaLR.load_state_dict overwrites the fields of
        the object it holds with the saved ones, so a fresh one is built whenever the config's is wanted)."""
        run, optim = self.cfg.run, self.cfg.optim
        try:
            return WarmupStepSchedule(total_iterations=self.total_iterations, warmup_iterations=optim.warmup_iters,
                                      decay_fractions=tuple(optim.decay_at), decay_factor=optim.decay_factor)
        except ValueError as error:
            raise ConfigError(f"optim.warmup_iters / optim.decay_at with run.iterations={run.iterations}: "
                              f"{error}") from None

    def _decide_budget(self, recent_seconds: list[float], spent_seconds: float) -> None:
        """Turn ``run.time_budget_minutes`` into the run's length at this iteration (rank 0 decides from its clock,
        every rank follows), and make the lr schedule follow it: ``recent_seconds`` are the loop's last iterations,
        ``spent_seconds`` its time over all attempts so far."""
        run, optim = self.cfg.run, self.cfg.optim
        rate = sum(recent_seconds) / len(recent_seconds)
        length = fit_to_budget(run.time_budget_minutes * 60.0, spent_seconds, rate, self.iteration,
                               run.iterations, multiple=run.ckpt_every, warmup=optim.warmup_iters,
                               first_decay=optim.decay_at[0] if optim.decay_at else None)
        if self.world_size > 1:
            agreed = torch.tensor([length], dtype=torch.int64,
                                  device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(agreed, src=0)
            length = int(agreed.item())
        self.total_iterations = length
        self.budget = {"minutes": run.time_budget_minutes, "cap": run.iterations, "iterations": length,
                       "decided_at": self.iteration, "seconds_per_iteration": rate,
                       "measured_iterations": len(recent_seconds), "spent_seconds": spent_seconds}
        schedule = self._config_schedule()
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        if self.rank == 0:
            write_text_atomic(self.output_dir / BUDGET_FILE, json.dumps(json_safe(self.budget), indent=2) + "\n")
            print(f"\ntime budget {run.time_budget_minutes:g} min: {rate:.3f} s per iteration over iterations "
                  f"{self.iteration - len(recent_seconds)}-{self.iteration}, {spent_seconds / 60:.1f} min spent; "
                  f"the run ends at iteration {length} (at most {run.iterations}), the lr decays at "
                  f"{', '.join(str(m) for m in schedule.milestones) or 'none'}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self, iteration: int) -> list[str]:
        """This rank's task for each micro-batch of ``iteration``.

        Unmixed: the sampled task for every micro-batch. Mixed: slot ``m * world_size + rank`` for micro-batch m.
        """
        if isinstance(self.sampler, UnmixedTaskSampler):
            return [self.sampler.task_for_iteration(iteration)] * self.cfg.run.grad_accum
        slots = self.sampler.slots_for_iteration(iteration)
        return [slots[m * self.world_size + self.rank] for m in range(self.cfg.run.grad_accum)]

    def _iteration_tasks(self, iteration: int) -> set[str]:
        """The tasks of ``iteration`` on every rank and micro-batch."""
        if isinstance(self.sampler, UnmixedTaskSampler):
            return {self.sampler.task_for_iteration(iteration)}
        return set(self.sampler.slots_for_iteration(iteration))

    def _text_tuning(self, task: str) -> contextlib.AbstractContextManager:
        """``text_encoder.tuned_by``: the text encoder is tuned on this task's step, or runs as if frozen."""
        if self.text_tuned_by is None:
            return contextlib.nullcontext()
        return self.model.text_encoder.tuned(task in self.text_tuned_by)

    def optimizer_kwargs(self, iteration: int) -> dict[str, Any]:
        """What ``optimizer.step`` receives at ``iteration`` (see "Where the loss weight w_k goes")."""
        if not isinstance(self.optimizer, MTAdamW) or not isinstance(self.sampler, UnmixedTaskSampler):
            return {}
        task = self.sampler.task_for_iteration(iteration)
        task_weight = self.task_configs[task].loss_weight if self.optimizer.normalize else 1.0
        kwargs: dict[str, Any] = {"sampling_ratio": self.sampler.sampling_ratio(task), "task_weight": task_weight}
        if self.optimizer.task_moments:
            kwargs["task"] = task
        return kwargs

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, iteration: int) -> list[tuple[str, dict[str, float], int]]:
        """Run iteration ``iteration`` (0-based): forward/backward of each micro-batch, clip, step, schedule.

        Returns:
            [(task, {"loss": ..., other terms..., "grad_norm": ...}, number of micro-batches)] per distinct
            task of this rank, the terms averaged over that task's micro-batches.
        """
        self.model.train()
        seed_iteration(self.cfg.run.seed, self.rank, iteration)
        plan = self.plan(iteration)
        per_task: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        for micro, task in enumerate(plan):
            batch = move_to_device(next(self.streams[task]), self.device)
            last = micro == len(plan) - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.loss_module.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None), self._text_tuning(task):
                    losses = self.loss_module(task, batch)
                if "loss" not in losses:
                    raise KeyError(f"task {task!r}: loss() returned {sorted(losses)} without the key 'loss'")
                loss = losses["loss"]
                if loss.dtype in (torch.float16, torch.bfloat16):   # a loss computed under autocast
                    loss = loss.float()
                self.scaler.scale(loss / len(plan)).backward()
            # One host sync per micro-batch for all logged terms.
            values = dict(zip(losses, torch.stack([v.detach().to(torch.float64).reshape(())
                                                   for v in losses.values()]).tolist()))
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"iteration {iteration}: task {task!r} loss is {values['loss']} "
                                         f"(terms: {values})")
            sums = per_task.setdefault(task, {})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            counts[task] = counts.get(task, 0) + 1

        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.scaler.step(self.optimizer, **self.optimizer_kwargs(iteration))
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.text_tuned_by is not None and self.text_tuned_by & self._iteration_tasks(iteration):
            self.model.text_encoder.weights_changed()
        grad_norm = float(grad_norm)
        return [(task, {**{k: v / counts[task] for k, v in sums.items()}, "grad_norm": grad_norm}, counts[task])
                for task, sums in per_task.items()]

    # ------------------------------------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        streams = {name: stream.state_dict() for name, stream in self.streams.items()}
        if self.world_size > 1:
            # Ranks consume different amounts of each task under mixed sampling: keep every rank's positions.
            per_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, streams)
        else:
            per_rank = [streams]
        return {
            "streams_per_rank": per_rank,
            "sampler": {"kind": self.cfg.run.sampling, "seed": self.cfg.run.seed},
            "grad_scaler": self.scaler.state_dict(),
            "elapsed_seconds": self.elapsed,
            "loop_seconds": self.loop_seconds,
            "time_budget": self.budget,
            "world_size": self.world_size,
        }

    def save(self) -> Path:
        """Write a checkpoint of the current iteration (every rank must call this)."""
        keep = self.cfg.run.keep_checkpoints or None
        return save_checkpoint(self.checkpoint_dir, self.iteration, self.model, self.optimizer, self.scheduler,
                               self._extra_state(), config=self.cfg, keep_last=keep)

    def resume(self, checkpoint: str | Path | None = None, new_schedule: bool = False) -> bool:
        """Restore a checkpoint (default: the latest one under ``<output_dir>/checkpoints``).

        Args:
            checkpoint: a checkpoint folder; None = the latest one of this run.
            new_schedule: follow this config's lr schedule (``run.iterations``, ``optim.warmup_iters`` /
                ``decay_at``) from the checkpoint's iteration on, instead of the schedule the checkpoint was
                saved with. For extending a finished run: resumed with ``run.iterations`` raised from 2000 to 5000,
                the saved schedule keeps the lr decayed since iteration 1600, the new one runs at the base lr
                until 4000. Everything else (moments, sampler, data order) continues as saved.

        Returns:
            False if ``checkpoint`` is None and there is no checkpoint yet (training starts from scratch).
        """
        path = Path(checkpoint) if checkpoint is not None else find_latest(self.checkpoint_dir)
        if path is None:
            return False
        meta = read_checkpoint_meta(path)
        saved = meta.get("config") or {}
        differing = _differing_keys(saved, self.cfg.to_dict())
        if differing and get_rank() == 0:
            print(f"warning: resuming from {path} with a config that differs in {', '.join(differing)}",
                  file=sys.stderr)
        extra = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        per_rank = extra["streams_per_rank"]
        streams = per_rank[self.rank % len(per_rank)]
        for name, stream in self.streams.items():
            if name in streams:
                stream.load_state_dict(streams[name])
        if extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])
        self.iteration = int(meta["iteration"])
        budget = extra.get("time_budget")
        run = self.cfg.run
        if budget is not None and budget["minutes"] == run.time_budget_minutes and budget["cap"] == run.iterations:
            self.budget, self.total_iterations = budget, int(budget["iterations"])   # the length decided before
        if new_schedule:
            schedule = self._config_schedule()
            self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
            factor = schedule(self.iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.elapsed = float(extra.get("elapsed_seconds", 0.0))
        self.loop_seconds = float(extra.get("loop_seconds", self.elapsed))
        self.resumed_from = self.iteration
        return True

    # ------------------------------------------------------------------------------------------------ loop
    def _install_signal_handlers(self) -> dict[int, Any]:
        def handler(signum, frame):
            self._stop_signal = signum
            # A second signal interrupts at once.
            signal.signal(signum, previous[signum])

        previous: dict[int, Any] = {}
        # Python installs signal handlers only from the main thread (not, e.g., from a notebook's worker thread).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.getsignal(signum)
                signal.signal(signum, handler)
        return previous

    def _agreed_stop(self) -> int | None:
        """The stop signal if any rank received one (one small all-reduce per iteration when distributed)."""
        if self.world_size == 1:
            return self._stop_signal
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64,
                            device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _lrs(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def evaluate(self, split: str) -> dict[str, Any]:
        """Run ``evaluate_fn`` on every rank; rank 0 writes ``eval_<split>_<iteration>.json`` and logs."""
        if self.evaluate_fn is None:
            return {}
        results = self.evaluate_fn(self.model, self.cfg, self.tasks, split)
        if self.rank == 0:
            path = self.output_dir / f"eval_{split}_{self.iteration:07d}.json"
            record = {"iteration": self.iteration, "split": split, "results": results}
            write_text_atomic(path, json.dumps(json_safe(record), indent=2) + "\n")
            if self._writer is not None:
                self._writer.write_eval(self.iteration, split, results)
        return results

    def _start_attempt(self) -> None:
        """Rank 0: cut the run's records back to ``self.iteration``, open the metric writer, record the attempt."""
        start = self.iteration
        if self.resumed_from is None:
            old = sorted(path.name for path in self.checkpoint_dir.glob("iter_*"))
            if old:
                print(f"warning: starting from scratch in {self.output_dir}, which holds checkpoints of an earlier "
                      f"run ({', '.join(old)}); resume them with --resume, or they are replaced as this run saves",
                      file=sys.stderr)
        if self.budget is None:            # a decision of an earlier run or attempt that does not hold any more
            (self.output_dir / BUDGET_FILE).unlink(missing_ok=True)
        self._writer = MetricWriter(self.output_dir, tensorboard=self.tensorboard, start_iteration=start)
        eval_files = set_aside_evaluations(self.output_dir, start)
        discarded = None
        if self._writer.discarded or eval_files:
            discarded = {"metrics_records": self._writer.discarded, "eval_files": eval_files}
            print(f"starting at iteration {start}: set aside what an earlier attempt logged after it: "
                  f"{self._writer.discarded} record(s) of {self._writer.path.name} -> {self._writer.path.name}"
                  f".discarded" + (f", {', '.join(eval_files)}" if eval_files else ""), file=sys.stderr)
        write_run_files(self.cfg, self.output_dir, self.argv, self.resumed_from, self.precision,
                        discarded=discarded, last_logged_iteration=self._writer.last_logged_iteration)

    def _record_end(self, end: dict[str, Any]) -> None:
        try:
            record_run_end(self.output_dir, {**end, "iteration": self.iteration})
        except OSError as error:   # the record is informational: never hide the run's own outcome behind it
            print(f"warning: could not record the end of this attempt in run_info.json: {error}", file=sys.stderr)

    def train(self) -> TrainResult:
        """Train from ``self.iteration`` to ``run.iterations``, or to the length the time budget sets (see the
        module docstring and ``fit_to_budget``)."""
        run = self.cfg.run
        decide_at = None                          # the iteration after which the time budget is decided
        if run.time_budget_minutes > 0 and self.budget is None:
            check = budget_check_iteration(run)
            decide_at = max(check, self.iteration + min(BUDGET_WINDOW, check))
        recent: collections.deque[float] = collections.deque(maxlen=BUDGET_WINDOW)
        if self.rank == 0:
            self._start_attempt()
        previous_handlers = self._install_signal_handlers()
        end: dict[str, Any] = {"status": "failed"}
        window = WindowAverages()
        result = TrainResult(iteration=self.iteration)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_iterations, initial=self.iteration, desc="train", dynamic_ncols=True)
        try:
            while self.iteration < self.total_iterations:
                start = self.clock()
                records = self.train_step(self.iteration)
                self.iteration += 1
                for task, values, count in records:
                    window.add(task, values, count)
                seconds = self.clock() - start
                self.elapsed += seconds
                window.add_time(seconds)
                if bar is not None:
                    bar.set_postfix(task=records[0][0], loss=f"{records[0][1]['loss']:.4f}", refresh=False)
                    bar.update(1)

                stop = self._agreed_stop()
                if self.iteration == decide_at and stop is None:
                    so_far = self.clock() - start                 # this iteration up to here
                    self._decide_budget([*recent, so_far][-BUDGET_WINDOW:], self.loop_seconds + so_far)
                    if bar is not None:
                        bar.total = self.total_iterations
                        bar.refresh()
                done = self.iteration == self.total_iterations
                checkpoint_now = done or stop is not None or (
                    run.ckpt_every > 0 and self.iteration % run.ckpt_every == 0)
                if done or checkpoint_now or (run.log_every > 0 and self.iteration % run.log_every == 0):
                    merged = window.merged()
                    if self._writer is not None:
                        self._writer.write_train(self.iteration, merged, self._lrs(), self.elapsed,
                                                 window.seconds / max(window.iterations, 1))
                    result.final_losses.update({task: values["loss"] for task, values in merged.items()})
                    window.reset()
                if checkpoint_now:
                    result.checkpoint = self.save()
                if stop is not None:
                    result.interrupted_by = stop
                    if self.rank == 0:
                        print(f"\nstopped by signal {signal.Signals(stop).name} after iteration {self.iteration}; "
                              f"checkpoint {result.checkpoint}; continue with --resume", file=sys.stderr)
                    break
                if run.eval_every > 0 and self.iteration % run.eval_every == 0 and not done:
                    result.eval_results[self.cfg.data.val_split] = self.evaluate(self.cfg.data.val_split)
                recent.append(self.clock() - start)       # the whole iteration: step, log, checkpoint
                self.loop_seconds += recent[-1]
            if result.interrupted_by is None and self.evaluate_fn is not None:
                result.eval_results[self.cfg.data.val_split] = self.evaluate(self.cfg.data.val_split)
            end = {"status": "finished"} if result.interrupted_by is None else {
                "status": "stopped", "signal": signal.Signals(result.interrupted_by).name}
        except BaseException as error:
            end["error"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
                end["checkpoint"] = str(result.checkpoint) if result.checkpoint is not None else None
                self._record_end(end)
        result.iteration = self.iteration
        return result


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            keys += _differing_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(f"{prefix}{key}")
    return keys
