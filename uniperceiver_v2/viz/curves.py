"""Training curves from the trainer's JSON-lines log (``metrics.jsonl``)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullFormatter

from ..engine.logging import read_metrics
from .base import _figure, set_log_scale, task_color


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last ``window`` points (fewer at the start), so the curve keeps its first point."""
    if window <= 1:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plateau_values(values: Sequence[float], min_fraction: float = 0.05) -> list[float]:
    """The values (to three significant digits) that at least ``min_fraction`` of ``values`` take: the levels of a
    piecewise-constant curve such as a step learning-rate schedule, without the points of its warm-up ramp."""
    rounded = [float(f"{value:.3g}") for value in values if math.isfinite(value)]
    if not rounded:
        return []
    counts = Counter(rounded)
    return sorted(value for value, count in counts.items() if count >= max(2, min_fraction * len(rounded)))


def _same_style(levels: Sequence[float], value: float) -> str:
    """``value`` written like its neighbours: "3e-4" for all when any level is below 0.001 (``%g`` alone would
    mix "0.0003" with "3e-05"), plain numbers otherwise."""
    nonzero = [abs(level) for level in levels if level != 0]
    if nonzero and min(nonzero) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"


def plot_curves(log_path_or_records: str | Path | Sequence[Mapping[str, Any]], keys: Sequence[str] = ("loss",),
                by: str | None = "task", smooth: int = 0, logy: bool = False, kind: str | None = None,
                label_plateaus: bool = False) -> Figure:
    """Training curves from a JSON-lines log: one panel per key, one line per value of ``by`` (per task).

    Args:
        log_path_or_records: a ``.jsonl`` file (one object per line, each with at least ``iteration``; the
            trainer's ``metrics.jsonl``) or the records themselves as a list of dicts.
        keys: record fields to plot, e.g. ``("loss", "lr")``; a record without a key (or with None, a
            non-finite value in the trainer's log) is left out of that panel.
        by: the field that splits a panel into lines (records without it form the line "all"); None = one line.
            With ``by="task"`` every line has its task's colour (``viz.task_color``), as in every other figure.
        smooth: moving-average window in points (0 or 1 = raw values).
        logy: logarithmic y axis, labelled with plain numbers.
        kind: keep only records whose ``kind`` field equals this (the trainer writes "train" and "eval").
        label_plateaus: tick the y axis only at the values that a line holds for at least 5 % of its points
            (the steps of a learning-rate schedule: 3e-4, 3e-5), all written in one style (:func:`plateau_values`).
    """
    if isinstance(log_path_or_records, (str, Path)):
        source = str(log_path_or_records)
        records = read_metrics(log_path_or_records, kind=None)
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
            color = task_color(group) if by == "task" and group != "all" else None   # "all": no task field
            ax.plot(points[:, 0], moving_average(points[:, 1], smooth), label=group, linewidth=1.2, color=color)
        if not series:
            ax.text(0.5, 0.5, f"no records with '{key}'", transform=ax.transAxes, ha="center", va="center")
        if logy and series:
            set_log_scale(ax, "y")
        if label_plateaus and series:
            levels = sorted({level for points in series.values() for level in plateau_values([v for _, v in points])})
            if levels:
                ax.yaxis.set_major_locator(FixedLocator(levels))
                ax.yaxis.set_major_formatter(FixedFormatter([_same_style(levels, level) for level in levels]))
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))   # iterations to 5 digits stay apart
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return fig
