"""Task interference metric of Uni-Perceiver-MoE (its Sec. 3.1; see also docs/design.md).

For shared parameters theta and tasks i, j, with d_i = grad L_i(batch_i) / ||grad L_i(batch_i)|| the
normalised gradient of task i, a small step along -d_i changes task j's loss to first order by
-grad L_j(batch_j) . d_i. The interference of task i on task j is

    I(i -> j) = E[ grad L_j(batch_j) . d_i ] / E[ grad L_j(batch_j) . d_j' ]

where d_j' is task j's direction on a different batch than batch_j, so that the diagonal is 1.
I(i -> j) > 0: training task i also lowers task j's loss (collaboration); < 0: it raises it (interference).
The MoE paper reports it per layer (the 4th and 12th FFN blocks) from 100 batches per task.

Estimator. With N batches per task, g_k^n the gradient of task k on its n-th batch and d_k^n = g_k^n / ||g_k^n||,
the batches of different tasks are independent, so every pair (n, m) estimates the numerator:

    E[g_j . d_i] ~ (1/N^2) sum_{n,m} g_j^n . d_i^m = mean_n(g_j^n) . mean_m(d_i^m)         (i != j)

and the denominator uses all pairs of different batches of task j (g_j^n . d_j^n = ||g_j^n||):

    E[g_j . d_j'] ~ ( N^2 mean(g_j) . mean(d_j) - sum_n ||g_j^n|| ) / (N (N - 1))

Only the running sums of g and d per task are kept: memory is 2 K P float64 numbers for K tasks and P
selected parameters, independent of N.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TaskInterference", "task_interference"]


@dataclass(frozen=True)
class TaskInterference:
    """Result of `task_interference`.

    Attributes:
        task_names: the K tasks, in the order of the matrix rows and columns.
        matrix: (K, K) float64, matrix[i, j] = I(task_names[i] -> task_names[j]); the diagonal is 1.
        parameter_names: the parameters the gradients were taken on.
        num_batches: batches used per task.
        redrawn: per task, how many batches gave an exactly zero gradient on the selected parameters and were
            replaced by a fresh one (e.g. a detection batch whose images hold nothing the loss acts on).
    """

    task_names: list[str]
    matrix: torch.Tensor
    parameter_names: list[str]
    num_batches: int
    redrawn: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, pair: tuple[str, str]) -> float:
        """I(source -> target) for task names, e.g. result["captioning", "classification"]."""
        source, target = pair
        return float(self.matrix[self.task_names.index(source), self.task_names.index(target)])


def _select_parameters(model: nn.Module, prefixes: str | Sequence[str] | None) -> tuple[list[str], list[nn.Parameter]]:
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if prefixes is not None:
        if not prefixes:
            raise ValueError("task_interference: empty list of parameter prefixes")
        named = [
            (name, p) for name, p in named if any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        ]
    if not named:
        raise ValueError(f"task_interference: no trainable parameter of the model matches {prefixes}")
    return [name for name, _ in named], [p for _, p in named]


def task_interference(
    model: nn.Module,
    task_losses: Mapping[str, Callable[[], torch.Tensor]],
    parameters: str | Sequence[str] | None = None,
    num_batches: int = 100,
    undefined: str = "raise",
) -> TaskInterference:
    """Estimate the K x K task-interference matrix I(i -> j) on a subset of the model's parameters.

    The model is not updated and its `.grad` fields are not touched (gradients come from
    torch.autograd.grad). Put the model in the mode you want measured first: model.eval() removes the
    variance of dropout, stochastic depth and MoE gate noise.

    Args:
        model: the model whose parameters are shared by the tasks.
        task_losses: task name -> closure that draws a FRESH batch of that task and returns its scalar loss.
        parameters: parameter-name prefix(es), e.g. "decoder.layers.3.ffn" for one FFN block; default all
            trainable parameters.
        num_batches: N, batches drawn per task (the MoE paper: 100); at least 2.
        undefined: what to do when a task j's denominator E[g_j . d_j'] is not positive (task j's own gradients
            disagree from batch to batch, e.g. a nearly converged task, so the ratio has no meaning): "raise" a
            ValueError, or "nan": fill column j (every I(i -> j), its diagonal too) with NaN and keep the others;
            row j, task j's effect on the other tasks, stays defined.

    Returns:
        TaskInterference with matrix[i, j] = I(i -> j).

    Raises:
        ValueError: if a task's gradient on the selected parameters is zero in ``num_batches`` batches (the task
            does not use them, so its direction d_i is undefined; a single zero batch is redrawn), or, with
            ``undefined="raise"``, its denominator is not positive.
    """
    if undefined not in ("raise", "nan"):
        raise ValueError(f"task_interference: undefined must be 'raise' or 'nan', got {undefined!r}")
    if num_batches < 2:
        raise ValueError(
            f"task_interference: num_batches must be >= 2 (the diagonal needs two batches), got {num_batches}"
        )
    if not task_losses:
        raise ValueError("task_interference: no tasks given")
    names, params = _select_parameters(model, parameters)
    task_names = list(task_losses)
    num_params = sum(p.numel() for p in params)
    device = params[0].device
    sum_grad = torch.zeros(len(task_names), num_params, dtype=torch.float64, device=device)
    sum_direction = torch.zeros_like(sum_grad)
    sum_norm = torch.zeros(len(task_names), dtype=torch.float64, device=device)

    redrawn = dict.fromkeys(task_names, 0)
    for batch in range(num_batches):
        for k, task in enumerate(task_names):
            # A batch with an exactly zero gradient has no direction d: it is replaced by a fresh one, at most
            # num_batches times per task in all; a task whose gradient stays zero does not use these parameters.
            while True:
                flat = _flat_gradient(task, task_losses[task](), params, device)  # (P,)
                norm = torch.linalg.vector_norm(flat)
                if norm > 0:
                    break
                redrawn[task] += 1
                if redrawn[task] >= num_batches:
                    raise ValueError(
                        f"task {task!r}: zero gradient on the selected parameters in {redrawn[task]} batches "
                        f"(the last at batch {batch}); a task that does not use these parameters has no "
                        "interference direction")
            sum_grad[k] += flat
            sum_direction[k] += flat / norm
            sum_norm[k] += norm

    n = num_batches
    mean_grad = sum_grad / n  # (K, P)
    mean_direction = sum_direction / n  # (K, P)
    # cross[i, j] ~ E[g_j . d_i] over independent batches of tasks i and j.
    cross = mean_direction @ mean_grad.T  # (K, K)
    # Same task: only pairs of different batches, i.e. remove the N terms g_j^n . d_j^n = ||g_j^n||.
    self_change = (n * n * cross.diagonal() - sum_norm) / (n * (n - 1))  # (K,)
    defined = self_change > 0
    for k, task in enumerate(task_names):
        if not defined[k] and undefined == "raise":
            raise ValueError(
                f"task {task!r}: E[g . d'] over different batches is {self_change[k].item():.3g} <= 0; its "
                "gradients do not agree across batches, so I(i -> j) cannot be normalised by it"
            )
    matrix = cross / self_change.unsqueeze(0)
    matrix.diagonal().fill_(1.0)
    matrix[:, ~defined] = float("nan")
    return TaskInterference(task_names=task_names, matrix=matrix.cpu(), parameter_names=names, num_batches=n,
                            redrawn=redrawn)


def _flat_gradient(task: str, loss: Any, params: Sequence[nn.Parameter], device: torch.device) -> torch.Tensor:
    """(P,) float64: the gradient of one batch's scalar ``loss`` on ``params``, zeros for an unused parameter."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"task {task!r}: the loss closure must return a scalar tensor")
    if not loss.requires_grad:
        raise ValueError(f"task {task!r}: the loss does not require grad (computed under torch.no_grad?)")
    grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(device=device, dtype=torch.float64)
                      for g, p in zip(grads, params)])
