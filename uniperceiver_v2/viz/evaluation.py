"""Figures of the evaluation notebooks (07, 08) that ``viz`` does not have: top-k classification predictions next
to their images, text-to-image retrieval rankings, ranked texts (caption beams), a caption's per-step token
probabilities and the choice of calibrated stacking's gamma on halves of the novel-category scenes.

Same conventions as ``uniperceiver_v2.viz``: plain inputs (tensors, arrays, PIL images via ``viz.to_display_image``),
no pyplot state, every function returns its :class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .base import _single_axes, quoted_token, to_display_image

__all__ = ["plot_calibration", "plot_ranked_texts", "plot_token_probabilities", "plot_topk_predictions",
           "show_text_retrieval"]

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


def show_text_retrieval(query: str, images_ranked: Sequence[Any], correct: Sequence[bool] | None,
                        scores: Sequence[float] | None = None, width: int = 90, title: str | None = None) -> Figure:
    """Text-to-image retrieval for one query: the text and its ranked images, the right one framed in green.

    Args:
        query: the text.
        images_ranked: the best images, best first.
        correct: one flag per ranked image, True where it is the text's image; None when the query has no known
            image (a sentence typed by hand): the images are then numbered without a right / wrong mark.
        scores: the similarity of each ranked image, shown under it.
        width: characters per line of the query before wrapping.
        title: heading above the query; default "text -> image".
    """
    n = len(images_ranked)
    if n < 1:
        raise ValueError("show_text_retrieval: no images")
    if correct is not None and len(correct) != n:
        raise ValueError(f"correct: expected {n} flags (one per ranked image), got {len(correct)}")
    if scores is not None and len(scores) != n:
        raise ValueError(f"scores: expected {n} values (one per ranked image), got {len(scores)}")
    fig = Figure(figsize=(1.9 * max(n, 3), 2.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for rank, ax in enumerate(axes):
        ax.imshow(_image_array(images_ranked[rank]))
        ax.set_xticks([])
        ax.set_yticks([])
        if correct is None:
            color, mark, line = "black", "", 1.0
        else:
            color = _RIGHT if correct[rank] else _WRONG
            mark, line = (" \u2713", 3.0) if correct[rank] else (" \u2717", 1.0)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(line)
        ax.set_title(f"{rank + 1}.{mark}", fontsize=9, color=color)
        if scores is not None:
            ax.set_xlabel(f"{float(scores[rank]):.3f}", fontsize=8)
    heading = title if title else "text \u2192 image"
    fig.suptitle(f"{heading}\n\u201c{textwrap.fill(query, width)}\u201d", fontsize=9)
    return fig


def plot_ranked_texts(texts: Sequence[str], scores: Sequence[float] | None = None,
                      labels: Sequence[str] | None = None, highlight: int | None = None, width: int = 60,
                      title: str | None = None, ax: Axes | None = None) -> Figure:
    """Texts listed one per line, best first, each with its label and score (e.g. the captions that beam searches
    of several widths found, with their sums of log-probabilities).

    Args:
        texts: the texts, in the order to list them.
        scores: one value per text, written after it.
        labels: one short label per text written before it (default "1.", "2.", ...).
        highlight: index of the text to set in bold (e.g. the one the other panels show).
        width: characters per line; a longer text wraps onto a second line, and is cut at the end of that one
            (a caption of sub-words can be one long word), so two hypotheses that differ late still read apart.
    """
    n = len(texts)
    for name, values in (("scores", scores), ("labels", labels)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per text), got {len(values)}")
    if highlight is not None and not 0 <= highlight < n:
        raise ValueError(f"highlight: expected an index in [0, {n}), got {highlight}")
    fig, ax = _single_axes(ax, figsize=(6.0, 0.6 + 0.3 * max(n, 1)))
    ax.set_axis_off()
    for row in range(n):
        label = labels[row] if labels is not None else f"{row + 1}."
        score = f"  ({float(scores[row]):.3f})" if scores is not None else ""
        lines = textwrap.wrap(" ".join(str(texts[row]).split()), width) or ["(empty)"]
        if len(lines) > 2:
            lines = [lines[0], lines[1][:width - 3] + "..."]
        line = "\n".join(lines)
        ax.text(0.0, 1.0 - (row + 0.5) / max(n, 1), f"{label} {line}{score}", transform=ax.transAxes,
                va="center", ha="left", fontsize=9, fontweight="bold" if row == highlight else "normal")
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return fig


def plot_token_probabilities(tokens: Sequence[str], probabilities: Sequence[float],
                             alternatives: Sequence[tuple[str, float]] | None = None, title: str | None = None,
                             ax: Axes | None = None, fontsize: float = 7) -> Figure:
    """The probability of each chosen token of a generated sequence (bars), step by step, and at each step the most
    likely token that was *not* chosen (dot, named above it): where a beam kept a less likely word, the dot is
    above the bar.

    Args:
        tokens: the T chosen tokens (the x axis).
        probabilities: (T,) their probabilities at their step.
        alternatives: per step (token, probability) of the best other token, or None.
        fontsize: of the best other tokens' names and the legend (the chosen tokens' ticks are one point larger).
    """
    values = np.asarray([float(p) for p in probabilities])
    n = len(tokens)
    if values.shape != (n,):
        raise ValueError(f"probabilities: expected {n} values (one per token), got {values.shape[0]}")
    if alternatives is not None and len(alternatives) != n:
        raise ValueError(f"alternatives: expected {n} (token, probability) pairs, got {len(alternatives)}")
    fig, ax = _single_axes(ax, figsize=(max(4.0, 0.55 * n + 1.5), 3.0))
    x = np.arange(n)
    ax.bar(x, values, color="tab:blue", width=0.7, label="chosen token")
    if alternatives is not None and n:
        other = np.asarray([float(p) for _, p in alternatives])
        ax.scatter(x, other, color="tab:orange", edgecolors="black", linewidths=0.4, s=22, zorder=4,
                   label="best other token")
        for i, (token, probability) in enumerate(alternatives):
            # a few points above its dot (the dot stays visible against the bar); a white backing keeps the name
            # readable where it runs over a (dark blue) bar
            ax.annotate(quoted_token(token), (i, float(probability)), xytext=(0, 5), textcoords="offset points",
                        rotation=90, ha="center", va="bottom", fontsize=fontsize, color="tab:orange", zorder=3,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 0.8})
    ax.set_xticks(x, [quoted_token(token) for token in tokens], rotation=45, ha="right", fontsize=fontsize + 1)
    ax.set_ylim(0.0, 1.25)                       # room above 1 for the rotated names and the legend ...
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])   # ... but a probability's axis stops at 1
    ax.set_ylabel("probability")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=fontsize, loc="upper right", frameon=False, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_calibration(penalties: Sequence[float], fold_ap50: Sequence[Sequence[float]], chosen: Sequence[float],
                     pooled_ap50: float | None = None, ax: Axes | None = None) -> Figure:
    """Novel box AP50 of each half of the novel-category scenes against calibrated stacking's gamma
    (``engine.evaluation.CalibratedNovelResult``): one line per half, a star where each half was scored (the gamma
    chosen on the other half), and the pooled AP50 as a dashed line when given."""
    if any(len(row) != len(penalties) for row in fold_ap50):
        raise ValueError("plot_calibration: every half needs one AP50 per gamma")
    if len(chosen) != len(fold_ap50):
        raise ValueError(f"plot_calibration: {len(chosen)} chosen gammas for {len(fold_ap50)} halves")
    fig, ax = _single_axes(ax, figsize=(4.8, 3.4))
    positions = np.arange(len(penalties))            # evenly spaced: the candidates are usually 0, 2, 4, 8, ...
    for half, (row, gamma) in enumerate(zip(fold_ap50, chosen)):
        line, = ax.plot(positions, row, marker="o", markersize=3, label=f"half {half + 1}")
        at = list(penalties).index(gamma)
        ax.plot(positions[at], row[at], marker="*", markersize=13, color=line.get_color(), linestyle="none",
                label=f"half {half + 1} scored at gamma {gamma:g} (best on the other half)")
    if pooled_ap50 is not None:
        ax.axhline(pooled_ap50, color="black", linestyle="--", linewidth=1,
                   label=f"both halves, each at its gamma: {pooled_ap50:.3f}")
    ax.set_xticks(positions, [f"{g:g}" for g in penalties])
    ax.set_xlabel("gamma subtracted from the seen names' logits (the candidates, evenly spaced: not to scale)")
    ax.set_ylabel("novel box AP50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)  # under the axes
    return fig
