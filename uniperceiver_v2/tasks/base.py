"""The common shape of every task: build inputs and candidate targets, compute the loss of v2 eq. (7), predict.

Every task of Uni-Perceiver v2 is "pick the most likely target y from a candidate set Y" (v2 eq. (5)):

    y_hat = argmax_{y in Y} P(x, y),        P(x, y) ~ exp(cos(g(f(x)), g(f(y))) / tau)      (v2 eq. (6))

with no task-specific head: only what goes into the sequences and what the candidate set is differ between tasks.
One task = one subclass of ``Task`` in its own module; adding a task touches no other task (register it in
``tasks/__init__.py``'s ``TASKS``).

The model is passed to every call (tasks hold no parameters), so one task object serves any model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from uniperceiver_v2.config import TaskConfig

__all__ = ["Task"]


class Task(ABC):
    """Base class of the six tasks.

    Attributes:
        name: the task's key in ``config.tasks`` and in ``TASKS`` ("classification", ...).
        config: its ``TaskConfig`` (sampling weight s_k, loss weight w_k, label smoothing, ...).

    Subclasses implement:
        ``collate(samples) -> batch``: samples of the task's loader (``uniperceiver_v2.data``) -> a batch object
            with ``.to(device)``.
        ``loss(model, batch) -> dict[str, Tensor]``: the task's loss terms (unweighted, for logging), metrics such
            as an accuracy (detached), and ``"loss"``: the value to back-propagate, w_k times the sum of the terms
            (v2 eq. (7), plus the region-proposal losses of localization tasks and the MoE load-balancing loss).
            An optimizer that normalises the gradient (MT-AdamW) divides any loss scale out; give it w_k as its
            ``task_weight``; an optimizer that does not normalise should get ``task_weight=1``.
        ``predict(model, batch)``: the argmax of v2 eq. (5) in the task's natural output format.
    """

    name: ClassVar[str]

    def __init__(self, config: TaskConfig):
        self.config = config

    @classmethod
    def from_dataset(cls, config: TaskConfig, dataset: Any) -> Task:
        """The task for a training / evaluation dataset; tasks whose candidates come from the dataset (class
        names) override this to read them."""
        return cls(config)

    @abstractmethod
    def collate(self, samples: Sequence[Any]) -> Any:
        """Samples of the task's loader -> a batch."""

    @abstractmethod
    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        """The loss terms, metrics and ``"loss"`` (see the class docstring)."""

    @abstractmethod
    def predict(self, model, batch) -> Any:
        """Predictions for a batch (the model's mode is left as the caller set it)."""

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """w_k * (sum of the loss terms): the ``"loss"`` entry of v2 eq. (7)."""
        if not terms:
            raise ValueError(f"task {self.name}: no loss terms")
        return self.config.loss_weight * torch.stack(list(terms.values())).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
