"""Where the Conditional-MoE gates send the tokens (MoE paper Sec. 3; docs/design.md, "Conditional MoE").

The unified decoder routes every token by a condition c(x) (``modeling/moe.py``). This module looks at those
decisions on real sequences, for notebooks 03 and 04:

* ``task_batches`` / ``run_tasks``: one real batch of every task, and every task's loss on it with the decoder's
  calls recorded (below).
* ``record_decoder_calls(decoder)``: every call of the decoder g while the tasks compute their losses, with the
  sequences' conditions (attributes, modality ids, task id, padding, attention mask) and every gate decision.
  Nothing in the tasks changes: the recorder switches ``record_gates`` on through forward hooks and hands the
  caller the output it asked for.
* ``token_groups`` / ``token_kinds`` / ``kind_segments``: what the sequences are made of, token by token, read
  from the attribute bits (MoE paper Tab. 2).
* ``expert_usage``: per layer, the mean gate value G_e(x) of every expert over the tokens of each attribute
  combination or of each task, as in the MoE paper's Fig. 3.
* ``replay`` / ``with_routing`` / ``distinct_decisions``: the same recorded inputs through a decoder that differs
  only in its routing, to compare the five routings; ``expert_assignments`` / ``capacity_drops``: load balance
  and capacity of the data-dependent (token, context) routings.
* ``merged_difference`` / ``reparameterisation_timings``: re-parameterisation (MoE paper Sec. 3.3) is exact and
  costs a dense layer; the timings come from ``bench/moe.py``.

Shapes: B sequences of T tokens, k experts per token (top-k), E experts, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from uniperceiver_v2.bench.moe import Case, run_case
from uniperceiver_v2.config import DecoderConfig
from uniperceiver_v2.engine.runtime import evaluation_mode
from uniperceiver_v2.modeling.attributes import ATTRIBUTE_NAMES, NUM_ATTRIBUTES, TASK_IDS, attribute_codes
from uniperceiver_v2.modeling.moe import GateRecord, capacity_keep, is_gate_parameter
from uniperceiver_v2.modeling.unified_decoder import DecoderOutput, UnifiedDecoder

__all__ = [
    "TASK_NAMES",
    "TOKEN_KINDS",
    "DecoderCall",
    "DecoderRecorder",
    "ExpertUsage",
    "TokenGroup",
    "attribute_bits",
    "attribute_label",
    "bench_case",
    "capacity_drops",
    "distinct_decisions",
    "expert_assignments",
    "expert_usage",
    "kind_segments",
    "merged_difference",
    "record_decoder_calls",
    "replay",
    "routing_comparison",
    "reparameterisation_timings",
    "run_tasks",
    "sequence_layouts",
    "task_batches",
    "token_groups",
    "token_kinds",
    "with_routing",
]

# task id -> name (``attributes.TASK_IDS`` inverted)
TASK_NAMES = {task_id: name for name, task_id in TASK_IDS.items()}
_TASK_SHORT = {"classification": "cls", "detection": "det", "captioning": "cap", "mlm": "mlm",
               "retrieval_i2t": "i2t", "retrieval_t2i": "t2i"}

# What a token is, as far as the gates can tell (attribute bits 4-6), for layouts and figures. With the image
# encoder's token types an image token is further split into global (v2 eq. (3)) and regional (v2 eq. (2)).
TOKEN_KINDS = {0: "<SPE>", 1: "image", 2: "image global", 3: "image regional", 4: "text", 5: "<SPE> (causal)",
               6: "text (causal)"}
_KIND_IDS = {name: kind for kind, name in TOKEN_KINDS.items()}
_IMAGE_ENCODER_REGIONAL = 2          # ``ImageEncoderOutput.token_types``: 0, 1 global; 2 regional
_BIT = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}


# --------------------------------------------------------------------------------------------------------------
# Recording the decoder's calls
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DecoderCall:
    """One call of the unified decoder, as recorded by ``record_decoder_calls``; tensors detached, on the CPU.

    Attributes:
        label: the recorder's label while the call ran (e.g. the task whose loss was being computed), or None.
        key_padding_mask: (B, T) bool, True = padding (all False when the call had none).
        attn_mask: (T, T) or (B, T, T) bool, True = may attend, or None (bidirectional).
        attributes: (B, T, 8) float 0/1, or None.
        modality_ids: (B, T) long, or None.
        task_id: (B,) long, or None.
        gates: one dict per layer {"attn" / "ffn": GateRecord} of the MoE sub-layers (empty dicts when dense).
        x: (B, T, d) the embedded input, kept only with ``keep_inputs=True`` (for ``replay``).
    """

    label: str | None
    key_padding_mask: torch.Tensor
    attn_mask: torch.Tensor | None
    attributes: torch.Tensor | None
    modality_ids: torch.Tensor | None
    task_id: torch.Tensor | None
    gates: list[dict[str, GateRecord]]
    x: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.key_padding_mask.shape[0]

    @property
    def length(self) -> int:
        return self.key_padding_mask.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) bool, True for real (non-padding) tokens."""
        return ~self.key_padding_mask

    @property
    def task(self) -> str | None:
        """The task name of the call's first sequence (``TASK_IDS``), or None when no task id was given."""
        return None if self.task_id is None else TASK_NAMES[int(self.task_id[0])]

    @property
    def is_input(self) -> bool:
        """True for input sequences x, False for candidate target sequences y (attribute bit 7 of the first
        token)."""
        return bool(self._require_attributes()[0, 0, _BIT["token_from_inputs"]])

    def _require_attributes(self) -> torch.Tensor:
        if self.attributes is None:
            raise ValueError("this decoder call has no token attributes (the caller passed attributes=None)")
        return self.attributes


@dataclass
class DecoderRecorder:
    """The calls recorded so far; ``labelled`` names the calls made inside a block (e.g. after the task)."""

    calls: list[DecoderCall] = field(default_factory=list)
    label: str | None = None

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def of(self, label: str) -> list[DecoderCall]:
        """The calls recorded under ``label``."""
        return [call for call in self.calls if call.label == label]


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


@contextlib.contextmanager
def record_decoder_calls(decoder: UnifiedDecoder, keep_inputs: bool = False) -> Iterator[DecoderRecorder]:
    """Record every call of ``decoder`` inside the ``with`` block, gate decisions included.

    A forward pre-hook sets ``record_gates=True`` on every call and a forward hook stores the call and returns
    the output the caller asked for (``gates=None`` unless it asked for them), so the code under observation (the
    tasks) runs unchanged. The hooks are removed when the block ends.

    Args:
        decoder: the unified decoder (``model.decoder``).
        keep_inputs: also keep each call's embedded input x (B, T, d), needed by ``replay`` and
            ``merged_difference``.

    Yields:
        a ``DecoderRecorder`` whose ``calls`` fill up as the decoder runs.
    """
    if not isinstance(decoder, UnifiedDecoder):
        raise TypeError(f"record_decoder_calls: expected a UnifiedDecoder, got {type(decoder).__name__}")
    recorder = DecoderRecorder()
    signature = inspect.signature(decoder.forward)
    asked: list[bool] = []       # the caller's record_gates, innermost call last

    def before(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        asked.append(bool(bound.arguments["record_gates"]))
        bound.arguments["record_gates"] = True
        return (), dict(bound.arguments)

    def after(module, args, kwargs, output: DecoderOutput):
        B, T, _ = kwargs["x"].shape
        padding = kwargs["key_padding_mask"]
        recorder.calls.append(DecoderCall(
            label=recorder.label,
            key_padding_mask=(torch.zeros(B, T, dtype=torch.bool) if padding is None else _detached(padding)),
            attn_mask=_detached(kwargs["attn_mask"]),
            attributes=_detached(kwargs["attributes"]),
            modality_ids=_detached(kwargs["modality_ids"]),
            task_id=_detached(kwargs["task_id"]),
            gates=[{name: GateRecord(*(_detached(t) for t in (g.indices, g.weights, g.keep)))
                    for name, g in layer.items()} for layer in output.gates],
            x=_detached(kwargs["x"]) if keep_inputs else None,
        ))
        return output if asked.pop() else dataclasses.replace(output, gates=None)

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def task_batches(tasks: Mapping[str, Any], datasets: Mapping[str, Any], batch_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """One batch of every task: samples drawn at random (without replacement) from its dataset, collated by the task.

    Args:
        tasks: name -> ``tasks.Task`` (e.g. from ``engine.build.build_training``); datasets: name -> its dataset.
        batch_size: samples per batch (at most the dataset's size); default each task's ``config.batch_size``.
        seed: the draw, and the random augmentation of the samples (torch's generator, restored afterwards).
    """
    batches = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, task in tasks.items():
            if name not in datasets:
                raise KeyError(f"task_batches: no dataset for task {name!r}")
            dataset = datasets[name]
            size = min(batch_size or task.config.batch_size, len(dataset))
            indices = torch.randperm(len(dataset))[:size].tolist()
            batches[name] = task.collate([dataset[i] for i in indices])
    return batches


def run_tasks(model: nn.Module, tasks: Mapping[str, Any], batches: Mapping[str, Any], seed: int = 0,
              keep_inputs: bool = False) -> tuple[dict[str, dict[str, float]], DecoderRecorder]:
    """Every task's loss on its batch, with every call of the unified decoder recorded under the task's name.

    Runs in evaluation mode without gradients (no gate noise, no dropout: the decisions a trained model makes at
    inference) and puts the model back in its previous mode. ``seed`` fixes the remaining random choices (which
    words masked language modelling hides).

    Returns:
        (task -> {loss term: value}, the ``DecoderRecorder``).
    """
    losses = {}
    with evaluation_mode(model), torch.random.fork_rng(devices=[]), \
            record_decoder_calls(model.decoder, keep_inputs) as recorder:
        torch.manual_seed(seed)
        for name, task in tasks.items():
            with recorder.labelled(name):
                losses[name] = {key: float(value) for key, value in task.loss(model, batches[name]).items()}
    return losses, recorder


# --------------------------------------------------------------------------------------------------------------
# What the sequences are made of
# --------------------------------------------------------------------------------------------------------------
def attribute_bits(code: int) -> torch.Tensor:
    """The 8-bit attribute vector (8,) float of an attribute code (``attributes.attribute_codes`` inverted)."""
    if not 0 <= code < 2 ** NUM_ATTRIBUTES:
        raise ValueError(f"attribute code {code}: expected an integer in [0, {2 ** NUM_ATTRIBUTES})")
    return ((code >> torch.arange(NUM_ATTRIBUTES)) & 1).to(torch.float32)


def _modalities(image: bool, text: bool) -> str:
    return "+".join(name for name, present in (("I", image), ("T", text)) if present) or "-"


def _token_kind_name(bits: torch.Tensor) -> str:
    """"<SPE>", "image" or "text" from bits 4-5, with " (causal)" from bit 6."""
    kind = "image" if bits[4] else "text" if bits[5] else "<SPE>"
    return f"{kind} (causal)" if bits[6] else kind


def attribute_label(code: int) -> str:
    """A readable name of an attribute combination: the task's input → target modalities (bits 0-3), the token's
    side (bit 7), its kind and causality (bits 4-6); e.g. "I→T · input · image", "I+T→T · input · text (causal)"."""
    bits = attribute_bits(code).bool()
    task = f"{_modalities(bits[0], bits[1])}→{_modalities(bits[2], bits[3])}"
    side = "input" if bits[7] else "target"
    return f"{task} · {side} · {_token_kind_name(bits)}"


@dataclass(frozen=True)
class TokenGroup:
    """The tokens of one task, one side (input / target) and one kind: the rows of the MoE paper's Fig. 3.

    Attributes:
        task: a ``TASK_IDS`` name; is_input: input x or candidate target y; kind: "<SPE>", "image", "text",
        "<SPE> (causal)" or "text (causal)"; code: their attribute code (all tokens of a group share it);
        tokens: how many non-padding tokens the calls held.
    """

    task: str
    is_input: bool
    kind: str
    code: int
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.task} · {'input' if self.is_input else 'target'} · {self.kind}"

    @property
    def bits(self) -> torch.Tensor:
        """(8,) the attribute vector of the group's tokens."""
        return attribute_bits(self.code)


def _task_ids_per_token(call: DecoderCall) -> torch.Tensor:
    if call.task_id is None:
        raise ValueError("this decoder call has no task id (the caller passed task_id=None)")
    return call.task_id[:, None].expand(call.batch, call.length)


def _first_appearance(keys: torch.Tensor) -> list[tuple[int, int]]:
    """The distinct values of ``keys`` (n,) long with their counts, in order of first appearance."""
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(keys.numel()), reduce="amin")
    order = first.argsort()
    return list(zip(unique[order].tolist(), counts[order].tolist()))


def token_groups(calls: Sequence[DecoderCall]) -> list[TokenGroup]:
    """Every (task, side, kind) present in the calls' non-padding tokens, in order of first appearance."""
    counts: dict[int, int] = {}
    for call in calls:
        codes = attribute_codes(call._require_attributes())[call.valid]
        tasks = _task_ids_per_token(call)[call.valid]
        for key, number in _first_appearance(tasks * 2 ** NUM_ATTRIBUTES + codes):
            counts[key] = counts.get(key, 0) + number
    groups = []
    for key, tokens in counts.items():
        task_id, code = divmod(key, 2 ** NUM_ATTRIBUTES)
        bits = attribute_bits(code)
        groups.append(TokenGroup(task=TASK_NAMES[task_id], is_input=bool(bits[_BIT["token_from_inputs"]]),
                                 kind=_token_kind_name(bits), code=code, tokens=tokens))
    return groups


def token_kinds(call: DecoderCall, row: int = 0, image_token_types: torch.Tensor | None = None) -> torch.Tensor:
    """The kind (``TOKEN_KINDS``) of every token of one recorded sequence, read from its attribute bits.

    Args:
        call: a recorded call; row: which of its B sequences.
        image_token_types: optional (N,) long, the image encoder's ``token_types`` (0, 1 global; 2 regional) of
            the sequence's N image tokens, to split "image" into "image global" and "image regional".

    Returns:
        (T,) long ids of ``TOKEN_KINDS`` (padding tokens get the kind of their segment; see ``call.valid``).
    """
    bits = call._require_attributes()[row].bool()                                     # (T, 8)
    visual, text, causal = bits[:, _BIT["token_is_visual"]], bits[:, _BIT["token_is_text"]], bits[:, 6]
    kinds = torch.full((call.length,), _KIND_IDS["<SPE>"], dtype=torch.long)
    kinds[causal] = _KIND_IDS["<SPE> (causal)"]
    kinds[text] = _KIND_IDS["text"]
    kinds[text & causal] = _KIND_IDS["text (causal)"]
    kinds[visual] = _KIND_IDS["image"]
    if image_token_types is not None:
        image_token_types = torch.as_tensor(image_token_types).reshape(-1).cpu()
        if image_token_types.numel() != int(visual.sum()):
            raise ValueError(f"image_token_types: {image_token_types.numel()} types for the {int(visual.sum())} "
                             f"image tokens of sequence {row}")
        kinds[visual] = torch.where(image_token_types == _IMAGE_ENCODER_REGIONAL,
                                    _KIND_IDS["image regional"], _KIND_IDS["image global"])
    return kinds


def kind_segments(kinds: torch.Tensor, padding: torch.Tensor | None = None) -> list[tuple[str, int, int]]:
    """Runs of equal kind as ``(name, start, end)`` (end exclusive), e.g. for ``viz.plot_attention_mask``'s
    ``segment_labels``; trailing padding of a sequence is its own run named "padding".

    Args:
        kinds: (T,) long ``TOKEN_KINDS`` ids; padding: optional (T,) bool, True = padding.
    """
    kinds = kinds.tolist()
    pad = [False] * len(kinds) if padding is None else padding.tolist()
    labels = ["padding" if p else TOKEN_KINDS[k] for k, p in zip(kinds, pad)]
    segments, start = [], 0
    for end in range(1, len(labels) + 1):
        if end == len(labels) or labels[end] != labels[start]:
            count = end - start
            segments.append((labels[start] if count == 1 else f"{labels[start]} ×{count}", start, end))
            start = end
    return segments


def sequence_layouts(calls: Sequence[DecoderCall], image_token_types: torch.Tensor | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The first sequence of every call as (kinds, padding), for ``viz_regions.plot_token_layout`` with
    ``type_names=TOKEN_KINDS``.

    Args:
        calls: recorded calls; each becomes one row named "<task> · input|target (B × T)".
        image_token_types: optional (N,) the image encoder's token types, applied to the sequences that hold
            exactly N image tokens (see ``token_kinds``).

    Returns:
        row name -> ((T,) long kinds, (T,) bool padding), in call order.
    """
    layouts = {}
    for call in calls:
        images = int(call._require_attributes()[0, :, _BIT["token_is_visual"]].sum())
        types = (image_token_types if image_token_types is not None and torch.as_tensor(image_token_types).numel()
                 == images else None)
        side = "input" if call.is_input else "target"
        name = f"{call.task or call.label} · {side} ({call.batch} × {call.length})"
        layouts[name] = (token_kinds(call, 0, types), call.key_padding_mask[0])
    return layouts


# --------------------------------------------------------------------------------------------------------------
# Expert usage (MoE paper Fig. 3)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ExpertUsage:
    """Mean gate values per layer and row.

    Attributes:
        keys: R row keys (attribute codes, or task names).
        labels: R readable row labels.
        usage: (L, R, E) mean over the row's non-padding tokens of the dense gate vector G(x) (zero outside the
            kept top-k): how much each expert contributes to the row's tokens. A row sums to the fraction of gate
            mass that passed the capacity cut (1 for the data-independent routings).
        tokens: (R,) number of non-padding tokens of each row.
    """

    keys: list
    labels: list[str]
    usage: torch.Tensor
    tokens: torch.Tensor


def _dense_gates(record: GateRecord, num_experts: int) -> torch.Tensor:
    """(B, T, E) gate values G_e of a record; dropped assignments count 0."""
    weights = record.weights * record.keep
    dense = torch.zeros(*record.indices.shape[:2], num_experts, dtype=weights.dtype)
    return dense.scatter_add(2, record.indices, weights)


def _num_experts(calls: Sequence[DecoderCall], sublayer: str) -> tuple[int, int]:
    """(layers, experts) of the recorded gates; E is read from the largest expert index seen, so pass the
    config's value when some experts may never have been chosen."""
    if not calls:
        raise ValueError("no decoder calls recorded")
    layers = len(calls[0].gates)
    if layers == 0 or any(sublayer not in g for g in calls[0].gates):
        raise ValueError(f"the recorded decoder has no Conditional-MoE {sublayer!r} sub-layers "
                         f"(decoder.moe.routing / decoder.moe.placement)")
    highest = max(int(layer[sublayer].indices.max()) for call in calls for layer in call.gates)
    return layers, highest + 1


def expert_usage(calls: Sequence[DecoderCall], by: str = "attribute", sublayer: str = "ffn",
                 num_experts: int | None = None) -> ExpertUsage:
    """Expert usage per layer for every attribute combination (``by="attribute"``) or task (``by="task"``).

    Args:
        calls: recorded calls (``record_decoder_calls``) of a decoder with MoE ``sublayer`` layers.
        by: "attribute": one row per attribute code, labelled ``attribute_label`` + the tasks whose tokens have it;
            "task": one row per ``TASK_IDS`` name, over all its tokens (inputs and candidate targets).
        sublayer: "ffn" or "attn" (``decoder.moe.placement``).
        num_experts: E (default: 1 + the highest expert index recorded).

    Returns:
        ``ExpertUsage`` with rows in order of first appearance; by attribute, grouped by task shape (bits 0-3, in
        order of first appearance) with the inputs' rows (bit 7) first.
    """
    if by not in ("attribute", "task"):
        raise ValueError(f"by={by!r}: expected 'attribute' or 'task'")
    layers, seen = _num_experts(calls, sublayer)
    experts = seen if num_experts is None else num_experts
    if experts < seen:
        raise ValueError(f"num_experts={num_experts}, but expert index {seen - 1} was recorded")
    keys_of_calls = []
    for call in calls:
        per_token = (attribute_codes(call._require_attributes()) if by == "attribute"
                     else _task_ids_per_token(call))
        keys_of_calls.append(per_token[call.valid])
    order: dict[int, int] = {}
    for keys in keys_of_calls:
        for key, _ in _first_appearance(keys):
            order.setdefault(key, len(order))
    if by == "attribute":
        # each task shape (bits 0-3) in order of first appearance, its input tokens (bit 7) before its targets,
        # whichever side a task's calls happened to record first
        shape_rank: dict[int, int] = {}
        for key in order:
            shape_rank.setdefault(key & 0b1111, len(shape_rank))
        ranked = sorted(order, key=lambda key: (shape_rank[key & 0b1111], not key >> 7 & 1, order[key]))
        order = {key: row for row, key in enumerate(ranked)}
    row_of = torch.full((2 ** NUM_ATTRIBUTES,), -1, dtype=torch.long)      # key -> row (keys are < 256)
    row_of[list(order)] = torch.arange(len(order))
    sums = torch.zeros(layers, len(order), experts, dtype=torch.float64)
    tokens = torch.zeros(len(order), dtype=torch.long)
    for call, keys in zip(calls, keys_of_calls):
        rows = row_of[keys]
        tokens.index_add_(0, rows, torch.ones_like(rows))
        for layer, gates in enumerate(call.gates):
            dense = _dense_gates(gates[sublayer], experts)[call.valid].to(torch.float64)     # (n, E)
            sums[layer].index_add_(0, rows, dense)
    usage = (sums / tokens.clamp(min=1)[None, :, None]).to(torch.float32)
    keys = list(order)
    if by == "task":
        return ExpertUsage([TASK_NAMES[k] for k in keys], [TASK_NAMES[k] for k in keys], usage, tokens)
    tasks_of: dict[int, list[str]] = {k: [] for k in keys}
    for group in token_groups(calls):
        tasks_of[group.code].append(_TASK_SHORT[group.task])
    labels = [f"{attribute_label(k)} ({', '.join(tasks_of[k])})" for k in keys]
    return ExpertUsage(keys, labels, usage, tokens)


# --------------------------------------------------------------------------------------------------------------
# The five routings on the same inputs
# --------------------------------------------------------------------------------------------------------------
def with_routing(decoder: UnifiedDecoder, routing: str, seed: int = 0) -> UnifiedDecoder:
    """A copy of ``decoder`` whose Conditional-MoE layers use another routing, in evaluation mode.

    Everything but the gates (embeddings, attention, norms and the expert weights, whose shapes do not depend
    on the routing) is copied from ``decoder``; the new gates are initialised from ``seed``. The two decoders
    then differ only in how they pick experts.
    """
    cfg = dataclasses.replace(decoder.cfg, moe=dataclasses.replace(decoder.cfg.moe, routing=routing))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy = UnifiedDecoder(cfg, decoder.image_proj.in_features, decoder.text_proj.in_features)
    shared = {name: value for name, value in decoder.state_dict().items() if not is_gate_parameter(name)}
    missing, unexpected = copy.load_state_dict(shared, strict=False)
    leftover = [name for name in missing if not is_gate_parameter(name)]
    if leftover or unexpected:
        raise RuntimeError(f"with_routing({routing!r}): parameters that do not carry over: {leftover + unexpected}")
    return copy.eval()


def replay(call: DecoderCall, decoder: UnifiedDecoder, record_gates: bool = True) -> DecoderOutput:
    """Run a recorded call's inputs through ``decoder`` (recorded with ``keep_inputs=True``)."""
    if call.x is None:
        raise ValueError("replay: the call was recorded without its inputs; use record_decoder_calls(..., "
                         "keep_inputs=True)")
    return decoder(call.x, attn_mask=call.attn_mask, key_padding_mask=call.key_padding_mask,
                   attributes=call.attributes, modality_ids=call.modality_ids, task_id=call.task_id,
                   record_gates=record_gates)


def distinct_decisions(gates: Sequence[dict[str, GateRecord]], valid: torch.Tensor,
                       sublayer: str = "ffn") -> list[int]:
    """How many different gate decisions (experts and their weights) the valid tokens received, per layer.

    A data-independent routing gives one decision per distinct condition; token routing about one per token.

    Args:
        gates: one dict per layer (``DecoderOutput.gates`` or ``DecoderCall.gates``); valid: (B, T) bool.
    """
    return [int(torch.unique(_decisions(layer[sublayer], valid), dim=0).shape[0]) for layer in gates]


def _decisions(record: GateRecord, valid: torch.Tensor) -> torch.Tensor:
    """(n, 2k) the experts and weights of the n valid tokens of a record, one row per token."""
    return torch.cat([record.indices.to(record.weights.dtype), record.weights], dim=-1)[valid]


def routing_comparison(decoder: UnifiedDecoder, calls: Sequence[DecoderCall], routings: Sequence[str],
                       sublayer: str = "ffn", seed: int = 0) -> list[dict[str, Any]]:
    """The recorded inputs through copies of ``decoder`` that differ only in their routing (``with_routing``).

    Args:
        decoder: the decoder the calls were recorded on; calls: recorded with ``keep_inputs=True``.
        routings: e.g. ("token", "context", "modality", "task", "attribute").
        sublayer: "ffn" or "attn"; seed: initialisation of the new gates.

    Returns:
        one dict per routing: ``routing``; ``tokens``, the valid tokens of all calls; ``decisions``, per layer the
        number of distinct gate decisions (experts and weights) over all of them; ``balance_loss``, the mean over
        calls and MoE sub-layers of the unweighted load-balancing loss L_bal (0 for the data-independent routings,
        and when ``decoder.moe.balance_loss_weight`` is 0, which leaves it unrecoverable from the output).
    """
    rows = []
    for routing in routings:
        variant = with_routing(decoder, routing, seed)
        weight = variant.cfg.moe.balance_loss_weight
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(variant.cfg.depth)]
        balance, tokens = 0.0, 0
        with torch.no_grad():
            for call in calls:
                out = replay(call, variant)
                tokens += int(call.valid.sum())
                moe_layers = sum(len(gates) for gates in out.gates)
                balance += float(out.aux_loss) / (weight * moe_layers) if weight > 0 else 0.0
                for layer, gates in enumerate(out.gates):
                    per_layer[layer].append(_decisions(gates[sublayer], call.valid))
        rows.append({"routing": routing, "tokens": tokens,
                     "decisions": [int(torch.unique(torch.cat(d), dim=0).shape[0]) for d in per_layer],
                     "balance_loss": balance / len(calls)})
    return rows


def expert_assignments(gates: Sequence[dict[str, GateRecord]], valid: torch.Tensor, num_experts: int,
                       sublayer: str = "ffn") -> torch.Tensor:
    """(L, E) long: top-k assignments of the valid tokens to each expert, per layer, before the capacity cut (the
    f_e of the load-balancing loss, times k * N)."""
    return torch.stack([torch.bincount(layer[sublayer].indices[valid].reshape(-1), minlength=num_experts)
                        for layer in gates])


def capacity_drops(gates: Sequence[dict[str, GateRecord]], valid: torch.Tensor, num_experts: int,
                   factors: Sequence[float], sublayer: str = "ffn") -> torch.Tensor:
    """(L, F) fraction of the valid tokens' top-k assignments that an expert capacity
    C = ceil(factor * k * N / E) would drop, per layer and capacity factor (``moe.capacity_keep``)."""
    valid = valid.reshape(-1)
    rows = []
    for layer in gates:
        indices = layer[sublayer].indices.reshape(valid.shape[0], -1)                     # (N, k)
        total = indices.shape[1] * int(valid.sum())
        rows.append([1.0 - int(capacity_keep(indices, valid, num_experts, f).sum()) / max(total, 1)
                     for f in factors])
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Re-parameterisation
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def merged_difference(decoder: UnifiedDecoder, calls: Sequence[DecoderCall]) -> dict[str, float]:
    """Max |merged - unmerged| decoder output over the valid tokens of the recorded calls, per task.

    The decoder is put in evaluation mode and left unmerged (as it was) afterwards.

    Returns:
        task name (or the call's label when it has no task id) -> max absolute difference.
    """
    with evaluation_mode(decoder):
        unmerged = [replay(call, decoder, record_gates=False).hidden for call in calls]
        decoder.merge_experts()
        try:
            merged = [replay(call, decoder, record_gates=False).hidden for call in calls]
        finally:
            decoder.unmerge_experts()
    differences: dict[str, float] = {}
    for call, a, b in zip(calls, unmerged, merged):
        name = call.task or str(call.label)
        value = float((a - b)[call.valid].abs().max()) if bool(call.valid.any()) else 0.0
        differences[name] = max(differences.get(name, 0.0), value)
    return differences


def bench_case(cfg: DecoderConfig, name: str, batch: int, num_image: int, num_words: int) -> Case:
    """A ``bench.moe.Case`` with the decoder sizes of ``cfg``: captioning sequences
    [<SPE>, num_image image tokens, num_words words, num_words <SPE>] in batches of ``batch``."""
    return Case(name, width=cfg.width, depth=cfg.depth, heads=cfg.heads, ffn_dim=cfg.ffn_dim, batch=batch,
                num_image=num_image, num_words=num_words)


def reparameterisation_timings(case: Case, repeats: int, threads: int = 1, num_experts: int = 8,
                               top_k: int = 2, report: bool = False) -> dict[str, Any]:
    """Median forward times of dense / merged / unmerged attribute-MoE / token-MoE decoders
    (``bench.moe.run_case``, which also prints its table and the merged-vs-unmerged difference).

    Args:
        case: sizes (``bench_case`` or ``bench.moe.CASES``); repeats: timed passes per variant.
        threads: torch intra-op threads during the measurement (restored afterwards).
        report: True returns the benchmark's report as markdown under "report" instead of printing it (for
            ``IPython.display.Markdown``).

    Returns:
        {"median_ms": variant -> milliseconds, "ratio_to_dense": variant -> time / dense time}, and with ``report``
        also {"report": markdown text}.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    printed = io.StringIO()
    try:
        with torch.random.fork_rng(devices=[]):       # run_case seeds the global generator
            with contextlib.redirect_stdout(printed) if report else contextlib.nullcontext():
                medians = run_case(case, num_experts, top_k, repeats)
    finally:
        torch.set_num_threads(previous)
    result: dict[str, Any] = {"median_ms": {name: 1e3 * t for name, t in medians.items()},
                              "ratio_to_dense": {name: t / medians["dense"] for name, t in medians.items()}}
    if report:
        result["report"] = _as_markdown(printed.getvalue())
    return result


def _as_markdown(text: str) -> str:
    """Printed lines as markdown: each line its own paragraph, except that the lines of a table stay together; a
    heading line ("### ...") becomes bold text, so that it adds no heading to the notebook's outline."""
    blocks: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith("|") and blocks and blocks[-1].startswith("|"):
            blocks[-1] += "\n" + line
        elif line.startswith("#"):
            blocks.append(f"**{line.lstrip('#').strip()}**")
        elif line.strip():
            blocks.append(line)
    return "\n\n".join(blocks)
