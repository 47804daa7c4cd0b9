"""The decoder / MoE figures draw what they are given, headless, and refuse malformed input."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from uniperceiver_v2.modeling.attributes import ATTRIBUTE_NAMES  # noqa: E402
from uniperceiver_v2.viz import decoder as viz_decoder  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image_data(ax):
    images = [c for c in ax.get_children() if isinstance(c, AxesImage)]
    assert len(images) == 1
    return np.asarray(images[0].get_array())


def test_attribute_bits_table():
    bits = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 0, 1, 0, 1, 1, 1]], dtype=torch.float32)
    fig = viz_decoder.plot_attribute_bits(bits, ["cls · input · <SPE>", "cap · input · text (causal)"],
                                          ATTRIBUTE_NAMES, title="Tab. 2")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_array_equal(_image_data(ax), bits.numpy())
    assert [t.get_text() for t in ax.texts] == [str(int(v)) for v in bits.flatten().tolist()]
    assert ax.get_xticklabels()[6].get_text() == "6: token_is_causal"
    with pytest.raises(ValueError, match="only 0 and 1"):
        viz_decoder.plot_attribute_bits(bits * 2, ["a", "b"], ATTRIBUTE_NAMES)
    with pytest.raises(ValueError, match="row_labels: expected 2"):
        viz_decoder.plot_attribute_bits(bits, ["a"], ATTRIBUTE_NAMES)
    with pytest.raises(ValueError, match="bit_names: expected 8"):
        viz_decoder.plot_attribute_bits(bits, ["a", "b"], ATTRIBUTE_NAMES[:7])


def test_expert_usage_panels_share_one_scale():
    usage = torch.zeros(3, 2, 4)
    usage[0, 0, 1], usage[0, 0, 2] = 0.7, 0.3
    usage[2, 1, 3] = 1.0
    fig = viz_decoder.plot_expert_usage(usage, ["I→T · input · image", "T→T · target · text"], title="usage")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1", "layer 2"]
    for layer, ax in enumerate(panels):
        np.testing.assert_allclose(_image_data(ax), usage[layer].numpy())
        image = [c for c in ax.get_children() if isinstance(c, AxesImage)][0]
        assert image.get_clim() == (0.0, 1.0)
    assert sorted(t.get_text() for t in panels[0].texts) == [".30", ".70"]      # zero cells stay empty
    assert len(fig.axes) == 4                                                    # + one colour bar
    with pytest.raises(ValueError, match="layers, rows, experts"):
        viz_decoder.plot_expert_usage(usage[0], ["a", "b"])
    with pytest.raises(ValueError, match="layer_titles: expected 3"):
        viz_decoder.plot_expert_usage(usage, ["a", "b"], layer_titles=["x"])


def uniform_line_width(ax):
    return [line for line in ax.get_lines() if line.get_label().startswith("uniform")][0].get_linewidth()


def test_expert_load_marks_what_each_capacity_drops():
    counts = torch.tensor([10, 30, 20, 4])
    fig = viz_decoder.plot_expert_load(counts, {"factor 1.0": 16, "factor 2.0": 32}, title="layer 0")
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [b.get_height() for b in bars[:4]] == [10, 30, 20, 4]
    over = [(b.get_x() + b.get_width() / 2, b.get_y(), b.get_height()) for b in bars[4:]]
    assert over == [(1, 16, 14), (2, 16, 4)]               # the parts above C = 16; nothing exceeds C = 32
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # the uniform line coincides with factor 1.0's C: drawn last, on top, and its label says so
    assert labels == ["factor 1.0 (C = 16)", "factor 2.0 (C = 32)", "uniform (16), on the line of factor 1.0",
                      "hatched: dropped at the capacity of its colour"]
    covered_line = [line for line in ax.get_lines() if line.get_label() == "factor 1.0 (C = 16)"][0]
    assert covered_line.get_linewidth() > uniform_line_width(ax)       # wider than the dotted line drawn over it
    odd = viz_decoder.plot_expert_load(torch.tensor([10, 31, 20, 4]), {"factor 1.0": 17}).axes[0]
    assert odd.get_legend().get_texts()[1].get_text() == "uniform (16.2), on the line of factor 1.0"
    no_overflow = viz_decoder.plot_expert_load(counts, {"factor 2.0": 32}).axes[0]
    assert not any(t.get_text().startswith("hatched") for t in no_overflow.get_legend().get_texts())
    uniform_line = [line for line in ax.get_lines() if line.get_label().startswith("uniform")][0]
    assert uniform_line.get_zorder() > max(line.get_zorder() for line in ax.get_lines() if line is not uniform_line)
    with pytest.raises(ValueError, match="one count per expert"):
        viz_decoder.plot_expert_load([])


def test_expert_loads_draw_every_layer_on_one_scale_with_one_legend():
    counts = torch.tensor([[10, 30, 20, 4], [16, 16, 16, 16]])
    fig = viz_decoder.plot_expert_loads(counts, {"factor 1.0": 16, "factor 2.0": 32}, titles=["layer 0", "layer 1"])
    first, second = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["layer 0", "layer 1"]
    assert first.get_ylim() == second.get_ylim()                                 # one y scale
    assert first.get_legend() is None and second.get_legend() is None and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["factor 1.0 (C = 16)", "factor 2.0 (C = 32)", "uniform (16), on the line of factor 1.0",
                      "hatched: dropped at the capacity of its colour"]          # layer 0 drops, so the hatch is named
    hatched = [p for p in second.patches if p.get_hatch()]
    assert hatched == []                                                         # layer 1 sits at C = 16: no drop
    calm = viz_decoder.plot_expert_loads(counts[1:], {"factor 1.0": 16})
    assert [t.get_text() for t in calm.legends[0].get_texts()] == ["factor 1.0 (C = 16)",
                                                                    "uniform (16), on the line of factor 1.0"]
    with pytest.raises(ValueError, match="titles: expected 2"):
        viz_decoder.plot_expert_loads(counts, titles=["x"])
    with pytest.raises(ValueError, match=r"\(layers, experts\)"):
        viz_decoder.plot_expert_loads(counts[0])
