"""Images with their annotations: detections, masks, proposals, sampling points, attention maps, captions and
retrieved texts."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from .base import (
    _LEVEL_CMAP,
    _MASK_ALPHA,
    _as_boxes,
    _as_vector,
    _figure,
    _grid_shape,
    _hide_frame,
    _image_axes,
    class_color,
    to_display_image,
    to_numpy,
)


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
                    title: str | None = None, legend: bool = False, fit_captions: bool = False,
                    mask_style: str = "fill", tags: Sequence[str] | None = None, captions: str = "box",
                    ax: Axes | None = None) -> Figure:
    """Boxes with "class score" captions and semi-transparent instance masks, one stable colour per class.

    Ground truth and predictions are drawn the same way; leave ``scores=None`` for ground truth.

    Args:
        image: (3, H, W) / (H, W, 3), see :func:`to_display_image`.
        boxes_xyxy: (N, 4) absolute pixel coordinates.
        labels: (N,) class ids, or None (each instance then gets its own colour).
        scores: (N,) confidences, or None. With scores, instances below ``score_threshold`` are left out.
        masks: (N, H, W) bool, or probabilities in [0, 1] (shown where > 0.5), at the image's resolution.
        class_names: names indexed by class id, for the captions.
        legend: a legend of the classes among the drawn instances (needs ``labels``), one entry per class in
            order of class id; captions on small boxes overlap, the legend stays readable.
        fit_captions: keep every caption whole inside the image and off the captions drawn before it, where one
            of four places allows: above the box's left end, inside the box under its top edge (left or right end),
            above its right end. False (default): each caption sits above its box's top-left corner, clipped at the
            image's border.
        mask_style: "fill" (default) tints each mask with its class colour; "outline" draws only its contour, so
            the object keeps its own colour (for figures whose reader compares colours, e.g. with captions).
        tags: (N,) a short mark put before each instance's caption (e.g. a verdict: "✓", "✗"), or None.
        captions: "box" (default) writes each caption at its box; "key" writes only a number at the box and lists
            "number caption" under the image, in the box's colour: for crowded panels, where several boxes share one
            small object and their captions would cover it.
    """
    if mask_style not in ("fill", "outline"):
        raise ValueError(f"mask_style: expected 'fill' or 'outline', got {mask_style!r}")
    if captions not in ("box", "key"):
        raise ValueError(f"captions: expected 'box' or 'key', got {captions!r}")
    if captions == "key" and legend:
        raise ValueError("captions='key' lists the captions under the image: it cannot share it with legend=True")
    picture = to_display_image(image, mean, std)
    height, width = picture.shape[:2]
    boxes = _as_boxes(boxes_xyxy, "boxes_xyxy")
    n = len(boxes)
    labels_np = None if labels is None else _as_vector(labels, n, "labels").astype(np.int64)
    scores_np = None if scores is None else _as_vector(scores, n, "scores").astype(np.float64)
    keep = np.ones(n, dtype=bool) if scores_np is None else scores_np >= score_threshold
    if tags is not None and len(tags) != n:
        raise ValueError(f"tags: expected {n} (one per box), got {len(tags)}")

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
            if mask_style == "outline":
                if region.any() and not region.all():
                    ax.contour(region.astype(np.float32), levels=[0.5], colors=[colors[i]], linewidths=1.2)
                continue
            overlay[region, :3] = colors[i]
            overlay[region, 3] = _MASK_ALPHA
        if mask_style == "fill":
            ax.imshow(overlay, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")

    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    placed = []                        # display-space extents of the captions drawn so far (fit_captions)
    key: list[tuple[Any, str]] = []    # (colour, "number caption") of each numbered box (captions="key")
    if fit_captions and title:
        ax.set_title(title)            # the title takes its room before the captions are measured
    if fit_captions:
        ax.figure.draw_without_rendering()     # lay the figure out once, so that extents are final
    for i in np.flatnonzero(keep):
        x0, y0, x1, y1 = boxes[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[i], linewidth=1.5))
        caption = _detection_caption(i, labels_np, scores_np, class_names)
        if tags is not None and tags[i]:
            caption = f"{tags[i]} {caption}".strip()
        if caption and captions == "key":
            key.append((colors[i], f"{len(key) + 1}  {caption}"))
            caption = str(len(key))
        if caption:
            text = ax.text(x0, y0, caption, fontsize=7, color="white", va="bottom", ha="left", clip_on=True,
                           bbox=dict(facecolor=colors[i], alpha=0.8, pad=1.0, edgecolor="none"))
            if fit_captions:
                placed.append(_fit_caption(ax, text, (x0, y0, x1, y1), placed))
    if key:
        ax.legend([Rectangle((0, 0), 1, 1, facecolor=color, edgecolor="none") for color, _ in key],
                  [entry for _, entry in key], loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=7,
                  frameon=False, handlelength=1.0)
    if legend:
        if labels_np is None:
            raise ValueError("legend: needs labels (one class per instance)")
        shown = sorted({int(label) for label in labels_np[keep]})
        handles = [Rectangle((0, 0), 1, 1, facecolor=class_color(label), edgecolor="none") for label in shown]
        names = [_detection_caption(0, np.array([label]), None, class_names) for label in shown]
        if handles:
            ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def _fit_caption(ax: Axes, text: Any, box: tuple[float, float, float, float], placed: list) -> Any:
    """Place a caption drawn above its box's top-left corner at the first of: above the box's left end, inside the
    box under its top edge (left end, then right end), above the box's right end, under the box (left end, then
    right end), inside the box over its bottom edge (left end), that lies whole inside the image and off the
    ``placed`` extents. When none does, the place inside the image that overlaps the placed captions
    least, a caption that would cross the image's left or right border being pushed back inside it (see
    ``draw_detections(fit_captions=True)``). Before that last resort, crowded captions stack in a column above or
    under the box, each joined to its box by a leader line. Returns its final display-space extent."""
    frame = ax.get_window_extent()
    margin = 2.0 * ax.figure.dpi / 72      # display pixels: the caption's bbox pad (1 pt) and a glyph's overhang
    frame = Bbox.from_extents(frame.x0 + margin, frame.y0, frame.x1 - margin, frame.y1)     # at the side borders
    x0, y0, x1, y1 = box
    left_edge, right_edge = ax.get_xlim()
    inset = margin * (right_edge - left_edge) / max(ax.get_window_extent().width, 1.0)     # the same in data units
    left_edge, right_edge = left_edge + inset, right_edge - inset
    right = min(x1, right_edge)
    # (x, y, ha, va) in data units; the y axis points down, so va="bottom" at y0 is above the box
    candidates = [(x0, y0, "left", "bottom"), (x0, y0, "left", "top"), (right, y0, "right", "top"),
                  (right, y0, "right", "bottom"), (x0, y1, "left", "top"), (right, y1, "right", "top"),
                  (x0, y1, "left", "bottom")]

    def place(x, y, ha, va):
        text.set_position((x, y))
        text.set_ha(ha)
        text.set_va(va)
        return text.get_window_extent()

    best, best_cost = candidates[1], None
    for pushed in (False, True):            # second round: each place pushed back inside the image's side borders
        for x, y, ha, va in candidates:
            bounds = place(x, y, ha, va)
            if pushed:
                if bounds.x1 > frame.x1 + 0.5:
                    x, ha = right_edge, "right"
                elif bounds.x0 < frame.x0 - 0.5:
                    x, ha = left_edge, "left"
                else:
                    continue
                bounds = place(x, y, ha, va)
            inside = _inside(bounds, frame)
            overlap = sum(_area(bounds, o) for o in placed)
            if inside and overlap == 0:
                return bounds
            cost = (not inside, overlap)
            if best_cost is None or cost < best_cost:
                best, best_cost = (x, y, ha, va), cost
    # Third round, for crowded objects (several boxes on one small object): a column of places 1.3 caption heights
    # apart (room for their frames) above the box and under it, nearest first, each joined to its box by a line.
    bottom_edge, top_edge = ax.get_ylim()                  # the y axis points down: ylim is (bottom, top)
    step = 1.3 * place(x0, y0, "left", "bottom").height * (bottom_edge - top_edge) / max(frame.height, 1.0)
    anchor_x = min(max(x0, left_edge), right_edge)
    for k in range(1, 9):
        for y, va, corner in ((y0 - k * step, "bottom", y0), (y1 + k * step, "top", y1)):
            bounds = place(anchor_x, y, "left", va)
            if bounds.x1 > frame.x1 + 0.5:                  # pushed back inside the right border
                bounds = place(right_edge, y, "right", va)
            if _inside(bounds, frame) and not any(_area(bounds, o) > 0 for o in placed):
                ax.plot([text.get_position()[0], x0], [y, corner], color=text.get_bbox_patch().get_facecolor(),
                        linewidth=0.8, alpha=0.9, solid_capstyle="butt")
                return bounds
    return place(*best)


def _inside(bounds: Bbox, frame: Bbox) -> bool:
    """Whether a display-space extent lies whole inside ``frame`` (half a pixel of tolerance)."""
    return (bounds.x0 >= frame.x0 - 0.5 and bounds.x1 <= frame.x1 + 0.5
            and bounds.y0 >= frame.y0 - 0.5 and bounds.y1 <= frame.y1 + 0.5)


def _area(a: Bbox, b: Bbox) -> float:
    """Overlap of two display-space extents, in square pixels."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


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
                   title: str | None = None, ax: Axes | None = None, score_label: str = "objectness") -> Figure:
    """The ``top`` region proposals by objectness, coloured by their objectness (Sec. 4.1, query selection).

    Args:
        boxes: (N, 4) absolute pixel (x0, y0, x1, y1).
        objectness: (N,) any score that orders the proposals (logit or probability); the colour bar shows it
            as given.
        score_label: the colour bar's label (e.g. "σ(objectness)" for probabilities).
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
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, label=score_label)
    h, w = picture.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title if title else f"top {len(order)} of {len(boxes_np)} proposals")
    return fig


def draw_sampling_points(image: Any, reference_point: Any, sampling_locations: Any, attention_weights: Any,
                         level_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, title: str | None = None,
                         ax: Axes | None = None, legend: bool | str = True) -> Figure:
    """Where one query of multi-scale deformable attention looks: its sampling points, one colour per feature
    level, each point's area proportional to its attention weight.

    Args:
        reference_point: (2,) normalised (x, y) in [0, 1].
        sampling_locations: (levels, points, 2) or (heads, levels, points, 2), normalised (x, y) in [0, 1]
            (the layout of Deformable-DETR's ``sampling_locations`` for one query).
        attention_weights: (levels, points) or (heads, levels, points); softmax-normalised over levels x points.
        level_names: a name per level for the legend (e.g. "stride 8").
        legend: True (default): the legend in the image's upper right corner; "outside": to the right of the
            image, where it covers no point; False: none (e.g. on all but one panel of a row).
    """
    if legend not in (True, False, "outside"):
        raise ValueError(f"legend: expected True, False or 'outside', got {legend!r}")
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
    if legend:
        drawn = (ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
                 if legend == "outside" else ax.legend(loc="upper right", fontsize=7, framealpha=0.8))
        for handle in getattr(drawn, "legend_handles", getattr(drawn, "legendHandles", [])):
            if hasattr(handle, "set_sizes"):      # a level's marker: one size for all, not its first point's weight
                handle.set_sizes([40.0])
    if title:
        ax.set_title(title)
    return fig


def attention_heatmaps(image: Any, maps: Any, titles: Sequence[str] | None = None, ncols: int = 5,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       padding: Any = None, relative: bool = False, grey_image: bool = False) -> Figure:
    """Attention maps overlaid on the image, one panel per map (e.g. the M' attention poolings of v2 eq. (3)).

    Each map is drawn cell by cell (no interpolation: a cell of the feature grid is one block of the image), so a
    weight never bleeds into a neighbouring cell or into padding.

    Args:
        image: the (padded) image whose feature grid the maps live on; the grid is stretched over all of it.
        maps: (M, h, w) non-negative weights on the feature grid of F_L.
        padding: optional (h, w) bool, True where a cell is padding: those cells are hatched grey instead of
            coloured (their weight is zero by construction, not by choice).
        relative: False (default): each map is scaled to its own maximum, which shows *where* a map looks but
            makes a uniform map look fully lit. True: every map shows weight x (number of valid cells), the
            weight relative to a uniform average, on one diverging scale shared by all panels (white = the
            uniform share, red = more, blue = less, symmetric in log and reaching the largest ratio of any panel),
            with a colour bar; a uniform map is then plain white.
        grey_image: draw the image underneath in grey levels, so that its own colours cannot be read as weights.
    """
    picture = to_display_image(image, mean, std)
    if grey_image:                                     # (H, W, C) floats in [0, 1]: luminance, kept as RGB
        weights = np.array([0.299, 0.587, 0.114])[:picture.shape[-1]]
        luminance = (picture @ (weights / weights.sum())).clip(0.0, 1.0)
        picture = np.repeat(luminance[..., None], 3, axis=-1)
    heat = to_numpy(maps).astype(np.float64)
    if heat.ndim == 2:
        heat = heat[None]
    if heat.ndim != 3:
        raise ValueError(f"maps: expected (M, h, w), got shape {heat.shape}")
    num_maps = heat.shape[0]
    if titles is not None and len(titles) != num_maps:
        raise ValueError(f"titles: expected {num_maps} titles, got {len(titles)}")
    pad = np.zeros(heat.shape[1:], dtype=bool) if padding is None else to_numpy(padding).astype(bool)
    if pad.shape != heat.shape[1:]:
        raise ValueError(f"padding: expected the grid shape {heat.shape[1:]} (h, w), got {pad.shape}")
    if pad.all():
        raise ValueError("padding: every cell is padding; nothing to draw")
    rows, cols = _grid_shape(num_maps, ncols)
    fig, axes = _figure(rows, cols, figsize=(2.2 * cols + (0.6 if relative else 0.0), 2.3 * rows))
    h, w = picture.shape[:2]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    if relative:
        ratio = heat * (~pad).sum()
        # The scale is symmetric in log around 1 and reaches the largest ratio of any panel (at least 2, so a
        # near-uniform figure stays pale); cells far below the uniform share all take the darkest blue.
        spread = max(2.0, float(ratio[:, ~pad].max()))
        norm = matplotlib.colors.LogNorm(vmin=1.0 / spread, vmax=spread)
        cmap = matplotlib.colormaps["RdBu_r"]
    image_artist = None
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= num_maps:
            continue
        ax.imshow(picture)
        if relative:
            values = np.ma.masked_array(np.clip(ratio[i], 1.0 / spread, spread), mask=pad)
            image_artist = ax.imshow(values, cmap=cmap, norm=norm, alpha=0.6, extent=extent, interpolation="nearest")
        else:
            peak = heat[i][~pad].max()
            values = np.ma.masked_array(heat[i] / peak if peak > 0 else heat[i], mask=pad)
            ax.imshow(values, cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0, extent=extent,
                      interpolation="nearest")
        if pad.any():
            cell_h, cell_w = h / pad.shape[0], w / pad.shape[1]
            for r, c in zip(*np.nonzero(pad)):
                ax.add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, facecolor="lightgrey",
                                       edgecolor="grey", hatch="////", linewidth=0.0, alpha=0.85))
        ax.set_title(titles[i] if titles is not None else f"pool {i + 1}", fontsize=8)
    if relative and image_artist is not None:
        clipped = bool((ratio[:, ~pad] < 1.0 / spread).any())          # cells below the scale: the arrow's blue
        bar = fig.colorbar(image_artist, ax=list(axes.flat), shrink=0.8, extend="min" if clipped else "neither",
                           label="weight / uniform weight")
        ticks = [2.0 ** k for k in range(-8, 9) if 1.0 / spread <= 2.0 ** k <= spread]
        bar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
        bar.minorticks_off()
    return fig


def show_captions(images: Sequence[Any], captions_pred: Sequence[str] | None = None,
                  captions_gt: Sequence[str | Sequence[str]] | None = None, ncols: int = 4, width: int = 34,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  fontsize: float = 7) -> Figure:
    """Images with the predicted caption above (bold) and the reference caption(s) below (grey).

    Args:
        captions_pred: one string per image, or None.
        captions_gt: one string or a list of reference strings per image, or None.
        width: characters per line before wrapping.
        fontsize: of the reference captions (the predicted caption is one point larger).
    """
    n = len(images)
    if captions_pred is None and captions_gt is None:
        raise ValueError("show_captions: pass captions_pred, captions_gt or both")
    for name, values in (("captions_pred", captions_pred), ("captions_gt", captions_gt)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per image), got {len(values)}")
    titles = [None if captions_pred is None else textwrap.fill(captions_pred[i], width) for i in range(n)]
    labels = []
    for i in range(n):
        if captions_gt is None:
            labels.append(None)
            continue
        refs = [captions_gt[i]] if isinstance(captions_gt[i], str) else list(captions_gt[i])
        # A dash in front of each reference keeps several wrapped references apart.
        labels.append("\n".join(textwrap.fill(r, width, initial_indent="- ", subsequent_indent="  ") for r in refs)
                      if len(refs) > 1 else textwrap.fill(refs[0], width))
    # Each panel is as wide as a line of ``width`` characters (so the image is not squeezed by its captions) and
    # as tall as the image plus the most lines of text any panel has.
    panel = max(2.6, width * fontsize / 100)
    lines = max((text.count("\n") + 1 for text in titles + labels if text), default=0)
    rows, cols = _grid_shape(n, ncols)
    fig, axes = _figure(rows, cols, figsize=(panel * cols, (panel + 1.35 * lines * fontsize / 72 + 0.2) * rows))
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(to_display_image(images[i], mean, std))
        _hide_frame(ax)
        if titles[i] is not None:
            ax.set_title(titles[i], fontsize=fontsize + 1, fontweight="bold")
        if labels[i] is not None:
            ax.set_xlabel(labels[i], fontsize=fontsize, color="dimgray")
    return fig


def show_retrieval(query_image: Any, texts_ranked: Sequence[str], correct: Sequence[bool],
                   scores: Sequence[float] | None = None, top: int = 5, width: int = 80, title: str | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   numbered: bool = True) -> Figure:
    """Image-to-text retrieval for one query: the image, and its ``top`` ranked texts marked right / wrong.

    Args:
        texts_ranked: candidate texts, best first.
        correct: one bool per ranked text, True where the text belongs to the query image.
        scores: the similarity of each ranked text, shown next to it.
        width: characters per text before it is shortened.
        title: heading of the text panel; default "top k texts".
        numbered: number the texts by rank (a ranking); False lists them with bullets (a set in no order).
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
        bullet = f"{rank + 1}." if numbered else "\u2022"
        text_ax.text(0.0, 1.0 - (rank + 0.5) / max(top, 1), f"{bullet} {mark} {line}{score}",
                     transform=text_ax.transAxes, va="center", ha="left", fontsize=9,
                     color="forestgreen" if correct[rank] else "firebrick")
    return fig
