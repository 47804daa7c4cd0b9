"""Every figure of the project: images with annotations, attention, expert usage, training curves, tables.

Notebooks and tests draw through this module only, so a figure looks the same wherever it appears.

Conventions:
  * Inputs are plain: numpy arrays, torch tensors (any device, with or without grad) or nested lists.
  * Images are CHW or HWC, float in [0, 1] or uint8 in [0, 255]; grayscale HW is accepted too. An image
    normalised for a backbone is shown after ``mean`` / ``std`` undo the normalisation
    (``mean=IMAGENET_MEAN, std=IMAGENET_STD``).
  * Boxes are absolute pixel coordinates ``(x0, y0, x1, y1)``. Region proposals usually come as normalised
    ``(cx, cy, w, h)``: convert with ``torchvision.ops.box_convert(b, "cxcywh", "xyxy") * [W, H, W, H]``.
  * Every function returns the :class:`matplotlib.figure.Figure` it drew on and never calls ``plt.show()``.
    Figures are built without pyplot (``Figure(...)``), so nothing accumulates in pyplot's global figure list
    during long loops or tests; in a notebook they display as the cell's value once ``%matplotlib inline`` is
    active. Functions drawing a single panel also take ``ax=`` to draw into an existing Axes.
"""

from __future__ import annotations

import colorsys
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

# tab20 with its dark shades first, so the first ten classes get ten clearly different colours.
_TAB20 = matplotlib.colormaps["tab20"]
_PALETTE = [_TAB20(i)[:3] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
_MASK_ALPHA = 0.45
_LEVEL_CMAP = matplotlib.colormaps["viridis"]


# --------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------
def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a torch tensor (detached, moved to the CPU), an array or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":   # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_display_image(image: Any, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> np.ndarray:
    """An image as a float array (H, W, 3) in [0, 1], ready for ``imshow``.

    Args:
        image: (3, H, W) or (1, H, W) channels-first, (H, W, 3) or (H, W, 1) channels-last, or (H, W);
            float in [0, 1] or uint8. A (3, H, 3) array is read as channels-last.
        mean, std: per-channel statistics the image was normalised with, ``x = (pixel - mean) / std``;
            the normalisation is undone before display.
    """
    array = to_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"image: expected (C, H, W), (H, W, C) or (H, W), got shape {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected 1 or 3 channels first or last, got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
    if (mean is None) != (std is None):
        raise ValueError("image: pass both mean and std to undo a normalisation, or neither")
    if mean is not None:
        array = array * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
        # Undoing the normalisation reproduces the original [0, 1] pixels up to rounding; clip the rounding.
        array = np.clip(array, 0.0, 1.0)
    elif array.size and (array.min() < -1e-3 or array.max() > 1.0 + 1e-3):
        raise ValueError(
            f"image: float values span [{array.min():.3g}, {array.max():.3g}], outside [0, 1]; "
            "if the image is normalised, pass mean= and std= (e.g. viz.IMAGENET_MEAN, viz.IMAGENET_STD)")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def _as_boxes(boxes: Any, name: str = "boxes") -> np.ndarray:
    array = to_numpy(boxes).astype(np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4) as (x0, y0, x1, y1), got {array.shape}")
    return array


def _as_vector(values: Any, n: int, name: str) -> np.ndarray:
    array = to_numpy(values).reshape(-1)
    if len(array) != n:
        raise ValueError(f"{name}: expected {n} values (one per box), got {len(array)}")
    return array


def class_color(label: int) -> tuple[float, float, float]:
    """The RGB colour of a class id; the same id always gets the same colour, in every figure.

    Ids 0-19 use tab20; later ids step around the hue circle by the golden angle, which keeps neighbouring
    ids far apart.
    """
    label = int(label)
    if label < 0:
        raise ValueError(f"class id must be >= 0, got {label}")
    if label < len(_PALETTE):
        return tuple(_PALETTE[label])
    hue = (label * 0.6180339887) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.85)


def _figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None,
            **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def subplots(n: int, ncols: int = 3, panel_size: tuple[float, float] = (3.0, 3.0)) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure with ``n`` panels in rows of ``ncols``, for functions that take ``ax=``.

    Returns the figure and its first ``n`` axes in reading order; unused cells of the last row are hidden.
    """
    rows, cols = _grid_shape(n, ncols)
    fig, axes = _figure(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows))
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def _single_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = _figure(figsize=figsize)
    return fig, axes[0, 0]


def _image_axes(ax: Axes | None, image: np.ndarray, width: float = 5.0) -> tuple[Figure, Axes]:
    h, w = image.shape[:2]
    fig, ax = _single_axes(ax, figsize=(width, max(1.5, width * h / max(w, 1))))
    ax.imshow(image)
    ax.set_axis_off()
    return fig, ax


def _hide_frame(ax: Axes) -> None:
    """No ticks and no spines, but keep the x label (captions) and title visible."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _grid_shape(n: int, ncols: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError("nothing to draw: expected at least one image")
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


# --------------------------------------------------------------------------------------------------------------
# Images and annotations
# --------------------------------------------------------------------------------------------------------------
def show_image(image: Any, title: str | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, ax: Axes | None = None) -> Figure:
    """One image (see :func:`to_display_image` for the accepted layouts)."""
    fig, ax = _image_axes(ax, to_display_image(image, mean, std))
    if title:
        ax.set_title(title)
    return fig


def image_grid(images: Sequence[Any], titles: Sequence[str] | None = None,
               title_colors: Sequence[Any] | None = None, ncols: int = 6,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Figure:
    """Images in a grid, each with an optional title (e.g. its class name; ``title_colors`` to mark novel ones)."""
    n = len(images)
    rows, cols = _grid_shape(n, ncols)
    for name, values in (("titles", titles), ("title_colors", title_colors)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per image), got {len(values)}")
    fig, axes = _figure(rows, cols, figsize=(1.8 * cols, 1.9 * rows))
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(to_display_image(images[i], mean, std))
        if titles is not None:
            ax.set_title(titles[i], fontsize=8, color=title_colors[i] if title_colors is not None else "black")
    return fig


def draw_detections(image: Any, boxes_xyxy: Any, labels: Any = None, scores: Any = None, masks: Any = None,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.0,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    title: str | None = None, ax: Axes | None = None) -> Figure:
    """Boxes with "class score" captions and semi-transparent instance masks, one stable colour per class.

    Ground truth and predictions are drawn the same way; leave ``scores=None`` for ground truth.

    Args:
        image: (3, H, W) / (H, W, 3), see :func:`to_display_image`.
        boxes_xyxy: (N, 4) absolute pixel coordinates.
        labels: (N,) class ids, or None (each instance then gets its own colour).
        scores: (N,) confidences, or None. With scores, instances below ``score_threshold`` are left out.
        masks: (N, H, W) bool, or probabilities in [0, 1] (shown where > 0.5), at the image's resolution.
        class_names: names indexed by class id, for the captions.
    """
    picture = to_display_image(image, mean, std)
    height, width = picture.shape[:2]
    boxes = _as_boxes(boxes_xyxy, "boxes_xyxy")
    n = len(boxes)
    labels_np = None if labels is None else _as_vector(labels, n, "labels").astype(np.int64)
    scores_np = None if scores is None else _as_vector(scores, n, "scores").astype(np.float64)
    keep = np.ones(n, dtype=bool) if scores_np is None else scores_np >= score_threshold

    fig, ax = _image_axes(ax, picture)
    colors = [class_color(labels_np[i]) if labels_np is not None else class_color(i) for i in range(n)]

    if masks is not None:
        masks_np = to_numpy(masks)
        if masks_np.shape != (n, height, width):
            raise ValueError(f"masks: expected shape ({n}, {height}, {width}) (one mask per box, at the image's "
                             f"resolution), got {masks_np.shape}")
        overlay = np.zeros((height, width, 4), dtype=np.float32)
        # Draw low scores first so the most confident instance is on top where masks overlap.
        order = np.argsort(scores_np, kind="stable") if scores_np is not None else np.arange(n)
        for i in order:
            if not keep[i]:
                continue
            region = masks_np[i] > 0.5
            overlay[region, :3] = colors[i]
            overlay[region, 3] = _MASK_ALPHA
        ax.imshow(overlay, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")

    for i in np.flatnonzero(keep):
        x0, y0, x1, y1 = boxes[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[i], linewidth=1.5))
        caption = _detection_caption(i, labels_np, scores_np, class_names)
        if caption:
            ax.text(x0, y0, caption, fontsize=7, color="white", va="bottom", ha="left", clip_on=True,
                    bbox=dict(facecolor=colors[i], alpha=0.8, pad=1.0, edgecolor="none"))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    if title:
        ax.set_title(title)
    return fig


def _detection_caption(i: int, labels: np.ndarray | None, scores: np.ndarray | None,
                       class_names: Sequence[str] | None) -> str:
    parts = []
    if labels is not None:
        label = int(labels[i])
        if class_names is not None:
            if not 0 <= label < len(class_names):
                raise ValueError(f"labels: class id {label} has no entry in class_names ({len(class_names)} names)")
            parts.append(str(class_names[label]))
        else:
            parts.append(str(label))
    if scores is not None:
        parts.append(f"{scores[i]:.2f}")
    return " ".join(parts)


def draw_proposals(image: Any, boxes: Any, objectness: Any, top: int = 20,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   title: str | None = None, ax: Axes | None = None) -> Figure:
    """The ``top`` region proposals by objectness, coloured by their objectness (Sec. 4.1, query selection).

    Args:
        boxes: (N, 4) absolute pixel (x0, y0, x1, y1).
        objectness: (N,) any score that orders the proposals (logit or probability); the colour bar shows it
            as given.
    """
    if top < 1:
        raise ValueError(f"top: expected at least 1 proposal to draw, got {top}")
    picture = to_display_image(image, mean, std)
    boxes_np = _as_boxes(boxes)
    score = _as_vector(objectness, len(boxes_np), "objectness").astype(np.float64)
    order = np.argsort(-score, kind="stable")[:top]
    fig, ax = _image_axes(ax, picture)
    if len(order):
        norm = matplotlib.colors.Normalize(vmin=score[order].min(), vmax=score[order].max())
        cmap = matplotlib.colormaps["plasma"]
        # Weakest first, so the strongest proposals are drawn on top.
        for i in order[::-1]:
            x0, y0, x1, y1 = boxes_np[i]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=cmap(norm(score[i])),
                                   linewidth=1.2))
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, label="objectness")
    h, w = picture.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title if title else f"top {len(order)} of {len(boxes_np)} proposals")
    return fig


def draw_sampling_points(image: Any, reference_point: Any, sampling_locations: Any, attention_weights: Any,
                         level_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, title: str | None = None,
                         ax: Axes | None = None) -> Figure:
    """Where one query of multi-scale deformable attention looks: its sampling points, one colour per feature
    level, each point's area proportional to its attention weight.

    Args:
        reference_point: (2,) normalised (x, y) in [0, 1].
        sampling_locations: (levels, points, 2) or (heads, levels, points, 2), normalised (x, y) in [0, 1]
            (the layout of Deformable-DETR's ``sampling_locations`` for one query).
        attention_weights: (levels, points) or (heads, levels, points); softmax-normalised over levels x points.
        level_names: a name per level for the legend (e.g. "stride 8").
    """
    picture = to_display_image(image, mean, std)
    h, w = picture.shape[:2]
    locations = to_numpy(sampling_locations).astype(np.float64)
    weights = to_numpy(attention_weights).astype(np.float64)
    if locations.ndim == 4:   # heads: fold into points, each head's points stay at their own level
        locations = locations.transpose(1, 0, 2, 3).reshape(locations.shape[1], -1, 2)
        if weights.ndim != 3:
            raise ValueError(f"attention_weights: expected (heads, levels, points) to match sampling_locations, "
                             f"got shape {weights.shape}")
        weights = weights.transpose(1, 0, 2).reshape(weights.shape[1], -1)
    if locations.ndim != 3 or locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations: expected (levels, points, 2), got shape {locations.shape}")
    if weights.shape != locations.shape[:2]:
        raise ValueError(f"attention_weights: expected shape {locations.shape[:2]}, got {weights.shape}")
    reference = to_numpy(reference_point).astype(np.float64).reshape(-1)
    if reference.shape != (2,):
        raise ValueError(f"reference_point: expected (x, y), got shape {reference.shape}")
    num_levels = locations.shape[0]
    if level_names is not None and len(level_names) != num_levels:
        raise ValueError(f"level_names: expected {num_levels} names, got {len(level_names)}")

    fig, ax = _image_axes(ax, picture)
    scale = 400.0 / max(weights.max(), 1e-12)
    for level in range(num_levels):
        color = _LEVEL_CMAP(level / max(num_levels - 1, 1))
        ax.scatter(locations[level, :, 0] * w - 0.5, locations[level, :, 1] * h - 0.5,
                   s=weights[level] * scale + 4.0, color=color, alpha=0.75, edgecolors="white", linewidths=0.5,
                   label=level_names[level] if level_names is not None else f"level {level}")
    ax.plot(reference[0] * w - 0.5, reference[1] * h - 0.5, marker="*", markersize=14, color="red",
            markeredgecolor="white", linestyle="none", label="reference point")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(loc="upper right", fontsize=7, markerscale=0.6, framealpha=0.8)
    if title:
        ax.set_title(title)
    return fig


def attention_heatmaps(image: Any, maps: Any, titles: Sequence[str] | None = None, ncols: int = 5,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Figure:
    """Attention maps overlaid on the image, one panel per map (e.g. the M' attention poolings of eq. (3)).

    Args:
        maps: (M, h, w) non-negative weights on the feature grid of F_L; each map is stretched over the whole
            image with bilinear interpolation and scaled to its own maximum.
    """
    picture = to_display_image(image, mean, std)
    heat = to_numpy(maps).astype(np.float64)
    if heat.ndim == 2:
        heat = heat[None]
    if heat.ndim != 3:
        raise ValueError(f"maps: expected (M, h, w), got shape {heat.shape}")
    num_maps = heat.shape[0]
    if titles is not None and len(titles) != num_maps:
        raise ValueError(f"titles: expected {num_maps} titles, got {len(titles)}")
    rows, cols = _grid_shape(num_maps, ncols)
    fig, axes = _figure(rows, cols, figsize=(2.2 * cols, 2.3 * rows))
    h, w = picture.shape[:2]
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= num_maps:
            continue
        ax.imshow(picture)
        peak = heat[i].max()
        ax.imshow(heat[i] / peak if peak > 0 else heat[i], cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0,
                  extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        ax.set_title(titles[i] if titles is not None else f"pool {i + 1}", fontsize=8)
    return fig


def show_captions(images: Sequence[Any], captions_pred: Sequence[str] | None = None,
                  captions_gt: Sequence[str | Sequence[str]] | None = None, ncols: int = 4, width: int = 34,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Figure:
    """Images with the predicted caption above (bold) and the reference caption(s) below (grey).

    Args:
        captions_pred: one string per image, or None.
        captions_gt: one string or a list of reference strings per image, or None.
        width: characters per line before wrapping.
    """
    n = len(images)
    if captions_pred is None and captions_gt is None:
        raise ValueError("show_captions: pass captions_pred, captions_gt or both")
    for name, values in (("captions_pred", captions_pred), ("captions_gt", captions_gt)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per image), got {len(values)}")
    rows, cols = _grid_shape(n, ncols)
    fig, axes = _figure(rows, cols, figsize=(2.6 * cols, 3.4 * rows))
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(to_display_image(images[i], mean, std))
        _hide_frame(ax)
        if captions_pred is not None:
            ax.set_title(textwrap.fill(captions_pred[i], width), fontsize=8, fontweight="bold")
        if captions_gt is not None:
            refs = [captions_gt[i]] if isinstance(captions_gt[i], str) else list(captions_gt[i])
            # A dash in front of each reference keeps several wrapped references apart.
            text = "\n".join(textwrap.fill(r, width, initial_indent="- ", subsequent_indent="  ") for r in refs) \
                if len(refs) > 1 else textwrap.fill(refs[0], width)
            ax.set_xlabel(text, fontsize=7, color="dimgray")
    return fig


def show_retrieval(query_image: Any, texts_ranked: Sequence[str], correct: Sequence[bool],
                   scores: Sequence[float] | None = None, top: int = 5, width: int = 80, title: str | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Figure:
    """Image-to-text retrieval for one query: the image, and its ``top`` ranked texts marked right / wrong.

    Args:
        texts_ranked: candidate texts, best first.
        correct: one bool per ranked text, True where the text belongs to the query image.
        scores: the similarity of each ranked text, shown next to it.
        width: characters per text before it is shortened.
        title: heading of the text panel; default "top k texts".
    """
    n = len(texts_ranked)
    if top < 1:
        raise ValueError(f"top: expected at least 1 text to show, got {top}")
    if len(correct) != n:
        raise ValueError(f"correct: expected {n} flags (one per ranked text), got {len(correct)}")
    if scores is not None and len(scores) != n:
        raise ValueError(f"scores: expected {n} values (one per ranked text), got {len(scores)}")
    shown = min(top, n)
    fig, axes = _figure(1, 2, figsize=(9.0, 3.0), width_ratios=[1.0, 2.2])
    image_ax, text_ax = axes[0]
    image_ax.imshow(to_display_image(query_image, mean, std))
    image_ax.set_axis_off()
    image_ax.set_title("query", fontsize=9)
    text_ax.set_axis_off()
    text_ax.set_title(title if title else f"top {shown} texts", fontsize=9, loc="left")
    for rank in range(shown):
        mark = "\u2713" if correct[rank] else "\u2717"
        score = f" ({float(scores[rank]):.3f})" if scores is not None else ""
        line = textwrap.shorten(str(texts_ranked[rank]), width=width, placeholder="...")
        text_ax.text(0.0, 1.0 - (rank + 0.5) / max(top, 1), f"{rank + 1}. {mark} {line}{score}",
                     transform=text_ax.transAxes, va="center", ha="left", fontsize=9,
                     color="forestgreen" if correct[rank] else "firebrick")
    return fig


# --------------------------------------------------------------------------------------------------------------
# Attention masks, similarities and expert usage
# --------------------------------------------------------------------------------------------------------------
def plot_attention_mask(mask: Any, segment_labels: Sequence[tuple[str, int, int]] | None = None,
                        title: str | None = None, ax: Axes | None = None) -> Figure:
    """An attention mask with its segments marked (e.g. [<SPE>, image, words, <SPE> x T] for captioning).

    Args:
        mask: (T, T) bool, ``mask[i, j] = True`` where query token i may attend to key token j (dark cells).
            PyTorch's boolean ``attn_mask`` means the opposite (True = blocked): pass ``~attn_mask``.
        segment_labels: ``(name, start, end)`` per segment, ``end`` exclusive, in token positions.
    """
    allowed = to_numpy(mask)
    if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1]:
        raise ValueError(f"mask: expected a square (T, T) matrix, got shape {allowed.shape}")
    if allowed.dtype != bool:
        if not np.isin(allowed, (0, 1)).all():
            raise ValueError("mask: expected bool or 0/1 values (True = may attend); for an additive float mask "
                             "pass `mask == 0`")
        allowed = allowed.astype(bool)
    size = allowed.shape[0]
    fig, ax = _single_axes(ax, figsize=(5.2, 5.0))
    ax.imshow(allowed, cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
    if segment_labels:
        centers, names = [], []
        for name, start, end in segment_labels:
            if not 0 <= start < end <= size:
                raise ValueError(f"segment_labels: segment {name!r} [{start}, {end}) does not fit in {size} tokens")
            centers.append((start + end - 1) / 2.0)
            names.append(name)
            if start > 0:
                ax.axhline(start - 0.5, color="tab:red", linewidth=1.0)
                ax.axvline(start - 0.5, color="tab:red", linewidth=1.0)
        ax.set_xticks(centers, names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(centers, names, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title if title else "attention mask (dark = may attend)")
    return fig


def plot_similarity_matrix(sim: Any, row_labels: Sequence[str] | None = None,
                           col_labels: Sequence[str] | None = None, targets: Any = None,
                           title: str | None = None, ax: Axes | None = None) -> Figure:
    """Input-candidate similarities (eq. (6)) with the chosen candidate of every row marked (eq. (5)).

    Args:
        sim: (inputs, candidates) cosine similarities or logits.
        targets: (inputs,) index of the correct candidate per row, drawn as a square; the arg-max of each row
            (the prediction of eq. (5)) is drawn as a dot, green where it hits the target.
    """
    values = to_numpy(sim).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"sim: expected (inputs, candidates), got shape {values.shape}")
    rows, cols = values.shape
    for name, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name}: expected {n} labels, got {len(labels)}")
    fig, ax = _single_axes(ax, figsize=(min(2.0 + 0.35 * cols, 12.0), min(1.5 + 0.3 * rows, 10.0)))
    image = ax.imshow(values, cmap="magma", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85, label="similarity")
    predicted = values.argmax(axis=1)
    if targets is not None:
        target = _as_vector(targets, rows, "targets").astype(np.int64)
        ax.scatter(target, np.arange(rows), marker="s", s=60, facecolors="none", edgecolors="deepskyblue",
                   linewidths=1.5, label="target")
        hit = predicted == target
    else:
        hit = np.ones(rows, dtype=bool)
    ax.scatter(predicted, np.arange(rows), marker="o", s=14, c=np.where(hit, "limegreen", "red"),
               label="arg max (eq. (5))")
    if row_labels is not None:
        ax.set_yticks(range(rows), row_labels, fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(cols), col_labels, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("candidate target y")
    ax.set_ylabel("input x")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if col_labels is None else -0.3), ncol=2,
              fontsize=7, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_gate_heatmap(usage: Any, row_labels: Sequence[str], title: str | None = None,
                      expert_labels: Sequence[str] | None = None, annotate: bool = True,
                      ax: Axes | None = None) -> Figure:
    """Expert usage per condition (attribute combination, task, layer), as the MoE paper's Fig. 3.

    Args:
        usage: (rows, experts) fraction of tokens routed to each expert, or mean gate weights G_e(x).
        row_labels: one label per row.
        annotate: write each value in its cell (only drawn when there are at most 400 cells).
    """
    values = to_numpy(usage).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"usage: expected (rows, experts), got shape {values.shape}")
    rows, experts = values.shape
    if len(row_labels) != rows:
        raise ValueError(f"row_labels: expected {rows} labels, got {len(row_labels)}")
    if expert_labels is not None and len(expert_labels) != experts:
        raise ValueError(f"expert_labels: expected {experts} labels, got {len(expert_labels)}")
    fig, ax = _single_axes(ax, figsize=(1.5 + 0.55 * experts, 0.8 + 0.35 * rows))
    image = ax.imshow(values, cmap="Blues", aspect="auto", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85, label="usage")
    if annotate and values.size <= 400:
        threshold = values.max() * 0.6
        for r in range(rows):
            for e in range(experts):
                ax.text(e, r, f"{values[r, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[r, e] > threshold else "black")
    ax.set_xticks(range(experts), expert_labels if expert_labels is not None else [f"E{e}" for e in range(experts)],
                  fontsize=8)
    ax.set_yticks(range(rows), row_labels, fontsize=8)
    ax.set_xlabel("expert")
    if title:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Training logs, data statistics and tables
# --------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, one object per non-empty line; a bad line raises naming file and line."""
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last ``window`` points (fewer at the start), so the curve keeps its first point."""
    if window <= 1:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot_curves(log_path_or_records: str | Path | Sequence[Mapping[str, Any]], keys: Sequence[str] = ("loss",),
                by: str | None = "task", smooth: int = 0, logy: bool = False, kind: str | None = None) -> Figure:
    """Training curves from a JSON-lines log: one panel per key, one line per value of ``by`` (per task).

    Args:
        log_path_or_records: a ``.jsonl`` file (one object per line, each with at least ``iteration``; the
            trainer's ``metrics.jsonl``) or the records themselves as a list of dicts.
        keys: record fields to plot, e.g. ``("loss", "lr")``; a record without a key (or with None, a
            non-finite value in the trainer's log) is left out of that panel.
        by: the field that splits a panel into lines (records without it form the line "all"); None = one line.
        smooth: moving-average window in points (0 or 1 = raw values).
        logy: logarithmic y axis.
        kind: keep only records whose ``kind`` field equals this (the trainer writes "train" and "eval").
    """
    if isinstance(log_path_or_records, (str, Path)):
        source = str(log_path_or_records)
        records = read_jsonl(log_path_or_records)
    else:
        source = "records"
        records = list(log_path_or_records)
    if not keys:
        raise ValueError("plot_curves: keys is empty; name at least one field to plot")
    if smooth < 0:
        raise ValueError(f"plot_curves: smooth must be >= 0, got {smooth}")
    if kind is not None:
        records = [record for record in records if record.get("kind") == kind]
    for index, record in enumerate(records):
        if "iteration" not in record:
            raise ValueError(f"{source}: record {index} has no 'iteration' field: {record}")

    fig, axes = _figure(1, len(keys), figsize=(4.6 * len(keys), 3.4))
    for ax, key in zip(axes[0], keys):
        series: dict[str, list[tuple[float, float]]] = {}
        for record in records:
            if key in record and record[key] is not None:
                group = str(record.get(by, "all")) if by is not None else "all"
                series.setdefault(group, []).append((float(record["iteration"]), float(record[key])))
        for group in sorted(series):
            points = np.asarray(sorted(series[group]))
            ax.plot(points[:, 0], _moving_average(points[:, 1], smooth), label=group, linewidth=1.2)
        if not series:
            ax.text(0.5, 0.5, f"no records with '{key}'", transform=ax.transAxes, ha="center", va="center")
        if logy and series:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return fig


def coco_instance_statistics(ann_file: str | Path) -> dict[str, Any]:
    """What :func:`plot_instance_statistics` draws, read from a COCO instances file (crowd regions left out).

    Returns:
        ``objects_per_image`` (one count per image, images without objects included), ``box_sizes``
        (sqrt of each box's area in pixels) and ``category_counts`` (instances per category name, in id order).
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
        width, height = annotation["bbox"][2], annotation["bbox"][3]
        sizes.append(math.sqrt(max(width, 0.0) * max(height, 0.0)))
    return {"objects_per_image": list(per_image.values()), "box_sizes": sizes, "category_counts": counts}


def plot_instance_statistics(objects_per_image: Sequence[int], box_sizes: Sequence[float],
                             category_counts: Mapping[str, int], title: str | None = None) -> Figure:
    """Three panels describing a detection set: objects per image, object sizes, instances per category.

    Args:
        objects_per_image: number of annotated objects of each image.
        box_sizes: sqrt(box area) in pixels of each object; COCO's small / medium / large limits (32, 96) are
            marked.
        category_counts: instances per category name.
    """
    fig, axes = _figure(1, 3, figsize=(13.0, 3.4), width_ratios=[1.0, 1.0, 1.6])
    per_image = np.asarray(objects_per_image, dtype=np.int64)
    sizes = np.asarray(box_sizes, dtype=np.float64)
    ax = axes[0, 0]
    if len(per_image):
        ax.hist(per_image, bins=np.arange(per_image.max() + 2) - 0.5, color="tab:blue", rwidth=0.85)
    ax.set_xlabel("objects per image")
    ax.set_ylabel("images")
    ax = axes[0, 1]
    if len(sizes):
        ax.hist(sizes, bins=30, color="tab:orange")
    for limit in (32, 96):
        if len(sizes) and sizes.max() > limit:
            ax.axvline(limit, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("object size sqrt(area) [px]")
    ax.set_ylabel("objects")
    ax = axes[0, 2]
    names = list(category_counts)
    ax.bar(range(len(names)), [category_counts[n] for n in names],
           color=[class_color(i) for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("instances")
    if title:
        fig.suptitle(title)
    return fig


def results_table_figure(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
                         float_format: str = "{:.1f}") -> Figure:
    """A table as a figure, e.g. our numbers next to the paper's; floats are formatted with ``float_format``."""
    for index, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"rows[{index}]: expected {len(columns)} cells (one per column), got {len(row)}")

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (float, np.floating)):
            return float_format.format(value)
        return str(value)

    cells = [[fmt(v) for v in row] for row in rows] or [["" for _ in columns]]
    fig, axes = _figure(figsize=(max(4.0, 1.3 * len(columns)), 0.6 + 0.32 * (len(cells) + 1)))
    ax = axes[0, 0]
    ax.set_axis_off()
    table = ax.table(cellText=cells, colLabels=list(columns), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#e8e8e8")
    if title:
        ax.set_title(title)
    return fig
