"""The region proposal network and the regional representations of v2 eq. (2) / (9) (Sec. 4.1, appendix A).

A Mask-DINO-style detector with binary objectness instead of classes:

1. **Input levels.** The backbone maps at strides 8, 16, 32 are projected to d by 1x1 conv + GroupNorm; a 3x3
   stride-2 conv + GroupNorm on the raw stride-32 map adds stride 64 (``num_feature_levels = 4``; more levels add
   more stride-2 convs). These are the paper's F'_1..F'_4; F_0 (stride 4) only feeds the mask head.
2. **Deformable encoder** over the L levels -> memory F^enc (B, S, d).
3. **Query selection** (two-stage Deformable-DETR / DINO). Every encoder position predicts an objectness logit
   and a box ``sigmoid(delta + logit(anchor))`` around an anchor centred on the position with side 0.05 * 2^l on
   level l. The top-N positions by objectness give N reference boxes (detached) and N content queries:
   "the selected features are added to N randomly initialized object queries" (appendix A), i.e.
   ``content = selected memory (detached) + learned query embedding``. The top-N encoder predictions (objectness,
   box, and a mask from the same mask head) are supervised too ("at the outputs of Transformer encoder").
4. **Deformable decoder** with iterative box refinement; in training, contrastive denoising queries are placed in
   front of the N matching queries (``denoising.py``). Every layer predicts objectness, box and mask (v2 eq. (8)).
5. **Regional representations**, v2 eq. (2) = v2 eq. (9):
       q^proposal_j = q^sem_j + B(q^box_j) + M(q^mask_j)
   q^sem: the last decoder layer's (normalised) hidden state; B: Linear of the sine embedding of the box;
   M: Linear of the mask *probabilities* (sigmoid of the logits) average-pooled to ``mask_pool_size`` squared
   (28 x 28 in the paper) over the image's unpadded region. Box and mask are detached ("Note that the bounding box
   and segmentation mask representations are detached before fusing"), so the unified decoder's losses reach the
   proposal network only through q^sem. Probabilities rather than logits: pooled probabilities are the fraction of
   each cell covered by the object, bounded in [0, 1], whereas background logits have an arbitrary scale.
   Finally the top-O proposals by the last layer's objectness (``topk_queries``, O = 200) are kept.

If the maps have fewer positions S than ``num_queries`` (tiny test images), N = S; likewise O = min(O, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from uniperceiver_v2.config import ImageEncoderConfig
from uniperceiver_v2.modeling.backbone import group_norm
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from uniperceiver_v2.modeling.deformable_transformer import MLP, DeformableDecoder, DeformableEncoder, flatten_levels
from uniperceiver_v2.modeling.denoising import DenoisingQueries, build_denoising_queries
from uniperceiver_v2.modeling.mask_head import MaskHead
from uniperceiver_v2.modeling.position_encoding import box_sine_embedding, sine_position_embedding
from uniperceiver_v2.modeling.proposal_criterion import PredictionSet

ANCHOR_BASE_SIZE = 0.05         # query-selection anchor side on the stride-8 level, doubling per level (DINO)
ANCHOR_VALID_RANGE = (0.01, 0.99)   # anchors with a coordinate outside are not selectable (DINO)
OBJECTNESS_PRIOR = 0.01         # initial objectness probability (focal-loss initialisation, RetinaNet)


@dataclass
class RegionProposals:
    """What the proposal network returns.

    Top-O regional representations (the tokens of v2 eq. (1)):
        tokens (B, O, d) q^proposal of v2 eq. (2); boxes (B, O, 4) cxcywh normalised to the unpadded image;
        masks (B, O, Hm, Wm) logits at stride 4 of the padded image; objectness (B, O) logits;
        indices (B, O) positions of the kept proposals among the N decoder queries.
    All N proposals of the last decoder layer: all_boxes (B, N, 4), all_objectness (B, N).
    For the losses (only when targets are given): predictions {"enc", "dec0", ...}, denoising,
        denoising_predictions {"dn0", ...}.
    For visualisation: encoder_objectness one (B, H_l, W_l) map per level; sampling_locations (B, N, h, L, P, 2)
        of the last decoder layer's cross-attention; selected_positions (B, N) indices of the query-selection
        positions along S.
    """

    tokens: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    objectness: torch.Tensor
    indices: torch.Tensor
    all_boxes: torch.Tensor
    all_objectness: torch.Tensor
    encoder_objectness: list[torch.Tensor]
    sampling_locations: torch.Tensor
    selected_positions: torch.Tensor
    predictions: dict[str, PredictionSet] | None = None
    denoising: DenoisingQueries | None = None
    denoising_predictions: dict[str, PredictionSet] | None = None


def _roi_dtype(x: torch.Tensor) -> torch.Tensor:
    """float32 for roi_align under bfloat16 / float16 autocast; float64 stays (gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) gathered along dim 1 at index (B, N) -> (B, N, ...)."""
    expanded = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


class ProposalFusion(nn.Module):
    """v2 eq. (2) / (9): q^proposal = q^sem + B(box) + M(mask), with box and mask detached.

    Two options beyond the paper (``image_encoder.mask_pooling``, ``image_encoder.region_appearance_size``), for
    small images whose objects cover a few cells of the pooled mask:

    * ``mask_pooling="box"``: M pools the mask probabilities inside the proposal's (detached) box, RoI-aligned to
      ``mask_pool_size`` squared, instead of over the whole image; the pooled cells then draw the object's shape
      at any object size (the whole-image pooling also says where the object is, which B already says).
    * ``appearance_size=r > 0`` adds A(appearance): a stride-4 map RoI-aligned to r x r inside the detached box,
      flattened, through a Linear. The map is the mask head's per-pixel embedding (F_0 plus the encoder's stride-8
      map; ``region_appearance_source="pixel_embedding"``) or the backbone's F_0 itself (``"backbone"``, with
      ``appearance_channels`` its width): the mask loss trains the embedding to tell an object from its
      background, which it does without its colour, while F_0 keeps the colour. The map is not detached, so the
      naming, captioning and retrieval losses reach the backbone through what the region looks like and not only
      through q^sem's sampled points.
    """

    def __init__(self, hidden_dim: int, mask_pool_size: int, mask_pooling: str = "image",
                 appearance_size: int = 0, appearance_channels: int | None = None):
        super().__init__()
        if mask_pooling not in ("image", "box"):
            raise ValueError(f"ProposalFusion: mask_pooling={mask_pooling!r}, expected 'image' or 'box'")
        self.hidden_dim = hidden_dim
        self.mask_pool_size = mask_pool_size
        self.mask_pooling = mask_pooling
        self.appearance_size = appearance_size
        self.box_proj = nn.Linear(2 * hidden_dim, hidden_dim)                  # after the sine embedding (4 * d/2)
        self.mask_proj = nn.Linear(mask_pool_size * mask_pool_size, hidden_dim)
        channels = hidden_dim if appearance_channels is None else appearance_channels
        self.appearance_proj = (nn.Linear(channels * appearance_size * appearance_size, hidden_dim)
                                if appearance_size > 0 else None)

    def pool_masks(self, masks: torch.Tensor, valid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """masks (B, O, Hm, Wm) logits -> (B, O, s*s) probabilities average-pooled over each unpadded region."""
        probs = masks.sigmoid()
        pooled = [F.adaptive_avg_pool2d(probs[b, :, :h, :w], self.mask_pool_size)
                  for b, (h, w) in enumerate(valid_sizes)]
        return torch.stack(pooled).flatten(2)

    @staticmethod
    def roi_boxes(boxes: torch.Tensor, valid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """boxes (B, O, 4) cxcywh normalised to the unpadded image -> (B * O, 4) xyxy in cells of the stride-4 map."""
        scale = boxes.new_tensor([[w, h, w, h] for h, w in valid_sizes])                 # (B, 4)
        return (box_cxcywh_to_xyxy(boxes) * scale[:, None]).flatten(0, 1)

    def pool_masks_in_boxes(self, masks: torch.Tensor, boxes: torch.Tensor,
                            valid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """masks (B, O, Hm, Wm) logits -> (B, O, s*s) probabilities RoI-aligned inside each proposal's box."""
        batch, num = masks.shape[:2]
        probs = _roi_dtype(masks.sigmoid())
        rois = torch.cat([torch.arange(batch * num, device=masks.device, dtype=probs.dtype)[:, None],
                          self.roi_boxes(boxes, valid_sizes).to(probs.dtype)], dim=1)    # (B*O, 5), one map each
        pooled = roi_align(probs.flatten(0, 1)[:, None], rois, self.mask_pool_size,
                           sampling_ratio=2, aligned=True)                               # (B*O, 1, s, s)
        return pooled.view(batch, num, -1).to(masks.dtype)

    def appearance(self, pixel_embedding: torch.Tensor, boxes: torch.Tensor,
                   valid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """pixel_embedding (B, C, Hm, Wm), the stride-4 appearance map -> (B, O, d): A of its RoI-aligned r x r
        cells in each box."""
        batch, num = boxes.shape[:2]
        pixels = _roi_dtype(pixel_embedding)
        index = torch.arange(batch, device=boxes.device, dtype=pixels.dtype).repeat_interleave(num)[:, None]
        rois = torch.cat([index, self.roi_boxes(boxes, valid_sizes).to(pixels.dtype)], dim=1)   # (B*O, 5)
        pooled = roi_align(pixels, rois, self.appearance_size, sampling_ratio=2, aligned=True)
        return self.appearance_proj(pooled.flatten(1).to(pixel_embedding.dtype)).view(batch, num, -1)

    def forward(self, semantic: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                valid_sizes: list[tuple[int, int]], pixel_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            semantic: (B, O, d) q^sem; boxes: (B, O, 4) cxcywh; masks: (B, O, Hm, Wm) logits;
            valid_sizes: per image (rows, cols) of the mask map covering the unpadded image;
            pixel_embedding: (B, C, Hm, Wm) the stride-4 map A reads (needed with ``appearance_size``): the mask
                head's per-pixel embedding, or the backbone's F_0 (see the class docstring).

        Returns:
            (B, O, d) regional representations.
        """
        boxes, masks = boxes.detach(), masks.detach()
        box_code = self.box_proj(box_sine_embedding(boxes, self.hidden_dim // 2))
        pooled = (self.pool_masks(masks, valid_sizes) if self.mask_pooling == "image"
                  else self.pool_masks_in_boxes(masks, boxes, valid_sizes))
        tokens = semantic + box_code + self.mask_proj(pooled)
        if self.appearance_proj is not None:
            if pixel_embedding is None:
                raise ValueError("ProposalFusion: appearance_size > 0 needs the pixel embedding")
            tokens = tokens + self.appearance(pixel_embedding, boxes, valid_sizes)
        return tokens


class RegionProposalNetwork(nn.Module):
    """Backbone maps -> N class-agnostic proposals -> top-O regional representations (see the module docstring)."""

    def __init__(self, cfg: ImageEncoderConfig, backbone_channels: list[int]):
        super().__init__()
        if cfg.num_feature_levels < 3:
            raise ValueError(f"image_encoder.num_feature_levels={cfg.num_feature_levels}: the proposal network "
                             "needs >= 3 levels (strides 8, 16, 32; each further level adds a stride-2 conv)")
        self.cfg = cfg
        d = cfg.hidden_dim
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, 1), group_norm(d))
                                        for c in backbone_channels[1:4])
        extra_in = [backbone_channels[3]] + [d] * (cfg.num_feature_levels - 4)
        self.extra_levels = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, 3, stride=2, padding=1), group_norm(d))
                                          for c in extra_in[:cfg.num_feature_levels - 3])
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.encoder = DeformableEncoder(cfg.enc_layers, d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
                                         cfg.nheads, cfg.enc_n_points)
        self.decoder = DeformableDecoder(cfg.dec_layers, d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
                                         cfg.nheads, cfg.dec_n_points)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        # Heads shared by the encoder proposals and every decoder layer (Mask DINO).
        self.objectness_head = nn.Linear(d, 1)
        self.box_head = MLP(d, d, 4, 3)
        self.mask_head = MaskHead(backbone_channels[0], d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.denoising_content = nn.Embedding(2, d) if cfg.use_denoising and cfg.dn_num_queries > 0 else None
        self.fusion = ProposalFusion(d, cfg.mask_pool_size, cfg.mask_pooling, cfg.region_appearance_size,
                                     backbone_channels[0] if cfg.region_appearance_source == "backbone" else None)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.level_embed)
        for proj in list(self.input_proj) + list(self.extra_levels):
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.constant_(self.objectness_head.bias, -math.log((1 - OBJECTNESS_PRIOR) / OBJECTNESS_PRIOR))
        # Zero box deltas at initialisation: the first boxes are exactly the anchors / references.
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    # -- steps ---------------------------------------------------------------------------------------------------
    def input_levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone maps (strides 4..32) -> L maps (B, d, H_l, W_l) at strides 8, 16, 32, 64, ..."""
        levels = [proj(f) for proj, f in zip(self.input_proj, features[1:4])]
        x = features[3]
        for conv in self.extra_levels:
            x = conv(x)
            levels.append(x)
        return levels

    @staticmethod
    def anchors(padding_mask: torch.Tensor, spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One anchor box per encoder position, in the unpadded image's normalised coordinates.

        Args:
            padding_mask: (B, S) flattened padding mask; spatial_shapes: (L, 2).

        Returns:
            anchors (B, S, 4) in logit space (0 where invalid), valid (B, S) bool (inside the image, not padding).
        """
        boxes, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            mask = padding_mask[:, start:start + height * width].view(-1, height, width)
            valid_h = (~mask[:, :, 0]).sum(1).float().clamp(min=1)[:, None, None]
            valid_w = (~mask[:, 0, :]).sum(1).float().clamp(min=1)[:, None, None]
            ys, xs = torch.meshgrid(torch.arange(height, device=mask.device, dtype=torch.float32) + 0.5,
                                    torch.arange(width, device=mask.device, dtype=torch.float32) + 0.5,
                                    indexing="ij")
            cx, cy = xs[None] / valid_w, ys[None] / valid_h                         # (B, H, W)
            side = torch.full_like(cx, ANCHOR_BASE_SIZE * 2.0 ** level)
            boxes.append(torch.stack([cx, cy, side, side], -1).flatten(1, 2))
            start += height * width
        boxes = torch.cat(boxes, 1)
        low, high = ANCHOR_VALID_RANGE
        valid = ((boxes > low) & (boxes < high)).all(-1) & ~padding_mask
        return inverse_sigmoid(boxes).masked_fill(~valid[..., None], 0.0), valid

    def predict(self, hidden: torch.Tensor, pixel_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, Q, d) -> objectness (B, Q) logits, masks (B, Q, Hm, Wm) logits (v2 eq. (8))."""
        return self.objectness_head(hidden)[..., 0], self.mask_head(hidden, pixel_embedding)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, features: list[torch.Tensor], padding_mask: torch.Tensor,
                targets: list[dict] | None = None) -> RegionProposals:
        """
        Args:
            features: backbone maps F_0..F_3, (B, C_l, H/s, W/s) for s = 4, 8, 16, 32.
            padding_mask: (B, H, W) bool, True = padding, at the input resolution.
            targets: normalised targets (``box_ops.normalize_targets`` with the padded size) or None. When given,
                every prediction set needed by the losses is returned; denoising queries are added in training.
        """
        cfg, d = self.cfg, self.cfg.hidden_dim
        levels = self.input_levels(features)
        masks = [F.interpolate(padding_mask[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].bool()
                 for x in levels]
        positions = [sine_position_embedding(m, d // 2).to(x.dtype) + self.level_embed[level].view(1, -1, 1, 1)
                     for level, (x, m) in enumerate(zip(levels, masks))]
        src, mask_flat, pos_flat, shapes, starts, ratios = flatten_levels(levels, masks, positions)
        memory = self.encoder(src, pos_flat, shapes, starts, ratios, mask_flat)               # (B, S, d)

        # Query selection from the encoder output.
        anchors, anchor_valid = self.anchors(mask_flat, shapes)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~anchor_valid[..., None], 0.0)))
        enc_objectness = self.objectness_head(output_memory)[..., 0]                           # (B, S)
        enc_box_logits = self.box_head(output_memory) + anchors                                # (B, S, 4)
        num_queries = min(cfg.num_queries, memory.shape[1])
        selected = enc_objectness.masked_fill(~anchor_valid, float("-inf")).topk(num_queries, dim=1).indices
        enc_hidden = _gather(output_memory, selected)                                          # (B, N, d)
        enc_boxes = _gather(enc_box_logits, selected).sigmoid()                                # (B, N, 4)

        height1, width1 = shapes[0].tolist()
        stride8 = memory[:, :height1 * width1].transpose(1, 2).reshape(memory.shape[0], d, height1, width1)
        pixel_embedding = self.mask_head.pixel_embedding(features[0], stride8)                 # (B, d, Hm, Wm)

        # Decoder input: [denoising queries (training), matching queries].
        tgt = enc_hidden.detach() + self.query_embed.weight[None, :num_queries]
        reference = enc_boxes.detach()
        denoising = None
        if targets is not None and self.training and self.denoising_content is not None:
            denoising = build_denoising_queries(targets, num_queries, self.denoising_content.weight,
                                                cfg.dn_num_queries, cfg.dn_box_noise_scale, cfg.dn_label_noise_ratio)
        num_dn = 0 if denoising is None else denoising.num_queries
        if denoising is not None:
            tgt = torch.cat([denoising.content, tgt], dim=1)
            reference = torch.cat([denoising.boxes, reference], dim=1)
        hidden, boxes, locations = self.decoder(tgt, reference, memory, mask_flat, shapes, starts, ratios,
                                                self.box_head, None if denoising is None else denoising.attn_mask)

        # Predictions of the matching queries; every set the losses need when targets are given.
        matching = slice(num_dn, None)
        semantic = hidden[-1][:, matching]                                                     # q^sem (B, N, d)
        num_kept = min(cfg.topk_queries, num_queries)
        predictions = denoising_predictions = None
        if targets is not None:
            enc_masks = self.mask_head(enc_hidden, pixel_embedding)
            predictions = {"enc": PredictionSet(_gather(enc_objectness, selected), enc_boxes, enc_masks)}
            denoising_predictions = {} if denoising is not None else None
            for i, (h, b) in enumerate(zip(hidden, boxes)):
                layer_objectness, layer_masks = self.predict(h, pixel_embedding)
                layer = PredictionSet(layer_objectness, b, layer_masks)
                predictions[f"dec{i}"] = layer.select(matching)
                if denoising is not None:
                    denoising_predictions[f"dn{i}"] = layer.select(slice(0, num_dn))
            last = predictions[f"dec{len(hidden) - 1}"]
            final_objectness, final_boxes = last.objectness, last.boxes
            kept = final_objectness.topk(num_kept, dim=1).indices                             # (B, O)
            kept_masks = _gather(last.masks, kept)
        else:
            # Without losses only the kept proposals need masks (O of N dot products with the pixel map).
            final_objectness = self.objectness_head(semantic)[..., 0]
            final_boxes = boxes[-1][:, matching]
            kept = final_objectness.topk(num_kept, dim=1).indices
            kept_masks = self.mask_head(_gather(semantic, kept), pixel_embedding)

        # v2 eq. (2) on the top-O proposals by objectness.
        kept_boxes = _gather(final_boxes, kept)
        mask_padding = F.interpolate(padding_mask[:, None].float(), size=kept_masks.shape[-2:],
                                     mode="nearest")[:, 0].bool()
        valid_sizes = [(max(int((~m[:, 0]).sum()), 1), max(int((~m[0, :]).sum()), 1)) for m in mask_padding]
        appearance_map = features[0] if cfg.region_appearance_source == "backbone" else pixel_embedding
        tokens = self.fusion(_gather(semantic, kept), kept_boxes, kept_masks, valid_sizes, appearance_map)

        enc_maps = [m.view(-1, h, w) for m, (h, w) in
                    zip(enc_objectness.detach().split((shapes[:, 0] * shapes[:, 1]).tolist(), dim=1),
                        shapes.tolist())]
        return RegionProposals(
            tokens=tokens, boxes=kept_boxes, masks=kept_masks, objectness=_gather(final_objectness, kept),
            indices=kept, all_boxes=final_boxes, all_objectness=final_objectness, encoder_objectness=enc_maps,
            sampling_locations=locations[:, matching].detach(), selected_positions=selected,
            predictions=predictions, denoising=denoising, denoising_predictions=denoising_predictions)
