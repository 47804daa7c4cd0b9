"""Conditional Mixture-of-Experts (Uni-Perceiver-MoE, Sec. 3.2; used in every FFN of the v2 unified decoder).

A Conditional-MoE layer has a gate and one or more banks of expert Linear layers that share the gate's decision.
For a token x with condition c(x) and E experts (MoE eq. (3) and (4)):

    h    = W_g c(x) + n,          n ~ N(0, sigma^2) in training only, sigma = noise_std (default 1 / E)
    G(x) = softmax over the top-k entries of h, 0 for the other E - k experts
    y    = sum_e G_e(x) (W_e x + b_e)          experts with G_e(x) = 0 are not computed

The condition c(x) is the routing (``ConditionalGate``):

    token      c = x                                       (MoE eq. (5))
    context    c = concat(x, AttnPool(tokens of x's sample, padding masked))   (MoE eq. (6))
    modality   c = Embedding(modality id of x)            (MoE eq. (7))
    task       c = Embedding(task id)                     (MoE eq. (8))
    attribute  c = LayerNorm(W_a a), a = the 8-bit attribute vector of x   (MoE eq. (9), the v2 choice)

Each expert is a single Linear layer (not a whole FFN): an MoE FFN is ``MoELinear(d, ffn) -> GELU ->
MoELinear(ffn, d)`` with both banks reading the same ``GateDecision``. That makes re-parameterisation exact for the
data-independent routings (modality, task, attribute), where all tokens with the same condition take the same
experts with the same weights:

    y = sum_e G_e (W_e x + b_e) = (sum_e G_e W_e) x + sum_e G_e b_e,

so at inference ``merge_experts`` mixes the selected experts once per distinct condition and the layer costs one
dense Linear (MoE paper Sec. 3.3).

Data-dependent routings (token, context) follow Switch Transformers ([23] of the MoE paper):

* load-balancing loss  L_bal = E * sum_e f_e P_e, with f_e the fraction of (token, choice) assignments sent to
  expert e (top-k choices of the valid tokens, before the capacity cut; sum_e f_e = 1) and P_e the mean over
  valid tokens of the full softmax over the E logits; L_bal = 1 for a perfectly uniform router. The gradient
  flows through P_e. ``GateDecision.aux_loss`` holds the unweighted value; the decoder multiplies it by
  ``balance_loss_weight``.
* capacity: each expert takes at most C = ceil(capacity_factor * k * N / E) assignments, N = the number of
  non-padding tokens in the batch; capacity_factor is 1.0 in training and 2.0 at evaluation. Assignments queue by
  choice rank first (every token's first choice before any second choice, as in GShard) and then by token order
  in the flattened batch. An assignment over capacity is dropped: that expert contributes nothing to the token
  (the remaining weights are not renormalised); a token with every assignment dropped gets 0 from the layer and
  passes through its residual connection only. Padding tokens are never dispatched and take no capacity.

Gate parameters all live in modules named ``gate`` (``is_gate_parameter``) so the optimizer can give them their
own group without weight decay.

Under autocast (``run.precision=bf16``) the expert and gate Linear layers run in half precision like any Linear,
but the router works in float32 from its logits on (noise, top-k, softmax, balance loss) and ``MoELinear`` adds
the gate-weighted expert outputs in the promoted dtype (float32); without autocast nothing is cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_v2.config import ROUTINGS, MoEConfig
from uniperceiver_v2.modeling.attributes import MODALITY_IDS, NUM_ATTRIBUTES, TASK_IDS, attribute_codes

__all__ = [
    "DATA_DEPENDENT_ROUTINGS",
    "DATA_INDEPENDENT_ROUTINGS",
    "GATE_MODULE_NAME",
    "AttentionPool",
    "ConditionGroups",
    "ConditionalGate",
    "GateDecision",
    "GateRecord",
    "MoELinear",
    "TokenConditions",
    "capacity_keep",
    "is_gate_parameter",
    "load_balancing_loss",
    "merge_experts",
    "unmerge_experts",
]

DATA_DEPENDENT_ROUTINGS = ("token", "context")
DATA_INDEPENDENT_ROUTINGS = ("modality", "task", "attribute")
GATE_MODULE_NAME = "gate"


def is_gate_parameter(name: str) -> bool:
    """True for a parameter of a Conditional-MoE gate, given its name from ``model.named_parameters()``."""
    return GATE_MODULE_NAME in name.split(".")


# --------------------------------------------------------------------------------------------------------------
# Conditions: what the gates route on
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ConditionGroups:
    """The tokens of a batch grouped by their (data-independent) condition.

    Attributes:
        codes: (U,) long, the distinct condition ids present (modality id, task id or attribute code).
        inverse: (N,) long, index into ``codes`` of each flattened token.
        rows: U tensors (n_u,) long, the flattened tokens of each condition, in ``codes`` order.
    """

    codes: torch.Tensor
    inverse: torch.Tensor
    rows: list[torch.Tensor]

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> ConditionGroups:
        """Group flattened per-token condition ids (N,) long."""
        codes, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        rows = torch.argsort(inverse, stable=True).split(counts.tolist())
        return cls(codes=codes, inverse=inverse, rows=list(rows))

    def apply(self, x: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """y[rows_u] = fn(x[rows_u], u) for every condition u: one dense computation per condition.

        Args:
            x: (N, ...) flattened tokens.
            fn: (x_u (n_u, ...), u) -> (n_u, ...).

        Returns:
            (N, ...) the outputs in token order.
        """
        if len(self.rows) == 1:              # a single condition: no gather / scatter at all
            return fn(x, 0)
        outputs = [fn(x.index_select(0, rows), u) for u, rows in enumerate(self.rows)]
        y = outputs[0].new_empty((x.shape[0],) + outputs[0].shape[1:])
        for rows, out in zip(self.rows, outputs):
            y.index_copy_(0, rows, out)
        return y


@dataclass
class TokenConditions:
    """Everything a gate may route on, for a batch of B sequences of T tokens. Fields a routing does not use may be
    None.

    Attributes:
        key_padding_mask: (B, T) bool, True = padding (token / context routing: padding is not dispatched and
            not pooled).
        modality_ids: (B, T) long, ``attributes.MODALITY_IDS`` (modality routing).
        task_id: (B,) long, ``attributes.TASK_IDS`` (task routing).
        attributes: (B, T, 8) float of 0/1, ``attributes.token_attributes`` (attribute routing).
    """

    key_padding_mask: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    task_id: torch.Tensor | None = None
    attributes: torch.Tensor | None = None
    _groups: dict[str, ConditionGroups] = field(default_factory=dict, repr=False, compare=False)

    def condition_ids(self, routing: str, batch: int, length: int) -> torch.Tensor:
        """The (B * T,) long condition id of every token for a data-independent routing."""
        if routing == "modality":
            ids = self._require("modality_ids", self.modality_ids, routing, (batch, length))
            if ids.numel() and (ids.min() < 0 or ids.max() >= len(MODALITY_IDS)):
                raise ValueError(f"modality_ids: values must be in [0, {len(MODALITY_IDS)}) ({MODALITY_IDS})")
        elif routing == "task":
            ids = self._require("task_id", self.task_id, routing, (batch,))
            if ids.numel() and (ids.min() < 0 or ids.max() >= len(TASK_IDS)):
                raise ValueError(f"task_id: values must be in [0, {len(TASK_IDS)}) ({TASK_IDS})")
            ids = ids[:, None].expand(batch, length)
        elif routing == "attribute":
            attributes = self._require("attributes", self.attributes, routing, (batch, length, NUM_ATTRIBUTES))
            ids = attribute_codes(attributes)
        else:
            raise ValueError(f"routing {routing!r} has no per-token condition id; expected one of "
                             f"{DATA_INDEPENDENT_ROUTINGS}")
        return ids.reshape(-1)

    def groups(self, routing: str, batch: int, length: int) -> ConditionGroups:
        """``ConditionGroups`` of the batch, computed once and shared by every gate of the model."""
        if routing not in self._groups:
            self._groups[routing] = ConditionGroups.from_ids(self.condition_ids(routing, batch, length))
        return self._groups[routing]

    def valid_tokens(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(B * T,) bool, True for non-padding tokens."""
        if self.key_padding_mask is None:
            return torch.ones(batch * length, dtype=torch.bool, device=device)
        if tuple(self.key_padding_mask.shape) != (batch, length):
            raise ValueError(f"key_padding_mask: expected shape {(batch, length)}, got "
                             f"{tuple(self.key_padding_mask.shape)}")
        return ~self.key_padding_mask.reshape(-1)

    @staticmethod
    def _require(name: str, value: torch.Tensor | None, routing: str, shape: tuple[int, ...]) -> torch.Tensor:
        if value is None:
            raise ValueError(f"decoder.moe.routing={routing!r} needs {name} of shape {shape}, got None")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for decoder.moe.routing={routing!r}, got "
                             f"{tuple(value.shape)}")
        return value


# --------------------------------------------------------------------------------------------------------------
# Gate decisions
# --------------------------------------------------------------------------------------------------------------
@dataclass
class GateRecord:
    """One gate's decisions for a batch, kept for visualisation (``record_gates=True``); detached.

    Attributes:
        indices: (B, T, k) long, the experts each token was sent to (top-k of the gate logits).
        weights: (B, T, k) float, their gate values G_e (sum to 1 over k).
        keep: (B, T, k) bool, False where the capacity factor dropped the assignment (or the token is padding).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor


@dataclass
class DispatchPlan:
    """The kept (token, expert) assignments of a decision, sorted by expert.

    Attributes:
        rows: (M,) long, the token (row of the flattened input) of each assignment.
        weights: (M, 1) float, its gate value G_e.
        sizes: E ints, how many assignments each expert received.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    sizes: list[int]


@dataclass
class GateDecision:
    """The output of a ``ConditionalGate`` for N = B * T flattened tokens, read by every ``MoELinear`` of the layer.

    Attributes:
        indices: (N, k) long, top-k experts per token.
        weights: (N, k) float, G_e(x) of those experts (softmax over the top-k logits).
        keep: (N, k) bool or None, False where an assignment is dropped (capacity, padding); None = all kept.
        aux_loss: scalar, the load-balancing loss (0 for the data-independent routings).
        groups: the tokens grouped by condition (data-independent routings), else None.
        group_indices: (U, k) long, the top-k experts of each condition in ``groups.codes`` (data-independent).
        group_weights: (U, k) float, their gate values (data-independent).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor | None
    aux_loss: torch.Tensor
    groups: ConditionGroups | None = None
    group_indices: torch.Tensor | None = None
    group_weights: torch.Tensor | None = None
    _plan: DispatchPlan | None = field(default=None, repr=False)

    def gate_matrix(self, num_experts: int) -> torch.Tensor:
        """(N, E) dense gate values G(x): zero outside the kept top-k."""
        weights = self.weights if self.keep is None else self.weights * self.keep
        return torch.zeros(self.indices.shape[0], num_experts, dtype=weights.dtype,
                           device=weights.device).scatter(1, self.indices, weights)

    def dispatch_plan(self, num_experts: int) -> DispatchPlan:
        """The assignments sorted by expert, computed once and shared by the layer's expert banks."""
        if self._plan is None:
            N, k = self.indices.shape
            experts = self.indices.reshape(-1)                                        # (N*k,)
            rows = torch.arange(N, device=experts.device).repeat_interleave(k)        # (N*k,)
            weights = self.weights.reshape(-1)
            if self.keep is not None:
                kept = self.keep.reshape(-1)
                experts, rows, weights = experts[kept], rows[kept], weights[kept]
            order = torch.argsort(experts, stable=True)
            sizes = torch.bincount(experts, minlength=num_experts).tolist()
            self._plan = DispatchPlan(rows=rows[order], weights=weights[order, None], sizes=sizes)
        return self._plan

    def record(self, batch: int, length: int) -> GateRecord:
        """The decision reshaped to (B, T, k) and detached, for visualisation."""
        keep = self.keep if self.keep is not None else torch.ones_like(self.indices, dtype=torch.bool)
        k = self.indices.shape[1]
        return GateRecord(indices=self.indices.detach().reshape(batch, length, k),
                          weights=self.weights.detach().reshape(batch, length, k),
                          keep=keep.detach().reshape(batch, length, k))


def load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss L_bal = E * sum_e f_e P_e (see the module docstring).

    Args:
        logits: (N, E) gate logits (with the training noise, as used for routing).
        indices: (N, k) long, the top-k experts of each token.
        valid: (N,) bool, False for padding tokens, which are left out of f and P.

    Returns:
        scalar; 1 when routing is perfectly uniform; E with top-1 routing that sends every token to one expert
        with probability 1.
    """
    E, k = logits.shape[1], indices.shape[1]
    num_valid = int(valid.sum())
    if num_valid == 0:
        return logits.sum() * 0.0
    fraction = torch.bincount(indices[valid].reshape(-1), minlength=E).to(logits.dtype) / (k * num_valid)  # f_e
    mean_prob = logits[valid].softmax(dim=-1).mean(dim=0)                                                   # P_e
    return E * (fraction * mean_prob).sum()


def capacity_keep(indices: torch.Tensor, valid: torch.Tensor, num_experts: int,
                  capacity_factor: float) -> torch.Tensor:
    """Which assignments fit in their expert's capacity C = ceil(capacity_factor * k * N_valid / E).

    Assignments queue by choice rank first, then by token order (module docstring).

    Args:
        indices: (N, k) long, top-k experts per token.
        valid: (N,) bool, False for padding (never kept, takes no capacity).
        num_experts: E.
        capacity_factor: 1.0 in training, 2.0 at evaluation (MoE paper appendix 6.1).

    Returns:
        (N, k) bool, True = the expert computes this token.
    """
    N, k = indices.shape
    capacity = math.ceil(capacity_factor * k * int(valid.sum()) / num_experts)
    by_rank = indices.t().reshape(-1)                                       # (k*N,) all 1st choices, then 2nd, ...
    valid_by_rank = valid.repeat(k)                                         # (k*N,)
    one_hot = F.one_hot(by_rank, num_experts) * valid_by_rank[:, None]      # (k*N, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1            # place in its expert's queue
    keep = valid_by_rank & (position < capacity)
    return keep.reshape(k, N).t()


# --------------------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------------------
class AttentionPool(nn.Module):
    """One learned query attending over the tokens of each sample (attention pooling, CLIP [61] of the MoE paper),
    for the context routing (MoE eq. (6)).

    Single head: the pooled vector only feeds the gate, which needs a summary of the sample, not a rich
    representation.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d); key_padding_mask: (B, T) bool, True = padding. Returns (B, d)."""
        scores = self.key(x) @ self.query / math.sqrt(x.shape[-1])                     # (B, T)
        if key_padding_mask is not None:
            # finfo.min rather than -inf: an all-padding sample gets a uniform average instead of NaN
            scores = scores.masked_fill(key_padding_mask, torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=-1)
        return (attn[:, :, None] * self.value(x)).sum(dim=1)


class ConditionalGate(nn.Module):
    """Gate of a Conditional-MoE layer: G(x) = softmax(top-k(W_g c(x) + noise)) (MoE eq. (3), (5)-(9)).

    Args:
        dim: width d of the tokens entering the layer (and of the condition embeddings).
        cfg: the ``decoder.moe`` config (routing, num_experts, top_k, noise_std, capacity factors).

    For the data-independent routings the gate computes one decision per distinct condition of the batch
    (U of them) and gathers it for the N tokens; in training the noise is drawn once per condition and forward
    pass, so all tokens of a condition always share experts and weights (training and inference agree on what a
    merged layer computes). For token / context routing the noise is drawn per token.

    With top_k = 1 the gate value is always 1 and the gate receives no gradient from the task loss (only from
    the balance loss): use top_k >= 2 (the paper uses 2).

    Two consequences of the routings' definitions, worth knowing with the auto-regressive (captioning) mask: the
    context routing pools over every token of the sample, later words included, so a token's experts can depend
    on tokens its attention may not see; and the capacity of token / context routing is shared by the whole
    batch, so a token can be dropped because of other tokens. Neither happens with the data-independent routings.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        if cfg.routing not in ROUTINGS or cfg.routing == "none":
            raise ValueError(f"decoder.moe.routing={cfg.routing!r}: a gate needs one of "
                             f"{DATA_DEPENDENT_ROUTINGS + DATA_INDEPENDENT_ROUTINGS}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"decoder.moe.top_k={cfg.top_k} must be in [1, num_experts={cfg.num_experts}]")
        self.routing = cfg.routing
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.noise_std = 1.0 / cfg.num_experts if cfg.noise_std is None else cfg.noise_std
        self.capacity_factor_train = cfg.capacity_factor_train
        self.capacity_factor_eval = cfg.capacity_factor_eval
        condition_dim = dim
        if cfg.routing == "context":
            self.pool = AttentionPool(dim)
            condition_dim = 2 * dim
        elif cfg.routing == "modality":
            self.embed = nn.Embedding(len(MODALITY_IDS), dim)
        elif cfg.routing == "task":
            self.embed = nn.Embedding(len(TASK_IDS), dim)
        elif cfg.routing == "attribute":
            self.attribute_proj = nn.Linear(NUM_ATTRIBUTES, dim)      # W_a of MoE eq. (9)
            self.attribute_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(condition_dim, cfg.num_experts, bias=False)   # W_g
        nn.init.normal_(self.proj.weight, std=0.02)

    @property
    def data_independent(self) -> bool:
        return self.routing in DATA_INDEPENDENT_ROUTINGS

    def forward(self, x: torch.Tensor, conditions: TokenConditions) -> GateDecision:
        """x: (B, T, d) tokens entering the layer. Returns the decision for the B * T flattened tokens."""
        if self.data_independent:
            return self._route_by_condition(x, conditions)
        return self._route_by_token(x, conditions)

    def _gate_logits(self, condition: torch.Tensor) -> torch.Tensor:
        """W_g c(x), (M, E), in float32 at least.

        Under autocast the projection returns bfloat16 (CPU) or float16 (CUDA); the noise, top-k, softmax and
        balance loss that follow are computed in float32 (the router in full precision, as Switch Transformers
        do), so the gate values G_e are float32 and ``MoELinear`` accumulates in float32. A no-op for float32
        and float64.
        """
        logits = self.proj(condition)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (M, E) -> indices (M, k) long, weights (M, k) = softmax of the top-k logits."""
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        return indices, top_logits.softmax(dim=-1)

    def _add_noise(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:
            return logits + torch.randn_like(logits) * self.noise_std
        return logits

    def _condition_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (U,) long distinct condition ids -> c (U, d)."""
        if self.routing == "attribute":
            bits = (codes[:, None] >> torch.arange(NUM_ATTRIBUTES, device=codes.device)) & 1    # (U, 8)
            return self.attribute_norm(self.attribute_proj(bits.to(self.attribute_proj.weight.dtype)))
        return self.embed(codes)

    def _route_by_condition(self, x: torch.Tensor, conditions: TokenConditions) -> GateDecision:
        B, T, _ = x.shape
        groups = conditions.groups(self.routing, B, T)
        logits = self._add_noise(self._gate_logits(self._condition_embedding(groups.codes)))   # (U, E)
        group_indices, group_weights = self._top_k(logits)                              # (U, k) each
        return GateDecision(
            indices=group_indices[groups.inverse], weights=group_weights[groups.inverse], keep=None,
            aux_loss=x.new_zeros(()), groups=groups, group_indices=group_indices, group_weights=group_weights)

    def _route_by_token(self, x: torch.Tensor, conditions: TokenConditions) -> GateDecision:
        B, T, d = x.shape
        valid = conditions.valid_tokens(B, T, x.device)
        condition = x
        if self.routing == "context":
            pooled = self.pool(x, conditions.key_padding_mask)                          # (B, d)
            condition = torch.cat([x, pooled[:, None, :].expand(B, T, d)], dim=-1)    # (B, T, 2d)
        logits = self._add_noise(self._gate_logits(condition.reshape(B * T, -1)))     # (N, E)
        indices, weights = self._top_k(logits)
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        keep = capacity_keep(indices, valid, self.num_experts, factor)
        return GateDecision(indices=indices, weights=weights, keep=keep,
                            aux_loss=load_balancing_loss(logits, indices, valid))


# --------------------------------------------------------------------------------------------------------------
# The experts
# --------------------------------------------------------------------------------------------------------------
class MoELinear(nn.Module):
    """E expert Linear layers combined by a gate decision: y = sum_e G_e(x) (W_e x + b_e) (MoE eq. (4)).

    Args:
        num_experts: E.
        in_features, out_features: sizes of each expert's Linear.
        mix_per_condition: compute data-independent decisions per condition (below) rather than by dispatch.

    Parameters:
        weight: (E, out_features, in_features); bias: (E, out_features).

    Three ways to compute the same thing:
      * dispatch (data-dependent routings: token, context): the kept (token, expert) assignments are sorted by
        expert, each expert computes only its tokens, and the weighted results are added back per token;
      * per condition (data-independent routings: modality, task, attribute; training and inference): the
        selected experts of each distinct condition are mixed into one dense weight, with gradients, and the
        condition's tokens go through it;
      * merged (after ``merge_experts``, inference only, data-independent routings): one dense weight
        sum_e G_e W_e and bias sum_e G_e b_e per distinct condition, computed on first use and cached; tokens
        of each condition go through one dense Linear.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, mix_per_condition: bool = True):
        super().__init__()
        self.mix_per_condition = mix_per_condition
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(num_experts, out_features, in_features) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        # condition code -> (weight (out, in), bias (out,)); None = not merged. Not part of the state dict.
        self._merged: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, merged={self.merged}")

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def merge(self) -> None:
        """Switch to merged (re-parameterised) inference; merged weights are built per condition on first use.
        Merge after loading the final weights: the cache is not refreshed if parameters change."""
        self._merged = {}

    def unmerge(self) -> None:
        self._merged = None

    def forward(self, x: torch.Tensor, decision: GateDecision) -> torch.Tensor:
        """x: (N, in_features) flattened tokens; decision: their gate decision. Returns (N, out_features)."""
        if self._merged is not None:
            return self._forward_merged(x, decision)
        if decision.groups is not None and self.mix_per_condition:
            return self._forward_per_condition(x, decision)
        return self._forward_dispatch(x, decision)

    def _forward_per_condition(self, x: torch.Tensor, decision: GateDecision) -> torch.Tensor:
        """A data-independent decision, in training too: every token of a condition has the same experts and gate
        values, so (MoE eq. (4)) sum_e G_e (W_e x + b_e) = (sum_e G_e W_e) x + sum_e G_e b_e is one dense Linear
        per condition, mixed here with gradients (U conditions x k experts of mixing instead of every token
        through k experts, and no gather / scatter of the tokens' expert assignments)."""
        mixed = []
        for u in range(decision.group_indices.shape[0]):
            experts, gate = decision.group_indices[u], decision.group_weights[u]               # (k,), (k,)
            weight = torch.einsum("k,koi->oi", gate.to(self.weight.dtype), self.weight[experts])  # sum_e G_e W_e
            mixed.append((weight, gate.to(self.bias.dtype) @ self.bias[experts]))            # sum_e G_e b_e
        return decision.groups.apply(x, lambda x_u, u: F.linear(x_u, *mixed[u]))

    def _forward_dispatch(self, x: torch.Tensor, decision: GateDecision) -> torch.Tensor:
        plan = decision.dispatch_plan(self.num_experts)
        routed = x.index_select(0, plan.rows)                                        # (M, in), sorted by expert
        outputs = [F.linear(chunk, self.weight[e], self.bias[e])
                   for e, chunk in enumerate(routed.split(plan.sizes))]
        weighted = torch.cat(outputs) * plan.weights                                 # (M, out)
        # Accumulate in the dtype of the weighted expert outputs, not of x: under CPU autocast F.linear returns
        # bfloat16 while x (the float32 residual stream) and the gate values are float32 (``_gate_logits``), so
        # ``weighted`` is their promotion. Without autocast every operand has x's dtype and nothing changes.
        return weighted.new_zeros(x.shape[0], self.out_features).index_add_(0, plan.rows, weighted)

    def merged_parameters(self, decision: GateDecision) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dense (weight (out, in), bias (out,)) of each condition in ``decision.groups.codes``: taken from the
        cache, or mixed now as (sum_e G_e W_e, sum_e G_e b_e) over the condition's top-k experts."""
        if self._merged is None:
            raise RuntimeError("MoELinear: not merged; call merge_experts(model) first")
        if self.training:
            raise RuntimeError("MoELinear: merged experts are for inference only; call unmerge_experts(model) "
                               "before training")
        if decision.groups is None:
            raise RuntimeError("MoELinear is merged but the gate decision is data-dependent (token / context "
                               "routing); such experts cannot be merged")
        codes = decision.groups.codes.tolist()
        # The cached mixtures are parameters, kept in the parameters' dtype whatever autocast context the first
        # call runs in (under autocast the einsum would return bfloat16 / float16, and a cached half-precision
        # weight would then break a later call without autocast); F.linear casts them per call as usual.
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            for u, code in enumerate(codes):
                if code not in self._merged:
                    experts, gate = decision.group_indices[u], decision.group_weights[u]       # (k,), (k,)
                    weight = torch.einsum("k,koi->oi", gate, self.weight[experts])             # sum_e G_e W_e
                    bias = gate @ self.bias[experts]                                           # sum_e G_e b_e
                    self._merged[code] = (weight.contiguous(), bias)
        return [self._merged[code] for code in codes]

    def _forward_merged(self, x: torch.Tensor, decision: GateDecision) -> torch.Tensor:
        parameters = self.merged_parameters(decision)
        return decision.groups.apply(x, lambda x_u, u: F.linear(x_u, *parameters[u]))


def merge_experts(model: nn.Module) -> int:
    """Re-parameterise every Conditional-MoE layer of ``model`` for inference (MoE paper Sec. 3.3).

    Each ``MoELinear`` then mixes, once per distinct condition, its selected experts into one dense Linear;
    outputs equal the unmerged model's (up to float rounding) and cost a dense model's. Put the model in eval
    mode; call ``unmerge_experts`` before training again.

    Returns:
        the number of ``MoELinear`` layers merged.

    Raises:
        ValueError: the model has no Conditional-MoE layer, or its routing depends on the data (token, context).
    """
    gates = [m for m in model.modules() if isinstance(m, ConditionalGate)]
    layers = [m for m in model.modules() if isinstance(m, MoELinear)]
    if not gates or not layers:
        raise ValueError("merge_experts: the model has no Conditional-MoE layer (decoder.moe.routing='none'?)")
    dependent = sorted({g.routing for g in gates if not g.data_independent})
    if dependent:
        raise ValueError(f"merge_experts: decoder.moe.routing={dependent[0]!r} depends on each token's value, so "
                         f"its experts cannot be merged; re-parameterisation needs one of "
                         f"{DATA_INDEPENDENT_ROUTINGS}")
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_experts(model: nn.Module) -> None:
    """Undo ``merge_experts``: back to dispatching tokens to the experts (and dropping the merged weights)."""
    for layer in model.modules():
        if isinstance(layer, MoELinear):
            layer.unmerge()
