"""uniperceiver_v2.viz.regions: every figure draws what it is given (panels, patches, marks, labels) and rejects
inputs of the wrong shape with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from uniperceiver_v2.viz import regions as viz_regions

IMAGE = torch.rand(3, 32, 48)


def _rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_plot_level_maps_one_panel_per_level_at_native_resolution():
    maps = [torch.rand(8, 12), torch.rand(4, 6), torch.rand(2, 3)]
    fig = viz_regions.plot_level_maps(IMAGE, maps, titles=["s4", "s8", "s16"], shared_scale=True,
                                      colorbar_label="norm")
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["image 32 x 48", "s4", "s8", "s16"]   # the image's size, h x w
    # Each level panel: the image, then the map covering exactly the image extent, unsmoothed.
    for ax, level in zip(panels[1:], maps):
        shown = ax.get_images()[-1]
        assert shown.get_array().shape == level.shape
        assert shown.get_extent() == [-0.5, 47.5, 31.5, -0.5]
        assert shown.get_interpolation() == "nearest"
        assert shown.get_clim() == pytest.approx((min(m.min() for m in maps).item(),
                                                  max(m.max() for m in maps).item()))
    assert any(ax.get_ylabel() == "norm" for ax in fig.axes)              # the shared colour bar
    alone = viz_regions.plot_level_maps(IMAGE, maps[:1], overlay=False)
    assert len(alone.axes[1].get_images()) == 1
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        viz_regions.plot_level_maps(IMAGE, [torch.rand(4, 4), torch.rand(2, 2, 2)])
    with pytest.raises(ValueError, match="titles"):
        viz_regions.plot_level_maps(IMAGE, maps, titles=["one"])


def test_draw_denoising_boxes_draws_three_boxes_per_object():
    gt = torch.tensor([[4.0, 4.0, 20.0, 20.0], [24.0, 8.0, 40.0, 30.0]])
    fig = viz_regions.draw_denoising_boxes(IMAGE, gt, gt + 2, gt - 3, title="group 1")
    ax = fig.axes[0]
    boxes = _rectangles(ax)
    assert len(boxes) == 6
    styles = [b.get_linestyle() for b in boxes]
    assert styles.count("--") == 2 and styles.count("-") == 4
    first_negative = next(b for b in boxes if b.get_linestyle() == "--")
    assert first_negative.get_xy() == (1.0, 1.0) and first_negative.get_width() == pytest.approx(16.0)
    assert ax.get_title() == "group 1"
    with pytest.raises(ValueError, match="one positive and one negative"):
        viz_regions.draw_denoising_boxes(IMAGE, gt, gt[:1], gt)
    assert ax.get_legend() is not None
    bare = viz_regions.draw_denoising_boxes(IMAGE, gt, gt + 2, gt - 3, legend=False)      # one legend per grid
    assert bare.axes[0].get_legend() is None


def test_plot_cost_matrices_marks_the_assignment_and_the_row_minima():
    cost = torch.tensor([[1.0, 0.0, 5.0, 3.0], [2.0, 0.5, 4.0, 0.7]])     # both GT prefer prediction 1
    fig = viz_regions.plot_cost_matrices({"total": cost, "giou": cost * 2},
                                         assignment=(torch.tensor([0, 1]), torch.tensor([1, 3])))
    panels = [ax for ax in fig.axes if ax.get_ylabel() in ("total", "giou")]
    assert len(panels) == 2
    dots, squares = panels[0].collections[:2]
    assert np.array_equal(dots.get_offsets(), [[1, 0], [1, 1]])              # cheapest per row
    assert np.array_equal(squares.get_offsets(), [[1, 0], [3, 1]])           # one-to-one
    with pytest.raises(ValueError, match="costs\\['giou'\\]"):
        viz_regions.plot_cost_matrices({"total": cost, "giou": cost[:, :2]})


def test_plot_bars_plain_stacked_and_log():
    fig = viz_regions.plot_bars({"a": 1.0, "b": 0.0, "c": 3.0}, logy=True, ylabel="norm")
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in _rectangles(ax)] == [1.0, 0.0, 3.0]
    assert [t.get_text() for t in ax.texts] == ["1", "0", "3"]
    assert ax.get_ylim()[1] > 3.0                     # room above the tallest bar for its value
    stacked = viz_regions.plot_bars({"enc": [1, 2], "dec0": [3, 4]}, stacked_by=["focal", "giou"])
    bars = _rectangles(stacked.axes[0])
    assert len(bars) == 4
    assert [t.get_text() for t in stacked.axes[0].texts] == ["3", "7"]
    assert [t.get_text() for t in stacked.axes[0].get_legend().get_texts()] == ["focal", "giou"]
    with pytest.raises(ValueError, match="2 numbers per key"):
        viz_regions.plot_bars({"enc": [1, 2, 3]}, stacked_by=["focal", "giou"])


def test_plot_token_layout_one_cell_per_token_with_run_counts():
    types = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2])
    padding = torch.tensor([False, False, False, False, True, True, False, False, False])
    fig = viz_regions.plot_token_layout({"global + regional": (types, padding), "regional only": ([2, 2, 2], None)},
                                        {0: "pooled", 1: "flattened", 2: "regional"})
    ax = fig.axes[0]
    cells = _rectangles(ax)
    assert len(cells) == 9 + 3
    assert sum(cell.get_hatch() == "////" for cell in cells) == 2
    texts = [t.get_text() for t in ax.texts]
    # the flattened run counts its 2 real tokens and, apart, its 2 padded ones (dark text on the pale hatching)
    assert texts == ["2", "2", "2", "3", "T = 9", "3", "T = 3"]
    assert [t.get_color() for t in ax.texts[:4]] == ["white", "white", "black", "white"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pooled", "flattened", "regional", "padding"]
    with pytest.raises(ValueError, match="token types \\[5\\]"):
        viz_regions.plot_token_layout({"x": ([5], None)}, {0: "pooled"})
    larger = viz_regions.plot_token_layout({"x": ([0, 1], None)}, {0: "pooled", 1: "flattened"}, legend_fontsize=10)
    assert {t.get_fontsize() for t in larger.axes[0].get_legend().get_texts()} == {10}
