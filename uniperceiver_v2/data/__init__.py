"""Data: the embedded synthetic multi-task suite and readers for its (and the real data sets') formats.

Readers return typed samples (``samples.py``); ``transforms.py`` augments them and ``collate.py``
batches them. See ``data/README.md`` at the repository root for file layouts.
"""

from .captions import CocoCaptions, KarpathyCaptions
from .classification import ImageFolderClassification, read_class_name_mapping
from .coco import Category, CocoInstances
from .collate import collate_captions, collate_classification, collate_detection, collate_text, pad_images
from .images import read_image
from .samples import (
    CaptionBatch,
    CaptionSample,
    ClassificationBatch,
    ClassificationSample,
    DetectionBatch,
    DetectionSample,
    ImageCaptionsSample,
    masks_to_boxes,
)
from .suite import SyntheticSuite
from .summary import DataError, DatasetSummary
from .text import TextCorpus


def __getattr__(name: str):
    # The generator is imported on first use, not with the package: ``python -m
    # uniperceiver_v2.data.synthetic`` must be able to import the package before running that module.
    if name in ("generate", "ensure_synthetic"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CaptionBatch",
    "CaptionSample",
    "Category",
    "ClassificationBatch",
    "ClassificationSample",
    "CocoCaptions",
    "CocoInstances",
    "DataError",
    "DatasetSummary",
    "DetectionBatch",
    "DetectionSample",
    "ImageCaptionsSample",
    "ImageFolderClassification",
    "KarpathyCaptions",
    "SyntheticSuite",
    "TextCorpus",
    "collate_captions",
    "collate_classification",
    "collate_detection",
    "collate_text",
    "ensure_synthetic",
    "generate",
    "masks_to_boxes",
    "pad_images",
    "read_class_name_mapping",
    "read_image",
]
