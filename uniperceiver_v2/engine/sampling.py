"""Task sampling for multi-task training: unmixed (the paper's) and mixed (the Tab. 4 baseline).

Unmixed sampling (paper Sec. 4.4): every iteration draws ONE task k with probability s_k (the sampling
ratio, normalised so that sum_k s_k = 1) and all ranks train on it, so the task gets the whole global batch.
Mixed sampling (the baseline of Tab. 4, as in Uni-Perceiver v1): one iteration holds several tasks; here the
global batch is cut into `num_slots` per-GPU batches ("slots"), each filled with a task drawn independently
by s_k, so every task still receives a fraction s_k of the data in expectation, but in smaller pieces.

Both samplers are stateless: the draw of iteration i is a pure function of (seed, i), computed with a
numpy generator seeded by the pair. All ranks given the same seed agree without communicating, and a
resumed run continues the same sequence from any iteration without replaying or saving sampler state.

A task can join late (``start_iterations``, our addition, not the paper's): before its start iteration it is never
drawn and the tasks already running share its probability in proportion to their s_k; from then on every task is
drawn with its s_k. ``sampling_ratio`` stays s_k throughout (MT-AdamW's compensation uses the long-run share).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["MixedTaskSampler", "UnmixedTaskSampler", "normalize_weights", "sqrt_size_weights"]


def normalize_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Scale non-negative task weights to sampling ratios s_k that sum to 1.

    Args:
        weights: task name -> weight (any positive scale).

    Returns:
        task name -> s_k, same order as `weights`.

    Raises:
        ValueError: naming the task whose weight is negative or not finite, or if all weights are zero.
    """
    if not weights:
        raise ValueError("normalize_weights: no tasks given")
    for task, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"task {task!r}: sampling weight must be finite and >= 0, got {weight}")
    total = math.fsum(weights.values())
    if total == 0:
        raise ValueError(f"all sampling weights are zero (tasks {list(weights)})")
    return {task: weight / total for task, weight in weights.items()}


def sqrt_size_weights(dataset_sizes: Mapping[str, int]) -> dict[str, float]:
    """Sampling ratios proportional to the square root of each dataset's size (paper Tab. 8, from [48]).

    s_k = sqrt(n_k) / sum_j sqrt(n_j): large datasets are sampled more often, but less than in proportion
    to their size, which eases the imbalance between, e.g., YFCC (14.8M) and COCO Caption (113K).

    Args:
        dataset_sizes: task (or task/dataset) name -> number of training samples.

    Returns:
        name -> s_k, summing to 1.
    """
    for task, size in dataset_sizes.items():
        if not size >= 0:
            raise ValueError(f"task {task!r}: dataset size must be >= 0, got {size}")
    return normalize_weights({task: math.sqrt(size) for task, size in dataset_sizes.items()})


class _SeededTaskDraws:
    """Shared part of both samplers: validated ratios and a generator per (seed, iteration)."""

    def __init__(
        self, task_names: Sequence[str], weights: Mapping[str, float] | Sequence[float], seed: int,
        start_iterations: Mapping[str, int] | None = None,
    ) -> None:
        task_names = list(task_names)
        if not task_names:
            raise ValueError("task sampler: no tasks given")
        duplicates = sorted(name for name, count in Counter(task_names).items() if count > 1)
        if duplicates:
            raise ValueError(f"task sampler: task names given more than once: {duplicates}")
        if isinstance(weights, Mapping):
            unknown = [name for name in weights if name not in task_names]
            if unknown:
                raise ValueError(f"sampling weight given for unknown task {unknown[0]!r}; tasks: {task_names}")
            missing = [name for name in task_names if name not in weights]
            if missing:
                raise ValueError(f"no sampling weight given for task {missing[0]!r}")
            weight_map = {name: float(weights[name]) for name in task_names}
        else:
            weights = list(weights)
            if len(weights) != len(task_names):
                raise ValueError(f"task sampler: {len(task_names)} tasks but {len(weights)} weights")
            weight_map = {name: float(w) for name, w in zip(task_names, weights)}
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"task sampler: seed must be a non-negative integer, got {seed!r}")

        self.task_names: list[str] = task_names
        self.sampling_ratios: dict[str, float] = normalize_weights(weight_map)
        self.seed = int(seed)
        self._cumulative = np.cumsum([self.sampling_ratios[name] for name in task_names])
        starts = dict(start_iterations or {})
        unknown = [name for name in starts if name not in task_names]
        if unknown:
            raise ValueError(f"start iteration given for unknown task {unknown[0]!r}; tasks: {task_names}")
        for name, start in starts.items():
            if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
                raise ValueError(f"task {name!r}: start iteration must be a non-negative integer, got {start!r}")
        self.start_iterations: dict[str, int] = {name: int(starts.get(name, 0)) for name in task_names}
        if not any(self.sampling_ratios[name] > 0 for name in task_names if self.start_iterations[name] == 0):
            raise ValueError("task sampler: no task with a positive sampling weight starts at iteration 0 "
                             f"(start iterations {self.start_iterations})")
        self._last_start = max(self.start_iterations.values())

    def active_ratios(self, iteration: int) -> dict[str, float]:
        """The probability of each task at `iteration`: s_k over the tasks that have started, renormalised."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        cumulative = self._cumulative_at(iteration)
        return dict(zip(self.task_names, np.diff(cumulative, prepend=0.0) / cumulative[-1]))

    def expected_iterations(self, task: str, iterations: int) -> float:
        """How many of iterations 0 .. `iterations` - 1 draw `task` in expectation (slots: times num_slots)."""
        if task not in self.sampling_ratios:
            raise ValueError(f"unknown task {task!r}; tasks: {self.task_names}")
        bounds = sorted({0, iterations, *(s for s in self.start_iterations.values() if s < iterations)})
        return math.fsum(self.active_ratios(lo)[task] * (hi - lo) for lo, hi in zip(bounds, bounds[1:]))

    def _cumulative_at(self, iteration: int) -> np.ndarray:
        if iteration >= self._last_start:
            return self._cumulative
        return np.cumsum([self.sampling_ratios[name] if self.start_iterations[name] <= iteration else 0.0
                          for name in self.task_names])

    def sampling_ratio(self, task: str) -> float:
        """s_k of `task` (what MTAdamW.step needs as `sampling_ratio`)."""
        if task not in self.sampling_ratios:
            raise ValueError(f"unknown task {task!r}; tasks: {self.task_names}")
        return self.sampling_ratios[task]

    def _draw(self, iteration: int, count: int) -> list[str]:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        rng = np.random.default_rng([self.seed, int(iteration)])
        uniforms = rng.random(count)
        # Inverse-CDF draw; the total is scaled by the last cumulative value so rounding in the sum can never
        # push a uniform past the end. A zero-weight task (or one that has not started) has an empty interval and
        # is never drawn.
        cumulative = self._cumulative_at(iteration)
        indices = np.searchsorted(cumulative, uniforms * cumulative[-1], side="right")
        return [self.task_names[i] for i in np.minimum(indices, len(self.task_names) - 1)]


class UnmixedTaskSampler(_SeededTaskDraws):
    """Draws one task per iteration for all ranks together (unmixed sampling, Sec. 4.4).

    Args:
        task_names: the tasks (or task/dataset pairs of Tab. 8), in a fixed order.
        weights: name -> weight, or one weight per name; normalised to s_k.
        seed: the same on every rank.
        start_iterations: name -> the first iteration the task may be drawn at (missing names: 0); at least one
            task with a positive weight must start at 0.

    Example:
        sampler = UnmixedTaskSampler(["cls", "det"], {"cls": 0.1, "det": 0.25}, seed=0)
        task = sampler.task_for_iteration(it)
        optimizer.step(sampling_ratio=sampler.sampling_ratio(task), task_weight=w[task])
    """

    def task_for_iteration(self, iteration: int) -> str:
        """The task of iteration `iteration` (>= 0), a pure function of (seed, iteration)."""
        return self._draw(iteration, 1)[0]


class MixedTaskSampler(_SeededTaskDraws):
    """Mixes several tasks in one iteration (the "mixed" baseline of Tab. 4).

    The iteration's global batch is made of `num_slots` per-GPU batches; each slot gets a task drawn
    independently by s_k, and holds that task's own per-GPU batch size (Tab. 8). In a distributed run use
    num_slots = world size and let rank r train slot r (as Uni-Perceiver v1 did); on one process use several
    slots and accumulate gradients over them. A task drawn for c slots gets the fraction c / num_slots of the
    iteration's batch; in expectation that is s_k, the same data share as with unmixed sampling.

    Args:
        task_names, weights, seed, start_iterations: as for UnmixedTaskSampler.
        num_slots: per-GPU batches per iteration.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        weights: Mapping[str, float] | Sequence[float],
        seed: int,
        num_slots: int,
        start_iterations: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(task_names, weights, seed, start_iterations)
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"MixedTaskSampler: num_slots must be a positive integer, got {num_slots!r}")
        self.num_slots = num_slots

    def slots_for_iteration(self, iteration: int) -> list[str]:
        """The task of each slot of iteration `iteration`, length num_slots (slot r -> rank r)."""
        return self._draw(iteration, self.num_slots)

    def tasks_for_iteration(self, iteration: int) -> list[tuple[str, float]]:
        """The tasks present in iteration `iteration` with their fraction of the batch.

        Returns:
            [(task, c / num_slots)] for every task drawn c > 0 times, in `task_names` order; the fractions
            sum to 1.
        """
        counts = Counter(self.slots_for_iteration(iteration))
        return [(task, counts[task] / self.num_slots) for task in self.task_names if counts[task] > 0]
