"""The image encoder f_image of Uni-Perceiver v2 (Sec. 4.1): an image as global and regional representations.

    f_image(x) = Concat( {q^global_i}_{i=1}^{M}, {q^proposal_j}_{j=1}^{O} )                              (1)

* backbone (``backbone.py``): F_0..F_3 at strides 4, 8, 16, 32;
* global representations, v2 eq. (3) (``global_pooling.py``): M' attention-pooled tokens and the flattened stride-32
  map, M = M' + h * w tokens;
* regional representations, v2 eq. (2) / (9) (``region_proposal.py``): O fused proposals of the Mask-DINO-style
  region proposal network, with their boxes, masks and objectness for the localization tasks;
* with targets, the region proposal losses (``criterion.py``).

``use_global`` / ``use_regional`` (the Tab. 2 ablation) select which parts exist; a disabled part builds no
parameters. Images are zero-padded at the bottom/right to a multiple of ``SIZE_DIVISIBILITY`` (so every stride
divides the padded size and the stride-4 mask logits cover exactly the padded canvas).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniperceiver_v2.config import ImageEncoderConfig
from uniperceiver_v2.modeling.backbone import build_backbone_from_config
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, normalize_targets
from uniperceiver_v2.modeling.global_pooling import GLOBAL_FLATTENED, GLOBAL_POOLED, GlobalRepresentations
from uniperceiver_v2.modeling.proposal_criterion import RegionProposalCriterion
from uniperceiver_v2.modeling.region_proposal import RegionProposalNetwork

SIZE_DIVISIBILITY = 32
MASK_STRIDE = 4
REGIONAL = 2                     # token type of the regional representations (0, 1: see global_pooling)
TOKEN_TYPES = {"global_pooled": GLOBAL_POOLED, "global_flattened": GLOBAL_FLATTENED, "regional": REGIONAL}


@dataclass
class ImageEncoderOutput:
    """The encoded image.

    tokens: (B, T, d) = [global tokens (num_global), regional tokens (O)], v2 eq. (1).
    token_padding_mask: (B, T) bool, True = padding (padded positions of the flattened map).
    token_types: (B, T) long, 0 = attention-pooled global, 1 = flattened-map global, 2 = regional.
    num_global: number of global tokens at the front of ``tokens`` (0 when ``use_global`` is off).
    boxes: (B, O, 4) cxcywh normalised to the unpadded image; masks: (B, O, Hm, Wm) logits at stride 4 of the
        padded image; objectness: (B, O) logits; proposal_indices: (B, O) into the N decoder queries.
        (All None when ``use_regional`` is off.) The i-th regional token is the i-th proposal.
    losses: weighted region-proposal losses ``rpn_{set}_{term}`` (empty without targets); callers sum them.
    image_sizes: (B, 2) long (h, w) of each unpadded image; padded_size: (H, W) of the padded batch.
    For visualisation: all_boxes (B, N, 4) and all_objectness (B, N) of every decoder query; encoder_objectness
        one (B, H_l, W_l) logit map per level; sampling_locations (B, N, heads, L, P, 2) of the last decoder
        layer; attention_pool_weights (B, M', h*w) with global_map_size (h, w).
    """

    tokens: torch.Tensor
    token_padding_mask: torch.Tensor
    token_types: torch.Tensor
    num_global: int
    image_sizes: torch.Tensor
    padded_size: tuple[int, int]
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    objectness: torch.Tensor | None = None
    proposal_indices: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    all_boxes: torch.Tensor | None = None
    all_objectness: torch.Tensor | None = None
    encoder_objectness: list[torch.Tensor] | None = None
    sampling_locations: torch.Tensor | None = None
    attention_pool_weights: torch.Tensor | None = None
    global_map_size: tuple[int, int] | None = None


def pad_batch(images: torch.Tensor, padding_mask: torch.Tensor, divisibility: int = SIZE_DIVISIBILITY
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad images (B, 3, H, W) and extend the padding mask (B, H, W) to multiples of ``divisibility``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % divisibility, (-width) % divisibility
    if pad_h == 0 and pad_w == 0:
        return images, padding_mask
    return F.pad(images, (0, pad_w, 0, pad_h)), F.pad(padding_mask, (0, pad_w, 0, pad_h), value=True)


def unpadded_sizes(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask (image at the top-left) -> (B, 2) long (h, w) of each image."""
    valid = ~padding_mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1)


def postprocess(boxes: torch.Tensor, masks: torch.Tensor | None, image_sizes: torch.Tensor,
                original_sizes: torch.Tensor, mask_threshold: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """Proposals -> absolute boxes and binary masks on the original images (COCO results).

    Args:
        boxes: (B, K, 4) cxcywh normalised to the unpadded network input.
        masks: (B, K, Hm, Wm) logits at stride 4 of the padded input, or None.
        image_sizes: (B, 2) (h, w) of the unpadded network input (``ImageEncoderOutput.image_sizes``).
        original_sizes: (B, 2) (H0, W0) of the original images.
        mask_threshold: probability above which a pixel belongs to the mask.

    Returns:
        per image ``boxes`` (K, 4) float xyxy in original pixels (clipped to the image) and, with masks,
        ``masks`` (K, H0, W0) bool: logits upsampled x4 (v2 eq. (8)'s Upsample), cropped to (h, w), resized to (H0, W0).
    """
    results = []
    for b in range(boxes.shape[0]):
        orig_h, orig_w = (int(v) for v in original_sizes[b].tolist())
        scale = boxes.new_tensor([orig_w, orig_h, orig_w, orig_h])
        xyxy = box_cxcywh_to_xyxy(boxes[b]) * scale
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)
        result = {"boxes": xyxy}
        if masks is not None:
            h, w = (int(v) for v in image_sizes[b].tolist())
            m = masks[b][None]
            if m.shape[1] == 0:
                result["masks"] = torch.zeros(0, orig_h, orig_w, dtype=torch.bool, device=m.device)
            else:
                m = F.interpolate(m, scale_factor=MASK_STRIDE, mode="bilinear", align_corners=False)[..., :h, :w]
                m = F.interpolate(m, size=(orig_h, orig_w), mode="bilinear", align_corners=False)[0]
                result["masks"] = m.sigmoid() > mask_threshold
        results.append(result)
    return results


class ImageEncoder(nn.Module):
    """f_image of v2 eq. (1): backbone + global representations (v2 eq. (3)) + regional representations (v2 eq. (2))."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone_from_config(cfg)
        channels = self.backbone.channels
        self.global_representations = (GlobalRepresentations(channels[3], cfg.hidden_dim, cfg.num_global_pools,
                                                             cfg.nheads) if cfg.use_global else None)
        self.region_proposals = RegionProposalNetwork(cfg, channels) if cfg.use_regional else None
        self.criterion = RegionProposalCriterion(cfg) if cfg.use_regional else None

    @property
    def output_dim(self) -> int:
        """d, the width of every token."""
        return self.cfg.hidden_dim

    postprocess = staticmethod(postprocess)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                targets: list[dict] | None = None) -> ImageEncoderOutput:
        """
        Args:
            images: (B, 3, H, W) float, normalised, padded at the bottom/right.
            padding_mask: (B, H, W) bool, True = padding; None = no padding.
            targets: optional, per image ``boxes`` (K, 4) xyxy absolute pixels of the unpadded image, ``masks``
                (K, h, w) bool/uint8, ``labels`` (K,) and ``size`` (2,) = (h, w); enables the region proposal losses.

        Returns:
            ImageEncoderOutput.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        if padding_mask is None:
            padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        if padding_mask.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"padding_mask: expected {(images.shape[0], *images.shape[-2:])}, "
                             f"got {tuple(padding_mask.shape)}")
        if targets is not None and self.region_proposals is None:
            raise ValueError("targets were given but image_encoder.use_regional=false: there are no region "
                             "proposals to supervise")
        images, padding_mask = pad_batch(images, padding_mask.bool())
        sizes = unpadded_sizes(padding_mask)
        padded_size = (images.shape[-2], images.shape[-1])
        normalized = None
        if targets is not None:
            if len(targets) != images.shape[0]:
                raise ValueError(f"targets: {len(targets)} entries for a batch of {images.shape[0]} images")
            normalized = normalize_targets(targets, padded_size, device=images.device)
            for i, t in enumerate(normalized):
                if t["size"].tolist() != sizes[i].tolist():
                    raise ValueError(f"targets[{i}]['size'] = {t['size'].tolist()} but the padding mask leaves "
                                     f"an image of {sizes[i].tolist()} (h, w)")

        features = self.backbone(images)
        tokens, padding, types = [], [], []
        extras: dict = {}
        if self.global_representations is not None:
            last = features[3]
            mask = F.interpolate(padding_mask[:, None].float(), size=last.shape[-2:], mode="nearest")[:, 0].bool()
            g_tokens, g_padding, g_types, pool_weights = self.global_representations(last, mask)
            tokens.append(g_tokens)
            padding.append(g_padding)
            types.append(g_types)
            extras.update(attention_pool_weights=pool_weights, global_map_size=(last.shape[-2], last.shape[-1]))
        num_global = sum(t.shape[1] for t in tokens)
        if self.region_proposals is not None:
            proposals = self.region_proposals(features, padding_mask, normalized)
            tokens.append(proposals.tokens)
            padding.append(padding_mask.new_zeros(proposals.tokens.shape[:2]))
            types.append(torch.full(proposals.tokens.shape[:2], REGIONAL, dtype=torch.long, device=images.device))
            extras.update(boxes=proposals.boxes, masks=proposals.masks, objectness=proposals.objectness,
                          proposal_indices=proposals.indices, all_boxes=proposals.all_boxes,
                          all_objectness=proposals.all_objectness, encoder_objectness=proposals.encoder_objectness,
                          sampling_locations=proposals.sampling_locations)
            if normalized is not None:
                extras["losses"] = self.criterion(proposals.predictions, normalized, proposals.denoising,
                                                  proposals.denoising_predictions)
        return ImageEncoderOutput(tokens=torch.cat(tokens, 1), token_padding_mask=torch.cat(padding, 1),
                                  token_types=torch.cat(types, 1), num_global=num_global, image_sizes=sizes,
                                  padded_size=padded_size, **extras)
