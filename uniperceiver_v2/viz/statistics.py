"""Statistics of a COCO instances file: objects per image, object sizes, instances per category."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .base import (
    _figure,
    class_color,
)

# COCO's size classes: small below 32 x 32 pixels of area, large above 96 x 96 (pycocotools' areaRng).
COCO_SIZE_LIMITS = (32.0, 96.0)


def coco_instance_statistics(ann_file: str | Path) -> dict[str, Any]:
    """What :func:`plot_instance_statistics` draws, read from a COCO instances file (crowd regions left out).

    Returns:
        ``objects_per_image`` (one count per image, images without objects included), ``object_sizes``
        (sqrt of each object's COCO ``area`` in pixels: the mask's area in an instances file, which is what
        COCOeval sorts into AP_S / AP_M / AP_L; the box's area when an annotation has no ``area``) and
        ``category_counts`` (instances per category name, in id order).
    """
    with open(ann_file) as handle:
        data = json.load(handle)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_file}: not a COCO instances file (no '{key}')")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in categories}
    per_image = {image["id"]: 0 for image in data["images"]}
    counts = {c["name"]: 0 for c in categories}
    sizes = []
    for index, annotation in enumerate(data["annotations"]):
        if annotation.get("iscrowd", 0):
            continue
        if annotation["image_id"] not in per_image or annotation["category_id"] not in names:
            raise ValueError(f"{ann_file}: annotations[{index}] refers to an unknown image or category")
        per_image[annotation["image_id"]] += 1
        counts[names[annotation["category_id"]]] += 1
        area = annotation.get("area")
        if area is None:                                  # COCOeval's size classes read "area"; a box is a fallback
            width, height = annotation["bbox"][2], annotation["bbox"][3]
            area = max(width, 0.0) * max(height, 0.0)
        sizes.append(math.sqrt(max(area, 0.0)))
    return {"objects_per_image": list(per_image.values()), "object_sizes": sizes, "category_counts": counts}


def coco_size_counts(object_sizes: Sequence[float]) -> dict[str, int]:
    """How many objects fall in each of COCO's size classes, from sqrt(area) in pixels (``object_sizes``).

    Returns:
        ``{"small": n, "medium": n, "large": n}``: small below 32 px, large at 96 px and above (COCO's
        ``areaRng``: area < 32^2, 32^2 <= area < 96^2, area >= 96^2).
    """
    sizes = np.asarray(object_sizes, dtype=np.float64)
    small, large = COCO_SIZE_LIMITS
    return {"small": int((sizes < small).sum()), "medium": int(((sizes >= small) & (sizes < large)).sum()),
            "large": int((sizes >= large).sum())}


def plot_instance_statistics(objects_per_image: Sequence[int], object_sizes: Sequence[float],
                             category_counts: Mapping[str, int], title: str | None = None) -> Figure:
    """Three panels describing a detection set: objects per image, object sizes, instances per category.

    Args:
        objects_per_image: number of annotated objects of each image.
        object_sizes: sqrt(area) in pixels of each object (:func:`coco_instance_statistics`: the COCO ``area``,
            a mask's area); COCO's small / medium / large limits (32, 96) are dashed lines, always inside the
            axis, with the size class of each side written above.
        category_counts: instances per category name.
    """
    fig, axes = _figure(1, 3, figsize=(13.0, 3.4), width_ratios=[1.0, 1.0, 1.6])
    per_image = np.asarray(objects_per_image, dtype=np.int64)
    sizes = np.asarray(object_sizes, dtype=np.float64)
    ax = axes[0, 0]
    if len(per_image):
        ax.hist(per_image, bins=np.arange(per_image.max() + 2) - 0.5, color="tab:blue", rwidth=0.85)
    ax.set_xlabel("objects per image")
    ax.set_ylabel("images")
    ax = axes[0, 1]
    if len(sizes):
        ax.hist(sizes, bins=30, color="tab:orange")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.12)      # room for the size-class names
    # Both limits are always on the axis (it is widened to reach 96 px), with the size class of each side written
    # at the top: a scene of small objects shows that it has no "large" ones.
    right = max(float(sizes.max()) if len(sizes) else 0.0, COCO_SIZE_LIMITS[-1]) * 1.25
    ax.set_xlim(0.0, right)
    for limit in COCO_SIZE_LIMITS:
        ax.axvline(limit, color="gray", linestyle="--", linewidth=1)
    edges = (0.0, *COCO_SIZE_LIMITS, right)
    for name, low, high in zip(("small", "medium", "large"), edges[:-1], edges[1:]):
        ax.text((low + high) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, color="dimgray")
    ax.set_xlabel("object size sqrt(COCO area) [px]")
    ax.set_ylabel("objects")
    ax = axes[0, 2]
    names = list(category_counts)
    ax.bar(range(len(names)), [category_counts[n] for n in names],
           color=[class_color(i) for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_ylabel("instances")
    if title:
        fig.suptitle(title)
    return fig
