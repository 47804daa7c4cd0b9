"""Uni-Perceiver v2: the image encoder, the text encoder and the unified decoder assembled into one model.

    P(x, y) ~ exp(cos(g(f(x)), g(f(y))) / tau)                                           (v2 eq. (6))

``UniPerceiverV2`` owns the three networks (f_image, f_text, g), one learnable temperature per task group, and the
vocabulary of the language tasks. It knows how to turn images and texts into ``<SPE>`` representations
g(f(.)) of input and target sequences; each task (``uniperceiver_v2.tasks``) decides which sequences to build and
which candidates to compare. There are no task-specific heads.

Temperatures. One learnable logit scale per task group, initialised to 1 / 0.07 and clipped at 100 (as in CLIP).
The model keeps one ``LogitScale`` (1 / tau) per task group (``LOGIT_SCALE_GROUPS``) in ``logit_scales`` and passes
the group's scale to ``decoder.similarity``.

Candidate-target cache. Class-name and vocabulary embeddings are computed once per call in training (they change
with every step). In evaluation mode they are cached, detached, keyed by (task, candidate list); the cache is
cleared whenever the model switches mode (``train()`` <-> ``eval()``), loads a state dict or gets a new vocabulary.
Updating the weights while staying in evaluation mode (unusual) requires ``clear_target_cache()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from uniperceiver_v2.config import Config
from uniperceiver_v2.modeling.decoder_inputs import build_sequence, image_segment, spe_segment, text_segment
from uniperceiver_v2.modeling.image_encoder import ImageEncoder, ImageEncoderOutput
from uniperceiver_v2.modeling.text_encoder import TextEncoder
from uniperceiver_v2.modeling.unified_decoder import LogitScale, UnifiedDecoder
from uniperceiver_v2.tasks.vocabulary import encode_sharded, full_vocabulary

__all__ = ["LOGIT_SCALE_GROUPS", "UniPerceiverV2"]

# One temperature per task group; the two retrieval directions share one.
LOGIT_SCALE_GROUPS = ("classification", "detection", "captioning", "mlm", "retrieval")


def _logit_scale_group(task: str) -> str:
    group = "retrieval" if task.startswith("retrieval") else task
    if group not in LOGIT_SCALE_GROUPS:
        raise ValueError(f"no logit scale for task {task!r}; groups are {LOGIT_SCALE_GROUPS}")
    return group


class UniPerceiverV2(nn.Module):
    """The generalist model.

    Args:
        config: the full ``Config`` (``image_encoder``, ``text_encoder``, ``decoder`` and ``tasks`` are used here).
        text_encoder: an already built ``TextEncoder`` (e.g. a small random one in tests); default one built from
            ``config.text_encoder``.
        vocabulary: (V,) long token ids of the language tasks' candidate words (``tasks.vocabulary``); default
            every ordinary token of the tokenizer (``full_vocabulary``). Training scripts set the data vocabulary
            with ``set_vocabulary(build_vocabulary(...))`` before training.

    Attributes:
        image_encoder, text_encoder, decoder: f_image, f_text, g.
        logit_scales: ModuleDict group -> ``LogitScale`` (1 / tau of v2 eq. (6)).
        vocabulary: buffer (V,) long, saved with the weights.
    """

    def __init__(self, config: Config, text_encoder: TextEncoder | None = None,
                 vocabulary: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image_encoder)
        if config.run.sampling == "mixed" and self.image_encoder.criterion is not None:
            # ranks run different tasks in one micro-batch: no collective may sit inside a task's loss
            self.image_encoder.criterion.synchronize_counts = False
        self.text_encoder = text_encoder if text_encoder is not None else TextEncoder(config.text_encoder)
        self.decoder = UnifiedDecoder(config.decoder, self.image_encoder.output_dim, self.text_encoder.hidden_size)
        self.logit_scales = nn.ModuleDict({
            group: LogitScale(config.decoder.temperature_init, config.decoder.logit_scale_max)
            for group in LOGIT_SCALE_GROUPS})
        if vocabulary is None:
            vocabulary = full_vocabulary(self.text_encoder.tokenizer)
        self.register_buffer("vocabulary", self._check_vocabulary(vocabulary))
        self._target_cache: dict[tuple, torch.Tensor] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.decoder.spe_token.device

    @property
    def width(self) -> int:
        """d, the decoder width: the size of every representation g(f(.))."""
        return self.decoder.width

    def _check_vocabulary(self, vocabulary: torch.Tensor) -> torch.Tensor:
        vocabulary = torch.as_tensor(vocabulary, dtype=torch.long).flatten()
        if vocabulary.numel() == 0:
            raise ValueError("vocabulary: empty; build it with tasks.vocabulary.build_vocabulary")
        if int(vocabulary.min()) < 0 or int(vocabulary.max()) >= self.text_encoder.vocab_size:
            raise ValueError(f"vocabulary: token ids must be in [0, {self.text_encoder.vocab_size}) (the text "
                             f"encoder's tokenizer), got [{int(vocabulary.min())}, {int(vocabulary.max())}]")
        if vocabulary.unique().numel() != vocabulary.numel():
            raise ValueError("vocabulary: token ids must be unique")
        return vocabulary

    def set_vocabulary(self, token_ids: torch.Tensor) -> None:
        """Replace the language tasks' vocabulary (V,) long token ids; the buffer follows the model's device."""
        self.vocabulary = self._check_vocabulary(token_ids).to(self.device)
        self.clear_target_cache()

    def clear_target_cache(self) -> None:
        """Forget the cached candidate-target embeddings (see the module docstring)."""
        self._target_cache.clear()

    def train(self, mode: bool = True) -> UniPerceiverV2:
        if mode != self.training:
            self.clear_target_cache()
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that first resizes the vocabulary buffer to the saved one (its length is
        data-dependent) and clears the target cache."""
        saved = state_dict.get("vocabulary")
        if saved is not None and saved.shape != self.vocabulary.shape:
            self.vocabulary = torch.zeros_like(saved, device=self.device)
        self.clear_target_cache()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def logit_scale(self, task: str) -> torch.Tensor:
        """1 / tau of the task's group (scalar)."""
        return self.logit_scales[_logit_scale_group(task)]()

    def similarity(self, inputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
        """v2 eq. (6) logits cos(g(f(x)), g(f(y))) / tau_task.

        Args:
            inputs: (N, d) representations of the inputs; targets: (M, d) of the candidates.

        Returns:
            (N, M).
        """
        return self.decoder.similarity(inputs, targets, self.logit_scales[_logit_scale_group(task)])

    def forward(self, task, batch) -> dict[str, torch.Tensor]:
        """One training step's losses: ``task.loss(self, batch)`` (v2 eq. (7); see ``tasks.base.Task``).

        Going through ``forward`` lets ``DistributedDataParallel(model)(task, batch)`` prepare its gradient
        all-reduce; calling ``task.loss(model.module, batch)`` directly would bypass it.
        """
        return task.loss(self, batch)

    # -- encoders ------------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      targets: list[dict] | None = None) -> ImageEncoderOutput:
        """f_image (v2 eq. (1)). images (B, 3, H, W) normalised; padding_mask (B, H, W) True = padding."""
        return self.image_encoder(images, padding_mask, targets)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """The text encoder's tokenizer on this model's device: input_ids, attention_mask (B, L) long."""
        tokens = self.text_encoder.tokenize(list(texts), max_length)
        return {key: value.to(self.device) for key, value in tokens.items()}

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           causal: bool = False) -> torch.Tensor:
        """f_text (v2 eq. (4)) of token ids (B, L); attention_mask (B, L) 1 = token.

        With ``causal`` every token sees only itself and the tokens before it, so the feature of token i does not
        depend on tokens i+1.. (the caption words, see ``tasks/captioning.py``). The language model is
        bidirectional. The installed transformers (5.x) no longer expands a 3-D (B, L, L) mask, but passes a
        prepared 4-D mask (B, 1, L, L) through unchanged (``masking_utils._preprocess_mask_arguments``), so the
        causal mask is handed over as that additive mask (0 = may attend, dtype minimum = may not), which both the
        eager and the SDPA attention implementations accept.

        Returns:
            (B, L, text_dim).
        """
        if not causal:
            return self.text_encoder(input_ids, attention_mask)
        length = input_ids.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        allowed = allowed[None] & attention_mask.bool()[:, None, :]                      # (B, L, L)
        dtype = self.text_encoder.model.dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]       # (B, 1, L, L)
        return self.text_encoder(input_ids, additive)

    # -- g(f(.)): <SPE> representations of whole sequences -------------------------------------------------------
    def image_representations(self, image: ImageEncoderOutput, task: str, is_input: bool,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``<SPE>`` output of ``[<SPE>, image tokens]`` for every image.

        Args:
            image: f_image of B images.
            task: the attribute task ("classification", "retrieval_i2t", ...).
            is_input: input sequence (True) or candidate target (False).
            rows: (N,) long, optional selection / repetition of the B images.

        Returns:
            (N, d) representations and the decoder's MoE auxiliary loss (scalar).
        """
        tokens, types, padding = image.tokens, image.token_types, image.token_padding_mask
        if rows is not None:
            tokens, types, padding = tokens[rows], types[rows], padding[rows]
        segments = [spe_segment(self.decoder, tokens.shape[0]), image_segment(self.decoder, tokens, types, padding)]
        out = build_sequence(segments, task, is_input).run(self.decoder)
        return out.hidden[:, 0], out.aux_loss

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and encode texts (bidirectionally): features (N, L, text_dim), attention_mask (N, L) long."""
        tokens = self.tokenize(texts)
        return self.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"]), tokens["attention_mask"]

    def text_representations(self, texts: Sequence[str], task: str, is_input: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``<SPE>`` output of ``[<SPE>, f_text(text)]`` for every text (class names, captions).

        Returns:
            (N, d) representations and the MoE auxiliary loss (scalar).
        """
        return self.text_feature_representations(*self.encode_texts(texts), task, is_input)

    def text_feature_representations(self, features: torch.Tensor, attention_mask: torch.Tensor, task: str,
                                     is_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_representations`` from already encoded texts (``encode_texts``), to reuse one text-encoder pass
        for several sequences (the two retrieval directions).

        Args:
            features: (N, L, text_dim); attention_mask: (N, L), 1 = token.

        Returns:
            (N, d) and the MoE auxiliary loss.
        """
        segments = [spe_segment(self.decoder, features.shape[0]),
                    text_segment(self.decoder, features, attention_mask)]
        out = build_sequence(segments, task, is_input).run(self.decoder)
        return out.hidden[:, 0], out.aux_loss

    def word_representations(self, token_ids: torch.Tensor, task: str) -> torch.Tensor:
        """Candidate targets ``[<SPE>, word]``, each vocabulary token on its own (v1 Sec. 3.2).

        The word's feature is the text encoder's output for ``[CLS] word [SEP]`` at the word
        (``TextEncoder.encode_tokens``). Returns (V, d).
        """
        features = self.text_encoder.encode_tokens(token_ids)[:, None]                  # (V, 1, text_dim)
        ones = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        segments = [spe_segment(self.decoder, features.shape[0]), text_segment(self.decoder, features, ones)]
        return build_sequence(segments, task, is_input=False).run(self.decoder).hidden[:, 0]

    # -- candidate sets (cached at evaluation, sharded across ranks when distributed) ----------------------------
    def _shard_targets(self) -> bool:
        # Collectives inside a task are only safe when every rank runs the same task in the iteration.
        return self.config.run.sampling == "unmixed"

    def _cached(self, key: tuple, compute) -> torch.Tensor:
        if self.training:
            return compute()
        if key not in self._target_cache:
            with torch.no_grad():
                self._target_cache[key] = compute().detach()
        return self._target_cache[key]

    def class_name_embeddings(self, class_names: Sequence[str], task: str) -> torch.Tensor:
        """g(f(y)) of every class name y (``[<SPE>, name tokens]``), for classification or detection.

        Any list of names works (zero-shot): nothing is tied to the training classes. Computed once per call in
        training (all classes of the batch's dataset, then shared by the batch), cached at evaluation.

        Returns:
            (C, d).
        """
        names = tuple(str(name) for name in class_names)
        if not names:
            raise ValueError(f"{task}: the list of class names is empty")

        def representations(idx: torch.Tensor) -> torch.Tensor:
            subset = tuple(names[i] for i in idx.tolist())
            features, mask = self.text_encoder.target_features(("texts", subset), lambda: self.encode_texts(subset))
            return self.text_feature_representations(features, mask, task, is_input=False)[0]

        def compute() -> torch.Tensor:
            return encode_sharded(representations, len(names), self._shard_targets(), self.width,
                                  self.decoder.spe_token)

        return self._cached((task, "class_names", names), compute)

    def vocabulary_embeddings(self, task: str) -> torch.Tensor:
        """g(f(w)) of every word w of ``self.vocabulary`` for captioning or MLM; (V, d), row i = vocabulary[i]."""

        def compute() -> torch.Tensor:
            return encode_sharded(lambda idx: self.word_representations(self.vocabulary[idx], task),
                                  self.vocabulary.numel(), self._shard_targets(), self.width,
                                  self.decoder.spe_token)

        return self._cached((task, "vocabulary"), compute)

