"""The shared sequence builder: encoder outputs -> the unified decoder's input, for inputs and candidate targets.

Every task feeds the decoder g a concatenation of segments (v2 Sec. 4.3: "an additional <SPE> token inserted at the
beginning"):

    input x   = [<SPE>, image tokens f_image(x) (v2 eq. (1)) and / or text tokens f_text(x) (v2 eq. (4))]
    target y  = [<SPE>, text tokens]            (a class name, a vocabulary word, a caption)
                [<SPE>, image tokens]           (an image, for text-to-image retrieval)

A ``Segment`` is a run of already-embedded tokens of one modality (embedded by the decoder's own ``spe`` /
``embed_image`` / ``embed_text``); ``build_sequence`` concatenates segments and derives, token by token, everything
the decoder needs besides the embeddings: the key-padding mask, the modality ids, the 8-bit attributes of the
Conditional MoE gates (``modeling/attributes.py``: the task's input and target modalities, the token's modality,
whether its attention row is causal, whether it belongs to the input or to a target) and the task id.

Shapes: B sequences, T tokens, d = decoder width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniperceiver_v2.modeling.attributes import MODALITY_IDS, TASK_IDS, task_token_attributes
from uniperceiver_v2.modeling.unified_decoder import TOKEN_TYPES, DecoderOutput, UnifiedDecoder

__all__ = [
    "DecoderInputs",
    "Segment",
    "build_sequence",
    "image_segment",
    "image_token_types",
    "spe_segment",
    "text_segment",
]

# The image encoder's token types (``ImageEncoderOutput.token_types``): 0 attention-pooled global (v2 eq. (3)),
# 1 flattened-map global (v2 eq. (3)), 2 regional proposal (v2 eq. (2)).
_IMAGE_ENCODER_REGIONAL = 2


@dataclass
class Segment:
    """A run of embedded tokens of one modality.

    Attributes:
        embeddings: (B, n, d) decoder-width embeddings.
        padding: (B, n) bool, True = padding.
        modality: "spe", "image" or "text" (``attributes.MODALITY_IDS``).
        causal: whether these tokens' attention rows are causal (attribute bit 6): True only for the words and the
            predicting ``<SPE>`` tokens of captioning.
        token_modality: optional (B, n) long modality ids overriding ``modality`` token by token (MLM: the
            ``<SPE>`` tokens standing in for masked words inside a text segment).
    """

    embeddings: torch.Tensor
    padding: torch.Tensor
    modality: str
    causal: bool = False
    token_modality: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITY_IDS:
            raise ValueError(f"Segment.modality: {self.modality!r} not in {sorted(MODALITY_IDS)}")
        if self.embeddings.dim() != 3 or tuple(self.padding.shape) != tuple(self.embeddings.shape[:2]):
            raise ValueError(f"Segment ({self.modality}): expected embeddings (B, n, d) and padding (B, n), got "
                             f"{tuple(self.embeddings.shape)} and {tuple(self.padding.shape)}")
        if self.token_modality is not None and self.token_modality.shape != self.padding.shape:
            raise ValueError(f"Segment ({self.modality}): token_modality {tuple(self.token_modality.shape)} != "
                             f"{tuple(self.padding.shape)}")

    def modality_ids(self) -> torch.Tensor:
        """(B, n) long modality id of every token."""
        if self.token_modality is not None:
            return self.token_modality
        return torch.full(self.padding.shape, MODALITY_IDS[self.modality], dtype=torch.long,
                          device=self.embeddings.device)

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]


@dataclass
class DecoderInputs:
    """Everything ``UnifiedDecoder.forward`` takes, for B sequences of T tokens.

    Attributes:
        x: (B, T, d) embedded tokens.
        key_padding_mask: (B, T) bool, True = padding.
        attn_mask: (T, T) or (B, T, T) bool, True = may attend; None = bidirectional.
        attributes: (B, T, 8) float 0/1, the MoE token attributes.
        modality_ids: (B, T) long.
        task_id: (B,) long.
        offsets: start index of every segment in the sequence, in the order given to ``build_sequence``.
    """

    x: torch.Tensor
    key_padding_mask: torch.Tensor
    attn_mask: torch.Tensor | None
    attributes: torch.Tensor
    modality_ids: torch.Tensor
    task_id: torch.Tensor
    offsets: list[int]

    def run(self, decoder: UnifiedDecoder, record_gates: bool = False) -> DecoderOutput:
        """g(sequence): the decoder's output for every token (``DecoderOutput.hidden`` (B, T, d))."""
        return decoder(self.x, attn_mask=self.attn_mask, key_padding_mask=self.key_padding_mask,
                       attributes=self.attributes, modality_ids=self.modality_ids, task_id=self.task_id,
                       record_gates=record_gates)


def spe_segment(decoder: UnifiedDecoder, batch: int, n: int = 1, positions: torch.Tensor | None = None,
                causal: bool = False) -> Segment:
    """``<SPE>`` tokens: (B, n); ``positions`` (n,) or (B, n) gives each the position embedding of the word it stands
    for (captioning, MLM); the leading ``<SPE>`` of a sequence has none."""
    embeddings = decoder.spe(batch, n, positions)
    padding = torch.zeros(batch, n, dtype=torch.bool, device=embeddings.device)
    return Segment(embeddings, padding, "spe", causal)


def image_token_types(encoder_token_types: torch.Tensor) -> torch.Tensor:
    """The image encoder's token types (0/1 global, 2 regional) as the decoder's ``TOKEN_TYPES``."""
    return torch.where(encoder_token_types == _IMAGE_ENCODER_REGIONAL,
                       torch.full_like(encoder_token_types, TOKEN_TYPES["image_regional"]),
                       torch.full_like(encoder_token_types, TOKEN_TYPES["image_global"]))


def image_segment(decoder: UnifiedDecoder, tokens: torch.Tensor, token_types: torch.Tensor,
                  token_padding_mask: torch.Tensor) -> Segment:
    """The image tokens f_image(x) = [global, regional] (v2 eq. (1)) of ``ImageEncoderOutput``.

    Args:
        tokens: (B, N, image_dim).
        token_types: (B, N) or (N,) long, the image encoder's types (0, 1 global; 2 regional).
        token_padding_mask: (B, N) bool, True = padding (e.g. flattened-map cells of a padded image).
    """
    return Segment(decoder.embed_image(tokens, image_token_types(token_types)), token_padding_mask, "image")


def text_segment(decoder: UnifiedDecoder, features: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor | None = None, causal: bool = False) -> Segment:
    """Text tokens f_text(x) (v2 eq. (4)).

    Args:
        features: (B, L, text_dim) text encoder outputs.
        attention_mask: (B, L) the tokenizer's mask, 1 / True = token, 0 / False = padding.
        positions: (L,) or (B, L) position of each token; default 0..L-1.
        causal: True for caption words (they see only the past).
    """
    return Segment(decoder.embed_text(features, positions), ~attention_mask.bool(), "text", causal)


def build_sequence(
    segments: Sequence[Segment],
    task: str,
    is_input: bool,
    attn_mask: torch.Tensor | None = None,
) -> DecoderInputs:
    """Concatenate segments into one decoder input sequence.

    Args:
        segments: in sequence order, all with the same B.
        task: a key of ``attributes.TASK_IDS`` ("classification", "detection", "captioning", "mlm",
            "retrieval_i2t", "retrieval_t2i"): fixes the task bits of the attributes and the task id.
        is_input: True for the input sequence x, False for a candidate target sequence y (attribute bit 7).
        attn_mask: (T, T) or (B, T, T) bool, True = may attend; None = bidirectional (padding is always
            masked through ``key_padding_mask``).

    Returns:
        ``DecoderInputs`` with T = the sum of the segment lengths.
    """
    if not segments:
        raise ValueError("build_sequence: no segments")
    if task not in TASK_IDS:
        raise ValueError(f"build_sequence: task {task!r} not in {sorted(TASK_IDS)}")
    batch = segments[0].embeddings.shape[0]
    for segment in segments:
        if segment.embeddings.shape[0] != batch:
            raise ValueError(f"build_sequence: segment batch sizes differ: "
                             f"{[s.embeddings.shape[0] for s in segments]}")
    device = segments[0].embeddings.device
    x = torch.cat([s.embeddings for s in segments], dim=1)
    key_padding_mask = torch.cat([s.padding for s in segments], dim=1)
    modality_ids = torch.cat([s.modality_ids() for s in segments], dim=1)
    causal = torch.cat([torch.full((batch, s.length), s.causal, dtype=torch.bool, device=device)
                        for s in segments], dim=1)
    attributes = task_token_attributes(task, modality_ids, causal=causal, is_input=is_input)
    offsets, start = [], 0
    for segment in segments:
        offsets.append(start)
        start += segment.length
    task_id = torch.full((batch,), TASK_IDS[task], dtype=torch.long, device=device)
    return DecoderInputs(x, key_padding_mask, attn_mask, attributes.to(x.dtype), modality_ids, task_id, offsets)
