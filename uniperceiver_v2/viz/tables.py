"""Figures of result tables: our ablations next to the paper's, and our final numbers next to the paper's.

Same conventions as :mod:`uniperceiver_v2.viz`: plain inputs, pyplot-free figures, each function returns its
:class:`~matplotlib.figure.Figure`. Values are in the paper's units (percent); ``None`` is a missing result
(the paper's "-"), drawn as no bar with a small "n/a".

An ablation is read as gaps to a reference row (the paper prints them in Tab. 3), so
:func:`plot_ablation` draws ``value - value(reference)`` for ours and the paper's side by side on one scale:
the absolute numbers of a tiny model on synthetic data and of the paper's models differ by an order of
magnitude, their gaps can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation

from .base import _figure, subplots

__all__ = ["grouped_bars", "plot_ablation", "plot_metrics_vs_paper", "results_table_figure"]

Value = float | None
OURS_COLOR = "tab:blue"
PAPER_COLOR = "tab:gray"


def _check_rows(name: str, rows: Mapping[str, Sequence[Value]], n: int) -> None:
    for label, values in rows.items():
        if len(values) != n:
            raise ValueError(f"{name}[{label!r}]: expected {n} values (one per column), got {len(values)}")


def grouped_bars(ax: Axes, categories: Sequence[str], series: Mapping[str, Sequence[Value]],
                 colors: Mapping[str, str] | None = None, value_format: str = "{:.1f}") -> dict[str, Any]:
    """Bars grouped by category, one bar per series; None leaves a gap marked "n/a", NaN a gap without mark.

    Args:
        ax: the axes to draw in.
        categories: the group labels along x.
        series: label -> one value per category.
        colors: label -> colour (default: matplotlib's cycle).
        value_format: how each bar's value is printed above (or below) it.

    Returns:
        label -> the x position of each of its bars, one per category, and the bar width under ``"width"``.
    """
    _check_rows("series", series, len(categories))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    drawn_values = [0.0]
    positions: dict[str, Any] = {"width": width * 0.95}
    for index, (label, values) in enumerate(series.items()):
        offsets = x - 0.4 + width * (index + 0.5)
        positions[label] = offsets
        color = (colors or {}).get(label)
        drawn = False
        for position, value in zip(offsets, values):
            if value is None:
                ax.text(position, 0.0, "n/a", ha="center", va="bottom", fontsize=7, color="gray", rotation=90)
                continue
            if math.isnan(value):
                continue
            bars = ax.bar(position, value, width=width * 0.95, color=color, label=None if drawn else label)
            color = bars[0].get_facecolor()   # the same colour for every bar of the series
            drawn = True
            drawn_values.append(value)
            text = value_format.format(value)
            if text.startswith("-") and float(text) == 0.0:   # "-0.0" for a tiny negative value
                text = text[1:]
            label_bar(ax, position, value, text)
    finish_bar_axes(ax, categories, drawn_values)
    return positions


def label_bar(ax, position: float, value: float, text: str) -> None:
    """Write ``text`` just beyond the end of the bar at ``position`` (above a positive bar, below a negative one)."""
    above = value >= 0
    ax.annotate(text, (position, value), ha="center", fontsize=7.5, va="bottom" if above else "top",
                xytext=(0, 1 if above else -1), textcoords="offset points")


def finish_bar_axes(ax, categories: Sequence[str], values: Sequence[float]) -> None:
    """Tick labels, a zero line, a grid, and room for the value labels beyond the highest and lowest of ``values``
    (bars pin autoscaling at 0)."""
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    low, high = min(values), max(values)
    pad = 0.12 * (high - low) or 1.0
    ax.set_ylim(low - (pad if low < 0 else 0.0), high + pad)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)


def plot_ablation(columns: Sequence[str], ours: Mapping[str, Sequence[Value]],
                  paper: Mapping[str, Sequence[Value]] | None = None, ours_reference: str | None = None,
                  paper_reference: str | None = None, title: str | None = None) -> Figure:
    """One panel per metric: our rows and the paper's, as gaps to a reference row (or absolute values).

    Args:
        columns: metric names, one panel each.
        ours: our row -> one value per column.
        paper: the paper's row -> values; rows with the same label as ours are drawn next to ours, the others
            after ours.
        ours_reference, paper_reference: the rows the gaps are measured to (in points); both None draws absolute
            values. With a reference for one side only, that side is drawn as gaps and the other is left out.
            The reference rows get a "reference" mark instead of zero-height bars, under the zero line when
            the panel has a negative bar, else above it (below, it would fall on the tick labels).
        title: the figure title.
    """
    _check_rows("ours", ours, len(columns))
    paper = dict(paper or {})
    _check_rows("paper", paper, len(columns))
    for name, rows, reference in (("ours", ours, ours_reference), ("paper", paper, paper_reference)):
        if reference is not None and reference not in rows:
            raise KeyError(f"plot_ablation: reference row {reference!r} is not among the {name} rows {list(rows)}")
    gaps = ours_reference is not None or paper_reference is not None

    def relative(rows: Mapping[str, Sequence[Value]], reference: str | None) -> dict[str, list[Value]]:
        if not gaps:
            return {label: list(values) for label, values in rows.items()}
        if reference is None:
            return {}
        base = rows[reference]
        # The reference row's own gaps are 0 by definition: drawn as a "reference" mark, not as bars.
        return {label: [math.nan if label == reference else None if v is None or b is None else v - b
                        for v, b in zip(values, base)]
                for label, values in rows.items()}

    ours_values, paper_values = relative(ours, ours_reference), relative(paper, paper_reference)
    categories = list(ours_values) + [label for label in paper_values if label not in ours_values]
    # at most three panels a row: five in one row shrink every label below legibility at a notebook's width
    ncols = min(3, len(columns))
    fig, axes = subplots(len(columns), ncols=ncols, panel_size=(max(4.0, 6.0 / ncols), 3.8))
    for index, (ax, column) in enumerate(zip(axes, columns)):
        series = {}
        if ours_values:
            series["ours"] = [ours_values[c][index] if c in ours_values else None for c in categories]
        if paper_values:
            series["paper"] = [paper_values[c][index] if c in paper_values else None for c in categories]
        grouped_bars(ax, categories, series, colors={"ours": OURS_COLOR, "paper": PAPER_COLOR})
        ax.set_title(column, fontsize=9)
        references = {reference for reference in (ours_reference, paper_reference) if reference is not None}
        # Under the zero line only where a negative bar made room there; else above it, off the tick labels.
        below = min((v for values in series.values() for v in values if v is not None and not math.isnan(v)),
                    default=0.0) < 0
        for reference in references:
            ax.annotate("reference", (categories.index(reference), 0.0), fontsize=7, ha="center",
                        va="top" if below else "bottom", xytext=(0, -2 if below else 2), textcoords="offset points",
                        color="dimgray")
        if index % ncols == 0:
            ax.set_ylabel("gap to the reference row [points]" if gaps else "value [%]")
        if index == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_metrics_vs_paper(columns: Sequence[str], series: Mapping[str, Sequence[Value]],
                          title: str | None = None,
                          chance: Mapping[str, Sequence[float | None]] | None = None) -> Figure:
    """Our final metrics and the paper's on one axis: one group of bars per metric, one bar per model.

    Args:
        columns: metric names (x groups).
        series: model label -> one value per metric (paper units; None = not measured). Labels starting with
            "(paper)" (as ``paper_results.main_results_table`` writes them) are drawn in greys, ours in colour.
        title: the figure title.
        chance: label -> the chance level of each metric for that series (``paper_results.main_column_chance``; None
            where there is none), drawn as a black bar across its bar: our tasks are far smaller than the paper's,
            so a bar is read against its own chance level, not against the paper's bars.
    """
    if not series:
        raise ValueError("plot_metrics_vs_paper: no series to draw")
    paper = [label for label in series if label.startswith("(paper)")]
    ours = [label for label in series if label not in paper]
    greys = [str(level) for level in np.linspace(0.35, 0.75, max(len(paper), 1))]
    colors = {**{label: f"C{index}" for index, label in enumerate(ours)}, **dict(zip(paper, greys))}
    fig, axes = _figure(figsize=(max(6.0, 1.3 * len(columns) + 2.0), 3.8 + 0.16 * (len(series) + 1)))
    ax = axes[0, 0]
    positions = grouped_bars(ax, list(columns), series, colors=colors)
    marks = []                                          # the chance lines, and each column's levels for the legend
    levels_of: dict[str, list[str]] = {}
    for label, levels in (chance or {}).items():
        if label not in series:
            raise ValueError(f"chance: {label!r} is not one of the series {list(series)}")
        _check_rows("chance", {label: levels}, len(columns))
        for column, position, level, value in zip(columns, positions[label], levels, series[label]):
            if level is None or value is None:
                continue
            half = positions["width"] / 2
            marks += ax.plot([position - half, position + half], [level, level], color="black", linewidth=2.0,
                             solid_capstyle="butt", zorder=3)
            shown = levels_of.setdefault(column, [])
            if f"{level:.2g}" not in shown:
                shown.append(f"{level:.2g}")
    top = ax.get_ylim()[1]
    for mark in marks:
        level = mark.get_ydata()[0]
        if level < 0.03 * top:   # a line at 0.2 % of a 0-100 scale hides in the axis: a triangle above points at it
            ax.plot(np.mean(mark.get_xdata()), level, marker="v", markersize=5, color="black", linestyle="none",
                    clip_on=False, zorder=4, transform=ax.transData + ScaledTranslation(0, 4 / 72, fig.dpi_scale_trans))
    if marks:    # the legend gives the levels
        marks[0].set_label("chance level of our bar: " + "; ".join(f"{column} {' / '.join(values)}"
                                                                    for column, values in levels_of.items()))
    ax.set_ylabel("value (percent; CIDEr x100)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=2)   # under the axes: off the bars
    if title:
        ax.set_title(title, fontsize=10)
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
