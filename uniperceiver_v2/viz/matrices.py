"""Matrices drawn as heat maps: attention masks, similarities, expert usage (gates)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .base import (
    _as_vector,
    _single_axes,
    to_numpy,
)


def plot_attention_mask(mask: Any, segment_labels: Sequence[tuple[str, int, int]] | None = None,
                        title: str | None = None, ax: Axes | None = None) -> Figure:
    """An attention mask with its segments marked (e.g. [<SPE>, image, words, <SPE> x T] for captioning).

    Args:
        mask: (T, T) bool, ``mask[i, j] = True`` where query token i may attend to key token j (grey cells; masked
            pairs are white). PyTorch's boolean ``attn_mask`` means the opposite (True = blocked): pass ``~attn_mask``.
        segment_labels: ``(name, start, end)`` per segment, ``end`` exclusive, in token positions.
        title: the axes' title; the colour key "(grey = may attend)" is added on a second line unless the title
            already says "may attend".
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
    key = "(grey = may attend)"
    if not title:
        title = f"attention mask {key}"
    elif "may attend" not in title:
        title = f"{title}\n{key}"                     # a custom title keeps the colour key
    ax.set_title(title)
    return fig


def plot_similarity_matrix(sim: Any, row_labels: Sequence[str] | None = None,
                           col_labels: Sequence[str] | None = None, targets: Any = None,
                           title: str | None = None, ax: Axes | None = None,
                           value_label: str = "similarity", row_title: str = "input x",
                           col_title: str = "candidate target y") -> Figure:
    """Input-candidate similarities (v2 eq. (6)) with the chosen candidate of every row marked (v2 eq. (5)).

    Args:
        sim: (inputs, candidates) cosine similarities or logits, or the softmax probabilities of v2 eq. (6).
        value_label: what the values are, written on the colour bar ("cosine", "probability", ...).
        row_title, col_title: the axes' titles (what the rows and the columns are).
        targets: (inputs,) index of the correct candidate per row, drawn as a square; the arg-max of each row
            (the prediction of v2 eq. (5)) is drawn as a dot, green where it hits the target.
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
    fig.colorbar(image, ax=ax, shrink=0.85, label=value_label)
    predicted = values.argmax(axis=1)
    dot = {"marker": "o", "linestyle": "", "markersize": 4}       # the legend's dots, drawn as the scatter's
    if targets is not None:
        target = _as_vector(targets, rows, "targets").astype(np.int64)
        handles = [ax.scatter(target, np.arange(rows), marker="s", s=60, facecolors="none",
                              edgecolors="deepskyblue", linewidths=1.5, label="target")]
        hit = predicted == target
        # One entry per dot colour: a single scatter's legend entry would show the first row's colour only.
        handles += [Line2D([], [], color="limegreen", label="arg max (v2 eq. (5)), correct", **dot),
                    Line2D([], [], color="red", label="arg max, wrong", **dot)]
    else:
        hit = np.ones(rows, dtype=bool)
        handles = [Line2D([], [], color="limegreen", label="arg max (v2 eq. (5))", **dot)]
    ax.scatter(predicted, np.arange(rows), marker="o", s=14, c=np.where(hit, "limegreen", "red"))
    if row_labels is not None:
        ax.set_yticks(range(rows), row_labels, fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(cols), col_labels, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12 if col_labels is None else -0.3),
              ncol=len(handles), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_gate_heatmap(usage: Any, row_labels: Sequence[str], title: str | None = None,
                      expert_labels: Sequence[str] | None = None, annotate: bool = True,
                      ax: Axes | None = None, colorbar_label: str = "usage") -> Figure:
    """Expert usage per condition (attribute combination, task, layer), as the MoE paper's Fig. 3.

    Args:
        usage: (rows, experts) fraction of tokens routed to each expert, or mean gate weights G_e(x).
        row_labels: one label per row.
        annotate: write each value in its cell (only drawn when there are at most 400 cells).
        colorbar_label: the colour bar's label (e.g. "mean gate value $G_e(x)$" for mean gate weights).
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
    fig.colorbar(image, ax=ax, shrink=0.85, label=colorbar_label)
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
