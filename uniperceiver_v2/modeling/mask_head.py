"""Mask head of the region proposal network: v2 eq. (8), Mask DINO's mask branch.

    q^mask_j = Upsample( MLP(q_j) . R( G(F_0) + H(F^enc_1) ) )                                          (8)

G: 1x1 conv + GroupNorm on the stride-4 backbone map F_0; H: 1x1 conv + GroupNorm on the stride-8 encoder output
F^enc_1, bilinearly upsampled to stride 4; R: 3x3 conv + GroupNorm + ReLU + 1x1 conv. The per-pixel embedding
R(...) (B, d, H/4, W/4) is computed once per image; a query's mask logits are the dot product of its MLP
embedding with every pixel's embedding. The logits stay at stride 4 of the padded image (what the losses sample
and what v2 eq. (2) pools); "Upsample" happens in ``ImageEncoder.postprocess`` when masks are pasted on the image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniperceiver_v2.modeling.backbone import group_norm
from uniperceiver_v2.modeling.deformable_transformer import MLP


class MaskHead(nn.Module):
    def __init__(self, stride4_channels: int, hidden_dim: int):
        super().__init__()
        self.lateral = nn.Sequential(nn.Conv2d(stride4_channels, hidden_dim, 1), group_norm(hidden_dim))   # G
        self.encoder_proj = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 1), group_norm(hidden_dim))    # H
        self.output = nn.Sequential(                                                                        # R
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), group_norm(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 1))
        self.query_mlp = MLP(hidden_dim, hidden_dim, hidden_dim, 3)

    def pixel_embedding(self, stride4_features: torch.Tensor, encoder_stride8: torch.Tensor) -> torch.Tensor:
        """R(G(F_0) + H(F^enc_1)).

        Args:
            stride4_features: F_0, (B, C_0, H/4, W/4) backbone map.
            encoder_stride8: F^enc_1, (B, d, H/8, W/8) encoder output of the stride-8 level.

        Returns:
            (B, d, H/4, W/4) per-pixel embeddings.
        """
        lateral = self.lateral(stride4_features)
        top_down = F.interpolate(self.encoder_proj(encoder_stride8), size=lateral.shape[-2:], mode="bilinear",
                                 align_corners=False)
        return self.output(lateral + top_down)

    def forward(self, queries: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, d), pixel_embedding (B, d, Hm, Wm) -> mask logits (B, Q, Hm, Wm)."""
        return torch.einsum("bqc,bchw->bqhw", self.query_mlp(queries), pixel_embedding)
