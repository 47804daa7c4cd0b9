"""Figures of notebook 05: each draws what it is given (counts, colours, scales) and refuses inconsistent input."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from uniperceiver_v2.viz import task_color
from uniperceiver_v2.viz.optim import (
    plot_grad_norms,
    plot_interference,
    plot_sampling_weights,
    plot_task_curves,
    plot_task_sequence,
)

TASKS = ["a", "b", "c"]


def test_task_sequence_draws_each_draw_and_its_frequency():
    unmixed = ["a", "b", "b", "c", "a", "b"]
    mixed = [["a", "b"], ["b", "b"], ["c", "a"], ["b", "c"], ["a", "a"], ["b", "a"]]
    fig = plot_task_sequence(unmixed, mixed, TASKS, {"a": 0.3, "b": 0.5, "c": 0.2})
    assert isinstance(fig, Figure)
    top, bottom, bars = fig.axes
    np.testing.assert_array_equal(top.images[0].get_array(), [[0, 1, 1, 2, 0, 1]])
    assert bottom.images[0].get_array().shape == (2, 6)  # (slots, iterations)
    np.testing.assert_array_equal(bottom.images[0].get_array()[:, 0], [0, 1])
    widths = [patch.get_width() for patch in bars.patches]
    np.testing.assert_allclose(widths[:3], [2 / 6, 3 / 6, 1 / 6])  # unmixed frequencies
    np.testing.assert_allclose(widths[3:6], [5 / 12, 5 / 12, 2 / 12])  # mixed slot frequencies
    assert tuple(bars.patches[1].get_facecolor()[:3]) == pytest.approx(task_color("b"))


def test_task_sequence_can_draw_only_the_first_iterations():
    unmixed = ["a", "b", "b", "c", "a", "b"]
    mixed = [["a", "b"], ["b", "b"], ["c", "a"], ["b", "c"], ["a", "a"], ["b", "a"]]
    fig = plot_task_sequence(unmixed, mixed, TASKS, {"a": 0.3, "b": 0.5, "c": 0.2}, shown=4)
    top, bottom, bars = fig.axes
    np.testing.assert_array_equal(top.images[0].get_array(), [[0, 1, 1, 2]])
    assert bottom.images[0].get_array().shape == (2, 4) and "first 4 of 6" in top.get_title(loc="left")
    np.testing.assert_allclose([patch.get_width() for patch in bars.patches][:3], [2 / 6, 3 / 6, 1 / 6])  # all six
    assert plot_task_sequence(unmixed, mixed, TASKS, {"a": 0.3, "b": 0.5, "c": 0.2}, shown=10).axes[0].images[0] \
        .get_array().shape == (1, 6)
    with pytest.raises(ValueError, match="shown"):
        plot_task_sequence(unmixed, mixed, TASKS, {"a": 0.3, "b": 0.5, "c": 0.2}, shown=0)


def test_task_sequence_rejects_unknown_tasks_and_ragged_slots():
    with pytest.raises(ValueError, match="not in task_names"):
        plot_task_sequence(["a", "z"], [["a"], ["b"]], TASKS, {"a": 0.3, "b": 0.5, "c": 0.2})
    with pytest.raises(ValueError, match="same number of slots"):
        plot_task_sequence(["a", "b"], [["a", "b"], ["b"]], TASKS, {"a": 0.3, "b": 0.5, "c": 0.2})
    with pytest.raises(ValueError, match="no s_k"):
        plot_task_sequence(["a"], [["a"]], TASKS, {"a": 1.0})


def test_sampling_weights_bars():
    fig = plot_sampling_weights(["x", "y"], {"paper": [0.1, 0.2], "rule": [0.15, 0.15]}, title="t")
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [0.1, 0.2, 0.15, 0.15])
    with pytest.raises(ValueError, match="one per data set"):
        plot_sampling_weights(["x", "y"], {"paper": [0.1]})


def test_grad_norms_colour_each_iteration_by_its_task():
    runs = {"unmixed": (["a", "c", "a"], torch.tensor([1.0, 10.0, 2.0])), "mixed": (["mixed"] * 4, [1, 2, 3, 4])}
    fig = plot_grad_norms(runs, TASKS)
    unmixed_ax, mixed_ax = fig.axes
    points = unmixed_ax.collections[0]
    # every iteration once, the rare task "c" drawn last (on top of the frequent "a")
    np.testing.assert_allclose(points.get_offsets(), [[0, 1.0], [2, 2.0], [1, 10.0]])
    np.testing.assert_allclose(points.get_facecolors()[2][:3], task_color("c"))
    np.testing.assert_allclose(points.get_facecolors()[0][:3], task_color("a"))
    assert len(mixed_ax.collections[0].get_offsets()) == 4
    assert unmixed_ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="3 step tasks but 2"):
        plot_grad_norms({"r": (["a", "b", "c"], [1.0, 2.0])}, TASKS)


def test_task_curves_one_panel_per_task_one_line_per_variant():
    x = np.array([0, 10, 20])
    curve = (x, np.array([3.0, 2.0, 1.0]), np.array([2.5, 1.5, 0.5]), np.array([3.5, 2.5, 1.5]))
    curves = {"v1": {t: curve for t in TASKS}, "v2": {t: curve for t in TASKS}}
    fig = plot_task_curves(curves, TASKS, ncols=2, logy=True)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in panels] == TASKS
    assert all(len(ax.lines) == 2 for ax in panels)
    np.testing.assert_allclose(panels[0].lines[0].get_ydata(), [3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="no curve for task 'c'"):
        plot_task_curves({"v1": {"a": curve, "b": curve}}, TASKS)
    with pytest.raises(ValueError, match="differ in length"):
        plot_task_curves({"v1": {t: (x, x[:2], x, x) for t in TASKS}}, TASKS)


def test_interference_scale_is_symmetric_and_ignores_the_diagonal():
    matrix = np.array([[1.0, 0.3, -0.1], [-0.2, 1.0, 0.05], [0.0, 0.1, 1.0]])
    fig = plot_interference(matrix, TASKS)
    image = fig.axes[0].images[0]
    assert image.get_clim() == (-0.3, 0.3)
    assert np.ma.is_masked(image.get_array()[1, 1]) and image.get_array()[0, 1] == 0.3
    assert plot_interference(matrix, TASKS, limit=1.0).axes[0].images[0].get_clim() == (-1.0, 1.0)
    assert len(fig.axes) == 2 and len(plot_interference(matrix, TASKS, colorbar=False).axes) == 1   # colour bar
    with pytest.raises(ValueError, match="square"):
        plot_interference(np.ones((2, 3)), TASKS)
    with pytest.raises(ValueError, match="expected 3 names"):
        plot_interference(matrix, TASKS[:2])


def test_a_task_has_one_colour_in_every_figure_whatever_the_task_order():
    """Notebook 05 lists its tasks in one order, notebook 06 in another: the colours must not follow the order."""
    order_05 = ["classification", "detection", "language_modelling", "captioning", "retrieval"]
    order_06 = ["captioning", "classification", "detection", "mlm", "retrieval"]
    sequence = plot_task_sequence(order_05, [[t] for t in order_05], order_05, dict.fromkeys(order_05, 0.2))
    norms = plot_grad_norms({"run": (order_06, np.arange(1.0, 6.0))}, order_06)
    bars = sequence.axes[2].patches[:5]
    points = norms.axes[0].collections[0].get_facecolors()
    for index, task in enumerate(order_05):
        assert tuple(bars[index].get_facecolor()[:3]) == pytest.approx(task_color(task))
    for index, task in enumerate(order_06):
        np.testing.assert_allclose(points[index][:3], task_color(task))
    assert task_color("mlm") == task_color("language_modelling")
    known = ["classification", "detection", "captioning", "retrieval", "mlm", "segmentation"]
    assert len({task_color(task) for task in known}) == len(known)


def test_task_curves_take_variant_colours_and_title_each_panel_in_black():
    x = np.array([1e-3, 3e-3, 1e-2])
    curve = (x, np.array([3.0, 2.0, 1.0]), np.array([2.5, 1.5, 0.5]), np.array([3.5, 2.5, 1.5]))
    fig = plot_task_curves({"v1": {"detection": curve}}, ["detection"], logx=True, logy=True, ncols=1)
    ax = fig.axes[0]
    # the lines carry the variants' colours: a title in a task colour would clash with one of them
    assert ax.title.get_color() == "black" and ax.lines[0].get_color() != task_color("detection")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    # a few swept values: one labelled tick at each (a decade-only axis would leave 0.003 unlabelled)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.003", "0.01"]
    np.testing.assert_allclose(ax.get_xticks(), x)


def test_short_log_ticks_are_nice_values_spread_over_the_axis():
    from uniperceiver_v2.viz.optim import short_log_ticks

    assert short_log_ticks(1.15, 3.4) == [1.2, 1.5, 2.0, 2.5, 3.0]          # the digits alone would give 2 and 3
    assert short_log_ticks(0.33, 1.6) == [0.4, 0.5, 0.7, 1.0, 1.5]
    ticks = short_log_ticks(2.6, 2.9)
    assert ticks == [2.6, 2.7, 2.8, 2.9]
    with pytest.raises(ValueError, match="low < high"):
        short_log_ticks(2.0, 1.0)


def test_task_curves_label_a_short_log_axis_down_to_where_the_curves_end():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    x = np.arange(5)
    short = (x, np.array([3.4, 2.5, 1.8, 1.4, 1.2]), np.array([3.3, 2.4, 1.7, 1.3, 1.15]),
             np.array([3.45, 2.6, 1.9, 1.5, 1.25]))                        # less than one decade, all above 1
    long = (x, np.array([300.0, 30.0, 3.0, 0.3, 0.03]), np.full(5, 0.02), np.full(5, 400.0))
    fig = plot_task_curves({"v": {"a": short, "b": long}}, ["a", "b"], ncols=2, logy=True)
    FigureCanvasAgg(fig).draw()
    short_ax, long_ax = fig.axes[:2]
    low, high = short_ax.get_ylim()
    labelled = [float(t.get_text()) for t in short_ax.yaxis.get_minorticklabels() if t.get_text()
                and low <= t.get_position()[1] <= high]
    assert min(labelled) < 1.5 and max(labelled) >= 3.0 and len(labelled) >= 4
    assert min(labelled) / low < 1.1                                       # the labels reach the lowest curve
    # over more than a decade the axis keeps set_log_scale's labels (decades, no crowded minor labels)
    assert not any(t.get_text() for t in long_ax.yaxis.get_minorticklabels())
