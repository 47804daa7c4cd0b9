"""Figures of the region proposal and global representation walk-throughs (notebooks 01 and 02).

Same conventions as ``uniperceiver_v2.viz``: plain inputs (tensors, arrays, lists), images CHW/HWC (undo a
normalisation with ``mean`` / ``std``), boxes in absolute pixels (x0, y0, x1, y1), and every function returns the
matplotlib ``Figure`` it drew on (built without pyplot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .base import (
    _as_boxes,
    _figure,
    _grid_shape,
    _image_axes,
    _single_axes,
    class_color,
    set_log_scale,
    to_display_image,
    to_numpy,
)

__all__ = ["draw_denoising_boxes", "plot_bars", "plot_cost_matrices", "plot_level_maps", "plot_token_layout"]


def plot_level_maps(image: Any, maps: Sequence[Any], titles: Sequence[str] | None = None, overlay: bool = True,
                    shared_scale: bool = False, cmap: str = "magma", colorbar_label: str | None = None,
                    ncols: int = 6, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Figure:
    """The image, then one panel per feature level: each map stretched over the image *without* interpolation,
    so that a cell of a stride-s map covers s x s pixels and the levels' resolutions can be compared.

    Args:
        maps: L maps (H_l, W_l) of any sizes covering the same (padded) image, e.g. channel norms of F_0..F_3 or the
            encoder objectness of each level.
        titles: one per map (e.g. "F'_2, stride 16").
        overlay: draw each map half-transparent over the image (False: the map alone).
        shared_scale: one colour scale for all maps (to compare values across levels) instead of one per map.
        colorbar_label: with ``shared_scale``, draw one colour bar with this label.
    """
    picture = to_display_image(image, mean, std)
    arrays = [to_numpy(m).astype(np.float64) for m in maps]
    if not arrays:
        raise ValueError("maps: expected at least one (H_l, W_l) map")
    for i, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(f"maps[{i}]: expected a 2-D (H_l, W_l) map, got shape {array.shape}")
    if titles is not None and len(titles) != len(arrays):
        raise ValueError(f"titles: expected {len(arrays)} titles (one per map), got {len(titles)}")
    rows, cols = _grid_shape(len(arrays) + 1, ncols)
    fig, axes = _figure(rows, cols, figsize=(2.4 * cols, 2.5 * rows))
    flat = list(axes.flat)
    for ax in flat:
        ax.set_axis_off()
    flat[0].imshow(picture)
    h, w = picture.shape[:2]
    flat[0].set_title(f"image {h} x {w}", fontsize=9)
    low = min(a.min() for a in arrays) if shared_scale else None
    high = max(a.max() for a in arrays) if shared_scale else None
    shown = None
    for i, (ax, array) in enumerate(zip(flat[1:], arrays)):
        if overlay:
            ax.imshow(picture)
        shown = ax.imshow(array, cmap=cmap, alpha=0.6 if overlay else 1.0, vmin=low, vmax=high,
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
        ax.set_title(titles[i] if titles is not None else f"level {i}", fontsize=9)
    if shared_scale and colorbar_label and shown is not None:
        fig.colorbar(shown, ax=flat[1:len(arrays) + 1], shrink=0.8, label=colorbar_label)
    return fig


def draw_denoising_boxes(image: Any, gt_boxes: Any, positive_boxes: Any, negative_boxes: Any,
                         title: str | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, ax: Axes | None = None,
                         legend: bool = True) -> Figure:
    """Contrastive denoising queries of one group: each ground-truth box (white) with its positive (solid, in the
    object's colour) and negative (dashed, same colour) noised copies.

    Args:
        gt_boxes, positive_boxes, negative_boxes: (K, 4) absolute pixel xyxy; row k of each belongs to object k.
        legend: draw the legend of the three box styles (e.g. False on all but one panel of a grid).
    """
    picture = to_display_image(image, mean, std)
    gt = _as_boxes(gt_boxes, "gt_boxes")
    positive = _as_boxes(positive_boxes, "positive_boxes")
    negative = _as_boxes(negative_boxes, "negative_boxes")
    if not len(gt) == len(positive) == len(negative):
        raise ValueError(f"expected one positive and one negative per ground-truth box, got {len(gt)} GT, "
                         f"{len(positive)} positives, {len(negative)} negatives")
    fig, ax = _image_axes(ax, picture)
    for k in range(len(gt)):
        color = class_color(k)
        for box, style, width, edge in ((gt[k], "-", 2.2, "white"), (positive[k], "-", 1.4, color),
                                        (negative[k], "--", 1.4, color)):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=edge, linestyle=style,
                                   linewidth=width))
    h, w = picture.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    handles = [Patch(facecolor="none", edgecolor="white", linewidth=2, label="ground truth"),
               Patch(facecolor="none", edgecolor="grey", label="positive (objectness 1; colour: its object)"),
               Patch(facecolor="none", edgecolor="grey", linestyle="--",
                     label="negative (objectness 0; colour: its object)")]
    if legend:
        ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_cost_matrices(costs: Mapping[str, Any], assignment: tuple[Any, Any] | None = None,
                       title: str | None = None) -> Figure:
    """Matching costs, one panel per matrix (e.g. the total cost and each of its weighted terms), with the
    one-to-one assignment marked in every panel.

    Args:
        costs: name -> (K, N) cost of assigning ground-truth object k (row) to prediction n (column).
        assignment: (ground-truth indices, prediction indices) of the matched pairs, drawn as squares; the
            cheapest prediction of each row is drawn as a dot (where it differs, the one-to-one constraint won).
    """
    if not costs:
        raise ValueError("costs: expected at least one (K, N) matrix")
    matrices = {name: to_numpy(value).astype(np.float64) for name, value in costs.items()}
    shape = next(iter(matrices.values())).shape
    for name, matrix in matrices.items():
        if matrix.ndim != 2 or matrix.shape != shape:
            raise ValueError(f"costs[{name!r}]: expected shape {shape} like the first matrix, got {matrix.shape}")
    num_gt, num_pred = shape
    fig, axes = _figure(len(matrices), 1, figsize=(min(1.6 + 0.22 * num_pred, 14.0), 0.9 + (0.3 * num_gt + 0.5)
                                                    * len(matrices)))
    for ax, (name, matrix) in zip(axes[:, 0], matrices.items()):
        shown = ax.imshow(matrix, cmap="viridis_r", aspect="auto", interpolation="nearest")
        fig.colorbar(shown, ax=ax, pad=0.01, fraction=0.03).set_label(f"cost: {name}", fontsize=9)
        ax.scatter(matrix.argmin(axis=1), np.arange(num_gt), s=12, color="white", edgecolors="black",
                   linewidths=0.5, label="cheapest prediction")
        if assignment is not None:
            gt_index = to_numpy(assignment[0]).astype(np.int64)
            pred_index = to_numpy(assignment[1]).astype(np.int64)
            ax.scatter(pred_index, gt_index, marker="s", s=70, facecolors="none", edgecolors="red",
                       linewidths=1.5, label="Hungarian assignment")
        ax.set_yticks(range(num_gt), [f"GT {k}" for k in range(num_gt)], fontsize=9)
        ax.set_ylabel(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=9)
    axes[-1, 0].set_xlabel("prediction (decoder query)")
    # the key under the panels: above them it would share the title's line
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    if title:
        axes[0, 0].set_title(title, loc="left", fontsize=10)
    return fig


def plot_bars(values: Mapping[str, Any], stacked_by: Sequence[str] | None = None, ylabel: str | None = None,
              logy: bool = False, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Bars with their values written on them: one bar per key, or, with ``stacked_by``, one stacked bar per key
    whose segments are the entries of ``values[key]`` (e.g. the five loss terms of each prediction set).

    Args:
        values: key -> a number, or, with ``stacked_by``, a sequence of ``len(stacked_by)`` numbers.
        stacked_by: names of the stacked segments (legend).
        logy: logarithmic y axis; zero bars are then labelled "0" at the bottom of the axis.
    """
    if not values:
        raise ValueError("values: nothing to draw")
    names = list(values)
    if stacked_by is None:
        data = np.array([[float(values[n])] for n in names])
    else:
        data = np.array([[float(v) for v in values[n]] for n in names])
        if data.shape[1] != len(stacked_by):
            raise ValueError(f"values: expected {len(stacked_by)} numbers per key (one per stacked_by entry), "
                             f"got {data.shape[1]}")
    fig, ax = _single_axes(ax, figsize=(max(4.0, 0.6 * len(names) + 2.0), 3.4))
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for j in range(data.shape[1]):
        label = stacked_by[j] if stacked_by is not None else None
        color = class_color(j) if stacked_by is not None else "tab:blue"
        ax.bar(x, data[:, j], bottom=bottom, color=color, label=label, width=0.7)
        bottom += data[:, j]
    if logy:
        set_log_scale(ax, "y")
        positive = bottom[bottom > 0]
        floor = positive.min() / 10 if len(positive) else 1e-3
        ax.set_ylim(bottom=floor)
    if bottom.max() > 0:       # room above the tallest bar for its value
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (high / low) ** 0.08 if logy else high * 1.06)
    for i, total in enumerate(bottom):
        text, y = (f"{total:.3g}", total) if total > 0 else ("0", ax.get_ylim()[0])
        ax.text(i, y, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=35 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                  fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel)
    if stacked_by is not None:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_token_layout(layouts: Mapping[str, tuple[Any, Any]], type_names: Mapping[int, str],
                      title: str | None = None, legend_fontsize: float = 7) -> Figure:
    """Token sequences as strips, one row per sequence: a cell per token coloured by its type, padding hatched.

    Args:
        layouts: row name -> (token types (T,) ints, padding mask (T,) bool or None); rows may differ in length.
        type_names: type id -> name, for the legend and the counts written on each run of equal types.
        legend_fontsize: of the legend above the strips (larger for a wide figure shown scaled down).
    """
    if not layouts:
        raise ValueError("layouts: expected at least one token sequence")
    rows = []
    for name, (types, padding) in layouts.items():
        types_np = to_numpy(types).astype(np.int64).reshape(-1)
        padding_np = (np.zeros(len(types_np), dtype=bool) if padding is None
                      else to_numpy(padding).astype(bool).reshape(-1))
        if padding_np.shape != types_np.shape:
            raise ValueError(f"layouts[{name!r}]: padding mask of shape {padding_np.shape} for {types_np.shape} types")
        unknown = sorted(set(types_np.tolist()) - set(type_names))
        if unknown:
            raise ValueError(f"layouts[{name!r}]: token types {unknown} have no entry in type_names")
        rows.append((name, types_np, padding_np))
    longest = max(len(types) for _, types, _ in rows)
    fig, ax = _single_axes(None, figsize=(min(2.5 + 0.16 * longest, 16.0), 0.6 + 0.55 * len(rows)))
    colors = {t: class_color(i) for i, t in enumerate(sorted(type_names))}
    for r, (_, types, padding) in enumerate(rows):
        for t, (kind, padded) in enumerate(zip(types, padding)):
            ax.add_patch(Rectangle((t, r - 0.4), 1.0, 0.8, facecolor=colors[kind], edgecolor="white", linewidth=0.4,
                                   hatch="////" if padded else None, alpha=0.45 if padded else 1.0))
        start = 0
        for end in range(1, len(types) + 1):       # the count in the middle of each run of one type and padding state
            if end == len(types) or (types[end], padding[end]) != (types[start], padding[start]):
                ax.text((start + end) / 2, r, str(end - start), ha="center", va="center", fontsize=7,
                        color="black" if padding[start] else "white", fontweight="bold")
                start = end
        ax.text(len(types) + 0.5, r, f"T = {len(types)}", va="center", fontsize=8)
    ax.set_xlim(-0.5, longest + max(4.0, 0.12 * longest))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    ax.set_xlabel("token position")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=colors[t], label=type_names[t]) for t in sorted(type_names)]
    handles.append(Patch(facecolor="lightgrey", hatch="////", label="padding"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles),
              fontsize=legend_fontsize, frameon=False)
    if title:
        ax.set_title(title, fontsize=max(10, legend_fontsize + 1), pad=22 + 2.5 * max(0.0, legend_fontsize - 7))
    return fig

