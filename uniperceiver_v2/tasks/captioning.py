"""Image captioning: auto-regressive language modelling with image clues (v1 Sec. 3.2 and appendix B).

Every word is predicted by a ``<SPE>`` token that sees the image and the words before it, and is compared with
every word of the vocabulary (each its own target sequence ``[<SPE>, word]``, ``tasks/vocabulary.py``):

    logits[i, v] = cos(g(x)_{<SPE>_i}, g(y_v)_<SPE>) / tau_cap          (v2 eq. (6)),   loss = v2 eq. (7)

Training (teacher forcing, one pass for all words; v1 appendix B):

    [<SPE>_0, image tokens, x_1 .. x_T, <SPE>_1 .. <SPE>_T]        with ``attention_masks.autoregressive_mask``

x_1..x_T are the caption's tokens after the tokenizer's start token, i.e. the words followed by the end token
([SEP] / </s>), which is therefore predicted like a word and stops generation. ``<SPE>_i`` carries the position
embedding of x_i, sees ``<SPE>_0``, the image, x_<i and itself, and predicts x_i; words never see a ``<SPE>_i``.

Inference (v1 appendix B): ``<SPE>`` is appended after the words generated so far,
``[<SPE>_0, image, x_1 .. x_{i-1}, <SPE>_i]``, and its output picks x_i; greedy or beam search, at most
``tasks.captioning.max_length`` steps, stopping at the end token.

Leak-free word features. The decoder's mask alone is not enough: the text encoder f_text is bidirectional, so
running it over the whole caption would put x_{i+1}.. into the features of x_<i, and ``<SPE>_i`` would see the
words it must predict. The caption is therefore encoded with a causal attention mask
(``UniPerceiverV2.encode_text_tokens(causal=True)``): the feature of x_j depends on the start token and x_1..x_j
only, exactly what it is at step j of generation. The pre-trained language model keeps its weights; only its
attention pattern is restricted for the captions, which keeps its contextual features (the alternative, its input
embeddings alone, would throw the language model away for this task). ``tests/test_tasks_captioning.py`` checks
that the logits at position i do not change when the words after i change, and that teacher-forced logits equal
step-by-step decoding logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from uniperceiver_v2.data.collate import collate_captions
from uniperceiver_v2.data.samples import CaptionSample, ImageCaptionsSample
from uniperceiver_v2.modeling.attention_masks import autoregressive_mask
from uniperceiver_v2.modeling.decoder_inputs import Segment, build_sequence, image_segment, spe_segment, text_segment
from uniperceiver_v2.modeling.image_encoder import ImageEncoderOutput
from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.losses import IGNORE_INDEX, unified_loss, vocabulary_uniformity_terms
from uniperceiver_v2.tasks.vocabulary import end_token_id, start_token_id, vocabulary_lookup

__all__ = ["CaptioningTask", "CaptioningTaskBatch"]


@dataclass
class CaptioningTaskBatch:
    """Images and (for training) one or more captions per image.

    Attributes:
        images: (B, 3, H, W) normalised, padded; padding_mask: (B, H, W) bool.
        captions: N strings, or None at inference.
        caption_image_index: (N,) long, the image row of every caption, or None.
        image_ids: B dataset image ids.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    captions: list[str] | None
    caption_image_index: torch.Tensor | None
    image_ids: list[int]

    def to(self, device: torch.device | str) -> CaptioningTaskBatch:
        index = None if self.caption_image_index is None else self.caption_image_index.to(device)
        return replace(self, images=self.images.to(device), padding_mask=self.padding_mask.to(device),
                       caption_image_index=index)


class CaptioningTask(Task):
    """Auto-regressive captioning over the model's vocabulary, with greedy and beam-search decoding."""

    name = "captioning"

    def collate(self, samples: Sequence[CaptionSample | ImageCaptionsSample]) -> CaptioningTaskBatch:
        batch = collate_captions(samples)
        return CaptioningTaskBatch(batch.images, batch.padding_mask, batch.captions, batch.caption_image_index,
                                   batch.image_ids)

    # -- the sequences ---------------------------------------------------------------------------------------------
    def _prefix(self, model, image: ImageEncoderOutput, rows: torch.Tensor | None) -> list[Segment]:
        """[<SPE>_0, image tokens] for the images ``rows`` (all when None)."""
        tokens, types, padding = image.tokens, image.token_types, image.token_padding_mask
        if rows is not None:
            tokens, types, padding = tokens[rows], types[rows], padding[rows]
        return [spe_segment(model.decoder, tokens.shape[0]), image_segment(model.decoder, tokens, types, padding)]

    def _predicting_spe(self, model, positions: torch.Tensor, padding: torch.Tensor) -> Segment:
        """The trailing ``<SPE>`` tokens (B, P), each with the position of the word it predicts."""
        embeddings = model.decoder.spe(padding.shape[0], padding.shape[1], positions)
        return Segment(embeddings, padding, "spe", causal=True)

    def _end_index(self, model) -> int:
        end = end_token_id(model.text_encoder.tokenizer)
        where = torch.nonzero(model.vocabulary == end).flatten()
        if where.numel() == 0:
            raise ValueError(f"captioning: the model's vocabulary lacks the end token (id {end}); build it with "
                             f"tasks.vocabulary.build_vocabulary, which adds it")
        return int(where[0])

    def teacher_forced_outputs(self, model, image: ImageEncoderOutput, rows: torch.Tensor | None,
                               input_ids: torch.Tensor, attention_mask: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The predicting ``<SPE>`` outputs of N captions in one pass (training layout).

        Args:
            image: f_image of the B images.
            rows: (N,) long image row of each caption (None: caption n belongs to image n).
            input_ids, attention_mask: (N, L) tokenised captions, [start, w_1 .. w_n, end, padding].

        Returns:
            hidden (N, T, d) with T = L - 1 (row i predicts x_{i+1} = input_ids[:, i + 1]), targets (N, T) long
            vocabulary indices (``IGNORE_INDEX`` at padding and at words outside the vocabulary), MoE aux loss.
        """
        decoder = model.decoder
        num_words = input_ids.shape[1] - 1
        features = model.encode_text_tokens(input_ids, attention_mask, causal=True)[:, 1:]   # (N, T, text_dim)
        word_mask = attention_mask[:, 1:].bool()                                              # (N, T)
        positions = torch.arange(1, num_words + 1, device=input_ids.device)
        prefix = self._prefix(model, image, rows)
        num_prefix = sum(segment.length for segment in prefix)
        words = text_segment(decoder, features, word_mask, positions, causal=True)
        spes = self._predicting_spe(model, positions, ~word_mask)
        mask = autoregressive_mask(num_prefix, num_words).to(input_ids.device)
        out = build_sequence(prefix + [words, spes], self.name, is_input=True, attn_mask=mask).run(decoder)
        hidden = out.hidden[:, num_prefix + num_words:]                                       # (N, T, d)
        lookup = vocabulary_lookup(model.vocabulary, model.text_encoder.vocab_size)
        targets = lookup[input_ids[:, 1:]].masked_fill(~word_mask, IGNORE_INDEX)
        return hidden, targets, out.aux_loss

    def word_logits(self, model, hidden: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """v2 eq. (6) logits (N, T, V) of the outputs ``hidden`` (N, T, d) against the vocabulary's targets (V, d)."""
        return model.similarity(hidden.flatten(0, 1), vocabulary, self.name).view(*hidden.shape[:2], -1)

    def teacher_forced_logits(self, model, image: ImageEncoderOutput, rows: torch.Tensor | None,
                              input_ids: torch.Tensor, attention_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All next-word logits (N, T, V) of N captions in one pass, their targets (N, T) and the MoE aux loss
        (:meth:`teacher_forced_outputs` against ``model.vocabulary_embeddings``)."""
        hidden, targets, aux = self.teacher_forced_outputs(model, image, rows, input_ids, attention_mask)
        return self.word_logits(model, hidden, model.vocabulary_embeddings(self.name)), targets, aux

    def next_word_logits(self, model, image: ImageEncoderOutput, rows: torch.Tensor | None,
                         generated: torch.Tensor) -> torch.Tensor:
        """Logits of the next word after ``generated`` (inference layout ``[<SPE>_0, image, x_1..x_t, <SPE>]``).

        Args:
            image: f_image of the B images; rows: (N,) image row of each hypothesis (None: hypothesis n -> image n).
            generated: (N, t) long token ids generated so far (t >= 0, the same t for all rows).

        Returns:
            (N, V) logits over the vocabulary.
        """
        decoder = model.decoder
        count, steps = generated.shape
        prefix = self._prefix(model, image, rows)
        num_prefix = sum(segment.length for segment in prefix)
        start = torch.full((count, 1), start_token_id(model.text_encoder.tokenizer), dtype=torch.long,
                           device=generated.device)
        ids = torch.cat([start, generated], dim=1)
        features = model.encode_text_tokens(ids, torch.ones_like(ids), causal=True)[:, 1:]   # (N, t, text_dim)
        positions = torch.arange(1, steps + 1, device=ids.device)
        words = text_segment(decoder, features, torch.ones_like(generated), positions, causal=True)
        spe = self._predicting_spe(model, torch.tensor([steps + 1], device=ids.device),
                                   torch.zeros(count, 1, dtype=torch.bool, device=ids.device))
        mask = autoregressive_mask(num_prefix, steps, spe_targets=[steps + 1]).to(ids.device)
        out = build_sequence(prefix + [words, spe], self.name, is_input=True, attn_mask=mask).run(decoder)
        return model.similarity(out.hidden[:, -1], model.vocabulary_embeddings(self.name), self.name)

    # -- training ------------------------------------------------------------------------------------------------
    def loss(self, model, batch: CaptioningTaskBatch) -> dict[str, torch.Tensor]:
        if batch.captions is None:
            raise ValueError("CaptioningTask.loss: the batch has no captions")
        image = model.encode_images(batch.images, batch.padding_mask)
        tokens = model.tokenize(batch.captions)
        hidden, targets, aux = self.teacher_forced_outputs(model, image, batch.caption_image_index,
                                                           tokens["input_ids"], tokens["attention_mask"])
        vocabulary = model.vocabulary_embeddings(self.name)                                   # (V, d)
        logits, targets = self.word_logits(model, hidden, vocabulary).flatten(0, 1), targets.flatten()
        valid = targets != IGNORE_INDEX
        terms = {"loss_caption": unified_loss(logits[valid], targets[valid], self.config.label_smoothing),
                 "loss_moe_aux": aux}
        terms.update(vocabulary_uniformity_terms(vocabulary, model.config.decoder.vocabulary_uniformity))
        accuracy = (logits[valid].argmax(1) == targets[valid]).float().mean().detach()
        return {**terms, "accuracy": accuracy, "loss": self.weighted_total(terms)}

    # -- decoding ------------------------------------------------------------------------------------------------
    def greedy(self, model, image: ImageEncoderOutput, max_length: int) -> list[tuple[list[int], float]]:
        """Pick the most likely word at every step (v2 eq. (5) per position).

        Returns:
            per image (token ids without the end token, sum of the chosen words' log-probabilities).
        """
        end_index = self._end_index(model)
        count = image.tokens.shape[0]
        generated = torch.zeros(count, 0, dtype=torch.long, device=model.device)
        scores = torch.zeros(count, device=model.device)
        finished = torch.zeros(count, dtype=torch.bool, device=model.device)
        for _ in range(max_length):
            log_probs = self.next_word_logits(model, image, None, generated).log_softmax(dim=1)
            best, index = log_probs.max(dim=1)
            scores = scores + best.masked_fill(finished, 0.0)
            index = index.masked_fill(finished, end_index)        # finished captions keep emitting the end token
            generated = torch.cat([generated, model.vocabulary[index][:, None]], dim=1)
            finished |= index == end_index
            if bool(finished.all()):
                break
        return [(self._until_end(model, row), float(score)) for row, score in zip(generated, scores)]

    def beam_search(self, model, image: ImageEncoderOutput, beam_size: int, max_length: int,
                    all_beams: bool = False) -> list[tuple[list[int], float]] | list[list[tuple[list[int], float]]]:
        """Keep the ``beam_size`` most likely partial captions (sum of word log-probabilities) at every step.

        A finished hypothesis (it emitted the end token) stays in the beam with its score unchanged, competing with
        the unfinished ones. The search stops after ``max_length`` steps, or as soon as every image's best finished
        hypothesis scores at least as high as its best unfinished one (scores only fall, so that one has won), and
        returns the best-scoring hypothesis. No length normalisation: with beam_size = 1 this is exactly greedy
        decoding.

        Returns:
            per image (token ids without the end token, total log-probability); with ``all_beams``, per image the
            list of every hypothesis left in the beam (at most ``beam_size``), best first.
        """
        end_index = self._end_index(model)
        num_images, vocab_size = image.tokens.shape[0], model.vocabulary.numel()
        if beam_size > vocab_size:
            raise ValueError(f"captioning: beam_size={beam_size} > vocabulary size {vocab_size}")
        device = model.device
        rows = torch.arange(num_images, device=device).repeat_interleave(beam_size)          # (B*K,)
        generated = torch.zeros(num_images * beam_size, 0, dtype=torch.long, device=device)
        scores = torch.full((num_images, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0                       # all beams start identical: expand only the first one
        finished = torch.zeros(num_images * beam_size, dtype=torch.bool, device=device)
        for _ in range(max_length):
            log_probs = self.next_word_logits(model, image, rows, generated).log_softmax(dim=1)   # (B*K, V)
            # a finished hypothesis has one continuation, the end token, at no cost
            log_probs[finished] = float("-inf")
            log_probs[finished, end_index] = 0.0
            candidates = (scores.view(-1, 1) + log_probs).view(num_images, beam_size * vocab_size)
            scores, flat = candidates.topk(beam_size, dim=1)                                   # (B, K)
            source = (torch.arange(num_images, device=device)[:, None] * beam_size
                      + torch.div(flat, vocab_size, rounding_mode="floor")).flatten()
            index = (flat % vocab_size).flatten()
            generated = torch.cat([generated[source], model.vocabulary[index][:, None]], dim=1)
            finished = finished[source] | (index == end_index)
            # Log-probabilities are <= 0, so a hypothesis' score can only fall: once an image's best finished
            # hypothesis scores at least as high as its best unfinished one, no continuation can overtake it.
            done = finished.view(num_images, beam_size)
            best_finished = scores.masked_fill(~done, float("-inf")).max(dim=1).values
            best_open = scores.masked_fill(done, float("-inf")).max(dim=1).values
            if bool((best_finished >= best_open).all()):
                break
        if all_beams:
            order = scores.argsort(dim=1, descending=True)
            return [[(self._until_end(model, generated[b * beam_size + k]), float(scores[b, k]))
                     for k in order[b].tolist() if math.isfinite(float(scores[b, k]))]
                    for b in range(num_images)]
        best = scores.argmax(dim=1)
        winners = torch.arange(num_images, device=device) * beam_size + best
        return [(self._until_end(model, generated[w]), float(scores[b, best[b]]))
                for b, w in enumerate(winners.tolist())]

    @staticmethod
    def _until_end(model, token_ids: torch.Tensor) -> list[int]:
        end = end_token_id(model.text_encoder.tokenizer)
        tokens = token_ids.tolist()
        return tokens[:tokens.index(end)] if end in tokens else tokens

    @torch.no_grad()
    def generate(self, model, images: torch.Tensor, padding_mask: torch.Tensor | None,
                 beam_size: int | None = None, max_length: int | None = None, all_beams: bool = False) -> list[dict]:
        """Caption B images.

        Args:
            images: (B, 3, H, W) normalised; padding_mask: (B, H, W) bool or None.
            beam_size: default ``tasks.captioning.beam_size`` (1 = greedy).
            max_length: maximum number of generated tokens; default ``tasks.captioning.max_length``.
            all_beams: also return every hypothesis the search ended with (``beam_size`` of them; one for greedy).

        Returns:
            per image {"caption": str, "token_ids": list[int] (without the end token), "score": float, the sum of
            the chosen tokens' log-probabilities}; with ``all_beams`` also "beams": a list of such dicts, best
            first (the first is the caption itself).
        """
        beam_size = self.config.beam_size if beam_size is None else beam_size
        max_length = self.config.max_length if max_length is None else max_length
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"captioning: beam_size ({beam_size}) and max_length ({max_length}) must be >= 1")
        image = model.encode_images(images, padding_mask)
        tokenizer = model.text_encoder.tokenizer

        def described(tokens: list[int], score: float) -> dict:
            return {"caption": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "token_ids": tokens,
                    "score": score}

        if beam_size == 1:
            hypotheses = [[hypothesis] for hypothesis in self.greedy(model, image, max_length)]
        else:
            hypotheses = self.beam_search(model, image, beam_size, max_length, all_beams=True)
        results = []
        for beams in hypotheses:
            result = described(*beams[0])
            if all_beams:
                result["beams"] = [described(*beam) for beam in beams]
            results.append(result)
        return results

    def predict(self, model, batch: CaptioningTaskBatch) -> list[dict]:
        """Generated captions with the batch's image ids: per image {"image_id", "caption", "token_ids", "score"}
        (``evaluation.captioning`` scores "caption" against the references)."""
        results = self.generate(model, batch.images, batch.padding_mask)
        return [{"image_id": image_id, **result} for image_id, result in zip(batch.image_ids, results)]
