"""Evaluation metrics: COCO detection / segmentation AP (`coco`), top-k accuracy (`classification`),
BLEU / CIDEr (`captioning`), image-text retrieval recall (`retrieval`).

Import the submodule you need; this file imports nothing so that pycocotools is loaded only when used.
"""
