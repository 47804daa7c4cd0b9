"""Token conditions for the Conditional MoE gates: modality ids, task ids and the 8 token attributes.

The gates of the unified decoder (``modeling/moe.py``) route every token by a condition c(x). Three of the
routings use a condition that does not depend on the token's value (MoE paper Sec. 3.2):

* ``modality``  -- the token's modality id (MoE eq. (7)): ``MODALITY_IDS``;
* ``task``      -- the task id (MoE eq. (8)): ``TASK_IDS``;
* ``attribute`` -- the 8-bit attribute vector of the token (MoE eq. (9), the MoE paper's Tab. 2), used by v2:

  ====  ==========================================================
  bit   meaning (1 = yes)
  ====  ==========================================================
  0     the task's inputs contain an image
  1     the task's inputs contain text
  2     the task's targets contain an image
  3     the task's targets contain text
  4     this token is visual
  5     this token is text
  6     this token's attention mask is causal
  7     this token comes from the inputs (not from the targets)
  ====  ==========================================================

The ``<SPE>`` token is neither visual nor text: bits 4 and 5 are both 0 and its modality id is its own
(``MODALITY_IDS["spe"] == 0``). Why: ``<SPE>`` is the token whose output represents the whole sequence (v1
Sec. 3.1) and is compared across modalities (an image's ``<SPE>`` against a text's ``<SPE>`` in retrieval), and in
captioning / MLM it stands in for the word to predict, so it is not the word either. Giving it a value of its
own lets the gates send it to its own experts instead of forcing it to share the experts of the image or text
tokens beside it. Bits 0-3 and 7 still tell the gate which task and which side of the task it belongs to.

Bit 6 (causal) is 1 exactly for the tokens whose attention row is restricted to the past: in captioning the
words x_1..x_T and the predicting ``<SPE>`` tokens after them (v1 appendix B); the leading ``<SPE>`` and the image
tokens attend bidirectionally to each other and so have bit 6 = 0 (see ``attention_masks.autoregressive_mask``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "ATTRIBUTE_NAMES",
    "MODALITY_IDS",
    "NUM_ATTRIBUTES",
    "TASK_IDS",
    "TASK_MODALITIES",
    "attribute_codes",
    "segment_ids",
    "task_token_attributes",
    "token_attributes",
]

NUM_ATTRIBUTES = 8
ATTRIBUTE_NAMES = (
    "image_in_inputs",
    "text_in_inputs",
    "image_in_targets",
    "text_in_targets",
    "token_is_visual",
    "token_is_text",
    "token_is_causal",
    "token_from_inputs",
)

# Modality ids (modality routing, MoE eq. (7)).
MODALITY_IDS = {"spe": 0, "image": 1, "text": 2}

# Task ids (task routing, MoE eq. (8)). Retrieval has two directions with different input / target modalities;
# each direction is its own task so that its attributes (bits 0-3) describe it.
TASK_IDS = {
    "classification": 0,
    "detection": 1,
    "captioning": 2,
    "mlm": 3,
    "retrieval_i2t": 4,       # image query, text candidates
    "retrieval_t2i": 5,       # text query, image candidates
}

# The modalities of every task's inputs and candidate targets (v2 Sec. 4.3; docs/design.md).
TASK_MODALITIES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "classification": (frozenset({"image"}), frozenset({"text"})),
    "detection": (frozenset({"image"}), frozenset({"text"})),
    "captioning": (frozenset({"image", "text"}), frozenset({"text"})),
    "mlm": (frozenset({"text"}), frozenset({"text"})),
    "retrieval_i2t": (frozenset({"image"}), frozenset({"text"})),
    "retrieval_t2i": (frozenset({"text"}), frozenset({"image"})),
}

_TASK_MODALITY_NAMES = frozenset({"image", "text"})


def _check_modalities(modalities: Iterable[str], name: str) -> frozenset[str]:
    modalities = frozenset(modalities)
    unknown = modalities - _TASK_MODALITY_NAMES
    if unknown:
        raise ValueError(f"{name}: unknown modalities {sorted(unknown)}; expected a subset of "
                         f"{sorted(_TASK_MODALITY_NAMES)}")
    return modalities


def segment_ids(segments: Sequence[tuple[str | int, int]], table: dict[str, int] | None = None) -> torch.Tensor:
    """Ids of a sequence written as consecutive segments, e.g. ``[("spe", 1), ("image", 20), ("text", 12)]``.

    Args:
        segments: (name or id, length) pairs in sequence order; names are looked up in ``table``.
        table: name -> id (default ``MODALITY_IDS``).

    Returns:
        (T,) long, T = the sum of the lengths.
    """
    table = MODALITY_IDS if table is None else table
    ids = []
    for key, length in segments:
        if isinstance(key, str):
            if key not in table:
                raise ValueError(f"segment {key!r}: unknown name; expected one of {sorted(table)}")
            key = table[key]
        if length < 0:
            raise ValueError(f"segment {key!r}: negative length {length}")
        ids.append(torch.full((length,), key, dtype=torch.long))
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def token_attributes(
    task_inputs: Iterable[str],
    task_targets: Iterable[str],
    token_modality: torch.Tensor,
    causal: bool | torch.Tensor,
    is_input: bool | torch.Tensor,
) -> torch.Tensor:
    """The 8-bit attribute vector of every token (MoE paper Tab. 2, the condition of MoE eq. (9)).

    Args:
        task_inputs: modalities of the task's inputs, a subset of {"image", "text"}.
        task_targets: modalities of the task's candidate targets, a subset of {"image", "text"}.
        token_modality: (...,) long modality ids (``MODALITY_IDS``) of the tokens; any leading shape, e.g. (T,)
            for one sequence or (B, T) for a batch.
        causal: one bool for all tokens, or a bool tensor broadcastable to ``token_modality``: True where the
            token's attention row is causal (bit 6).
        is_input: one bool, or a bool tensor broadcastable to ``token_modality``: True for tokens of the input
            sequence x, False for tokens of a candidate target sequence y (bit 7).

    Returns:
        (..., 8) float32 of zeros and ones.
    """
    task_inputs = _check_modalities(task_inputs, "task_inputs")
    task_targets = _check_modalities(task_targets, "task_targets")
    if token_modality.dtype != torch.long:
        raise TypeError(f"token_modality: expected a long tensor of modality ids, got {token_modality.dtype}")
    if token_modality.numel() and (token_modality.min() < 0 or token_modality.max() >= len(MODALITY_IDS)):
        raise ValueError(f"token_modality: ids must be in {MODALITY_IDS}, got values in "
                         f"[{int(token_modality.min())}, {int(token_modality.max())}]")
    shape, device = token_modality.shape, token_modality.device

    def per_token(value: bool | torch.Tensor, name: str) -> torch.Tensor:
        value = torch.as_tensor(value, device=device)
        if value.dtype != torch.bool:
            raise TypeError(f"{name}: expected a bool or a bool tensor, got {value.dtype}")
        try:
            return value.expand(shape)
        except RuntimeError:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not broadcast to the tokens' shape "
                             f"{tuple(shape)}") from None

    task_bits = torch.tensor([
        "image" in task_inputs, "text" in task_inputs, "image" in task_targets, "text" in task_targets,
    ], dtype=torch.float32, device=device)
    columns = [
        *task_bits.expand(*shape, 4).unbind(-1),
        token_modality == MODALITY_IDS["image"],
        token_modality == MODALITY_IDS["text"],
        per_token(causal, "causal"),
        per_token(is_input, "is_input"),
    ]
    return torch.stack([c.to(torch.float32) for c in columns], dim=-1)


def task_token_attributes(
    task: str,
    token_modality: torch.Tensor,
    causal: bool | torch.Tensor = False,
    is_input: bool | torch.Tensor = True,
) -> torch.Tensor:
    """``token_attributes`` with the task's input / target modalities looked up in ``TASK_MODALITIES``.

    Args:
        task: a key of ``TASK_MODALITIES`` (e.g. "captioning").
        token_modality, causal, is_input: as in ``token_attributes``.

    Returns:
        (..., 8) float32.
    """
    if task not in TASK_MODALITIES:
        raise ValueError(f"task {task!r}: unknown; expected one of {sorted(TASK_MODALITIES)}")
    inputs, targets = TASK_MODALITIES[task]
    return token_attributes(inputs, targets, token_modality, causal, is_input)


def attribute_codes(attributes: torch.Tensor) -> torch.Tensor:
    """The integer sum_i a_i 2^i of each 8-bit attribute vector: one id per distinct attribute combination.

    Used by the gates to compute one decision per distinct condition and by the re-parameterised experts as the
    key of their merged weights.

    Args:
        attributes: (..., 8) float or bool of zeros and ones.

    Returns:
        (...,) long in [0, 256).
    """
    if attributes.shape[-1] != NUM_ATTRIBUTES:
        raise ValueError(f"attributes: expected a last dimension of {NUM_ATTRIBUTES}, got shape "
                         f"{tuple(attributes.shape)}")
    bits = attributes.to(torch.long)
    if bits.numel() and (not torch.equal(bits.to(attributes.dtype), attributes) or bits.min() < 0 or bits.max() > 1):
        raise ValueError("attributes: every entry must be 0 or 1 (see attributes.token_attributes)")
    powers = 2 ** torch.arange(NUM_ATTRIBUTES, device=attributes.device)
    return (bits * powers).sum(-1)
