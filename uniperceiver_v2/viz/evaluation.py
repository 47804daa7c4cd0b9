"""Figures of the evaluation notebooks (07, 08) that ``viz`` does not have: top-k classification predictions next
to their images, and text-to-image retrieval rankings.

Same conventions as ``uniperceiver_v2.viz``: plain inputs (tensors, arrays, PIL images via ``viz.to_display_image``),
no pyplot state, every function returns its :class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .base import to_display_image

__all__ = ["plot_topk_predictions", "show_text_retrieval"]

_RIGHT, _WRONG, _OTHER = "forestgreen", "firebrick", "silver"


def _image_array(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):   # a PIL image
        image = np.asarray(image.convert("RGB"))
    return to_display_image(image)


def plot_topk_predictions(images: Sequence[Any], true_names: Sequence[str],
                          predictions: Sequence[Sequence[tuple[str, float]]], ncols: int = 3,
                          marked: Sequence[str] = (), chance: float | None = None,
                          title: str | None = None) -> Figure:
    """Each image next to its top-k classes (v2 eq. (5) over the class names), the true class in green.

    Args:
        images: N images (PIL, (3, H, W) or (H, W, 3)).
        true_names: the N true class names.
        predictions: per image the k best (class name, probability), best first.
        ncols: images per row.
        marked: class names whose image titles are drawn in red (e.g. the novel categories).
        chance: the probability of a uniform prediction (1 / number of classes), drawn as a dashed line.
        title: figure title.
    """
    n = len(images)
    if n < 1:
        raise ValueError("plot_topk_predictions: no images")
    if len(true_names) != n or len(predictions) != n:
        raise ValueError(f"plot_topk_predictions: {n} images, {len(true_names)} true names and "
                         f"{len(predictions)} prediction lists; expected one of each per image")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.6 * ncols, 1.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, 2 * ncols, squeeze=False, width_ratios=[1.0, 1.5] * ncols)
    marked = set(marked)
    for i in range(nrows * ncols):
        image_ax, bar_ax = axes[i // ncols, 2 * (i % ncols)], axes[i // ncols, 2 * (i % ncols) + 1]
        image_ax.set_axis_off()
        if i >= n:
            bar_ax.set_axis_off()
            continue
        image_ax.imshow(_image_array(images[i]))
        truth = str(true_names[i])
        image_ax.set_title(truth, fontsize=9, color=_WRONG if truth in marked else "black")
        names = [str(name) for name, _ in predictions[i]]
        scores = [float(score) for _, score in predictions[i]]
        positions = np.arange(len(names))
        bar_ax.barh(positions, scores, color=[_RIGHT if name == truth else _OTHER for name in names])
        bar_ax.set_yticks(positions, names, fontsize=8)
        bar_ax.invert_yaxis()
        bar_ax.set_xlim(0.0, 1.0)
        if chance is not None:
            bar_ax.axvline(chance, color="black", linestyle="--", linewidth=0.8)
        bar_ax.tick_params(axis="x", labelsize=7)
        bar_ax.set_xlabel("probability", fontsize=7)
        hit = bool(names) and names[0] == truth
        bar_ax.set_title("top-1 correct" if hit else ("in top-k" if truth in names else "not in top-k"),
                         fontsize=8, color=_RIGHT if truth in names else _WRONG)
    if title:
        fig.suptitle(title)
    return fig


def show_text_retrieval(query: str, images_ranked: Sequence[Any], correct: Sequence[bool],
                        scores: Sequence[float] | None = None, width: int = 90, title: str | None = None) -> Figure:
    """Text-to-image retrieval for one query: the text and its ranked images, the right one framed in green.

    Args:
        query: the text.
        images_ranked: the best images, best first.
        correct: one flag per ranked image, True where it is the text's image.
        scores: the similarity of each ranked image, shown under it.
        width: characters per line of the query before wrapping.
        title: heading above the query; default "text -> image".
    """
    n = len(images_ranked)
    if n < 1:
        raise ValueError("show_text_retrieval: no images")
    if len(correct) != n:
        raise ValueError(f"correct: expected {n} flags (one per ranked image), got {len(correct)}")
    if scores is not None and len(scores) != n:
        raise ValueError(f"scores: expected {n} values (one per ranked image), got {len(scores)}")
    fig = Figure(figsize=(1.9 * max(n, 3), 2.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for rank, ax in enumerate(axes):
        ax.imshow(_image_array(images_ranked[rank]))
        ax.set_xticks([])
        ax.set_yticks([])
        color = _RIGHT if correct[rank] else _WRONG
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3.0 if correct[rank] else 1.0)
        mark = "\u2713" if correct[rank] else "\u2717"
        ax.set_title(f"{rank + 1}. {mark}", fontsize=9, color=color)
        if scores is not None:
            ax.set_xlabel(f"{float(scores[rank]):.3f}", fontsize=8)
    heading = title if title else "text \u2192 image"
    fig.suptitle(f"{heading}\n\u201c{textwrap.fill(query, width)}\u201d", fontsize=9)
    return fig
