"""Figures of the unified decoder and Conditional-MoE walk-throughs (notebooks 03 and 04).

Same conventions as ``uniperceiver_v2.viz``: plain inputs (tensors, arrays, lists), and every function returns the
matplotlib ``Figure`` it drew on (built without pyplot). The data behind them comes from
``uniperceiver_v2.walkthrough.gating``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .base import _figure, _single_axes, class_color, to_numpy

__all__ = ["plot_attribute_bits", "plot_expert_load", "plot_expert_loads", "plot_expert_usage"]


def plot_attribute_bits(bits: Any, row_labels: Sequence[str], bit_names: Sequence[str], title: str | None = None,
                        ax: Axes | None = None) -> Figure:
    """Binary token attributes as a table of filled (1) and empty (0) cells, one row per kind of token (the MoE
    paper's Tab. 2 written out per task).

    Args:
        bits: (rows, bits) of 0 / 1.
        row_labels: one per row (e.g. "captioning · input · text (causal)").
        bit_names: one per column (``attributes.ATTRIBUTE_NAMES``).
    """
    values = to_numpy(bits).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"bits: expected (rows, bits), got shape {values.shape}")
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("bits: expected only 0 and 1")
    rows, columns = values.shape
    if len(row_labels) != rows:
        raise ValueError(f"row_labels: expected {rows} labels, got {len(row_labels)}")
    if len(bit_names) != columns:
        raise ValueError(f"bit_names: expected {columns} names, got {len(bit_names)}")
    fig, ax = _single_axes(ax, figsize=(2.5 + 0.5 * columns, 1.2 + 0.28 * rows))
    ax.imshow(values, cmap="Greens", vmin=0.0, vmax=1.4, aspect="auto", interpolation="nearest")
    for r in range(rows):
        for c in range(columns):
            ax.text(c, r, str(int(values[r, c])), ha="center", va="center", fontsize=7,
                    color="white" if values[r, c] else "grey")
    ax.set_xticks(range(columns), [f"{c}: {name}" for c, name in enumerate(bit_names)], rotation=40, ha="right",
                  fontsize=8)
    ax.set_yticks(range(rows), row_labels, fontsize=8)
    ax.set_xticks(np.arange(columns + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_expert_usage(usage: Any, row_labels: Sequence[str], layer_titles: Sequence[str] | None = None,
                      title: str | None = None, annotate: bool = True) -> Figure:
    """Expert usage of every layer side by side on one colour scale, as the MoE paper's Fig. 3.

    Args:
        usage: (layers, rows, experts), e.g. ``gating.expert_usage(...).usage``: the mean gate value of each expert
            over the tokens of a row (an attribute combination or a task).
        row_labels: one per row, written once on the left.
        layer_titles: one per layer (default "layer 0", "layer 1", ...).
        annotate: write values >= 0.005 in their cells (only when a panel has at most 400 cells).
    """
    values = to_numpy(usage).astype(np.float64)
    if values.ndim != 3:
        raise ValueError(f"usage: expected (layers, rows, experts), got shape {values.shape}")
    layers, rows, experts = values.shape
    if len(row_labels) != rows:
        raise ValueError(f"row_labels: expected {rows} labels, got {len(row_labels)}")
    if layer_titles is None:
        layer_titles = [f"layer {layer}" for layer in range(layers)]
    if len(layer_titles) != layers:
        raise ValueError(f"layer_titles: expected {layers} titles, got {len(layer_titles)}")
    high = max(float(values.max()), 1e-12)
    fig, axes = _figure(1, layers, figsize=(3.0 + (0.5 * experts + 0.3) * layers, 1.3 + 0.34 * rows),
                        sharey=True)
    image = None
    for layer, ax in enumerate(axes[0]):
        image = ax.imshow(values[layer], cmap="Blues", vmin=0.0, vmax=high, aspect="auto", interpolation="nearest")
        if annotate and rows * experts <= 400:
            for r in range(rows):
                for e in range(experts):
                    v = values[layer, r, e]
                    if v >= 0.005:
                        ax.text(e, r, f"{v:.2f}".lstrip("0"), ha="center", va="center", fontsize=7,
                                color="white" if v > 0.6 * high else "black")
        ax.set_xticks(range(experts), [f"E{e}" for e in range(experts)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(layer_titles[layer], fontsize=9)
    axes[0, 0].set_yticks(range(rows), row_labels, fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="mean gate value $G_e(x)$")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _expert_load_panel(ax: Axes, counts: np.ndarray, capacities: Mapping[str, float]) -> tuple[list, list[str]]:
    """Draw one layer's loads on ``ax``; returns the legend's handles and labels (the hatch entry only when a bar
    goes over a capacity)."""
    experts = counts.size
    x = np.arange(experts)
    uniform = counts.sum() / experts
    ax.bar(x, counts, color="tab:blue", width=0.7)
    # Capacity factor 1.0 gives C = ceil(k N / E), the uniform load itself: the uniform line is drawn last, on top,
    # and says which capacity lines it covers, so neither hides the other.
    covered = [label for label, capacity in capacities.items() if abs(capacity - uniform) < 1.0]
    uniform_label = f"uniform ({uniform:.1f}".rstrip("0").rstrip(".") + ")" + (
        f", on the line of {', '.join(covered)}" if covered else "")
    for i, (label, capacity) in enumerate(capacities.items()):
        color = class_color(i + 1)
        # a capacity line under the uniform one is drawn wider, so that its colour shows on both sides of it
        ax.axhline(capacity, color=color, linewidth=3.2 if label in covered else 1.2, linestyle="--",
                   label=f"{label} (C = {capacity:.0f})")
        over = counts > capacity
        ax.bar(x[over], counts[over] - capacity, bottom=capacity, color="none", edgecolor=color, hatch="///",
               width=0.7)
    ax.axhline(uniform, color="black", linewidth=1.4, linestyle=":", label=uniform_label, zorder=4)
    ax.set_xticks(x, [f"E{e}" for e in range(experts)], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    handles, labels = ax.get_legend_handles_labels()
    if any((counts > capacity).any() for capacity in capacities.values()):
        handles.append(Patch(facecolor="none", edgecolor="grey", hatch="///"))
        labels.append(_DROPPED_LABEL)
    return handles, labels


_DROPPED_LABEL = "hatched: dropped at the capacity of its colour"


def _expert_counts(assignments: Any) -> np.ndarray:
    counts = to_numpy(assignments).astype(np.float64)
    if counts.size == 0:
        raise ValueError("assignments: expected one count per expert")
    return counts


def plot_expert_load(assignments: Any, capacities: Mapping[str, float] | None = None, title: str | None = None,
                     ax: Axes | None = None) -> Figure:
    """Top-k assignments received by each expert (bars) against expert capacities (dashed lines): the hatched part
    of a bar above a line is what that capacity drops.

    Args:
        assignments: (experts,) counts, e.g. a row of ``gating.expert_assignments``.
        capacities: label -> capacity C in assignments, e.g. {"capacity factor 1.0": 67, ...}.
    """
    counts = _expert_counts(assignments).reshape(-1)
    fig, ax = _single_axes(ax, figsize=(1.5 + 0.45 * counts.size, 3.0))
    handles, labels = _expert_load_panel(ax, counts, capacities or {})
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_expert_loads(assignments: Any, capacities: Mapping[str, float] | None = None,
                      titles: Sequence[str] | None = None, panel_size: tuple[float, float] = (3.6, 3.0)) -> Figure:
    """:func:`plot_expert_load` for every layer side by side, on one y scale, with one legend under the panels
    (the lines mean the same in each; the hatch entry appears when any layer drops an assignment).

    Args:
        assignments: (layers, experts) counts, e.g. ``gating.expert_assignments``.
        titles: one per layer (default "layer i").
    """
    counts = _expert_counts(assignments)
    if counts.ndim != 2:
        raise ValueError(f"assignments: expected (layers, experts) counts, got shape {counts.shape}")
    layers = counts.shape[0]
    titles = list(titles) if titles is not None else [f"layer {i}" for i in range(layers)]
    if len(titles) != layers:
        raise ValueError(f"titles: expected {layers}, one per layer, got {len(titles)}")
    fig, axes = _figure(1, layers, figsize=(panel_size[0] * layers, panel_size[1]), sharey=True)
    legend: dict[str, Any] = {}
    for ax, row, title in zip(axes.flat, counts, titles):
        for handle, label in zip(*_expert_load_panel(ax, row, capacities or {})):
            legend.setdefault(label, handle)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[1:]:
        ax.set_ylabel("")
    # every panel has the same lines, so the hatch entry, appended after a panel's lines, comes last
    fig.legend(list(legend.values()), list(legend), fontsize=8, frameon=False, loc="outside lower center",
               ncol=min(2, len(legend)))
    return fig
