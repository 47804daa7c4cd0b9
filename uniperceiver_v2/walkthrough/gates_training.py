"""Notebook 04: trained Conditional-MoE gates on the page, whatever has run before.

At initialisation the attribute gates (MoE eq. (9)) send most kinds of token to the same experts, so a figure of
the untrained gates shows nothing specialised. Two ways to put trained gates on the page:

* :func:`model_of_run`: the model of notebook 06's run, when its checkpoint exists (the gates trained by the
  generalist's own tasks, as in the paper; after a short run they have barely moved);
* :func:`train_gates`: a short training of the unified decoder alone on the sequences the tasks fed it (recorded
  by ``gating.run_tasks(..., keep_inputs=True)``), seconds on a CPU, with a stand-in objective that one shared FFN
  cannot fit: every attribute combination must map its tokens by its own random rotation.
  The decoder sees the attribute bits nowhere but in its gates (the task's shape, bits 0-3, is in no token's
  value), so the loss can fall as the gates separate the combinations that need different maps (whether they do,
  layer by layer, is :func:`gate_difference`'s to say).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.attributes import attribute_codes
from ..modeling.moe import is_gate_parameter
from ..modeling.unified_decoder import UnifiedDecoder
from .gating import DecoderCall, ExpertUsage, attribute_bits, replay
from .runs import training_dir, training_status

__all__ = ["NEGLIGIBLE_WEIGHT", "CollapsedLayer", "GateTraining", "RunModel", "collapsed_layers", "describe_collapsed",
           "describe_fig3", "describe_one_hot", "gate_difference", "model_of_run", "near_one_hot", "replayed_calls",
           "shared_expert_layers", "train_gates"]


@dataclass
class GateTraining:
    """The result of :func:`train_gates`.

    Attributes:
        decoder: the trained copy of the decoder, in evaluation mode (the original is not touched).
        history: one record per iteration, ``{"iteration", "loss"}``: the mean squared error of the stand-in
            objective (``viz.plot_curves`` draws it).
        codes: the attribute codes of the recorded tokens, each with its own target map, in order of first
            appearance.
        iterations, seconds: length and wall-clock time of the training.
    """

    decoder: UnifiedDecoder
    history: list[dict[str, Any]]
    codes: list[int]
    iterations: int
    seconds: float


def train_gates(decoder: UnifiedDecoder, calls: Sequence[DecoderCall], iterations: int = 300, lr: float = 1e-3,
                seed: int = 0) -> GateTraining:
    """Train a copy of ``decoder`` on recorded calls so that each kind of token needs its own function.

    Every attribute combination u gets a fixed random rotation R_u (d x d); the decoder's output for a token x of
    combination u must match LN(x R_u), x its embedded input. One dense FFN cannot compute as many different
    rotations at once: the conflicting targets are a small model of task interference, and experts that
    specialise by combination remove it. The gates see the combination (MoE eq. (9)), the token's value does not
    say it, so the loss can fall as the gates send different combinations to different experts (it can also fall
    by the shared weights fitting an average map: :func:`gate_difference` measures which happened).

    Each step replays one recorded call (drawn at random) through the decoder in training mode (gate noise on).
    The gates' parameters get no weight decay, as in the trainer's parameter groups.

    Args:
        decoder: a unified decoder with Conditional-MoE layers.
        calls: recorded with ``keep_inputs=True`` and with attributes (``gating.run_tasks``).
        iterations: optimizer steps, one call each.
        seed: the rotations, the draws and the gate noise.

    Returns:
        :class:`GateTraining`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not calls or any(call.x is None or call.attributes is None for call in calls):
        raise ValueError("train_gates: needs recorded calls with inputs and attributes "
                         "(gating.run_tasks(..., keep_inputs=True))")
    per_call = [attribute_codes(call.attributes) for call in calls]                     # (B, T) each
    codes: list[int] = []
    for call, code in zip(calls, per_call):
        codes += [value for value in dict.fromkeys(code[call.valid].tolist()) if value not in codes]
    row_of = torch.zeros(max(codes) + 1, dtype=torch.long)
    row_of[codes] = torch.arange(len(codes))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained = copy.deepcopy(decoder).train()
        width = trained.cfg.width
        rotations = torch.linalg.qr(torch.randn(len(codes), width, width))[0]          # (U, d, d) orthogonal
        targets = []
        for call, code in zip(calls, per_call):
            rotated = torch.einsum("btd,btde->bte", call.x, rotations[row_of[code.clamp(max=len(row_of) - 1)]])
            targets.append(F.layer_norm(rotated, (width,)))                            # (B, T, d)
        gates = [p for name, p in trained.named_parameters() if is_gate_parameter(name)]
        others = [p for name, p in trained.named_parameters() if not is_gate_parameter(name)]
        optimizer = torch.optim.AdamW([{"params": others}, {"params": gates, "weight_decay": 0.0}], lr=lr,
                                      weight_decay=1e-4)
        draw = random.Random(seed)
        history = []
        started = time.monotonic()
        for iteration in range(iterations):
            index = draw.randrange(len(calls))
            call = calls[index]
            out = replay(call, trained, record_gates=False)
            loss = F.mse_loss(out.hidden[call.valid], targets[index][call.valid])
            optimizer.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            optimizer.step()
            history.append({"iteration": iteration, "loss": loss.item()})
        seconds = time.monotonic() - started
    return GateTraining(trained.eval(), history, codes, iterations, seconds)


def replayed_calls(decoder: UnifiedDecoder, calls: Sequence[DecoderCall]) -> list[DecoderCall]:
    """The recorded calls with the gate decisions ``decoder`` makes on their inputs (evaluation mode, no gradients),
    for ``gating.expert_usage`` of a decoder that did not record them (e.g. :func:`train_gates`'s)."""
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            return [dataclasses.replace(call, gates=replay(call, decoder).gates) for call in calls]
    finally:
        decoder.train(was_training)


def gate_difference(usage: ExpertUsage) -> list[float]:
    """Per layer, how differently the rows of ``usage`` are routed: the mean over pairs of rows of half the L1
    distance between their mean gate vectors (total variation), 0 when every row has the same experts and weights,
    1 when no two rows share an expert."""
    gates = usage.usage.to(torch.float64)                                              # (L, R, E)
    rows = gates.shape[1]
    if rows < 2:
        return [0.0] * gates.shape[0]
    distance = (gates[:, :, None, :] - gates[:, None, :, :]).abs().sum(-1) / 2         # (L, R, R), diagonal 0
    return (distance.sum((1, 2)) / (rows * (rows - 1))).tolist()


def near_one_hot(usage: ExpertUsage, threshold: float = 0.95) -> list[float]:
    """Per layer, the share of the rows of ``usage`` that put at least ``threshold`` of their gate weight on one
    expert: where it is high, top-k routing acts as top-1 (the softmax over the k chosen logits has saturated)."""
    heaviest = usage.usage.to(torch.float64).max(dim=-1).values                        # (L, R)
    return (heaviest >= threshold).to(torch.float64).mean(dim=1).tolist()


def describe_one_hot(shares: Sequence[float], top_k: int) -> str | None:
    """A sentence on the layers where top-k routing acts as top-1, from :func:`near_one_hot`'s per-layer shares: the
    layers where more than half of the rows put at least 0.95 of their weight on one expert, and what the other
    layers do; None when no layer does (or ``top_k`` is 1, where every row is one-hot by construction)."""
    hard = [layer for layer, share in enumerate(shares) if share > 0.5]
    if top_k < 2 or not hard:
        return None

    def listed(layers: Sequence[int]) -> str:
        return (f"layer{'s' if len(layers) > 1 else ''} " + ", ".join(str(layer) for layer in layers) + " ("
                + ", ".join(f"{100 * shares[layer]:.0f} %" for layer in layers) + ")")

    soft = [layer for layer in range(len(shares)) if layer not in hard]
    return (f"top-{top_k} routing acts almost as top-1 in {listed(hard)}: that share of the combinations puts at least "
            "0.95 of its gate weight on one expert (the softmax over the chosen experts' logits has saturated)"
            + (f"; in {listed(soft)} most combinations still mix their {top_k} experts." if soft else "."))


@dataclass
class CollapsedLayer:
    """A layer found by :func:`collapsed_layers` or :func:`shared_expert_layers`.

    Attributes:
        layer: its index; experts: the experts the rows take there (weights above ``NEGLIGIBLE_WEIGHT``).
        largest_difference: the largest difference between two rows' gate vectors (half the L1 distance, as in
            :func:`gate_difference`).
    """

    layer: int
    experts: list[int]
    largest_difference: float


NEGLIGIBLE_WEIGHT = 0.01      # a gate weight below it hardly changes a row's mixture: the expert is not counted


def _same_expert_layers(usage: ExpertUsage, negligible: float = NEGLIGIBLE_WEIGHT) -> list[CollapsedLayer]:
    """Every layer in which all rows of ``usage`` draw on the same k experts, with the largest difference between
    two rows' gate vectors; none with fewer than two rows.

    A row's experts are those with more than ``negligible`` of its weight (a top-k gate whose second expert gets
    0.001 is in effect a top-1 gate); the layer counts when every row has the same set of them. Rows that each put
    nearly all their weight on a different one of the same two experts (E0 for some, E4 for the others, the other
    weight under ``negligible``) take different experts: the layer does not count.
    """
    gates = usage.usage.to(torch.float64)                                              # (L, R, E)
    if gates.shape[1] < 2:
        return []
    found = []
    for layer, rows in enumerate(gates):                                               # rows: (R, E)
        taken = rows > negligible                                                      # (R, E): each row's
        if not bool((taken == taken[0]).all()):
            continue
        experts = taken[0]
        largest = float(((rows[:, None, :] - rows[None, :, :]).abs().sum(-1) / 2).max())
        found.append(CollapsedLayer(layer, experts.nonzero().flatten().tolist(), largest))
    return found


def collapsed_layers(usage: ExpertUsage, threshold: float = 0.2) -> list[CollapsedLayer]:
    """The layers in which every row of ``usage`` takes the same experts with nearly the same weights: all rows
    draw on the same k experts (ignoring weights of at most ``NEGLIGIBLE_WEIGHT``), and at most ``threshold``
    between any two rows' gate vectors (half the L1 distance, as in :func:`gate_difference`).

    Such a layer computes nearly one function for every row (one attribute combination each): a dense FFN in all
    but name. Attribute routing has no balance loss and no capacity, so nothing keeps its gates from collapsing.
    With fewer than two rows there is nothing to compare and no layer is returned.
    """
    return [layer for layer in _same_expert_layers(usage) if layer.largest_difference <= threshold]


NEARLY_COLLAPSED_MOST = 0.5   # gate vectors further apart than this mix the same experts in clearly different ways


def shared_expert_layers(usage: ExpertUsage, threshold: float = 0.2,
                         most: float = NEARLY_COLLAPSED_MOST) -> list[CollapsedLayer]:
    """The *nearly collapsed* layers: every row of ``usage`` draws on the same k experts (as in
    :func:`collapsed_layers`), and two rows' gate vectors differ by more than ``threshold`` (so
    :func:`collapsed_layers` does not name the layer) but by at most ``most``.

    Every kind of token is processed by the same few experts there, and the weights that mix them depend on the kind
    only a little (by at most ``largest_difference``), so the layer specialises far less than one whose rows take
    different experts. Rows on the same two experts with weights 0.95 / 0.05 and 0.05 / 0.95 (a difference of 0.9)
    are specialised by their weights: such a layer is not named. With fewer than two rows no layer is returned.
    """
    return [layer for layer in _same_expert_layers(usage) if threshold < layer.largest_difference <= most]


def _experts_text(layer: CollapsedLayer) -> str:
    return ", ".join(f"E{e}" for e in layer.experts)


def describe_collapsed(collapsed: Mapping[str, Sequence[CollapsedLayer]], combinations: int,
                       threshold: float = 0.2, nearly: Mapping[str, Sequence[CollapsedLayer]] | None = None,
                       most: float = NEARLY_COLLAPSED_MOST) -> str:
    """A markdown paragraph naming the collapsed layers of several models (``name -> collapsed_layers(...)``, the
    same ``threshold``), for ``combinations`` rows (attribute combinations) each, and their nearly collapsed layers
    (``nearly``: ``name -> shared_expert_layers(...)``, the same ``threshold`` and ``most``; None: not looked
    for)."""
    definition = (f"all {combinations} attribute combinations take the same experts, with gate vectors at most "
                  f"{threshold:g} apart (`gates_training.collapsed_layers`)")
    named = {name: layers for name, layers in collapsed.items() if layers}
    near = {name: layers for name, layers in (nearly or {}).items() if layers}
    near_text = " ".join(
        f"{name}: layer {c.layer} is nearly collapsed: all {combinations} combinations take the same experts "
        f"({_experts_text(c)}), only their weights differ (by at most {c.largest_difference:.2f}, "
        "`gates_training.shared_expert_layers`)." for name, layers in near.items() for c in layers)
    if near:
        near_text += (" There every kind of token is processed by the same experts and only the mixture depends on "
                      "it: far less specialised than a layer whose combinations take different experts.")
    if combinations < 2:
        return "With one attribute combination there is nothing to compare: no layer can be called collapsed."
    if not named and not near:
        return (f"**No collapsed layer**: in no layer of these gates do {definition}; in every layer at least two "
                "combinations take different experts"
                + (" or clearly different weights" if nearly is None else
                   f" or weights more than {most:g} apart")
                + ". Nothing balances the experts under attribute routing, though, so a longer training can still "
                "collapse a layer.")
    if not named:
        heading = "a nearly collapsed one" if sum(map(len, near.values())) == 1 else "nearly collapsed ones"
        return f"**No collapsed layer, but {heading}**: in no layer of these gates do {definition}. {near_text}"
    listed = "; ".join(
        f"{name}: " + ", ".join(f"layer {c.layer} (experts {_experts_text(c)}, largest "
                                 f"difference {c.largest_difference:.2f})" for c in layers)
        for name, layers in named.items())
    others = [name for name in collapsed if name not in named and name not in near]
    return (f"**Collapsed layers**, where {definition}: {listed}. There every kind of token gets nearly the same "
            "mixture of the same experts: the layer is nearly one dense FFN and has not specialised. Attribute "
            "routing has no balance loss and no capacity, and nothing keeps a layer's gates from collapsing."
            + (f" {near_text}" if near else "")
            + (f" No layer of {' or '.join(others)} is collapsed"
               + (" or nearly collapsed." if nearly is not None else ".") if others else ""))


def _layers_text(layers: Sequence[int]) -> str:
    if not layers:
        return "in no layer"
    return f"in layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def describe_fig3(usage: ExpertUsage, name: str) -> str:
    """A markdown paragraph asking the three questions of the MoE paper's Fig. 3 of the gates in ``usage`` (rows:
    attribute codes, ``gating.expert_usage(..., by="attribute")``), from each row's heaviest expert per layer:
    do different kinds of token take different experts, do the tokens of one modality share experts across task
    shapes (bits 0-3), and do the causal tokens (bit 6) take experts of their own?

    A modality's tokens sharing their heaviest expert counts only in a layer where no single expert is the heaviest
    of more than half of the combinations: where most combinations lean on the same expert, the sharing says nothing
    about the modality (such layers are named apart)."""
    bits = torch.stack([attribute_bits(int(code)) for code in usage.keys]).bool()          # (R, 8)
    top = usage.usage.argmax(dim=-1)                                                       # (L, R)
    layers, rows, experts = usage.usage.shape
    distinct = [len(set(top[layer].tolist())) for layer in range(layers)]
    lines = [f"**The MoE paper's Fig. 3, asked of {name}** (the heaviest expert of each of the {rows} attribute "
             "combinations, layer by layer):\n",
             f"* *different kinds of token, different experts*: the combinations' heaviest experts are "
             f"{', '.join(map(str, distinct))} distinct ones (of {experts}) in layers "
             f"{', '.join(map(str, range(layers)))} (1 would mean that every combination leans on the same expert);"]
    shared = []
    # layers where one expert is the heaviest of more than half of the rows: sharing it is not modality-specific
    uniform = [layer for layer in range(layers) if int(torch.bincount(top[layer]).max()) > rows / 2]
    for kind, where in (("image", bits[:, 4]), ("non-causal text", bits[:, 5] & ~bits[:, 6])):
        shapes = {tuple(row[:4].tolist()) for row in bits[where]}
        if len(shapes) < 2:
            continue
        same = [layer for layer in range(layers)
                if len(set(top[layer, where].tolist())) == 1 and layer not in uniform]
        counted = [layer for layer in range(layers) if layer not in uniform]
        verdict = (f"share their heaviest expert {_layers_text(same)}" if same or not uniform else
                   f"do not share their heaviest expert in layer {counted[0]}, the only layer counted"
                   if len(counted) == 1 else
                   f"do not share their heaviest expert in any counted layer ({', '.join(map(str, counted))})")
        shared.append(f"the {kind} tokens of all {len(shapes)} task shapes {verdict}")
    if shared and len(uniform) == layers:
        lines.append("* *one modality across tasks*: cannot be asked of these gates: in every layer one expert is the "
                     "heaviest of most combinations, so a modality's tokens sharing it would say nothing about the "
                     "modality;")
    elif shared:
        excluded = (f" (not counted: layer{'s' if len(uniform) > 1 else ''} {', '.join(map(str, uniform))}, where "
                    "one expert is the heaviest of most combinations, so sharing it is not specific to a modality)"
                    if uniform else "")
        lines.append(f"* *one modality across tasks*{excluded}: " + "; ".join(shared) + ";")
    causal = bits[:, 6]
    if bool(causal.any()) and bool((~causal).any()):
        own = [layer for layer in range(layers)
               if not set(top[layer, causal].tolist()) & set(top[layer, ~causal].tolist())]
        lines.append(f"* *the causal bit*: the causal tokens' heaviest experts are taken by no non-causal combination "
                     f"{_layers_text(own)};" if own else "* *the causal bit*: in every layer, some non-causal "
                     "combination has the same heaviest expert as a causal one;")
    lines[-1] = lines[-1][:-1] + "."
    return "\n".join(lines)


@dataclass
class RunModel:
    """The model of notebook 06's run (:func:`model_of_run`).

    Attributes:
        model: the trained model, in evaluation mode.
        checkpoint: the checkpoint it comes from; iteration: the iteration of that checkpoint.
    """

    model: nn.Module
    checkpoint: os.PathLike
    iteration: int


def model_of_run(run_dir: str | os.PathLike) -> RunModel | None:
    """The model of the newest checkpoint of notebook 06's run in ``{run_dir}/train``, or None when that run has
    not saved one yet (the model is rebuilt from the configuration recorded in the checkpoint)."""
    from transformers.utils import logging as transformers_logging

    from ..engine.build import build_model

    status = training_status(training_dir(run_dir), iterations=0)
    if status.checkpoint is None:
        return None
    transformers_logging.disable_progress_bar()      # the text encoder's "Loading weights" bar, in a notebook
    model = build_model(None, checkpoint=status.checkpoint)
    return RunModel(model.eval(), status.checkpoint, status.iteration)
