"""Model parts of Uni-Perceiver v2.

The image encoder (Sec. 4.1, appendix A): ``ImageEncoder`` = backbone + ``GlobalRepresentations`` (eq. (3)) +
``RegionProposalNetwork`` (Mask-DINO-style, binary objectness; eq. (2) / (9) fusion), with its ``HungarianMatcher``
and ``RegionProposalCriterion``. Import other parts (text encoder, MoE, unified decoder) from their modules.
"""

from uniperceiver_v2.modeling.box_ops import normalize_targets
from uniperceiver_v2.modeling.criterion import RegionProposalCriterion
from uniperceiver_v2.modeling.global_pooling import GlobalAttentionPooling, GlobalRepresentations
from uniperceiver_v2.modeling.image_encoder import (TOKEN_TYPES, ImageEncoder, ImageEncoderOutput, pad_batch,
                                                   postprocess)
from uniperceiver_v2.modeling.matcher import HungarianMatcher
from uniperceiver_v2.modeling.region_proposal import ProposalFusion, RegionProposalNetwork, RegionProposals

__all__ = [
    "TOKEN_TYPES",
    "GlobalAttentionPooling",
    "GlobalRepresentations",
    "HungarianMatcher",
    "ImageEncoder",
    "ImageEncoderOutput",
    "ProposalFusion",
    "RegionProposalCriterion",
    "RegionProposalNetwork",
    "RegionProposals",
    "normalize_targets",
    "pad_batch",
    "postprocess",
]
