"""Deformable Transformer encoder and decoder of the region proposal network (appendix A, after Mask DINO).

Shapes (B images, L levels, S = sum_l H_l * W_l encoder positions, Q decoder queries, d = hidden_dim, h heads,
P sampling points per head and level):

* the L projected maps F'_1..F'_L (strides 8, 16, 32, 64) are flattened and concatenated along S, each position
  carrying a sine position embedding plus a learned level embedding;
* the encoder refines them with multi-scale deformable self-attention (Deformable-DETR eq. (3), computed by
  ``uniperceiver_v2.ops.ms_deform_attn``): every position samples P points per level around its own location;
* the decoder runs self-attention among the queries, then deformable cross-attention around each query's
  reference box, and refines the box after every layer (iterative box refinement: each layer predicts a delta in
  logit space and the refined box, detached, is the next layer's reference).

Coordinates are normalised to the unpadded image. Because the maps of a padded batch are larger than each image's
valid region, Deformable-DETR's valid ratios (valid extent / map extent, per level) rescale reference points from
image coordinates to map coordinates before sampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniperceiver_v2.modeling.box_ops import inverse_sigmoid
from uniperceiver_v2.modeling.position_encoding import box_sine_embedding
from uniperceiver_v2.ops import ms_deform_attn


class MLP(nn.Module):
    """A stack of Linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def valid_ratios(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool padding mask (True = padding) -> (B, 2) (valid width / W, valid height / H)."""
    _, height, width = padding_mask.shape
    valid_h = (~padding_mask[:, :, 0]).sum(1).float()
    valid_w = (~padding_mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / width, valid_h / height], dim=-1)


def flatten_levels(features: list[torch.Tensor], padding_masks: list[torch.Tensor], positions: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate L maps along the sequence axis.

    Args:
        features: L tensors (B, d, H_l, W_l).
        padding_masks: L tensors (B, H_l, W_l), True = padding.
        positions: L tensors (B, d, H_l, W_l), position + level embeddings.

    Returns:
        src (B, S, d), padding_mask (B, S), pos (B, S, d), spatial_shapes (L, 2) long (H_l, W_l),
        level_start_index (L,) long, valid_ratios (B, L, 2).
    """
    shapes = torch.as_tensor([f.shape[-2:] for f in features], dtype=torch.long, device=features[0].device)
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    mask = torch.cat([m.flatten(1) for m in padding_masks], dim=1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) for p in positions], dim=1)
    level_start_index = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    ratios = torch.stack([valid_ratios(m) for m in padding_masks], dim=1)
    return src, mask, pos, shapes, level_start_index, ratios


class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR's multi-scale deformable attention module around ``ms_deform_attn``.

    Each query predicts, from its own features, P sampling offsets and attention weights per head and level;
    values are read by bilinear interpolation at (reference point + offset) and summed with the weights
    (softmax over the L * P points of a head).
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"image_encoder.hidden_dim={d_model} must be divisible by image_encoder.nheads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start at zero weight and a bias spreading head m's points along direction 2*pi*m/h, the k-th
        # point k+1 units away: before training, the heads look in different directions at growing distances.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                value_padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            query: (B, Lq, d).
            reference_points: (B, Lq, L, 2) points (x, y) or (B, Lq, L, 4) boxes (cx, cy, w, h), in [0, 1] of each
                level's map (already multiplied by the valid ratios).
            value: (B, S, d) flattened maps.
            spatial_shapes: (L, 2) long; level_start_index: (L,) long.
            value_padding_mask: (B, S) bool, True = padding (those values are zeroed).

        Returns:
            output (B, Lq, d), sampling_locations (B, Lq, h, L, P, 2), attention_weights (B, Lq, h, L, P).
        """
        batch, num_queries, _ = query.shape
        head_dim = self.d_model // self.n_heads
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.n_heads, head_dim)
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.n_heads, self.n_levels,
                                                    self.n_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads,
                                                     self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l) to get normalised units.
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(query.dtype)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box: the k-th point of a head reaches at most ~k/P half-box sizes.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points: last dimension must be 2 or 4, got {reference_points.shape[-1]}")
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output), locations, weights


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout, with residual and post-LayerNorm (DETR family)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, padding_mask: torch.Tensor
                ) -> torch.Tensor:
        """src, pos: (B, S, d); reference_points: (B, S, L, 2) -> (B, S, d)."""
        attended, _, _ = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                        padding_mask)
        return self.ffn(self.norm(src + self.dropout(attended)))


class DeformableEncoder(nn.Module):
    """A stack of deformable self-attention layers over all levels: F'_1..F'_L -> F^enc_1..F^enc_L."""

    def __init__(self, num_layers: int, d_model: int, dim_feedforward: int, dropout: float, n_levels: int,
                 n_heads: int, n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads,
                                                           n_points) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Every position's centre as a reference point on every level.

        A pixel centre is first normalised by its level's *valid* extent (its location in the unpadded image),
        then multiplied by each level's valid ratio to address the same image location on that level's map.

        Args:
            spatial_shapes: (L, 2) long; valid_ratios: (B, L, 2).

        Returns:
            (B, S, L, 2) points (x, y).
        """
        points = []
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5, indexing="ij")
            ys = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
            xs = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack([xs, ys], -1))                          # (B, H_l W_l, 2)
        points = torch.cat(points, 1)                                         # (B, S, 2)
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor, padding_mask: torch.Tensor
                ) -> torch.Tensor:
        """src, pos: (B, S, d); valid_ratios: (B, L, 2); padding_mask: (B, S) -> memory (B, S, d)."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return out


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (masked for denoising groups), deformable cross-attention, FFN."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.n_heads = n_heads
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_boxes: torch.Tensor,
                memory: torch.Tensor, memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, self_attn_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt, query_pos: (B, Q, d); reference_boxes: (B, Q, L, 4); memory: (B, S, d);
            self_attn_mask: (B, Q, Q) bool, True = query i may not attend to query j; None = no mask.

        Returns:
            tgt (B, Q, d), sampling locations (B, Q, h, L, P, 2).
        """
        q = k = tgt + query_pos
        mask = None if self_attn_mask is None else self_attn_mask.repeat_interleave(self.n_heads, dim=0)
        # need_weights=True takes MultiheadAttention's written-out path: on the CPU under bf16 autocast the fused
        # kernel it uses otherwise is ~6x slower for these short query sets (python -m uniperceiver_v2.bench attention)
        attended = self.self_attn(q, k, tgt, attn_mask=mask, need_weights=True, average_attn_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended, locations, _ = self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes,
                                                 level_start_index, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt), locations


class DeformableDecoder(nn.Module):
    """Deformable decoder with iterative box refinement (Deformable-DETR Sec. 4.1 / DINO).

    The query positional embedding is an MLP of the sine embedding of the current reference box (DINO). After
    every layer the box head predicts a delta in logit space: box_i = sigmoid(delta_i + logit(ref_i)); box_i is
    that layer's prediction (it receives gradient through delta_i only) and, detached, the next reference.
    """

    def __init__(self, num_layers: int, d_model: int, dim_feedforward: int, dropout: float, n_levels: int,
                 n_heads: int, n_points: int):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads,
                                                           n_points) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, reference_boxes: torch.Tensor, memory: torch.Tensor,
                memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                valid_ratios: torch.Tensor, box_head: nn.Module, self_attn_mask: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """
        Args:
            tgt: (B, Q, d) content queries.
            reference_boxes: (B, Q, 4) initial boxes, cxcywh in [0, 1] of the unpadded image (no gradient needed).
            memory: (B, S, d) encoder output; memory_padding_mask: (B, S).
            valid_ratios: (B, L, 2).
            box_head: maps (B, Q, d) normalised hidden states to (B, Q, 4) box deltas in logit space (shared with
                the query selection, as in Mask DINO; the proposal network owns it).
            self_attn_mask: (B, Q, Q) bool, True = blocked.

        Returns:
            hidden states: one (B, Q, d) per layer, after the final LayerNorm (the input of the prediction heads),
            boxes: one (B, Q, 4) per layer,
            sampling locations of the last layer (B, Q, h, L, P, 2).
        """
        hidden, boxes = [], []
        reference = reference_boxes.detach()
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]        # (B, 1, L, 4)
        out, locations = tgt, None
        for layer in self.layers:
            reference_input = reference[:, :, None] * ratios                 # (B, Q, L, 4)
            query_pos = self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], self.d_model // 2))
            out, locations = layer(out, query_pos, reference_input, memory, memory_padding_mask, spatial_shapes,
                                   level_start_index, self_attn_mask)
            normed = self.norm(out)
            refined = (box_head(normed) + inverse_sigmoid(reference)).sigmoid()
            hidden.append(normed)
            boxes.append(refined)
            reference = refined.detach()
        return hidden, boxes, locations
