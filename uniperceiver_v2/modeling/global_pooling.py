"""Global representations of the image, v2 eq. (3) (Sec. 4.1):

    q^global = Concat( {AttnPool_i(F_L)}_{i=1}^{M'}, Flatten(F_L) )                                    (3)

F_L is the backbone's last-scale map (stride 32: the deepest map the backbone itself produces, the one CLIP's
attention pooling [27] reads). It is projected to d by its own 1x1 conv + GroupNorm and carries the 2-D sine
position embedding, so that both the pooled and the flattened tokens know where they come from. Padding positions
(padded batches) are masked out of the pooling and flagged in the token padding mask.

Each of the M' attention poolings (``num_global_pools``, 10 in the paper) is a separately parameterised,
CLIP-style multi-head attention with a single learned query: its own key, value and output projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from uniperceiver_v2.modeling.backbone import group_norm
from uniperceiver_v2.modeling.position_encoding import sine_position_embedding

GLOBAL_POOLED, GLOBAL_FLATTENED = 0, 1          # token types of v2 eq. (3)'s two parts


class GlobalAttentionPooling(nn.Module):
    """M' independent attention poolings, each a learned query attending over the tokens of a map.

    For pool m with query q_m and head k of dimension c = d / heads:
        attn_m = softmax_n( (q_m W^q)_k . ((x_n + p_n) W^k_m)_k / sqrt(c) )      over the unpadded positions n
        out_m  = W^o_m concat_k( sum_n attn_m[k, n] (x_n W^v_m)_k )
    (W^q is folded into the learned query.) All M' pools run in one batched einsum.
    """

    def __init__(self, dim: int, num_pools: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"image_encoder.hidden_dim={dim} must be divisible by image_encoder.nheads={num_heads}")
        self.dim, self.num_pools, self.num_heads = dim, num_pools, num_heads
        scale = dim ** -0.5
        self.query = nn.Parameter(torch.randn(num_pools, dim) * scale)
        self.key_weight = nn.Parameter(torch.randn(num_pools, dim, dim) * scale)
        self.key_bias = nn.Parameter(torch.zeros(num_pools, dim))
        self.value_weight = nn.Parameter(torch.randn(num_pools, dim, dim) * scale)
        self.value_bias = nn.Parameter(torch.zeros(num_pools, dim))
        self.out_weight = nn.Parameter(torch.randn(num_pools, dim, dim) * scale)
        self.out_bias = nn.Parameter(torch.zeros(num_pools, dim))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: (B, n, d) map tokens; pos: (B, n, d) their position embeddings; padding_mask: (B, n) True = padding.

        Returns:
            pooled (B, M', d), attention weights (B, M', n) averaged over heads.
        """
        batch, n, _ = tokens.shape
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        keys = torch.einsum("bnd,med->bmne", tokens + pos, self.key_weight) + self.key_bias[None, :, None]
        values = torch.einsum("bnd,med->bmne", tokens, self.value_weight) + self.value_bias[None, :, None]
        keys = keys.view(batch, self.num_pools, n, heads, head_dim)
        values = values.view(batch, self.num_pools, n, heads, head_dim)
        query = self.query.view(self.num_pools, heads, head_dim)
        logits = torch.einsum("mkc,bmnkc->bmkn", query, keys) / math.sqrt(head_dim)       # (B, M', heads, n)
        logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = logits.softmax(-1)
        pooled = torch.einsum("bmkn,bmnkc->bmkc", attn, values).reshape(batch, self.num_pools, self.dim)
        pooled = torch.einsum("bmd,med->bme", pooled, self.out_weight) + self.out_bias
        return pooled, attn.mean(2)


class GlobalRepresentations(nn.Module):
    """v2 eq. (3): the M' attention-pooled tokens followed by the flattened, projected map F_L."""

    def __init__(self, in_channels: int, hidden_dim: int, num_pools: int, num_heads: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 1), group_norm(hidden_dim))
        self.pools = GlobalAttentionPooling(hidden_dim, num_pools, num_heads) if num_pools > 0 else None

    def forward(self, feature: torch.Tensor, padding_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Args:
            feature: F_L, (B, C, h, w) backbone map; padding_mask: (B, h, w) True = padding.

        Returns:
            tokens (B, M' + h*w, d), token padding mask (B, M' + h*w), token types (B, M' + h*w) long
            (GLOBAL_POOLED then GLOBAL_FLATTENED), attention weights (B, M', h*w) or None when M' = 0.
        """
        x = self.proj(feature).flatten(2).transpose(1, 2)                                       # (B, hw, d)
        pos = sine_position_embedding(padding_mask, self.hidden_dim // 2).to(x.dtype).flatten(2).transpose(1, 2)
        mask = padding_mask.flatten(1)                                                          # (B, hw)
        tokens, padding = [x + pos], [mask]
        types = [torch.full_like(mask, GLOBAL_FLATTENED, dtype=torch.long)]
        weights = None
        if self.pools is not None:
            pooled, weights = self.pools(x, pos, mask)
            tokens.insert(0, pooled)
            padding.insert(0, mask.new_zeros(mask.shape[0], pooled.shape[1]))
            types.insert(0, torch.full_like(padding[0], GLOBAL_POOLED, dtype=torch.long))
        return torch.cat(tokens, 1), torch.cat(padding, 1), torch.cat(types, 1), weights
