"""The unified decoder g of Uni-Perceiver v2 (paper Sec. 4.3, appendix B), readable top to bottom.

Every task is "find the candidate target y most similar to the input x" (v2 eq. (5)-(6)):

    P(x, y) ~ exp(cos(g(f(x)), g(f(y))) / tau)

where f is the image or text encoder and g this decoder: a pre-norm Transformer shared by all tasks and
modalities (BERT-base width, 6 layers in the paper presets), with stochastic depth 0.1, no layer scale, and the
attribute-routed Conditional MoE in every FFN (``modeling/moe.py``). The input of g is a sequence built by the
helpers below: ``[<SPE>, image tokens and/or text tokens]``, each token projected to the decoder width, layer-
normalised and tagged with a type embedding (``TOKEN_TYPES``); text tokens also get a learned position embedding.

The LayerNorm after each projection follows the v1 paper, whose modality tokenizers are a linear projection with a
layer norm (its prompt-tuning appendix tunes the "layer normalization weights and biases in each Transformer layer
and tokenizer"). It keeps the decoder's input at a fixed scale whatever the scale of the encoder features, which
changes while an encoder trained from scratch learns.

Shapes: B sequences, T tokens, width d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_v2.config import DecoderConfig
from uniperceiver_v2.modeling.attention_masks import combine_masks
from uniperceiver_v2.modeling.moe import (
    ConditionalGate,
    GateDecision,
    GateRecord,
    MoELinear,
    TokenConditions,
    merge_experts,
    unmerge_experts,
)

__all__ = [
    "TOKEN_TYPES",
    "Attention",
    "Block",
    "DecoderOutput",
    "DropPath",
    "LogitScale",
    "MoEFFN",
    "UnifiedDecoder",
]

# Type embedding of every token (v1 appendix A adds a modality embedding to each token; v2 tells apart the two
# kinds of image tokens of v2 eq. (1): global (v2 eq. (3)) and regional (v2 eq. (2))).
TOKEN_TYPES = {"spe": 0, "image_global": 1, "image_regional": 2, "text": 3}

# Layer-scale initial value when decoder.layer_scale is enabled (CaiT's value for networks of <= 18 layers).
LAYER_SCALE_INIT = 0.1


@dataclass
class DecoderOutput:
    """Attributes:
        hidden: (B, T, d) output of every token, after the final LayerNorm.
        aux_loss: scalar, the MoE load-balancing loss summed over layers and multiplied by
            ``decoder.moe.balance_loss_weight`` (0 for routings without it): add it to the task loss.
        gates: with ``record_gates=True``, one dict per layer {"attn": GateRecord, "ffn": GateRecord} holding the
            layer's MoE gate decisions (only the MoE sub-layers appear); else None.
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    gates: list[dict[str, GateRecord]] | None


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a whole sample with probability p and scale the
    kept ones by 1 / (1 - p); identity at evaluation."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) a residual branch."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT); only used when decoder.layer_scale is true."""

    def __init__(self, dim: int, init: float = LAYER_SCALE_INIT):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LogitScale(nn.Module):
    """The learnable 1 / tau of v2 eq. (6), stored as log(1 / tau) (as CLIP does) so it stays positive.

    Initialised to 1 / temperature_init (1 / 0.07); clipped at ``maximum`` (100) when used, so the gradient
    stops pushing it past the clip.
    """

    def __init__(self, temperature_init: float, maximum: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.maximum = maximum

    def forward(self) -> torch.Tensor:
        """Returns the scalar logit scale 1 / tau."""
        return self.log_scale.exp().clamp(max=self.maximum)


def _linear(layer: nn.Module, x: torch.Tensor, decision: GateDecision | None) -> torch.Tensor:
    """Apply a dense Linear or an expert bank to x (B, T, d_in) -> (B, T, d_out)."""
    if decision is None:
        return layer(x)
    B, T, _ = x.shape
    return layer(x.reshape(B * T, -1), decision).reshape(B, T, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) masked) v, as ``F.scaled_dot_product_attention`` computes it.

    q, k, v: (B, heads, T, d_head); mask: (B or 1, 1, T, T) bool, True = may attend, or None. A query that may
    attend to nothing gets zeros, as from ``scaled_dot_product_attention``.

    On the CPU in bfloat16 / float16 (under autocast) the scores are formed explicitly, with the softmax in float32:
    PyTorch's fused CPU kernel is several times slower there than in float32 for the decoder's short sequences
    (``python -m uniperceiver_v2.bench attention``; docs/benchmarks.md, "Training speed").
    Elsewhere the fused kernel is used.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return written_out_attention(q, k, v, mask, dropout_p)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`attention` with the scores formed explicitly and the softmax in float32 (or float64 for float64)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                                # (B, h, T, T)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)               # rows with no key
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention. With ``"attn"`` in decoder.moe.placement the qkv and output projections are
    expert banks; the output projection reuses the qkv projection's gate decision."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        width = cfg.width
        if cfg.moe.routing != "none" and "attn" in cfg.moe.placement:
            self.gate = ConditionalGate(width, cfg.moe)
            self.qkv = MoELinear(cfg.moe.num_experts, width, 3 * width, cfg.moe.mix_per_condition)
            self.proj = MoELinear(cfg.moe.num_experts, width, width, cfg.moe.mix_per_condition)
        else:
            self.gate = None
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                conditions: TokenConditions) -> tuple[torch.Tensor, GateDecision | None]:
        """x: (B, T, d); mask: (B or 1, 1, T, T) bool, True = may attend, or None = attend everywhere.

        Returns (B, T, d) and the gate decision (None without MoE)."""
        B, T, d = x.shape
        decision = self.gate(x, conditions) if self.gate is not None else None
        q, k, v = _linear(self.qkv, x, decision).split(d, dim=-1)                      # (B, T, d) each
        # (B, T, d) -> (B, heads, T, d / heads)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)          # (B, h, T, d / h)
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.proj_dropout(_linear(self.proj, y, decision)), decision


class MoEFFN(nn.Module):
    """The feed-forward network Linear(d, ffn) -> GELU -> Linear(ffn, d). With ``"ffn"`` in decoder.moe.placement
    (and a routing other than "none") each Linear is an expert bank and both read one gate decision, so the
    re-parameterisation of data-independent routings is exact (docs/design.md, "Conditional MoE")."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.moe.routing != "none" and "ffn" in cfg.moe.placement:
            self.gate = ConditionalGate(cfg.width, cfg.moe)
            self.fc1 = MoELinear(cfg.moe.num_experts, cfg.width, cfg.ffn_dim, cfg.moe.mix_per_condition)
            self.fc2 = MoELinear(cfg.moe.num_experts, cfg.ffn_dim, cfg.width, cfg.moe.mix_per_condition)
        else:
            self.gate = None
            self.fc1 = nn.Linear(cfg.width, cfg.ffn_dim)
            self.fc2 = nn.Linear(cfg.ffn_dim, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor,
                conditions: TokenConditions) -> tuple[torch.Tensor, GateDecision | None]:
        """x: (B, T, d) -> (B, T, d) and the gate decision (None without MoE)."""
        decision = self.gate(x, conditions) if self.gate is not None else None
        if decision is not None and self.fc1.merged:
            # re-parameterised: each condition's tokens go through their own dense FFN in one piece, so the
            # (N, ffn_dim) hidden activations are never gathered or scattered
            B, T, d = x.shape
            w1, w2 = self.fc1.merged_parameters(decision), self.fc2.merged_parameters(decision)
            y = decision.groups.apply(x.reshape(B * T, d),
                                      lambda x_u, u: F.linear(F.gelu(F.linear(x_u, *w1[u])), *w2[u]))
            return self.dropout(y.reshape(B, T, d)), decision
        h = F.gelu(_linear(self.fc1, x, decision))
        return self.dropout(_linear(self.fc2, h, decision)), decision


class Block(nn.Module):
    """Pre-norm Transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x)))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.ffn = MoEFFN(cfg)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                conditions: TokenConditions) -> tuple[torch.Tensor, dict[str, GateDecision]]:
        """x: (B, T, d) -> (B, T, d) and the MoE decisions of this block by sub-layer name."""
        a, attn_decision = self.attn(self.ln1(x), mask, conditions)
        x = x + self.drop_path(self.ls1(a))
        f, ffn_decision = self.ffn(self.ln2(x), conditions)
        x = x + self.drop_path(self.ls2(f))
        decisions = {"attn": attn_decision, "ffn": ffn_decision}
        return x, {name: d for name, d in decisions.items() if d is not None}


class UnifiedDecoder(nn.Module):
    """The modality-agnostic decoder g (v2 eq. (6)) with the embeddings that turn encoder features into its input.

    Args:
        cfg: the ``decoder`` config.
        image_dim: width of the image encoder's tokens (v2 eq. (1), e.g. 256).
        text_dim: width of the text encoder's features (v2 eq. (4), e.g. 384 MiniLM / 768 RoBERTa).
    """

    def __init__(self, cfg: DecoderConfig, image_dim: int, text_dim: int):
        super().__init__()
        if cfg.width % cfg.heads != 0:
            raise ValueError(f"decoder.width={cfg.width} must be divisible by decoder.heads={cfg.heads}")
        self.cfg = cfg
        self.image_proj = nn.Linear(image_dim, cfg.width)
        self.image_norm = nn.LayerNorm(cfg.width)
        self.text_proj = nn.Linear(text_dim, cfg.width)
        self.text_norm = nn.LayerNorm(cfg.width)
        self.type_embed = nn.Embedding(len(TOKEN_TYPES), cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.spe_token = nn.Parameter(torch.zeros(cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.apply(self._init_weights)
        nn.init.normal_(self.spe_token, std=0.02)
        self._register_load_state_dict_pre_hook(self._drop_obsolete_keys)

    # Weights that decoders saved before 2026-12-03 carry and this one does not have: a default logit scale that
    # no task used (the model keeps one ``LogitScale`` per task group). Loading such a checkpoint ignores them.
    OBSOLETE_KEYS = ("logit_scale.log_scale",)

    def _drop_obsolete_keys(self, state_dict, prefix, *args) -> None:
        for key in self.OBSOLETE_KEYS:
            state_dict.pop(prefix + key, None)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT-style initialisation; the decoder is trained from scratch (Sec. 5.2)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def width(self) -> int:
        return self.cfg.width

    # -- building the input sequence ---------------------------------------------------------------------------
    def _positions(self, positions: torch.Tensor | None, batch: int, length: int,
                   device: torch.device) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(length, device=device)
        positions = positions.expand(batch, length) if positions.dim() == 1 else positions
        if tuple(positions.shape) != (batch, length):
            raise ValueError(f"positions: expected ({length},) or ({batch}, {length}), got {tuple(positions.shape)}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= self.cfg.max_positions):
            raise ValueError(f"positions: values must be in [0, decoder.max_positions={self.cfg.max_positions}), "
                             f"got max {int(positions.max())}")
        return positions

    def embed_image(self, tokens: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        """Image tokens (v2 eq. (1)) into the decoder: LayerNorm(Linear(image_dim -> d)) + type embedding.

        Args:
            tokens: (B, N, image_dim) global and / or regional image tokens.
            token_types: (B, N) or (N,) long, ``TOKEN_TYPES["image_global"]`` or ``["image_regional"]``.

        Returns:
            (B, N, d).
        """
        allowed = (TOKEN_TYPES["image_global"], TOKEN_TYPES["image_regional"])
        if not bool(((token_types == allowed[0]) | (token_types == allowed[1])).all()):
            raise ValueError(f"token_types: image tokens must be image_global ({allowed[0]}) or image_regional "
                             f"({allowed[1]})")
        return self.image_norm(self.image_proj(tokens)) + self.type_embed(token_types)

    def embed_text(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (v2 eq. (4)) into the decoder: LayerNorm(Linear(text_dim -> d)) + type + position embeddings.

        Args:
            features: (B, L, text_dim) text encoder outputs.
            positions: (L,) or (B, L) long position of each token; default 0..L-1.

        Returns:
            (B, L, d).
        """
        B, L, _ = features.shape
        positions = self._positions(positions, B, L, features.device)
        text_type = self.type_embed.weight[TOKEN_TYPES["text"]]
        return self.text_norm(self.text_proj(features)) + text_type + self.pos_embed(positions)

    def spe(self, batch: int, n: int = 1, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``<SPE>`` tokens: the learned ``<SPE>`` embedding + its type embedding (+ a position embedding when
        ``positions`` is given: the captioning ``<SPE>`` that predicts word i takes the position of word i).

        Args:
            batch: B.
            n: number of ``<SPE>`` tokens per sequence.
            positions: (n,) or (B, n) long, or None for no position embedding.

        Returns:
            (B, n, d).
        """
        x = (self.spe_token + self.type_embed.weight[TOKEN_TYPES["spe"]]).expand(batch, n, self.width)
        if positions is not None:
            x = x + self.pos_embed(self._positions(positions, batch, n, x.device))
        return x

    # -- the decoder ---------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
        record_gates: bool = False,
    ) -> DecoderOutput:
        """Run g on embedded sequences.

        Args:
            x: (B, T, d) embedded tokens (``spe`` / ``embed_image`` / ``embed_text``, concatenated).
            attn_mask: (T, T) or (B, T, T) bool, True = may attend (``attention_masks``); None = bidirectional.
            key_padding_mask: (B, T) bool, True = padding.
            attributes: (B, T, 8) token attributes (``attributes.token_attributes``); needed by attribute routing.
            modality_ids: (B, T) long (``attributes.MODALITY_IDS``); needed by modality routing.
            task_id: (B,) long (``attributes.TASK_IDS``); needed by task routing.
            record_gates: keep every MoE gate decision in the output (for visualisation).

        Returns:
            ``DecoderOutput`` (hidden (B, T, d), aux_loss scalar, gates or None).
        """
        B, T, d = x.shape
        if d != self.width:
            raise ValueError(f"x: expected width decoder.width={self.width}, got {tuple(x.shape)}; embed the "
                             f"tokens with spe / embed_image / embed_text first")
        # every query keeps itself visible, so no attention row is empty (an empty row gives NaN)
        mask = combine_masks(attn_mask, key_padding_mask)
        mask = mask[:, None] if mask is not None else None                   # (B or 1, 1, T, T): all heads
        conditions = TokenConditions(key_padding_mask=key_padding_mask, modality_ids=modality_ids,
                                     task_id=task_id, attributes=attributes)
        aux_loss = x.new_zeros(())
        gates: list[dict[str, GateRecord]] | None = [] if record_gates else None
        for block in self.blocks:
            x, decisions = block(x, mask, conditions)
            for decision in decisions.values():
                aux_loss = aux_loss + decision.aux_loss
            if gates is not None:
                gates.append({name: decision.record(B, T) for name, decision in decisions.items()})
        return DecoderOutput(hidden=self.ln_f(x), aux_loss=aux_loss * self.cfg.moe.balance_loss_weight,
                             gates=gates)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor, logit_scale: LogitScale) -> torch.Tensor:
        """Logits of v2 eq. (6): cos(a_i, b_j) / tau.

        Args:
            a: (Na, d) decoder outputs of the inputs.
            b: (Nb, d) decoder outputs of the candidate targets.
            logit_scale: the task group's ``LogitScale`` (1 / tau).

        Returns:
            (Na, Nb).
        """
        scale = logit_scale()
        return scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()

    # -- re-parameterisation -------------------------------------------------------------------------------------
    def merge_experts(self) -> int:
        """Merge the experts of every data-independent MoE layer for inference (``moe.merge_experts``)."""
        return merge_experts(self)

    def unmerge_experts(self) -> None:
        unmerge_experts(self)
