"""Masked language modelling (v1 Sec. 3.2, "auto-encoding language modelling"): predict masked words from both sides.

``tasks.mlm.mask_prob`` (15 %) of the word tokens of each sentence are chosen (special tokens and padding never; at
least one per sentence). At a chosen position

* the text encoder sees the tokenizer's mask token ([MASK] / <mask>), so the features of the other words carry no
  trace of the hidden word (f_text is bidirectional);
* the decoder sees ``<SPE>`` instead of that token's feature -- "each word that needs to be predicted in x is
  replaced by a <SPE> token, whose feature at the encoder output is used to match the words in the vocabulary"
  (v1 Sec. 3.2) -- with the position embedding of the word it replaces (``tasks.mlm.masked_input="spe"``); or
  ``<SPE>`` added to the text encoder's feature of the mask token there (``"encoder"``): v1 has no language model
  before its shared encoder, v2 has one, and its contextual guess at the hidden word is then kept.

Unlike BERT there is no 80 / 10 / 10 split (keep or randomise some chosen tokens): the decoder always sees
``<SPE>`` at the positions it predicts, at training and at inference alike, so the mismatch that split addresses
does not arise in the decoder.

    input x   = [<SPE>, f_text(sentence with masks) where every masked position holds <SPE>]
    targets Y = { [<SPE>, f_text(w)] : w in the vocabulary }              (``tasks/vocabulary.py``)
    logits[m, v] = cos(g(x)_{masked position m}, g(y_v)_<SPE>) / tau_mlm

The loss is v2 eq. (7) over the masked positions (no label smoothing for language modelling, ``tasks.mlm``). A masked
token outside the vocabulary cannot be a target: it is left out of the loss and counts as a miss in the accuracy.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniperceiver_v2.data.collate import collate_text
from uniperceiver_v2.modeling.attributes import MODALITY_IDS
from uniperceiver_v2.modeling.decoder_inputs import Segment, build_sequence, spe_segment, text_segment
from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.losses import IGNORE_INDEX, unified_loss, vocabulary_uniformity_terms
from uniperceiver_v2.tasks.vocabulary import vocabulary_lookup

__all__ = ["MLMTaskBatch", "MaskedLanguageModelingTask", "choose_masked_positions", "sentence_draws"]

# Seed of the masking draw in ``predict``: evaluation masks the same positions every time it runs.
EVAL_MASK_SEED = 0
# Length of each sentence's stream of draws in ``sentence_draws`` (longer than any tokenised sentence).
MAX_DRAWS = 1024


@dataclass
class MLMTaskBatch:
    """Raw sentences; tokenisation and masking happen in the task (they need the model's tokenizer)."""

    texts: list[str]

    def to(self, device: torch.device | str) -> MLMTaskBatch:
        return self


def sentence_draws(texts: Sequence[str], length: int, seed: int) -> torch.Tensor:
    """(B, length) uniform draws, each row a function of its sentence and ``seed`` only: evaluation masks the same
    words of a sentence whatever batch it lands in and however long the batch is padded."""
    if length > MAX_DRAWS:
        raise ValueError(f"sentence_draws: sequences of {length} tokens, more than {MAX_DRAWS}")
    rows = [torch.rand(MAX_DRAWS, generator=torch.Generator().manual_seed(seed ^ zlib.crc32(text.encode())))[:length]
            for text in texts]
    return torch.stack(rows) if rows else torch.zeros(0, length)


def choose_masked_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int],
                            mask_prob: float, generator: torch.Generator | None = None,
                            draws: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli(mask_prob) choice of word tokens to mask, at least one per sentence that has a word.

    Args:
        input_ids, attention_mask: (B, L).
        special_ids: token ids never masked ([CLS], [SEP], [PAD], ...).
        mask_prob: probability of each word token.
        generator: a CPU generator for a reproducible draw (default: torch's global one).
        draws: (B, L) uniform draws to use instead (``sentence_draws``); ``generator`` is then ignored.

    Returns:
        (B, L) bool, True = masked.
    """
    special = torch.tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    if draws is None:
        draws = torch.rand(input_ids.shape, generator=generator)
    if tuple(draws.shape) != tuple(input_ids.shape):
        raise ValueError(f"choose_masked_positions: draws {tuple(draws.shape)} != input_ids {tuple(input_ids.shape)}")
    draws = draws.to(input_ids.device)
    masked = candidates & (draws < mask_prob)
    # A sentence with no draw still gets one masked word: its highest draw among its candidates.
    empty = ~masked.any(dim=1) & candidates.any(dim=1)
    forced = draws.masked_fill(~candidates, -1.0).argmax(dim=1)
    masked[empty, forced[empty]] = True
    return masked


class MaskedLanguageModelingTask(Task):
    """Masked language modelling over the model's vocabulary."""

    name = "mlm"

    def collate(self, samples: Sequence[str]) -> MLMTaskBatch:
        return MLMTaskBatch(collate_text(samples))

    def masked_representations(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs at the masked positions.

        Args:
            input_ids, attention_mask: (B, L) the tokenised sentences (the masked positions may hold any token:
                the text encoder is given the mask token there).
            masked: (B, L) bool.

        Returns:
            (M, d) outputs of the ``<SPE>`` tokens at the M masked positions (row-major order), and the MoE
            auxiliary loss.
        """
        decoder = model.decoder
        batch, length = input_ids.shape
        encoder_ids = input_ids.masked_fill(masked, model.text_encoder.mask_token_id)
        features = model.encode_text_tokens(encoder_ids, attention_mask)                    # (B, L, text_dim)
        text = text_segment(decoder, features, attention_mask)
        positions = torch.arange(length, device=input_ids.device)
        spe_in_place = decoder.spe(batch, length, positions)                                # (B, L, d)
        if self.config.masked_input == "encoder":
            # <SPE> (with its type and the word's position) added to the projected f_text of the mask token
            spe_in_place = spe_in_place + decoder.text_norm(decoder.text_proj(features))
        words = Segment(
            embeddings=torch.where(masked[..., None], spe_in_place, text.embeddings),
            padding=text.padding,
            modality="text",
            token_modality=torch.where(masked, MODALITY_IDS["spe"], MODALITY_IDS["text"]),
        )
        out = build_sequence([spe_segment(decoder, batch), words], self.name, is_input=True).run(decoder)
        return out.hidden[:, 1:][masked], out.aux_loss

    def _forward(self, model, texts: Sequence[str], fixed_masks: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (M, V) at the masked positions, their token ids (M,), their vocabulary targets (M,), aux loss, the
        vocabulary's target embeddings (V, d).

        ``fixed_masks``: each sentence's masks are a function of the sentence (evaluation); else a fresh draw from
        torch's global generator (training)."""
        tokens = model.tokenize(texts)
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        draws = sentence_draws(texts, input_ids.shape[1], EVAL_MASK_SEED) if fixed_masks else None
        masked = choose_masked_positions(input_ids, attention_mask, model.text_encoder.special_token_ids,
                                         self.config.mask_prob, draws=draws)
        hidden, aux = self.masked_representations(model, input_ids, attention_mask, masked)
        vocabulary = model.vocabulary_embeddings(self.name)
        logits = model.similarity(hidden, vocabulary, self.name)
        token_ids = input_ids[masked]
        targets = vocabulary_lookup(model.vocabulary, model.text_encoder.vocab_size)[token_ids]
        return logits, token_ids, targets, aux, vocabulary

    def loss(self, model, batch: MLMTaskBatch) -> dict[str, torch.Tensor]:
        logits, _, targets, aux, vocabulary = self._forward(model, batch.texts, fixed_masks=False)
        terms = {"loss_mlm": unified_loss(logits, targets, self.config.label_smoothing), "loss_moe_aux": aux}
        terms.update(vocabulary_uniformity_terms(vocabulary, model.config.decoder.vocabulary_uniformity))
        accuracy = ((logits.argmax(1) == targets) & (targets != IGNORE_INDEX)).float().mean().detach()
        return {**terms, "accuracy": accuracy, "loss": self.weighted_total(terms)}

    @torch.no_grad()
    def predict(self, model, batch: MLMTaskBatch) -> dict[str, torch.Tensor]:
        """Mask each sentence's words as a function of the sentence alone (the same positions at every evaluation,
        in any batch) and predict the masked tokens.

        Returns:
            {"predicted": (M,) token ids, "target": (M,) the masked token ids, "accuracy": scalar}.
        """
        logits, token_ids, _, _, _ = self._forward(model, batch.texts, fixed_masks=True)
        predicted = model.vocabulary[logits.argmax(1)]
        return {"predicted": predicted, "target": token_ids, "accuracy": (predicted == token_ids).float().mean()}
