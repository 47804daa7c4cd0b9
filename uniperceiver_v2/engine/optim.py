"""MT-AdamW, the multi-task optimizer of Uni-Perceiver v2 (paper Sec. 4.4), and its parameter groups.

With unmixed sampling (one task per iteration for all ranks, see `engine/sampling.py`) consecutive steps see
gradients of very different tasks and scales. MT-AdamW balances them by normalising each step's gradient to
unit global norm, scaling it by the sampled task's weight w_k (omega_k) and compensating the moment updates
by 1 / s_k, the task's sampling ratio.

The paper writes (its beta is our 1 - beta; weight decay and bias corrections are "omitted for simplicity"):

    g_t = omega_k * grad L_{t,k}(theta_{t-1}) / ||grad L_{t,k}(theta_{t-1})||
    m_t = (1 - beta_1) m_{t-1} + beta_1 / s_k * g_t
    n_t = (1 - beta_2) n_{t-1} + beta_2 / s_k * g_t^2
    theta_t = theta_{t-1} - alpha * m_t / sqrt(n_t + eps)

In the usual beta notation, with AdamW's decoupled weight decay and bias corrections, this module implements:

    g      = w_k * grad / ||grad||                     (global L2 norm over all parameters of the step)
    m      = beta1 * m + (1 - beta1) / s_k * g
    v      = beta2 * v + (1 - beta2) / s_k * g^2
    theta -= lr * ( m_hat / (sqrt(v_hat) + eps) + weight_decay * theta )

The choices made here, and why, are in the docstring of `MTAdamW`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["MTAdamW", "build_param_groups", "global_grad_norm"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients taken together, as if they were concatenated into one vector.

    Args:
        grads: gradient tensors of any shapes, dtypes and devices.

    Returns:
        A 0-d tensor on the first gradient's device, in float64 if any gradient is float64 and float32
        otherwise (half-precision gradients are accumulated in float32 so the norm does not overflow).
    """
    if not grads:
        raise ValueError("global_grad_norm needs at least one gradient tensor")
    norm_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    per_tensor = [torch.linalg.vector_norm(g, dtype=norm_dtype).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor))


class MTAdamW(torch.optim.Optimizer):
    """AdamW with per-step gradient normalisation and sampling-ratio compensation (MT-AdamW, Sec. 4.4).

    One call of `step(sampling_ratio=s_k, task_weight=w_k)` after the backward pass of the task k sampled for
    this iteration performs, for every parameter p with a gradient:

        g      = w_k * p.grad / N           N = global L2 norm of the gradients of ALL parameters (all groups)
                                              that have a gradient in this step      [normalize=True]
        p     *= 1 - lr * weight_decay      decoupled weight decay, applied first as torch.optim.AdamW does
        m      = beta1 * m + (1 - beta1) * c * g          c = 1 / s_k [compensate=True], else 1
        v      = beta2 * v + (1 - beta2) * c * g^2
        p     -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Choices, and why:

    * Bias correction is AdamW's, unchanged: 1 - beta^t with t the parameter's own step count. The
      compensation 1 / s_k is an importance weight: over the random task draws,
      E[(1 / s_k) g_k] = sum_k s_k (1 / s_k) g_k = sum_k g_k, so m estimates the sum of the (normalised,
      weighted) task gradients, the gradient of "all tasks at once", and v the sum of their squares.
      The zero initialisation of m and v biases that estimate towards zero by exactly the factor
      1 - beta^t in expectation, whatever the s_k, so AdamW's correction stays the right one. Dividing by
      the realised sum of weights instead would cancel the compensation itself.
    * eps is added to sqrt(v_hat) as in AdamW, not inside the square root as in the paper's formula; this
      keeps `normalize=False, compensate=False` identical to `torch.optim.AdamW`.
    * Weight decay is decoupled (AdamW), applied to theta_{t-1} before the moment update, which is the same
      as the formula in the module docstring because the Adam direction does not depend on theta_{t-1}.
    * The gradient norm is global, over every parameter of every group that has a gradient in this step,
      so the relative size of the gradients of different layers is kept; only the step's overall scale is
      removed. Under DistributedDataParallel every rank holds the same averaged gradients and computes the
      same norm. With normalize=True any loss scaling is divided out: pass the task's loss weight as
      `task_weight` rather than multiplying it into the loss.
    * A parameter whose `.grad` is None is skipped entirely, as torch.optim.AdamW does: no weight decay,
      its moments and its step count are untouched, so its bias correction uses its own number of updates.
      (Captioning-only or detection-only parameters are None-gradient in other tasks' iterations.)
    * A global norm of 0 (all gradients exactly zero) makes g = 0 instead of 0/0: the moments decay, weight
      decay and the step count proceed exactly as AdamW would with zero gradients; no NaN appears.
      Non-finite gradients are not guarded against, as in AdamW.

    Learning rates: the encoders' x0.1 is a per-group `lr` (see `build_param_groups`). torch's schedulers,
    e.g. `LambdaLR` in `engine/schedule.py`, store each group's initial lr and multiply it by the schedule
    factor, so ratios between groups are kept without any extra key.

    Args:
        params: parameters or parameter groups (dicts with "params" and optional "lr", "weight_decay",
            "betas", "eps"; other keys, e.g. "name", are kept and ignored).
        lr: learning rate (paper: 1e-4).
        betas: (beta1, beta2) in the usual AdamW meaning.
        eps: added to sqrt(v_hat).
        weight_decay: decoupled weight decay (paper: 1e-4).
        normalize: divide the step's gradient by its global L2 norm.
        compensate: multiply the moment updates by 1 / s_k.
        task_moments: keep m, v and the step count per task (state keys "exp_avg/<task>", ...); `step` then needs
            `task=`, and 1 / s_k is not applied (each task's moments average only its own steps). Not the paper's.

    Attributes:
        last_grad_norm: 0-d tensor, the global gradient norm N of the latest step (before normalisation and
            task weighting), or None before the first step; useful to plot how much gradient scales of the
            sampled tasks differ, the instability MT-AdamW addresses.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        normalize: bool = True,
        compensate: bool = True,
        task_moments: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"MTAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"MTAdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"MTAdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"MTAdamW: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.normalize = normalize
        self.compensate = compensate
        self.task_moments = task_moments
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        sampling_ratio: float = 1.0,
        task_weight: float = 1.0,
        task: str | None = None,
    ) -> torch.Tensor | None:
        """Update all parameters that have a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in torch optimizers).
            sampling_ratio: s_k of the task sampled for this step, in (0, 1]. Ignored if compensate=False.
            task_weight: w_k (omega_k) of that task, >= 0.
            task: the sampled task's name; required with task_moments=True (it selects the moments), else ignored.

        Returns:
            The closure's loss, or None.
        """
        if not (0.0 < sampling_ratio <= 1.0):
            raise ValueError(f"MTAdamW.step: sampling_ratio must be in (0, 1], got {sampling_ratio}")
        if not (task_weight >= 0.0 and math.isfinite(task_weight)):
            raise ValueError(f"MTAdamW.step: task_weight must be finite and >= 0, got {task_weight}")
        if self.task_moments and not task:
            raise ValueError("MTAdamW.step: task_moments=True keeps moments per task; pass task=<the sampled task>")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise RuntimeError("MTAdamW does not support sparse gradients")

        if self.normalize:
            norm = global_grad_norm(grads)
            self.last_grad_norm = norm
            # torch.where keeps this free of a host sync; for norm == 0 every gradient is zero, so g = 0.
            scale = torch.where(norm > 0, task_weight / norm, torch.zeros_like(norm))
        else:
            self.last_grad_norm = global_grad_norm(grads)
            scale = None
        # With moments per task, each task's moments average only its own steps: there is no mixture to compensate.
        compensation = 1.0 / sampling_ratio if self.compensate and not self.task_moments else 1.0
        suffix = f"/{task}" if self.task_moments else ""
        step_key, avg_key, sq_key = "step" + suffix, "exp_avg" + suffix, "exp_avg_sq" + suffix

        # One fused (torch._foreach_*) update per parameter group; the operations, in this order, are the
        # formulas above applied to every parameter that has a gradient.
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            params, group_grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if step_key not in state:
                    state[step_key] = 0
                    state[avg_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[sq_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[step_key] += 1
                params.append(p)
                group_grads.append(p.grad)
                exp_avgs.append(state[avg_key])
                exp_avg_sqs.append(state[sq_key])
                steps.append(state[step_key])
            if not params:
                continue
            if scale is not None:
                g = torch._foreach_mul(group_grads, scale.to(device=params[0].device, dtype=params[0].dtype))
            elif task_weight != 1.0:
                g = torch._foreach_mul(group_grads, task_weight)
            else:
                g = group_grads

            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, g, alpha=(1 - beta1) * compensation)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, g, g, value=(1 - beta2) * compensation)

            # a parameter's step counts the updates it received (a task that does not reach it skips it)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**step) for step in steps])
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**step) for step in steps])
        return loss


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_multipliers: Mapping[str, float] | None = None,
    no_weight_decay: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[dict]:
    """Split a model's trainable parameters into optimizer groups by learning-rate multiplier and decay.

    The paper multiplies the pre-trained encoders' lr by 0.1, e.g.
    `lr_multipliers={"image_encoder.backbone": 0.1, "text_encoder": 0.1}`. A parameter takes the multiplier
    of the longest prefix (on "."-separated name boundaries) that matches its name, and 1.0 if none does.
    The result goes straight into `MTAdamW(groups, ...)`; each group carries its final `lr`, so LambdaLR
    scales all groups by the same factor and keeps their ratios.

    Args:
        model: the model; parameters with requires_grad=False are left out.
        lr: base learning rate.
        weight_decay: weight decay of the groups that decay.
        lr_multipliers: parameter-name prefix -> lr multiplier. A prefix matching no parameter is an error
            (a typo would otherwise silently train the encoder at full lr).
        no_weight_decay: predicate (name, parameter) -> True for parameters trained without weight decay,
            e.g. the Conditional-MoE attribute gate (docs/design.md). Default: every parameter decays.

    Returns:
        Non-empty groups, each {"params": [...], "lr": float, "weight_decay": float, "name": str}, in the
        order of first appearance in `model.named_parameters()`.
    """
    lr_multipliers = dict(lr_multipliers or {})
    for prefix, mult in lr_multipliers.items():
        if not mult >= 0:
            raise ValueError(f"lr_multipliers[{prefix!r}] must be >= 0, got {mult}")

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    groups: dict[tuple[float, bool], dict] = {}
    used_prefixes: set[str] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matching = [prefix for prefix in lr_multipliers if matches(name, prefix)]
        prefix = max(matching, key=len) if matching else None
        mult = lr_multipliers[prefix] if prefix is not None else 1.0
        if prefix is not None:
            used_prefixes.add(prefix)
        decay = not (no_weight_decay is not None and no_weight_decay(name, param))
        key = (mult, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * mult,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"lr x{mult:g}" + ("" if decay else ", no weight decay"),
            }
        groups[key]["params"].append(param)

    unused = sorted(set(lr_multipliers) - used_prefixes)
    if unused:
        raise ValueError(f"lr_multipliers: no trainable parameter name starts with {unused}")
    return list(groups.values())
