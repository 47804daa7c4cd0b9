"""The table figures draw the numbers they are given: bar heights are the values (or the gaps to the reference
row), missing values leave no bar, bad input is refused with the offending row named."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from uniperceiver_v2.viz import tables as viz_tables

COLUMNS = ["det", "cls"]


def _bars(ax) -> dict[str, list[float]]:
    """Bar heights per legend label, in drawing order."""
    heights: dict[str, list[float]] = {}
    handles, labels = ax.get_legend_handles_labels()
    colors = {tuple(np.round(h.patches[0].get_facecolor(), 3)): label for h, label in zip(handles, labels)}
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            label = colors[tuple(np.round(patch.get_facecolor(), 3))]
            heights.setdefault(label, []).append(patch.get_height())
    return heights


def test_ablation_bars_are_gaps_to_the_reference_rows():
    ours = {"a": (1.0, 5.0), "b": (3.0, None), "full": (2.0, 4.0)}
    paper = {"a": (40.0, 70.0), "b": (45.0, 72.0), "full": (50.0, 75.0)}
    fig = viz_tables.plot_ablation(COLUMNS, ours, paper, ours_reference="full", paper_reference="full", title="t")
    assert isinstance(fig, Figure)
    det, cls = fig.axes[:2]
    # the reference row gets a mark, not zero-height bars
    assert _bars(det) == {"ours": pytest.approx([-1.0, 1.0]), "paper": pytest.approx([-10.0, -5.0])}
    assert [t.get_text() for t in det.texts if t.get_text() == "reference"] == ["reference"]
    # ours has no "cls" value for row b: no bar, an "n/a" mark instead
    assert _bars(cls) == {"ours": pytest.approx([1.0]), "paper": pytest.approx([-5.0, -3.0])}
    assert [t.get_text() for t in cls.texts].count("n/a") == 1
    assert "gap" in det.get_ylabel()


def test_ablation_rows_without_counterpart_follow_ours_and_absolute_mode():
    ours = {"pre-trained": (10.0, 20.0), "random": (5.0, 8.0)}
    paper = {"IN-1k": (45.7, 76.8), "IN-1k & COCO": (49.9, 76.9)}
    fig = viz_tables.plot_ablation(COLUMNS, ours, paper)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pre-trained", "random", "IN-1k", "IN-1k & COCO"]
    assert _bars(ax) == {"ours": [10.0, 5.0], "paper": [45.7, 49.9]}
    assert "value" in ax.get_ylabel()
    # different references per side
    fig = viz_tables.plot_ablation(COLUMNS, ours, paper, ours_reference="pre-trained", paper_reference="IN-1k & COCO")
    assert _bars(fig.axes[1]) == {"ours": pytest.approx([-12.0]), "paper": pytest.approx([-0.1])}
    assert [t.get_text() for t in fig.axes[1].texts].count("reference") == 2


def _reference_marks(ax) -> list[tuple[str, float]]:
    """(vertical alignment, vertical offset in points) of every "reference" mark of ``ax``."""
    return [(t.get_verticalalignment(), t.xyann[1]) for t in ax.texts if t.get_text() == "reference"]


def test_reference_mark_stays_off_the_tick_labels():
    """The "reference" mark goes under the zero line only where a negative bar made room there; in a panel of
    positive gaps zero is the bottom of the axes, and the mark goes above it instead of onto the tick labels."""
    ours = {"a": (1.0, 5.0), "full": (2.0, 4.0)}
    paper = {"a": (40.0, 80.0), "full": (50.0, 75.0)}
    fig = viz_tables.plot_ablation(COLUMNS, ours, paper, ours_reference="full", paper_reference="full")
    det, cls = fig.axes[:2]
    assert _reference_marks(det) == [("top", -2)] and det.get_ylim()[0] < 0     # gaps -1 and -10: room below 0
    assert _reference_marks(cls) == [("bottom", 2)] and cls.get_ylim()[0] == 0  # gaps +1 and +5: 0 is the bottom


def test_ablation_refuses_bad_input():
    with pytest.raises(ValueError, match=r"ours\['a'\]: expected 2 values"):
        viz_tables.plot_ablation(COLUMNS, {"a": (1.0,)})
    with pytest.raises(KeyError, match="reference row 'x'"):
        viz_tables.plot_ablation(COLUMNS, {"a": (1.0, 2.0)}, ours_reference="x")


def test_metrics_vs_paper_one_group_per_metric():
    series = {"ours": [1.0, None, 3.0], "(paper) BASE": [86.3, 58.6, 50.6]}
    fig = viz_tables.plot_metrics_vs_paper(["cls", "det", "seg"], series, title="Tab. 6")
    ax = fig.axes[0]
    assert _bars(ax) == {"ours": [1.0, 3.0], "(paper) BASE": [86.3, 58.6, 50.6]}
    paper_color = ax.patches[-1].get_facecolor()
    assert paper_color[0] == paper_color[1] == paper_color[2]      # the paper's bars are grey
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cls", "det", "seg"]
    with pytest.raises(ValueError, match="no series"):
        viz_tables.plot_metrics_vs_paper(["cls"], {})


def test_metrics_vs_paper_marks_each_of_our_bars_chance_level_across_that_bar():
    series = {"ours": [10.0, None, 3.0], "(paper) BASE": [86.3, 58.6, 50.6]}
    fig = viz_tables.plot_metrics_vs_paper(["cls", "det", "seg"], series, chance={"ours": [7.1, 5.0, None]})
    ax = fig.axes[0]
    marks = [line for line in ax.get_lines() if line.get_color() == "black" and line.get_linewidth() == 2.0]
    assert len(marks) == 1                          # det has no bar (None), seg no chance level: one mark
    bar = [p for p in ax.patches if p.get_height() == 10.0][0]
    xs, ys = marks[0].get_xdata(), marks[0].get_ydata()
    assert list(ys) == [7.1, 7.1]
    assert xs[0] == pytest.approx(bar.get_x()) and xs[1] == pytest.approx(bar.get_x() + bar.get_width())
    assert "chance level of our bar: cls 7.1" in [t.get_text() for t in fig.legends[0].get_texts()]
    two = {"ours": [10.0, 3.0], "ours, val": [8.0, 5.0]}
    legend = viz_tables.plot_metrics_vs_paper(["cls", "R@1"], two, chance={"ours": [7.1, 0.2], "ours, val": [7.1, 5.0]})
    assert legend.legends[0].get_texts()[0].get_text() == "chance level of our bar: cls 7.1; R@1 0.2 / 5"
    # R@1's 0.2 sits on the axis at this scale: a triangle points at it; 7.1 and 5 are visible as lines alone
    pointers = [line for line in legend.axes[0].get_lines() if line.get_marker() == "v"]
    assert [list(line.get_ydata()) for line in pointers] == [[0.2]] and not pointers[0].get_clip_on()
    without = viz_tables.plot_metrics_vs_paper(["cls", "det", "seg"], series)
    assert not any(t.get_text().startswith("chance") for t in without.legends[0].get_texts())
    with pytest.raises(ValueError, match="chance: 'theirs' is not one of the series"):
        viz_tables.plot_metrics_vs_paper(["cls", "det", "seg"], series, chance={"theirs": [1.0, None, None]})
    with pytest.raises(ValueError, match="expected 3 values"):
        viz_tables.plot_metrics_vs_paper(["cls", "det", "seg"], series, chance={"ours": [1.0]})
