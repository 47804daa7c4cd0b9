"""Ablation tables as values with a noise band: one panel per metric, our value of every row as a bar, the reference
row's value with the band the seed alone moves a metric by shaded around it, each bar coloured by whether its gap
to the reference agrees with the paper's.

Same conventions as :mod:`uniperceiver_v2.viz`: plain inputs, pyplot-free figures, the function returns its
:class:`~matplotlib.figure.Figure`. Values are in the paper's units (percent); ``None`` is a missing result, drawn
as no bar with a small "n/a". (Import this module by name: ``from uniperceiver_v2.viz import ablation_bands``.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .base import _figure
from .tables import finish_bar_axes, label_bar

__all__ = ["VERDICT_COLORS", "plot_ablation_band"]

Value = float | None

# One colour per verdict of walkthrough.ablations.gap_directions; the reference row and rows without a paper
# counterpart get their own.
VERDICT_COLORS: dict[str | None, str] = {
    "same": "tab:green",
    "opposite": "tab:red",
    "within noise": "silver",
    "paper flat": "lightsteelblue",
    None: "tab:blue",
}
REFERENCE_COLOR = "dimgray"
BAND_COLOR = "gold"
PAPER_MARKER_COLOR = "black"

_LEGEND = {
    "same": "same direction as the paper",
    "opposite": "opposite to the paper",
    "within noise": "within the noise band",
    "paper flat": "paper flat (its gap under 1 point)",
    None: "no paper counterpart",
}


def _axis_bottom(drawn: Sequence[float]) -> float:
    """Where a panel's value axis starts: 0, unless everything drawn lies far above it (e.g. top-1 between 92 and
    97), where bars from 0 would leave the gaps and the band a few pixels tall; the axis then starts a round step
    below the lowest value, and the panel says so."""
    if not drawn or min(drawn) <= 0:
        return 0.0
    low, high = min(drawn), max(drawn)
    if low < 0.75 * high:
        return 0.0
    step = 10.0 ** math.floor(math.log10(max(high - low, 1e-9)))     # a round number below the lowest value
    return max(0.0, math.floor((low - 1.5 * (high - low) - 1e-9) / step) * step)


def plot_ablation_band(columns: Sequence[str], ours: Mapping[str, Sequence[Value]], reference: str | None,
                       widths: Sequence[float], verdicts: Mapping[tuple[str, int], str | None] | None = None,
                       paper_gaps: Mapping[tuple[str, int], Value] | None = None, title: str | None = None) -> Figure:
    """One panel per column: a bar per row of ``ours``, the reference row's value as a line with ``+-width``
    shaded around it, the bars coloured by verdict, and the paper's gap for each row marked from our reference.

    Args:
        columns: metric names, one panel each.
        ours: row -> one value per column (paper units).
        reference: the row the gaps are measured to (its bar is grey); None draws no band.
        widths: the noise band's half-width per column, in points.
        verdicts: (row, column index) -> verdict (:data:`VERDICT_COLORS`); a missing entry is "no counterpart".
        paper_gaps: (row, column index) -> the paper's gap of that row to its reference; drawn as a black tick
            at ``reference value + gap`` (where the row would be if our gap were the paper's).
        title: the figure title.

    A value is written inside its bar at the foot (the band and the tick sit near the top), or above a bar too
    short to hold it. A panel whose values all lie far above 0 starts its axis above 0 and says where
    (:func:`_axis_bottom`).
    """
    if len(widths) != len(columns):
        raise ValueError(f"plot_ablation_band: {len(widths)} band widths for {len(columns)} columns")
    for label, values in ours.items():
        if len(values) != len(columns):
            raise ValueError(f"ours[{label!r}]: expected {len(columns)} values (one per column), got {len(values)}")
    if reference is not None and reference not in ours:
        raise KeyError(f"plot_ablation_band: reference row {reference!r} is not among the rows {list(ours)}")
    verdicts = dict(verdicts or {})
    paper_gaps = dict(paper_gaps or {})
    labels = list(ours)
    x = np.arange(len(labels))
    # at most three panels a row: five in one row shrink every label below legibility at a notebook's width
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = _figure(nrows, ncols, figsize=(max(3.6 * ncols, 6.0), 3.6 * nrows + 0.4))
    panels = list(axes.flat)
    for ax in panels[len(columns):]:
        ax.set_axis_off()
    used: set[str | None] = set()
    zero_bars = False
    for index, (ax, column) in enumerate(zip(panels, columns)):
        drawn = []
        base = ours[reference][index] if reference is not None else None
        if base is not None:
            width = float(widths[index])
            # every metric here is a non-negative percentage: the band is not drawn below 0, where no value can be
            low = max(0.0, base - width) if base >= 0 else base - width
            ax.axhspan(low, base + width, color=BAND_COLOR, alpha=0.35, linewidth=0)
            ax.axhline(base, color=REFERENCE_COLOR, linewidth=0.8, linestyle="--")
            drawn += [low, base + width]
        bars = []                                   # (position, value) of every bar, labelled once the axis is set
        for position, label in zip(x, labels):
            value = ours[label][index]
            if value is None or math.isnan(value):
                bars.append((position, None))
                continue
            if label == reference:
                color = REFERENCE_COLOR
            else:
                verdict = verdicts.get((label, index))
                used.add(verdict)
                color = VERDICT_COLORS.get(verdict, VERDICT_COLORS[None])
            ax.bar(position, value, width=0.7, color=color, edgecolor="black", linewidth=0.4)
            if round(value, 1) == 0:    # a bar of no visible height (labelled 0.0): its verdict colour as a marker
                zero_bars = True
                ax.plot(position, 0.0, marker="s", markersize=7, color=color, markeredgecolor="black",
                        markeredgewidth=0.4, clip_on=False, zorder=3)
            bars.append((position, value))
            drawn.append(value)
            gap = paper_gaps.get((label, index))
            if base is not None and gap is not None and label != reference:
                ax.plot([position - 0.3, position + 0.3], [base + gap] * 2, color=PAPER_MARKER_COLOR, linewidth=1.4,
                        clip_on=False, zorder=4)     # above the axis line when the tick sits at 0
                drawn.append(base + gap)
        bottom = _axis_bottom(drawn)
        finish_bar_axes(ax, labels, [bottom, *drawn])
        if bottom > 0:
            ax.set_ylim(bottom=bottom)
        top = ax.get_ylim()[1]
        for position, value in bars:
            if value is None:
                ax.text(position, bottom, "n/a", ha="center", va="bottom", fontsize=8, color="black")
            elif value - bottom >= 0.15 * (top - bottom):
                # inside the bar at its foot: the band, the reference line and the paper's tick sit near its top
                ax.annotate(f"{value:.1f}", (position, bottom), ha="center", va="bottom", fontsize=7.5,
                            xytext=(0, 3), textcoords="offset points",
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
            elif round(value, 1) == 0:              # above the square marker that stands for the bar
                ax.annotate(f"{value:.1f}", (position, value), ha="center", va="bottom", fontsize=7.5,
                            xytext=(0, 5), textcoords="offset points")
            else:
                label_bar(ax, position, value, f"{value:.1f}")
        ax.set_title(column + (f" (axis from {bottom:g})" if bottom > 0 else ""), fontsize=9)
        if index % ncols == 0:
            ax.set_ylabel("ours [%]")
    handles = [Patch(color=VERDICT_COLORS[v], label=_LEGEND[v]) for v in VERDICT_COLORS if v in used]
    if reference is not None:
        handles += [Patch(color=REFERENCE_COLOR, label=f"reference: {reference}"),
                    Line2D([], [], color=REFERENCE_COLOR, linewidth=0.8, linestyle="--",
                           label="our reference value"),
                    Patch(color=BAND_COLOR, alpha=0.35, label="noise band around the reference"),
                    Line2D([], [], color=PAPER_MARKER_COLOR, linewidth=1.4, label="reference + the paper's gap")]
    if zero_bars:
        handles.append(Line2D([], [], marker="s", markersize=6, color="white", markeredgecolor="black",
                              linestyle="none", label="a bar of height 0 (its colour: its verdict)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
