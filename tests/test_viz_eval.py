"""The evaluation figures draw what they are given: bars, colours, marks and titles, headless."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from uniperceiver_v2.viz import evaluation as viz_eval  # noqa: E402


def images(n):
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 16, 20, generator=generator) for _ in range(n)]


def bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_topk_predictions_draw_one_bar_per_class_and_mark_the_truth():
    predictions = [[("cat", 0.7), ("dog", 0.2), ("fox", 0.1)],
                   [("dog", 0.5), ("cat", 0.3), ("fox", 0.2)],
                   [("fox", 0.6), ("dog", 0.3), ("owl", 0.1)]]
    pil = Image.fromarray(np.zeros((10, 12), dtype=np.uint8))          # grayscale PIL works too
    fig = viz_eval.plot_topk_predictions(images(2) + [pil], ["cat", "cat", "hexagon"], predictions, ncols=2,
                                         marked=["hexagon"], chance=0.25, title="top-3")
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 8                                               # 2 rows x (image, bars) x 2
    image_ax, bar_ax = axes[0], axes[1]
    assert [b.get_width() for b in bars(bar_ax)] == pytest.approx([0.7, 0.2, 0.1])
    assert [to_rgb(b.get_facecolor()) for b in bars(bar_ax)] == [to_rgb("forestgreen")] + [to_rgb("silver")] * 2
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["cat", "dog", "fox"]
    assert bar_ax.get_title() == "top-1 correct" and axes[3].get_title() == "in top-k"
    assert axes[5].get_title() == "not in top-k" and to_rgb(axes[4].title.get_color()) == to_rgb("firebrick")
    assert to_rgb(image_ax.title.get_color()) == to_rgb("black")
    assert not axes[6].axison and not axes[7].axison                    # the unused cell is hidden
    assert fig._suptitle.get_text() == "top-3"
    assert [line.get_xdata()[0] for line in bar_ax.get_lines()] == [0.25]          # the chance line


def test_topk_predictions_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="one of each per image"):
        viz_eval.plot_topk_predictions(images(2), ["cat"], [[("cat", 1.0)]] * 2)
    with pytest.raises(ValueError, match="no images"):
        viz_eval.plot_topk_predictions([], [], [])


def test_text_retrieval_frames_the_right_image():
    fig = viz_eval.show_text_retrieval("a red circle above a blue square", images(3), [False, True, False],
                                       scores=[3.0, 2.5, 1.0])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["1. \u2717", "2. \u2713", "3. \u2717"]
    assert [ax.get_xlabel() for ax in axes] == ["3.000", "2.500", "1.000"]
    assert to_rgb(axes[1].spines["left"].get_edgecolor()) == to_rgb("forestgreen")
    assert axes[1].spines["left"].get_linewidth() > axes[0].spines["left"].get_linewidth()
    assert "a red circle above a blue square" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="one per ranked image"):
        viz_eval.show_text_retrieval("q", images(2), [True])
    with pytest.raises(ValueError, match="scores"):
        viz_eval.show_text_retrieval("q", images(2), [True, False], scores=[1.0])
