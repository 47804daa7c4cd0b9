"""The plotting module draws what it is given, headless, without touching pyplot's global state."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from uniperceiver_v2 import viz  # noqa: E402

H, W = 24, 32


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))


def _rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _images(ax):
    return [a for a in ax.get_children() if isinstance(a, AxesImage)]


def _scene():
    boxes = np.array([[2, 3, 12, 15], [14, 4, 30, 20], [5, 14, 11, 22], [20, 1, 25, 6]], dtype=np.float64)
    masks = np.zeros((4, H, W), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = True
    return boxes, masks


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def test_to_display_image_reads_every_layout_the_same(image):
    hwc = image.permute(1, 2, 0).numpy()
    as_uint8 = (hwc * 255).round().astype(np.uint8)
    np.testing.assert_allclose(viz.to_display_image(image), hwc)
    np.testing.assert_allclose(viz.to_display_image(hwc), hwc)
    np.testing.assert_allclose(viz.to_display_image(as_uint8), as_uint8 / 255.0, atol=1e-6)
    gray = viz.to_display_image(image[0])
    assert gray.shape == (H, W, 3) and np.allclose(gray[..., 0], gray[..., 2])


def test_to_display_image_undoes_imagenet_normalisation(image):
    mean = torch.tensor(viz.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(viz.IMAGENET_STD)[:, None, None]
    normalised = (image - mean) / std
    restored = viz.to_display_image(normalised, mean=viz.IMAGENET_MEAN, std=viz.IMAGENET_STD)
    np.testing.assert_allclose(restored, image.permute(1, 2, 0).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="mean= and std="):
        viz.to_display_image(normalised)
    with pytest.raises(ValueError, match="both mean and std"):
        viz.to_display_image(normalised, mean=viz.IMAGENET_MEAN)


def test_show_image_draws_one_image_and_can_use_a_given_axes(image):
    fig = viz.show_image(image, title="x")
    assert isinstance(fig, Figure) and len(_images(fig.axes[0])) == 1
    assert fig.axes[0].get_images()[0].get_array().shape == (H, W, 3)
    host = Figure()
    ax = host.subplots()
    assert viz.show_image(image, ax=ax) is host


def test_image_grid_has_one_panel_per_image(image):
    fig = viz.image_grid([image] * 5, titles=list("abcde"), title_colors=["black"] * 4 + ["red"], ncols=3)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(panels) == 5
    assert [ax.get_title() for ax in panels] == list("abcde")
    assert to_rgb(panels[-1].title.get_color()) == to_rgb("red")


# ---------------------------------------------------------------------------------------------------------------
# detections and proposals
# ---------------------------------------------------------------------------------------------------------------
def test_draw_detections_draws_only_instances_above_threshold(image):
    boxes, masks = _scene()
    scores = np.array([0.9, 0.3, 0.75, 0.5])
    labels = np.array([1, 2, 1, 0])
    fig = viz.draw_detections(image, torch.from_numpy(boxes), labels=labels, scores=scores, masks=masks,
                              class_names=["zero", "one", "two"], score_threshold=0.5)
    ax = fig.axes[0]
    kept = scores >= 0.5
    rectangles = _rectangles(ax)
    assert len(rectangles) == kept.sum()
    drawn = sorted((r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rectangles)
    expected = sorted((b[0], b[1], b[2] - b[0], b[3] - b[1]) for b in boxes[kept])
    np.testing.assert_allclose(drawn, expected)
    captions = sorted(t.get_text() for t in ax.texts)
    assert captions == sorted(["one 0.90", "one 0.75", "zero 0.50"])

    picture, overlay = _images(ax)
    assert picture.get_array().shape == (H, W, 3)
    overlay = np.asarray(overlay.get_array())
    assert overlay.shape == (H, W, 4)
    np.testing.assert_array_equal(overlay[..., 3] > 0, masks[kept].any(axis=0))


def test_draw_detections_outlines_masks_without_tinting_the_image(image):
    boxes, masks = _scene()
    scores = np.array([0.9, 0.3, 0.75, 0.5])
    fig = viz.draw_detections(image, boxes, labels=[1, 2, 1, 0], scores=scores, masks=masks, score_threshold=0.5,
                              mask_style="outline")
    ax = fig.axes[0]
    assert len(ax.images) == 1                              # the picture alone: no tinted overlay
    contours = [c for c in ax.collections if c.get_paths() and any(len(p.vertices) for p in c.get_paths())]
    assert len(contours) == (scores >= 0.5).sum()           # one contour per kept mask
    colours = sorted(tuple(np.round(c.get_edgecolor()[0][:3], 6)) for c in contours)
    expected = sorted(tuple(np.round(viz.class_color(label), 6)) for label in (1, 1, 0))
    assert colours == expected
    with pytest.raises(ValueError, match="mask_style"):
        viz.draw_detections(image, boxes, masks=masks, mask_style="dotted")


def test_draw_detections_gives_a_class_the_same_colour_everywhere(image):
    boxes, _ = _scene()
    fig = viz.draw_detections(image, boxes, labels=[3, 3, 7, 3])
    colours = [r.get_edgecolor()[:3] for r in _rectangles(fig.axes[0])]
    assert colours[0] == colours[1] == colours[3] != colours[2]
    assert np.allclose(colours[0], viz.class_color(3))
    other = viz.draw_detections(image, boxes[:1], labels=[3])
    assert np.allclose(_rectangles(other.axes[0])[0].get_edgecolor()[:3], colours[0])
    assert len({viz.class_color(i) for i in range(40)}) == 40


def test_draw_detections_without_labels_or_scores_draws_every_box(image):
    boxes, _ = _scene()
    fig = viz.draw_detections(image, boxes)
    assert len(_rectangles(fig.axes[0])) == 4 and not fig.axes[0].texts
    empty = viz.draw_detections(image, np.zeros((0, 4)), scores=np.zeros(0), masks=np.zeros((0, H, W)))
    assert not _rectangles(empty.axes[0])


def test_draw_detections_rejects_inconsistent_inputs(image):
    boxes, masks = _scene()
    with pytest.raises(ValueError, match="masks: expected shape"):
        viz.draw_detections(image, boxes, masks=masks[:, :10])
    with pytest.raises(ValueError, match="labels: expected 4"):
        viz.draw_detections(image, boxes, labels=[1, 2])
    with pytest.raises(ValueError, match="class id 5 has no entry"):
        viz.draw_detections(image, boxes, labels=[0, 1, 2, 5], class_names=["a", "b", "c"])


def test_draw_proposals_keeps_the_top_k_and_colours_the_best_brightest(image):
    boxes, _ = _scene()
    objectness = torch.tensor([0.2, 3.0, -1.0, 1.5])
    fig = viz.draw_proposals(image, boxes, objectness, top=2)
    rectangles = _rectangles(fig.axes[0])
    assert len(rectangles) == 2
    corners = {(r.get_x(), r.get_y()) for r in rectangles}
    assert corners == {(14.0, 4.0), (20.0, 1.0)}
    best = next(r for r in rectangles if (r.get_x(), r.get_y()) == (14.0, 4.0))
    assert np.allclose(best.get_edgecolor(), matplotlib.colormaps["plasma"](1.0))
    assert len(_rectangles(viz.draw_proposals(image, boxes, objectness, top=10).axes[0])) == 4


def test_draw_detections_fit_captions_keeps_captions_inside_the_image_and_apart(image):
    boxes = np.array([[1, 0, 9, 8], [2, 1, 10, 9], [29, 10, 31, 14]], dtype=np.float64)   # top edge, twin, right
    names = ["a long class name", "another long name", "a caption at the right edge"]
    plain = viz.draw_detections(image, boxes, labels=[0, 1, 2], class_names=names)
    assert [(t.get_va(), t.get_ha()) for t in plain.axes[0].texts] == [("bottom", "left")] * 3
    fig = viz.draw_detections(image, boxes, labels=[0, 1, 2], class_names=names, fit_captions=True, title="t")
    ax = fig.axes[0]
    fig.draw_without_rendering()
    frame = ax.get_window_extent()
    extents = [t.get_window_extent() for t in ax.texts]
    assert all(e.y1 <= frame.y1 + 1.0 and e.x1 <= frame.x1 + 1.0 for e in extents)
    assert ax.texts[0].get_va() == "top"                        # no room above the box: inside it
    assert not extents[0].overlaps(extents[1])                   # the twin box's caption moved off the first
    assert ax.texts[2].get_ha() == "right"                      # aligned with its box's right edge
    assert ax.get_title() == "t"
    # No place is free: a box running off the right border keeps its caption inside the image all the same.
    crowded = viz.draw_detections(image, np.array([[20, 0, 40, 5], [22, 0, 40, 5]], dtype=np.float64),
                                  labels=[0, 1], class_names=names[:2], fit_captions=True)
    crowded.draw_without_rendering()
    frame = crowded.axes[0].get_window_extent()
    assert all(t.get_window_extent().x1 <= frame.x1 + 1.0 for t in crowded.axes[0].texts)


def test_draw_detections_fit_captions_uses_the_room_under_crowded_boxes():
    # Four identical boxes in the middle of a large image: the four places at the top edge hold two captions side
    # by side at most, so the others must go under the box or inside it over its bottom edge, all apart.
    picture = torch.rand(3, 120, 120, generator=torch.Generator().manual_seed(1))
    boxes = np.array([[30, 40, 90, 80]] * 4, dtype=np.float64)
    names = [f"a class name too long for two side by side, number {i}" for i in range(4)]
    fig = viz.draw_detections(picture, boxes, labels=[0, 1, 2, 3], class_names=names, fit_captions=True)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    extents = [t.get_window_extent() for t in ax.texts]

    def area(a, b):   # overlap in display pixels (captions that only touch do not count)
        return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))

    assert all(area(a, b) < 1.0 for i, a in enumerate(extents) for b in extents[i + 1:])
    assert [t.get_position()[1] for t in ax.texts] == [40, 40, 80, 80]   # two at the top edge, two at the bottom


def test_draw_detections_fit_captions_stacks_the_captions_of_many_boxes_on_one_small_object():
    # Eight boxes on one small object (as a detector's best boxes on a ring): the seven places around the box hold
    # a few captions; the others stack in a column above and under it, apart, each with a leader line to its box.
    picture = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(2))
    boxes = np.array([[56, 50, 72, 66]] * 8, dtype=np.float64)
    names = [f"digit number {i}" for i in range(8)]
    fig = viz.draw_detections(picture, boxes, labels=list(range(8)), scores=[0.1] * 8, class_names=names,
                              fit_captions=True)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    frame = ax.get_window_extent()
    extents = [t.get_window_extent() for t in ax.texts]
    assert len(extents) == 8
    assert all(viz.images._area(a, b) < 1.0 for i, a in enumerate(extents) for b in extents[i + 1:])
    assert all(e.x0 >= frame.x0 - 1.0 and e.x1 <= frame.x1 + 1.0 and e.y0 >= frame.y0 - 1.0
               and e.y1 <= frame.y1 + 1.0 for e in extents)
    assert ax.lines, "the stacked captions are joined to their box"
    assert ax.get_xlim() == (-0.5, 127.5) and ax.get_ylim() == (127.5, -0.5)   # leader lines leave the view alone


def test_draw_proposals_labels_its_colour_bar(image):
    boxes, _ = _scene()
    fig = viz.draw_proposals(image, boxes, torch.rand(4), score_label="σ(objectness)")
    assert fig.axes[-1].get_ylabel() == "σ(objectness)"
    assert viz.draw_proposals(image, boxes, torch.rand(4)).axes[-1].get_ylabel() == "objectness"


def test_show_captions_font_size(image):
    fig = viz.show_captions([image, image], captions_gt=[["one", "two"], "three"], fontsize=10)
    assert [ax.xaxis.label.get_fontsize() for ax in fig.axes[:2]] == [10, 10]


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
def test_draw_sampling_points_legend_inside_outside_or_none(image):
    locations, weights = np.full((2, 3, 2), 0.5), np.full((2, 3), 1 / 6)
    inside = viz.draw_sampling_points(image, [0.5, 0.5], locations, weights).axes[0].get_legend()
    assert inside is not None and inside._loc == matplotlib.legend.Legend.codes["upper right"]
    outside = viz.draw_sampling_points(image, [0.5, 0.5], locations, weights, legend="outside").axes[0]
    assert outside.get_legend().get_bbox_to_anchor().x0 > outside.get_window_extent().x1 - 1
    assert viz.draw_sampling_points(image, [0.5, 0.5], locations, weights, legend=False).axes[0].get_legend() is None
    uneven = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]) / 1.0          # level 1's first point has weight 0
    legend = viz.draw_sampling_points(image, [0.5, 0.5], locations, uneven).axes[0].get_legend()
    sizes = [h.get_sizes()[0] for h in legend.legend_handles if hasattr(h, "get_sizes")]
    assert len(sizes) == 2 and sizes[0] == sizes[1]                  # a level's marker does not show a weight
    with pytest.raises(ValueError, match="legend"):
        viz.draw_sampling_points(image, [0.5, 0.5], locations, weights, legend="below")


def test_attention_heatmaps_can_draw_the_image_in_grey(image):
    maps = torch.full((2, 3, 4), 1 / 12)
    picture = _images(viz.attention_heatmaps(image, maps, relative=True, grey_image=True).axes[0])[0].get_array()
    assert picture.shape == (H, W, 3)
    np.testing.assert_allclose(picture[..., 0], picture[..., 2])
    coloured = _images(viz.attention_heatmaps(image, maps, relative=True).axes[0])[0].get_array()
    np.testing.assert_allclose(coloured, image.permute(1, 2, 0).numpy(), atol=1e-6)


def test_draw_sampling_points_one_scatter_per_level_sized_by_weight(image):
    rng = np.random.default_rng(0)
    levels, points = 3, 4
    locations = rng.random((levels, points, 2))
    weights = rng.random((levels, points))
    weights /= weights.sum()
    fig = viz.draw_sampling_points(image, [0.5, 0.25], locations, weights)
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == levels
    for level, scatter in enumerate(scatters):
        np.testing.assert_allclose(scatter.get_offsets(), locations[level] * [W, H] - 0.5)
        sizes = scatter.get_sizes()
        assert np.array_equal(np.argsort(sizes), np.argsort(weights[level]))
    reference = ax.lines[0].get_xydata()[0]
    np.testing.assert_allclose(reference, [0.5 * W - 0.5, 0.25 * H - 0.5])


def test_draw_sampling_points_accepts_a_heads_dimension(image):
    heads, levels, points = 2, 4, 3
    locations = torch.rand(heads, levels, points, 2)
    weights = torch.rand(heads, levels, points)
    fig = viz.draw_sampling_points(image, torch.tensor([0.5, 0.5]), locations, weights,
                                   level_names=[f"stride {s}" for s in (8, 16, 32, 64)])
    scatters = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(scatters) == levels and all(len(s.get_offsets()) == heads * points for s in scatters)
    with pytest.raises(ValueError, match="attention_weights"):
        viz.draw_sampling_points(image, [0.5, 0.5], locations, weights[0])


def test_plot_attention_mask_shows_the_mask_and_its_segments():
    size = 10
    mask = torch.tril(torch.ones(size, size, dtype=torch.bool))
    segments = [("<SPE>", 0, 1), ("image", 1, 5), ("words", 5, 10)]
    fig = viz.plot_attention_mask(mask, segments)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), mask.numpy())
    assert len(ax.lines) == 2 * 2   # one horizontal and one vertical line per inner boundary
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<SPE>", "image", "words"]
    assert ax.get_title() == "attention mask (grey = may attend)"
    titled = viz.plot_attention_mask(mask, title="causal").axes[0].get_title()
    assert titled == "causal\n(grey = may attend)"                    # a custom title keeps the colour key
    keyed = "self-attention (grey = may attend)"
    assert viz.plot_attention_mask(mask, title=keyed).axes[0].get_title() == keyed   # not said twice
    with pytest.raises(ValueError, match="'words'"):
        viz.plot_attention_mask(mask, [("words", 5, 11)])
    with pytest.raises(ValueError, match="square"):
        viz.plot_attention_mask(mask[:3])


def test_attention_heatmaps_one_overlay_per_map(image):
    maps = torch.rand(7, 3, 4)
    fig = viz.attention_heatmaps(image, maps, ncols=4)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 8 and len(panels) == 7
    for ax, expected in zip(panels, maps):
        picture, heat = ax.get_images()
        assert picture.get_array().shape == (H, W, 3)
        np.testing.assert_allclose(heat.get_array(), expected.numpy() / expected.numpy().max(), rtol=1e-6)



def test_attention_heatmaps_relative_scale_shows_a_uniform_map_as_the_uniform_share(image):
    uniform = np.full((2, 3, 4), 1.0 / 12)
    fig = viz.attention_heatmaps(image, uniform, relative=True)
    panels = [ax for ax in fig.axes if ax.images]
    for ax in panels:
        np.testing.assert_allclose(ax.get_images()[1].get_array(), 1.0)   # weight / uniform weight
    assert any(ax.get_ylabel() == "weight / uniform weight" for ax in fig.axes)   # the colour bar


def test_attention_heatmaps_hatch_padding_and_never_colour_it(image):
    padding = np.zeros((3, 4), dtype=bool)
    padding[:, 2:] = True                       # the right half of the grid is padding
    maps = np.zeros((1, 3, 4))
    maps[0, :, :2] = 1.0 / 6
    for relative in (False, True):
        fig = viz.attention_heatmaps(image, maps, padding=padding, relative=relative)
        heat = fig.axes[0].get_images()[1]
        assert heat.get_interpolation() == "nearest"          # a cell is a block: nothing bleeds into padding
        np.testing.assert_array_equal(np.ma.getmaskarray(heat.get_array()), padding)
        assert len(fig.axes[0].patches) == int(padding.sum())  # one hatched block per padded cell
    with pytest.raises(ValueError, match="grid shape"):
        viz.attention_heatmaps(image, maps, padding=padding[:, :3])

# ---------------------------------------------------------------------------------------------------------------
# similarities, experts, curves, tables
# ---------------------------------------------------------------------------------------------------------------
def test_plot_similarity_matrix_marks_the_arg_max_of_every_row():
    sim = np.random.default_rng(1).standard_normal((5, 6))
    targets = np.array([0, 1, 2, 3, 4])
    fig = viz.plot_similarity_matrix(sim, targets=targets, col_labels=list("abcdef"))
    ax = fig.axes[0]
    target_marks, argmax_marks = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_array_equal(target_marks.get_offsets()[:, 0], targets)
    np.testing.assert_array_equal(argmax_marks.get_offsets()[:, 0], sim.argmax(axis=1))
    hit = sim.argmax(axis=1) == targets
    np.testing.assert_allclose(argmax_marks.get_facecolors()[:, :3],
                               [to_rgb("limegreen") if h else to_rgb("red") for h in hit])
    legend = ax.get_legend()                                   # both dot colours are explained
    assert [t.get_text() for t in legend.get_texts()] == ["target", "arg max (v2 eq. (5)), correct", "arg max, wrong"]
    assert [to_rgb(h.get_color()) for h in legend.legend_handles[1:]] == [to_rgb("limegreen"), to_rgb("red")]


def test_plot_gate_heatmap_shows_usage_with_values():
    usage = np.random.default_rng(2).dirichlet(np.ones(8), size=6)
    rows = [f"attr {i:03b}" for i in range(6)]
    fig = viz.plot_gate_heatmap(torch.from_numpy(usage), rows, "layer 1")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), usage)
    assert len(ax.texts) == usage.size
    assert [t.get_text() for t in ax.get_yticklabels()] == rows
    assert fig.axes[1].get_ylabel() == "usage"                                          # the colour bar
    assert viz.plot_gate_heatmap(usage, rows, colorbar_label="mean G").axes[1].get_ylabel() == "mean G"
    with pytest.raises(ValueError, match="row_labels"):
        viz.plot_gate_heatmap(usage, rows[:2])


def _log_records():
    rng = np.random.default_rng(3)
    records = []
    for it in range(30):
        task = ("classification", "captioning", "retrieval")[it % 3]
        records.append({"iteration": it, "task": task, "loss": float(rng.random() + 1.0 / (it + 1)), "lr": 1e-3})
    records.append({"iteration": 30, "task": "eval", "acc": 0.5})   # no loss: left out of the loss panel
    return records


def test_plot_curves_from_jsonl_one_line_per_task(tmp_path):
    records = _log_records()
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    fig = viz.plot_curves(log, keys=("loss", "lr"))
    loss_ax, lr_ax = fig.axes
    assert sorted(line.get_label() for line in loss_ax.lines) == ["captioning", "classification", "retrieval"]
    for line in loss_ax.lines:
        expected = [(r["iteration"], r["loss"]) for r in records if r.get("task") == line.get_label()]
        np.testing.assert_allclose(line.get_xydata(), expected)
    assert len(lr_ax.lines) == 3
    assert len(viz.plot_curves(records, keys=("loss",), by=None).axes[0].lines) == 1


def test_plot_curves_smoothing_is_a_trailing_moving_average():
    records = _log_records()
    window = 4
    fig = viz.plot_curves(records, keys=("loss",), smooth=window)
    for line in fig.axes[0].lines:
        raw = np.array([r["loss"] for r in records if r.get("task") == line.get_label()])
        slow = [raw[max(0, i - window + 1): i + 1].mean() for i in range(len(raw))]
        np.testing.assert_allclose(line.get_ydata(), slow)


def test_plot_curves_names_the_bad_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 0, "loss": 1.0}\n{"iteration": 1, "loss": \n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        viz.plot_curves(log)
    with pytest.raises(ValueError, match="record 0 has no 'iteration'"):
        viz.plot_curves([{"loss": 1.0}])


def test_captions_retrieval_tables_and_statistics(image):
    fig = viz.show_captions([image, image], ["a red square", "two circles"], [["ref a", "ref b"], "ref c"])
    assert [ax.get_title() for ax in fig.axes] == ["a red square", "two circles"]
    assert fig.axes[0].get_xlabel() == "- ref a\n- ref b" and fig.axes[1].get_xlabel() == "ref c"

    fig = viz.show_retrieval(image, ["right one", "wrong", "wrong too"], [True, False, False],
                             scores=[0.9, 0.5, 0.1], top=2)
    lines = fig.axes[1].texts
    assert len(lines) == 2
    assert to_rgb(lines[0].get_color()) == to_rgb("forestgreen") and to_rgb(lines[1].get_color()) == to_rgb("firebrick")
    assert [t.get_text()[:4] for t in lines] == ["1. \u2713", "2. \u2717"]            # a ranking: numbered
    unordered = viz.show_retrieval(image, ["wrong", "right one"], [False, True], top=2, numbered=False).axes[1].texts
    assert [t.get_text()[:3] for t in unordered] == ["\u2022 \u2717", "\u2022 \u2713"]   # a set in no order: bullets

    fig = viz.results_table_figure([["ours", 12.345, None], ["paper", 49.9, 76.9]], ["model", "det", "cls"])
    cells = fig.axes[0].tables[0].get_celld()
    assert len(cells) == 3 * 3
    assert cells[1, 1].get_text().get_text() == "12.3" and cells[1, 2].get_text().get_text() == "-"

    fig = viz.plot_instance_statistics([1, 2, 2, 5], [8.0, 30.0, 50.0, 120.0], {"disk": 4, "square": 3, "ring": 2})
    assert len(fig.axes[2].patches) == 3


def test_instance_statistics_draw_both_coco_limits_even_without_large_objects():
    fig = viz.plot_instance_statistics([1, 2], [8.0, 20.0, 40.0], {"disk": 2, "ring": 1})
    sizes = fig.axes[1]
    dashed = sorted(line.get_xdata()[0] for line in sizes.lines if line.get_linestyle() == "--")
    assert dashed == [32.0, 96.0]
    assert sizes.get_xlim()[1] > 96.0                           # the promised line is on the axis
    assert [t.get_text() for t in sizes.texts] == ["small", "medium", "large"]
    assert viz.coco_size_counts([8.0, 31.9, 32.0, 95.9, 96.0, 200.0]) == {"small": 2, "medium": 2, "large": 2}


def test_log_axes_are_labelled_with_plain_numbers():
    """Matplotlib writes "6x10^1" under minor ticks of a short log axis; every log axis of the package must not."""
    records = [{"iteration": i, "task": "detection", "loss": 20.0 + 70.0 * i / 9} for i in range(10)]
    fig = viz.plot_curves(records, keys=("loss",), logy=True)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and not any("times" in text or "^" in text or "$" in text for text in labels), labels
    assert "60" in labels or "50" in labels                    # the range 20-90 is read off minor ticks
    fig = viz.subplots(1)[0]
    ax = fig.axes[0]
    ax.plot([1e-4, 1e1], [1.0, 2.0])
    viz.set_log_scale(ax, "x")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels(which="both") if t.get_text()]
    assert "0.0001" in labels and "1" in labels and not any("^" in text for text in labels), labels
    assert "2" not in labels                                    # five decades: minor ticks unlabelled
    with pytest.raises(ValueError, match="'x' or 'y'"):
        viz.set_log_scale(ax, "z")


def test_learning_rate_steps_are_the_ticks_of_their_axis_written_alike():
    """A step schedule's levels label the axis ("3e-4", "3e-5", "3e-6"), not decades in two styles ("0.0001",
    "1e-05"); the warm-up ramp's points are too few to be levels."""
    records = []
    for iteration in range(0, 1000, 10):
        factor = min(1.0, 0.001 + iteration / 50) * (0.1 if iteration >= 900 else 1.0)
        records += [{"iteration": iteration, "group": "lr x1", "lr": 3e-4 * factor},
                    {"iteration": iteration, "group": "lr x0.1", "lr": 3e-5 * factor}]
    assert viz.plateau_values([r["lr"] for r in records if r["group"] == "lr x1"]) == [3e-5, 3e-4]
    fig = viz.plot_curves(records, keys=("lr",), by="group", logy=True, label_plateaus=True)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels == ["3e-6", "3e-5", "3e-4"], labels
    assert viz.plateau_values([0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.1]) == [0.25, 0.5]
    fig = viz.plot_curves([{"iteration": i, "lr": v} for i, v in enumerate([0.5] * 5 + [0.05] * 5)], keys=("lr",),
                          by=None, label_plateaus=True)
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()] == ["0.05", "0.5"]


def test_plot_curves_colour_a_task_line_by_the_task_palette():
    fig = viz.plot_curves(_log_records(), keys=("loss",))
    for line in fig.axes[0].lines:
        assert to_rgb(line.get_color()) == pytest.approx(viz.task_color(line.get_label()))


def test_figures_save_to_png_and_leave_pyplot_alone(tmp_path, image):
    boxes, masks = _scene()
    figures = {
        "detections": viz.draw_detections(image, boxes, labels=[0, 1, 2, 3], masks=masks),
        "mask": viz.plot_attention_mask(np.tril(np.ones((6, 6), dtype=bool))),
        "curves": viz.plot_curves(_log_records()),
        "heatmaps": viz.attention_heatmaps(image, np.random.rand(3, 2, 2)),
    }
    assert plt.get_fignums() == []   # built without pyplot: nothing to leak in loops
    for name, fig in figures.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path, dpi=50)
        assert path.stat().st_size > 0
        with Image.open(path) as png:
            assert png.width > 10 and png.height > 10


def test_subplots_gives_n_axes_for_functions_taking_ax(image):
    fig, axes = viz.subplots(5, ncols=3)
    assert len(axes) == 5 and len(fig.axes) == 6 and not fig.axes[5].axison
    boxes, _ = _scene()
    for ax in axes:
        assert viz.draw_detections(image, boxes[:2], ax=ax) is fig
    assert [len(_rectangles(ax)) for ax in axes] == [2] * 5


def test_coco_instance_statistics_agree_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 50, "width": 60} for i in (1, 2, 3)],
        "categories": [{"id": 7, "name": "star"}, {"id": 3, "name": "disk"}, {"id": 9, "name": "never"}],
        "annotations": [
            # a mask's area is smaller than its box's (36, 100 and 16 here)
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 9], "area": 20, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10], "area": 64, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [1, 1, 2, 8], "area": 9, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    stats = viz.coco_instance_statistics(path)
    coco = COCO(str(path))
    assert stats["objects_per_image"] == [len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in (1, 2, 3)]
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert list(stats["category_counts"]) == [names[i] for i in sorted(names)]
    assert stats["category_counts"] == {names[i]: len(coco.getAnnIds(catIds=[i], iscrowd=False)) for i in names}
    # COCOeval sorts objects into AP_S / AP_M / AP_L by the annotation's "area" (a mask's), not by its box.
    expected_sizes = [np.sqrt(a["area"]) for a in coco.loadAnns(coco.getAnnIds(iscrowd=False))]
    np.testing.assert_allclose(sorted(stats["object_sizes"]), sorted(expected_sizes))
    assert sorted(stats["object_sizes"]) != pytest.approx(
        sorted(np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco.loadAnns(coco.getAnnIds(iscrowd=False))))

    del data["annotations"][0]["area"]                       # no "area": the box's area stands in
    path.write_text(json.dumps(data))
    assert sorted(viz.coco_instance_statistics(path)["object_sizes"]) == pytest.approx(sorted([6.0, 8.0, 3.0]))


def test_plot_curves_keeps_one_kind_of_record():
    records = [{"kind": "train", "iteration": i, "task": "t", "loss": 1.0 / (i + 1)} for i in range(5)]
    records += [{"kind": "eval", "iteration": 4, "task": "t", "loss": 0.9}]
    lines = viz.plot_curves(records, kind="train").axes[0].lines
    assert len(lines) == 1 and len(lines[0].get_xdata()) == 5


def test_plot_calibration_marks_each_halfs_gamma_and_the_pooled_value():
    fig = viz.plot_calibration([0.0, 2.0, 8.0], [[0.10, 0.14, 0.15], [0.09, 0.16, 0.12]], [2.0, 8.0], pooled_ap50=0.14)
    ax = fig.axes[0]
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in stars] == [(1.0, 0.14), (2.0, 0.12)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "8"]
    assert any("0.140" in t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(ValueError, match="one AP50 per gamma"):
        viz.plot_calibration([0.0, 2.0], [[0.1]], [0.0])
    with pytest.raises(ValueError, match="chosen"):
        viz.plot_calibration([0.0], [[0.1], [0.2]], [0.0])


def test_draw_detections_puts_a_tag_before_each_caption():
    image = torch.zeros(3, 32, 32)
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0], [16.0, 16.0, 30.0, 30.0]])
    fig = viz.draw_detections(image, boxes, torch.tensor([0, 1]), torch.tensor([0.9, 0.4]),
                              class_names=["circle", "square"], tags=["✓", "✗"])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["✓ circle 0.90", "✗ square 0.40"]
    with pytest.raises(ValueError, match="tags"):
        viz.draw_detections(image, boxes, tags=["✓"])


def test_draw_detections_key_numbers_the_boxes_and_lists_their_captions_under_the_image():
    image = torch.zeros(3, 32, 32)
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0], [3.0, 3.0, 13.0, 13.0], [16.0, 16.0, 30.0, 30.0]])
    fig = viz.draw_detections(image, boxes, torch.tensor([0, 1, 1]), torch.tensor([0.9, 0.4, 0.2]),
                              class_names=["circle", "square"], score_threshold=0.3, tags=["✓", "✗", "○"],
                              captions="key", fit_captions=True)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2"]                 # the third is under the threshold
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["1  ✓ circle 0.90", "2  ✗ square 0.40"]
    box_colours = [to_rgb(p.get_edgecolor()) for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert [to_rgb(h.get_facecolor()) for h in legend.legend_handles] == box_colours   # each entry in its box's colour
    with pytest.raises(ValueError, match="captions: expected 'box' or 'key'"):
        viz.draw_detections(image, boxes, captions="list")
    with pytest.raises(ValueError, match="cannot share it with legend=True"):
        viz.draw_detections(image, boxes, torch.tensor([0, 1, 1]), captions="key", legend=True)
