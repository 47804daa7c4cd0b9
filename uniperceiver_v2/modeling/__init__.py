"""Model parts of Uni-Perceiver v2.

The image encoder (Sec. 4.1, appendix A): ``ImageEncoder`` = backbone + ``GlobalRepresentations`` (v2 eq. (3)) +
``RegionProposalNetwork`` (Mask-DINO-style, binary objectness; v2 eq. (2) / (9) fusion), with its ``HungarianMatcher``
and ``RegionProposalCriterion``. Import the other parts (text encoder, MoE, unified decoder) from their modules.

The names below are imported on first use (PEP 562), so importing a sibling module such as
``uniperceiver_v2.modeling.moe`` does not load timm, torchvision and scipy for the image encoder.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageEncoder": "image_encoder",
    "ImageEncoderOutput": "image_encoder",
    "TOKEN_TYPES": "image_encoder",
    "pad_batch": "image_encoder",
    "postprocess": "image_encoder",
    "GlobalAttentionPooling": "global_pooling",
    "GlobalRepresentations": "global_pooling",
    "RegionProposalNetwork": "region_proposal",
    "RegionProposals": "region_proposal",
    "ProposalFusion": "region_proposal",
    "RegionProposalCriterion": "criterion",
    "HungarianMatcher": "matcher",
    "normalize_targets": "box_ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
