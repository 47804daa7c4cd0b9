"""A small multi-task problem on which mixed / unmixed sampling and AdamW / MT-AdamW can be compared in seconds
(notebook 05).

The problem (``ToyMultiTaskProblem``, generated from ``ToyProblemConfig`` and one seed): inputs x in R^D, drawn
per task k from its own Gaussian; a fixed random teacher h*(x) = tanh(A x + a) shared by all tasks; each task reads
its target from h* with its own head and is a "regression" (L1), "classification" (cross-entropy) or "retrieval"
(symmetric InfoNCE over the batch, v2 eq. (6)-(7) with a fixed tau) task. The model (``ToyMultiTaskModel``) is a
shared MLP trunk with a linear head per task. Each task has a sampling ratio s_k, a loss weight w_k (defaults:
Tab. 8's values) and a ``loss_scale`` c_k, the incidental size of its loss that MT-AdamW divides out.

Entry points: ``VARIANTS`` (mixed + AdamW, unmixed + AdamW, unmixed + MT-AdamW with normalisation and / or
compensation), ``train_variant``, ``final_loss_table``, ``mean_curves``, ``grad_norm_ratio``, ``toy_interference``
and ``max_parameter_difference_to_adamw`` (MT-AdamW with both switches off equals AdamW). Every variant uses the
same global batch, lr, betas, weight decay and schedule (``engine/schedule.py``). Why the problem is built this
way: docs/design.md, "A toy problem for the optimizer".
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import MTAdamW, global_grad_norm
from ..engine.sampling import MixedTaskSampler, UnmixedTaskSampler
from ..engine.schedule import WarmupStepSchedule, build_lr_scheduler
from .interference import TaskInterference, task_interference

__all__ = [
    "Comparison",
    "DEFAULT_TASKS",
    "TASK_KINDS",
    "VARIANTS",
    "ToyBatch",
    "ToyMultiTaskModel",
    "ToyMultiTaskProblem",
    "ToyProblemConfig",
    "ToyTask",
    "TrainingRun",
    "TrainingVariant",
    "describe_gaps",
    "final_loss_table",
    "grad_norm_ratio",
    "mean_curves",
    "max_parameter_difference_to_adamw",
    "toy_interference",
    "train_variant",
]

TASK_KINDS = ("regression", "classification", "retrieval")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's setting.

    The toy's matrices are 64 wide: splitting an op across threads saves nothing, and on a machine whose cores
    are busy every op waits until all its threads are scheduled (training ran ~50x slower with 2 threads on
    2 loaded cores than with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ToyTask:
    """One task of the toy problem.

    Attributes:
        name: the task's name (the paper task it stands for).
        kind: "regression", "classification" or "retrieval" (see the module docstring).
        num_outputs: regression targets, classes, or embedding width for retrieval.
        sampling_weight: s_k before normalisation (Tab. 8 "sampling weight").
        task_weight: w_k, the loss weight (Tab. 8 "scaling factor omega_k").
        loss_scale: c_k, the incidental scale of the task's loss, e.g. a detection loss summing many
            coefficient-weighted terms. Not a choice of the user, unlike w_k.
        input_offset: norm of the mean mu_k of the task's input distribution (its direction is random).
        input_std: sigma_k of the task's input distribution.
    """

    name: str
    kind: str
    num_outputs: int
    sampling_weight: float
    task_weight: float
    loss_scale: float = 1.0
    input_offset: float = 1.0
    input_std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"ToyTask {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.num_outputs < 1 or (self.kind == "classification" and self.num_outputs < 2):
            raise ValueError(f"ToyTask {self.name!r}: num_outputs={self.num_outputs} is too small for {self.kind}")
        for key in ("sampling_weight", "task_weight", "loss_scale", "input_std"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ToyTask {self.name!r}: {key} must be finite and > 0, got {value}")
        if not (math.isfinite(self.input_offset) and self.input_offset >= 0):
            raise ValueError(f"ToyTask {self.name!r}: input_offset must be finite and >= 0, got {self.input_offset}")


# Tab. 8's task-level sampling weights s_k and scaling factors w_k (the image-text tasks summed over their six
# data sets: captioning 0.3 / 0.5, retrieval 0.3 / 1.0). The loss scale of detection stands for a DETR-style loss:
# coefficients 2 + 5 + 2 + 5 + 5 (Tab. 7) per decoder layer, summed over the layers, the encoder's proposals and
# the denoising groups, against a single cross-entropy for the other tasks.
DEFAULT_TASKS: tuple[ToyTask, ...] = (
    ToyTask("classification", "classification", num_outputs=10, sampling_weight=0.10, task_weight=1.0),
    ToyTask("detection", "regression", num_outputs=4, sampling_weight=0.25, task_weight=1.0, loss_scale=20.0),
    ToyTask("language_modelling", "classification", num_outputs=32, sampling_weight=0.05, task_weight=0.5),
    ToyTask("captioning", "classification", num_outputs=32, sampling_weight=0.30, task_weight=0.5),
    ToyTask("retrieval", "retrieval", num_outputs=16, sampling_weight=0.30, task_weight=1.0),
)


@dataclass(frozen=True)
class ToyProblemConfig:
    """Sizes of the toy problem and of its training runs.

    Attributes:
        tasks: the tasks, in a fixed order (the order of every table and figure).
        input_dim: D, the input width.
        teacher_width: width of the teacher features h*(x).
        hidden_dim: H, the width of the student's shared trunk.
        batch_size: the global batch per iteration (all of one task with unmixed sampling).
        num_slots: slots per iteration with mixed sampling (per-GPU batches of a distributed run); each slot
            holds batch_size / num_slots samples.
        eval_size: held-out samples per task for the evaluation losses.
        regression_noise: standard deviation of the noise added to regression targets.
        retrieval_noise: standard deviation of the noise of the retrieval "text" side.
        temperature: tau of the retrieval loss.
        lr, betas, weight_decay: optimizer settings shared by every variant (`train_variant` can override lr).
        warmup_fraction: linear warm-up length as a fraction of the run.
        decay_fractions: where the lr is multiplied by 0.1 (the paper: at 80 % of training).
    """

    tasks: tuple[ToyTask, ...] = DEFAULT_TASKS
    input_dim: int = 16
    teacher_width: int = 32
    hidden_dim: int = 64
    batch_size: int = 64
    num_slots: int = 4
    eval_size: int = 512
    regression_noise: float = 0.1
    retrieval_noise: float = 0.3
    temperature: float = 0.1
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    decay_fractions: tuple[float, ...] = (0.8,)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("ToyProblemConfig.tasks: no tasks given")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"ToyProblemConfig.tasks: task names must be unique, got {names}")
        for key in ("input_dim", "teacher_width", "hidden_dim", "batch_size", "num_slots", "eval_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"ToyProblemConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size % self.num_slots:
            raise ValueError(f"ToyProblemConfig: batch_size={self.batch_size} must be divisible by "
                             f"num_slots={self.num_slots} (each slot holds batch_size / num_slots samples)")
        if self.batch_size // self.num_slots < 2 and any(task.kind == "retrieval" for task in self.tasks):
            raise ValueError("ToyProblemConfig: a retrieval slot needs at least 2 samples (one negative); "
                             f"batch_size / num_slots = {self.batch_size // self.num_slots}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"ToyProblemConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]


class ToyMultiTaskModel(nn.Module):
    """Shared MLP trunk with one linear head per task.

    Args:
        config: the problem's sizes and tasks.

    forward(x (B, D), task) -> (B, num_outputs of the task): regression outputs, class logits, or retrieval
    embeddings (not normalised; the loss normalises them).
    """

    def __init__(self, config: ToyProblemConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.trunk = nn.Sequential(
            nn.Linear(config.input_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.heads = nn.ModuleDict({task.name: nn.Linear(hidden, task.num_outputs) for task in config.tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.heads:
            raise KeyError(f"ToyMultiTaskModel: unknown task {task!r}; tasks: {list(self.heads)}")
        return self.heads[task](self.trunk(x))


@dataclass
class ToyBatch:
    """A batch of one task: `inputs` (B, D); `targets` (B, outputs) float for regression, (B,) long class
    labels for classification, (B, D) paired "text" inputs for retrieval."""

    inputs: torch.Tensor
    targets: torch.Tensor


class ToyMultiTaskProblem:
    """The tasks' data distributions, teacher and losses, all fixed by `seed`.

    Args:
        config: sizes and tasks.
        seed: fixes the input distributions, the teacher, its task heads and the evaluation sets.
    """

    def __init__(self, config: ToyProblemConfig | None = None, seed: int = 0) -> None:
        self.config = config or ToyProblemConfig()
        self.seed = seed
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        d, w = c.input_dim, c.teacher_width
        self.teacher_weight = torch.randn(w, d, generator=generator) * (1.5 / math.sqrt(d))  # A (W, D)
        self.teacher_bias = torch.randn(w, generator=generator) * 0.5  # a (W,)
        self.tasks: dict[str, ToyTask] = {task.name: task for task in c.tasks}
        self.input_mean: dict[str, torch.Tensor] = {}  # mu_k (D,)
        self.teacher_heads: dict[str, torch.Tensor] = {}  # (outputs, W), or G (D, W) for retrieval
        for task in c.tasks:
            direction = torch.randn(d, generator=generator)
            self.input_mean[task.name] = task.input_offset * direction / direction.norm()
            rows = d if task.kind == "retrieval" else task.num_outputs
            # h* has entries in (-1, 1) (rms about 0.75): a scale of 2 / sqrt(W) makes B_k h* of order 1.
            self.teacher_heads[task.name] = torch.randn(rows, w, generator=generator) * (2.0 / math.sqrt(w))
        # eval_size rounded up to whole groups of batch_size, for the retrieval loss's fixed group size.
        eval_size = c.batch_size * math.ceil(c.eval_size / c.batch_size)
        self.eval_batches: dict[str, ToyBatch] = {
            task.name: self.sample(task.name, eval_size, generator) for task in c.tasks
        }

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    @property
    def sampling_ratios(self) -> dict[str, float]:
        """s_k, normalised to sum to 1."""
        total = math.fsum(task.sampling_weight for task in self.config.tasks)
        return {task.name: task.sampling_weight / total for task in self.config.tasks}

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """h*(x) = tanh(A x + a): (B, D) -> (B, W)."""
        return torch.tanh(x @ self.teacher_weight.T + self.teacher_bias)

    def sample(self, task: str, batch_size: int, generator: torch.Generator) -> ToyBatch:
        """A fresh batch of `task`, drawn with `generator`."""
        spec = self._task(task)
        c = self.config
        x = self.input_mean[task] + spec.input_std * torch.randn(batch_size, c.input_dim, generator=generator)
        features = self.teacher_features(x)  # (B, W)
        head = self.teacher_heads[task]
        if spec.kind == "regression":
            noise = c.regression_noise * torch.randn(batch_size, spec.num_outputs, generator=generator)
            return ToyBatch(x, features @ head.T + noise)
        if spec.kind == "classification":
            return ToyBatch(x, (features @ head.T).argmax(dim=1))
        text = features @ head.T + c.retrieval_noise * torch.randn(batch_size, c.input_dim, generator=generator)
        return ToyBatch(x, text)

    def loss(self, model: ToyMultiTaskModel, task: str, batch: ToyBatch, group_size: int | None = None) -> torch.Tensor:
        """L_k of the batch: unscaled (no c_k, no w_k), averaged over the batch; a scalar tensor.

        Args:
            group_size: retrieval only: score the batch as independent groups of this many pairs (each pair's
                negatives are the other pairs of its group, as on one GPU without gathering); default the whole
                batch. The batch size must be a multiple of it.
        """
        spec = self._task(task)
        output = model(batch.inputs, task)
        if spec.kind == "regression":
            return (output - batch.targets).abs().mean()
        if spec.kind == "classification":
            return F.cross_entropy(output, batch.targets)
        # Symmetric InfoNCE: pair i's "image" must pick its own "text" among its group's, and vice versa.
        size = len(output)
        group_size = group_size or size
        if size % group_size:
            raise ValueError(f"retrieval loss: batch of {size} pairs is not a multiple of group_size={group_size}")
        image = F.normalize(output, dim=1).reshape(size // group_size, group_size, -1)  # (G, b, E)
        text = F.normalize(model(batch.targets, task), dim=1).reshape(size // group_size, group_size, -1)
        logits = image @ text.transpose(1, 2) / self.config.temperature  # (G, b, b)
        labels = torch.arange(group_size, device=logits.device).repeat(size // group_size)  # (G * b,)
        image_to_text = F.cross_entropy(logits.reshape(-1, group_size), labels)
        text_to_image = F.cross_entropy(logits.transpose(1, 2).reshape(-1, group_size), labels)
        return 0.5 * (image_to_text + text_to_image)

    @torch.no_grad()
    def evaluate(self, model: ToyMultiTaskModel) -> dict[str, float]:
        """Held-out L_k of every task (unscaled). Retrieval is scored in groups of `batch_size` pairs, so its
        loss always has batch_size - 1 negatives, whatever slot size the model was trained with."""
        return {task: float(self.loss(model, task, batch, group_size=self.config.batch_size))
                for task, batch in self.eval_batches.items()}

    def build_model(self, seed: int) -> ToyMultiTaskModel:
        """A freshly initialised student; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ToyMultiTaskModel(self.config)

    def _task(self, task: str) -> ToyTask:
        if task not in self.tasks:
            raise KeyError(f"unknown toy task {task!r}; tasks: {self.task_names}")
        return self.tasks[task]


@dataclass(frozen=True)
class TrainingVariant:
    """One combination of sampling strategy and optimizer.

    Attributes:
        name: label used in tables and figures.
        sampling: "mixed" or "unmixed".
        optimizer: "adamw" (torch.optim.AdamW) or "mt_adamw" (engine.optim.MTAdamW).
        normalize, compensate: MTAdamW's switches (only for optimizer="mt_adamw").
    """

    name: str
    sampling: str
    optimizer: str
    normalize: bool = False
    compensate: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in ("mixed", "unmixed"):
            raise ValueError(f"variant {self.name!r}: sampling must be 'mixed' or 'unmixed', got {self.sampling!r}")
        if self.optimizer not in ("adamw", "mt_adamw"):
            raise ValueError(f"variant {self.name!r}: optimizer must be 'adamw' or 'mt_adamw', "
                             f"got {self.optimizer!r}")
        if self.optimizer == "adamw" and (self.normalize or self.compensate):
            raise ValueError(f"variant {self.name!r}: normalize / compensate need optimizer='mt_adamw'")
        if self.sampling == "mixed" and self.optimizer == "mt_adamw":
            # A mixed iteration holds several tasks: there is no single s_k to compensate with.
            raise ValueError(f"variant {self.name!r}: MT-AdamW is defined for unmixed sampling (one task per step)")


VARIANTS: tuple[TrainingVariant, ...] = (
    TrainingVariant("mixed + AdamW", "mixed", "adamw"),
    TrainingVariant("unmixed + AdamW", "unmixed", "adamw"),
    TrainingVariant("unmixed + MT-AdamW (normalize only)", "unmixed", "mt_adamw", normalize=True),
    TrainingVariant("unmixed + MT-AdamW (compensate only)", "unmixed", "mt_adamw", compensate=True),
    TrainingVariant("unmixed + MT-AdamW", "unmixed", "mt_adamw", normalize=True, compensate=True),
)


@dataclass
class TrainingRun:
    """Everything logged by one `train_variant` call.

    Attributes:
        variant, seed, iterations, lr: what was run.
        step_tasks: (iterations,) the task of each iteration; "mixed" for mixed sampling.
        grad_norms: (iterations,) global L2 norm of the gradient the optimizer received (before MT-AdamW's
            normalisation; with AdamW it includes w_k, with MT-AdamW w_k goes to the optimizer instead).
        train_losses: task -> list of (iteration, unscaled L_k of that iteration's batch or slot).
        eval_iterations: iterations at which every task was evaluated (0 = before training).
        eval_losses: task -> held-out L_k at each of eval_iterations.
        model: the trained model.
    """

    variant: TrainingVariant
    seed: int
    iterations: int
    lr: float
    step_tasks: list[str] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    train_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    eval_iterations: list[int] = field(default_factory=list)
    eval_losses: dict[str, list[float]] = field(default_factory=dict)
    model: ToyMultiTaskModel | None = None

    @property
    def final_losses(self) -> dict[str, float]:
        """Held-out L_k of every task after the last iteration."""
        return {task: losses[-1] for task, losses in self.eval_losses.items()}

    def records(self) -> list[dict]:
        """The training log as flat records (`viz.plot_curves` reads them): one per task per iteration with
        "loss" and, for unmixed runs, "grad_norm"; eval records have kind="eval" and "eval_loss"."""
        records = []
        by_iteration: dict[int, list[tuple[str, float]]] = {}
        for task, points in self.train_losses.items():
            for iteration, value in points:
                by_iteration.setdefault(iteration, []).append((task, value))
        for iteration in sorted(by_iteration):
            for task, value in by_iteration[iteration]:
                record = {"iteration": iteration, "kind": "train", "variant": self.variant.name, "task": task,
                          "loss": value}
                if self.step_tasks[iteration] == task:
                    record["grad_norm"] = self.grad_norms[iteration]
                records.append(record)
        for index, iteration in enumerate(self.eval_iterations):
            for task, values in self.eval_losses.items():
                records.append({"iteration": iteration, "kind": "eval", "variant": self.variant.name, "task": task,
                                "eval_loss": values[index]})
        return records


def _build_optimizer(model: nn.Module, variant: TrainingVariant, config: ToyProblemConfig,
                     lr: float) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if variant.optimizer == "adamw":
        # foreach=False: the same per-parameter loop as MTAdamW; on 64-wide tensors the fused path gains nothing.
        return torch.optim.AdamW(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay,
                                 foreach=False)
    return MTAdamW(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay,
                   normalize=variant.normalize, compensate=variant.compensate)


def train_variant(
    problem: ToyMultiTaskProblem,
    variant: TrainingVariant,
    iterations: int,
    seed: int = 0,
    eval_every: int | None = None,
    lr: float | None = None,
) -> TrainingRun:
    """Train a fresh student on the toy problem with one variant and log everything.

    The model's initial weights, the task sequence and the data stream depend only on `seed` (and whether the
    sampling is mixed or unmixed), so two variants with the same sampling and seed see the same tasks and the
    same batches in the same order, and differ only in their optimizer.

    Args:
        problem: the toy problem.
        variant: sampling strategy and optimizer.
        iterations: optimizer steps.
        seed: run seed (model init, task draws, batches).
        eval_every: evaluate all tasks every this many iterations (default: about 40 points per run).
        lr: base learning rate (default: the config's).

    Returns:
        The run's logs and trained model.
    """
    if iterations < 1:
        raise ValueError(f"train_variant: iterations must be >= 1, got {iterations}")
    with _one_thread():
        return _train(problem, variant, iterations, seed, eval_every, lr)


def _train(problem: ToyMultiTaskProblem, variant: TrainingVariant, iterations: int, seed: int,
           eval_every: int | None, lr: float | None) -> TrainingRun:
    config = problem.config
    eval_every = eval_every or max(1, iterations // 40)
    model = problem.build_model(seed)
    optimizer = _build_optimizer(model, variant, config, config.lr if lr is None else lr)
    schedule = WarmupStepSchedule(
        total_iterations=iterations,
        warmup_iterations=int(config.warmup_fraction * iterations),
        decay_fractions=config.decay_fractions,
    )
    scheduler = build_lr_scheduler(optimizer, schedule)
    names = problem.task_names
    weights = [problem.tasks[name].sampling_weight for name in names]
    if variant.sampling == "unmixed":
        sampler: UnmixedTaskSampler | MixedTaskSampler = UnmixedTaskSampler(names, weights, seed=seed)
    else:
        sampler = MixedTaskSampler(names, weights, seed=seed, num_slots=config.num_slots)
    data_generator = torch.Generator().manual_seed(10_000 + seed)

    run = TrainingRun(variant=variant, seed=seed, iterations=iterations, lr=optimizer.defaults["lr"], model=model,
                      train_losses={name: [] for name in names}, eval_losses={name: [] for name in names})

    def evaluate(iteration: int) -> None:
        run.eval_iterations.append(iteration)
        for task, value in problem.evaluate(model).items():
            run.eval_losses[task].append(value)

    evaluate(0)
    for iteration in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        if isinstance(sampler, UnmixedTaskSampler):
            task = sampler.task_for_iteration(iteration)
            spec = problem.tasks[task]
            loss = problem.loss(model, task, problem.sample(task, config.batch_size, data_generator))
            # AdamW sees w_k inside the loss (v2 eq. (7)); MT-AdamW gets w_k as task_weight (engine/trainer.py).
            weight = spec.loss_scale * (spec.task_weight if variant.optimizer == "adamw" else 1.0)
            (weight * loss).backward()
            run.train_losses[task].append((iteration, loss.item()))
            run.step_tasks.append(task)
        else:
            slot_size = config.batch_size // config.num_slots
            total = 0.0
            for task in sampler.slots_for_iteration(iteration):
                spec = problem.tasks[task]
                loss = problem.loss(model, task, problem.sample(task, slot_size, data_generator))
                # The mean over slots, as DDP averages the ranks' gradients.
                total = total + spec.loss_scale * spec.task_weight * loss / config.num_slots
                run.train_losses[task].append((iteration, loss.item()))
            total.backward()
            run.step_tasks.append("mixed")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        run.grad_norms.append(float(global_grad_norm(grads)))
        if isinstance(optimizer, MTAdamW):
            # MT-AdamW implies unmixed sampling (TrainingVariant checks it): `task` is this iteration's only task.
            optimizer.step(sampling_ratio=sampler.sampling_ratio(task), task_weight=spec.task_weight)
        else:
            optimizer.step()
        scheduler.step()
        if (iteration + 1) % eval_every == 0 or iteration + 1 == iterations:
            evaluate(iteration + 1)
    return run


def final_loss_table(runs: Sequence[TrainingRun], task_names: Sequence[str]) -> dict:
    """Final held-out losses per variant, mean and standard deviation over the runs' seeds.

    Returns:
        {"columns": ["variant", *task_names, "seeds"], "rows": [[name, "mean ± std", ..., n], ...],
         "mean": {variant: {task: mean}}, "std": {variant: {task: std}}}; rows in order of first appearance.
        With a single seed the cells hold the value alone and std is 0.
    """
    by_variant: dict[str, list[TrainingRun]] = {}
    for run in runs:
        by_variant.setdefault(run.variant.name, []).append(run)
    columns = ["variant", *task_names, "seeds"]
    rows, means, stds = [], {}, {}
    for name, variant_runs in by_variant.items():
        values = np.array([[run.final_losses[task] for task in task_names] for run in variant_runs])  # (S, K)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if len(variant_runs) > 1 else np.zeros(len(task_names))
        means[name] = dict(zip(task_names, mean.tolist()))
        stds[name] = dict(zip(task_names, std.tolist()))
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std)] if len(variant_runs) > 1 else \
            [f"{m:.3f}" for m in mean]
        rows.append([name, *cells, len(variant_runs)])
    return {"columns": columns, "rows": rows, "mean": means, "std": stds}


def max_parameter_difference_to_adamw(problem: ToyMultiTaskProblem, iterations: int, seed: int = 0,
                                      dtype: torch.dtype = torch.float32) -> float:
    """Train two copies with unmixed sampling, one with torch.optim.AdamW and one with
    MTAdamW(normalize=False, compensate=False), on the same tasks and batches, and return the largest absolute
    difference between their parameters afterwards: 0 up to rounding if MTAdamW reduces to AdamW.

    Args:
        dtype: the models' and batches' dtype; float64 shrinks the rounding to ~1e-16.
    """
    config = problem.config
    names = problem.task_names
    sampler = UnmixedTaskSampler(names, [problem.tasks[n].sampling_weight for n in names], seed=seed)
    reference = problem.build_model(seed).to(dtype)
    ours = copy.deepcopy(reference)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=config.lr, betas=config.betas,
                                            weight_decay=config.weight_decay, foreach=False)
    our_optimizer = MTAdamW(ours.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                            normalize=False, compensate=False)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with _one_thread():
        for iteration in range(iterations):
            task = sampler.task_for_iteration(iteration)
            spec = problem.tasks[task]
            batch = problem.sample(task, config.batch_size, generator)
            targets = batch.targets if spec.kind == "classification" else batch.targets.to(dtype)
            batch = ToyBatch(batch.inputs.to(dtype), targets)
            for model, optimizer in ((reference, reference_optimizer), (ours, our_optimizer)):
                optimizer.zero_grad(set_to_none=True)
                (spec.loss_scale * spec.task_weight * problem.loss(model, task, batch)).backward()
            reference_optimizer.step()
            our_optimizer.step(sampling_ratio=sampler.sampling_ratio(task))
    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(reference.parameters(), ours.parameters()))


def toy_interference(
    problem: ToyMultiTaskProblem,
    model: ToyMultiTaskModel,
    parameters: str | Sequence[str] = "trunk",
    num_batches: int = 50,
    seed: int = 0,
) -> TaskInterference:
    """Task interference I(i -> j) (MoE paper Sec. 3.1, `walkthrough.interference`) of the toy tasks on `model`'s
    shared parameters (default: the whole trunk; "trunk.0" / "trunk.2" are its two Linear layers).

    Gradients are those of the unscaled L_k: the metric is a ratio of dot products with unit directions, so
    c_k and w_k cancel out of it anyway.
    """
    generator = torch.Generator().manual_seed(20_000 + seed)
    batch_size = problem.config.batch_size

    def closure(task: str):
        return lambda: problem.loss(model, task, problem.sample(task, batch_size, generator))

    with _one_thread():
        return task_interference(model, {task: closure(task) for task in problem.task_names},
                                 parameters=parameters, num_batches=num_batches)


def mean_curves(runs: Sequence[TrainingRun], task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation curve of `task` over runs of one variant: (iterations (P,), mean (P,), min (P,), max (P,)).
    The runs must share their evaluation iterations (same `iterations` and `eval_every`)."""
    if not runs:
        raise ValueError("mean_curves: no runs given")
    iterations = runs[0].eval_iterations
    for run in runs[1:]:
        if run.eval_iterations != iterations:
            raise ValueError(f"mean_curves: runs of {run.variant.name!r} (seeds {runs[0].seed}, {run.seed}) were "
                             "evaluated at different iterations")
    values = np.array([run.eval_losses[task] for run in runs])  # (S, P)
    return np.asarray(iterations), values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def describe_gaps(gaps: Mapping[str, float], tolerance: float = 0.02) -> str:
    """A sentence from ``Comparison.gaps``: the tasks that end lower, higher, and within ``tolerance`` (relative)
    of the reference, each with its change in percent, e.g. "lower on captioning (-31 %); higher on detection
    (+12 %); within 2 % on retrieval"."""
    if tolerance < 0:
        raise ValueError(f"describe_gaps: tolerance must be >= 0, got {tolerance}")
    parts = []
    for label, keep in (("lower", lambda g: g < -tolerance), ("higher", lambda g: g > tolerance)):
        tasks = [f"{task} ({100 * gap:+.0f} %)" for task, gap in gaps.items() if keep(gap)]
        if tasks:
            parts.append(f"{label} on " + ", ".join(tasks))
    level = [task for task, gap in gaps.items() if abs(gap) <= tolerance]
    if level:
        parts.append(f"within {100 * tolerance:g} % on " + ", ".join(level))
    return "; ".join(parts)


def grad_norm_ratio(run: TrainingRun) -> dict[str, float]:
    """Median gradient norm of each task's iterations in an unmixed run, divided by the smallest median: how
    much larger one task's raw gradient is than another's."""
    tasks = np.array(run.step_tasks)
    norms = np.array(run.grad_norms)
    medians = {task: float(np.median(norms[tasks == task])) for task in dict.fromkeys(run.step_tasks)
               if task != "mixed"}
    if not medians:
        raise ValueError(f"grad_norm_ratio: run {run.variant.name!r} has no per-task iterations (mixed sampling)")
    smallest = min(medians.values())
    return {task: value / smallest for task, value in medians.items()}


@dataclass
class Comparison:
    """Final and intermediate held-out losses of several variants, learning rates and seeds.

    Attributes:
        task_names: the tasks, in table order.
        runs: variant name -> lr -> runs (one per seed, in seed order).
    """

    task_names: list[str]
    runs: dict[str, dict[float, list[TrainingRun]]]

    @classmethod
    def run(
        cls,
        problem: ToyMultiTaskProblem,
        iterations: int,
        seeds: Sequence[int],
        learning_rates: Sequence[float],
        variants: Sequence[TrainingVariant] = VARIANTS,
        eval_every: int | None = None,
    ) -> Comparison:
        """Train every variant with every learning rate and seed."""
        if not seeds or not learning_rates:
            raise ValueError(f"Comparison.run: need at least one seed and one lr, got {seeds} and {learning_rates}")
        runs = {
            variant.name: {
                float(lr): [train_variant(problem, variant, iterations, seed=seed, eval_every=eval_every, lr=lr)
                            for seed in seeds]
                for lr in learning_rates
            }
            for variant in variants
        }
        return cls(task_names=problem.task_names, runs=runs)

    @property
    def learning_rates(self) -> list[float]:
        return sorted({lr for by_lr in self.runs.values() for lr in by_lr})

    def table(self, lr: float) -> dict:
        """`final_loss_table` of every variant at learning rate `lr`."""
        missing = [name for name, by_lr in self.runs.items() if lr not in by_lr]
        if missing:
            raise KeyError(f"Comparison.table: no runs with lr={lr} for {missing}; lrs: {self.learning_rates}")
        return final_loss_table([run for by_lr in self.runs.values() for run in by_lr[lr]], self.task_names)

    def relative_loss(self, variant: str, lr: float) -> float:
        """Mean over tasks and seeds of final / initial held-out loss: one number per (variant, lr) in which
        every task counts the same, whatever the scale of its loss."""
        runs = self.runs[variant][lr]
        return float(np.mean([[run.eval_losses[task][-1] / run.eval_losses[task][0] for task in self.task_names]
                              for run in runs]))

    def best_learning_rates(self) -> dict[str, float]:
        """variant -> its lr with the smallest `relative_loss` (a single choice for all tasks, as one training
        run must make)."""
        return {variant: min(by_lr, key=lambda lr: self.relative_loss(variant, lr))
                for variant, by_lr in self.runs.items()}

    def best_table(self) -> dict:
        """Final losses of every variant at its own best learning rate, with an "lr" column."""
        best = self.best_learning_rates()
        table = final_loss_table([run for variant, lr in best.items() for run in self.runs[variant][lr]],
                                 self.task_names)
        table["columns"] = table["columns"][:1] + ["lr"] + table["columns"][1:]
        table["rows"] = [row[:1] + [best[row[0]]] + row[1:] for row in table["rows"]]
        return table

    def gaps(self, lr: float, variant: str, reference: str) -> dict[str, float]:
        """task -> relative change of the final held-out loss of ``variant`` against ``reference`` at learning rate
        ``lr``, means over seeds: ``mean(variant) / mean(reference) - 1`` (negative: ``variant`` ends lower)."""
        table = self.table(lr)
        for name in (variant, reference):
            if name not in table["mean"]:
                raise KeyError(f"Comparison.gaps: no variant {name!r}; variants: {list(table['mean'])}")
        return {task: table["mean"][variant][task] / table["mean"][reference][task] - 1.0 for task in self.task_names}

    def best_means(self) -> dict[str, dict[str, float]]:
        """variant -> task -> mean over seeds of the final held-out loss, each variant at its own best learning rate
        (``best_learning_rates``): the fair comparison when one shared lr suits some variants better than others."""
        return self.best_table()["mean"]

    def best_gaps(self, variant: str, reference: str) -> dict[str, float]:
        """Like ``gaps``, with ``variant`` and ``reference`` each at its own best learning rate."""
        means = self.best_means()
        for name in (variant, reference):
            if name not in means:
                raise KeyError(f"Comparison.best_gaps: no variant {name!r}; variants: {list(means)}")
        return {task: means[variant][task] / means[reference][task] - 1.0 for task in self.task_names}

    def lr_curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
        """variant -> task -> (lrs (L,), mean (L,), min (L,), max (L,)) of the final held-out loss over seeds."""
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
        for variant, by_lr in self.runs.items():
            lrs = sorted(by_lr)
            curves[variant] = {}
            for task in self.task_names:
                values = np.array([[run.final_losses[task] for run in by_lr[lr]] for lr in lrs])  # (L, S)
                curves[variant][task] = (np.array(lrs), values.mean(1), values.min(1), values.max(1))
        return curves

    def training_curves(self, lr: float) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
        """variant -> task -> `mean_curves` of the held-out loss during training at learning rate `lr`."""
        return {variant: {task: mean_curves(by_lr[lr], task) for task in self.task_names}
                for variant, by_lr in self.runs.items()}
