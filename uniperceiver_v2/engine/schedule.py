"""Learning-rate schedule: linear warm-up, then step decay (paper Sec. 5.2).

The paper trains 200k iterations and multiplies the lr by 0.1 at 160k, i.e. at 80 % of training
(`decay_fractions=(0.8,)`); it does not state a warm-up length, which the config chooses.

    factor(i) = (start + (1 - start) * i / warmup)          for i < warmup
              * decay_factor ** (number of milestones <= i)  milestone_j = round(fraction_j * total)

`build_lr_scheduler` wraps it in `torch.optim.lr_scheduler.LambdaLR`, which multiplies every param group's
initial lr by the factor, so the encoders' x0.1 group keeps its ratio to the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WarmupStepSchedule", "build_lr_scheduler"]


@dataclass(frozen=True)
class WarmupStepSchedule:
    """Linear warm-up followed by step decay; `lr_factor(i)` is the multiplier of the base lr at iteration i.

    Args:
        total_iterations: length of training (200_000 for the paper's Swin models).
        warmup_iterations: iterations of linear warm-up (0 for none).
        decay_fractions: where the lr is multiplied by `decay_factor`, as fractions of total_iterations
            (paper: (0.8,)), increasing, in (0, 1].
        decay_factor: multiplier applied at each milestone (paper: 0.1).
        warmup_start_factor: factor at iteration 0, rising linearly to 1 at `warmup_iterations`; > 0 so the
            first step already trains.
    """

    total_iterations: int
    warmup_iterations: int = 0
    decay_fractions: tuple[float, ...] = (0.8,)
    decay_factor: float = 0.1
    warmup_start_factor: float = 0.001

    def __post_init__(self) -> None:
        if not self.total_iterations > 0:
            raise ValueError(f"total_iterations must be > 0, got {self.total_iterations}")
        if not 0 <= self.warmup_iterations <= self.total_iterations:
            raise ValueError(
                f"warmup_iterations must be in [0, total_iterations={self.total_iterations}], "
                f"got {self.warmup_iterations}"
            )
        fractions = tuple(float(f) for f in self.decay_fractions)
        object.__setattr__(self, "decay_fractions", fractions)
        if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
            raise ValueError(f"decay_fractions must be increasing values in (0, 1], got {fractions}")
        if fractions and self.milestones[0] < self.warmup_iterations:
            raise ValueError(
                f"the first lr decay (iteration {self.milestones[0]}) falls inside the warm-up "
                f"({self.warmup_iterations} iterations)"
            )
        if not 0 < self.decay_factor:
            raise ValueError(f"decay_factor must be > 0, got {self.decay_factor}")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")

    @property
    def milestones(self) -> list[int]:
        """Iterations at which the decay takes effect (the lr of that iteration is already decayed)."""
        return [round(f * self.total_iterations) for f in self.decay_fractions]

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of the base lr used by the optimizer step of iteration `iteration` (0-based)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        factor = 1.0
        if iteration < self.warmup_iterations:
            progress = iteration / self.warmup_iterations
            factor = self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress
        num_decays = sum(iteration >= milestone for milestone in self.milestones)
        return factor * self.decay_factor**num_decays

    def __call__(self, iteration: int) -> float:
        return self.lr_factor(iteration)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupStepSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `schedule`; call `scheduler.step()` once after each `optimizer.step()`.

    LambdaLR's step counter is the iteration: right after construction the groups' lr is
    initial_lr * lr_factor(0), and after n calls of `scheduler.step()` it is initial_lr * lr_factor(n).
    LambdaLR's state_dict holds the schedule's fields, so loading a checkpoint restores the schedule it was
    saved with (a changed total_iterations in the config does not override a resumed run's schedule).
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
