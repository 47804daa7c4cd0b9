"""The interactive explorers, driven the way a user drives them: set a control, check the figure changed as it
should; bad input shows a message, not a traceback; ``interactive=False`` gives one static figure. The notebooks
that embed an explorer declare ``interactive`` and pass it on."""

import datetime
import io
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from helpers import CAPTIONS, CLASS_NAMES, single_thread, tiny_model  # noqa: F401
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from uniperceiver_v2 import api
from uniperceiver_v2.viz import explore
from uniperceiver_v2.walkthrough import gating

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"04_conditional_moe.ipynb": ["gating"],
             "07_evaluation.ipynb": ["captions", "retrieval", "curves"],
             "08_novel_category_detection.ipynb": ["detections"]}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    """Four PIL images of different sizes and modes, each with a bright block in its own place."""
    rng = np.random.default_rng(0)
    pictures = {}
    for i, (height, width, mode) in enumerate([(64, 80, "RGB"), (72, 64, "L"), (64, 64, "RGBA"), (96, 60, "RGB")]):
        array = rng.integers(0, 90, (height, width, 4), dtype=np.uint8)
        array[(i % 2) * height // 2:(i % 2 + 1) * height // 2, (i // 2) * width // 2:(i // 2 + 1) * width // 2] = 250
        array[..., 3] = 255
        pictures[f"scene {i}"] = Image.fromarray(array, "RGBA").convert(mode)
    return pictures


def rectangles(ax) -> int:
    return sum(isinstance(patch, Rectangle) for patch in ax.patches)


def legend_names(ax) -> set[str]:
    """The class names of the key under the detections ("1  circle 0.53": box number, name, score)."""
    legend = ax.get_legend()
    return set() if legend is None else {text.get_text().split("  ", 1)[1].rsplit(" ", 1)[0]
                                         for text in legend.get_texts()}


def png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(explorer, name: str, content: bytes) -> None:
    explorer.extras["upload"].value = ({"name": name, "type": "", "size": len(content),
                                        "content": memoryview(content),
                                        "last_modified": datetime.datetime.now(datetime.UTC)},)


def shows_message(explorer, *words: str) -> bool:
    return (explorer.error is not None and all(word in explorer.error for word in words)
            and "Traceback" not in explorer.status.value)


# ------------------------------------------------------------------------------------------------------ detections
def test_detections_follow_the_threshold_the_class_names_and_the_proposals_toggle(model, images):
    explorer = explore.detections(model, images, ["circle", "square"], threshold=0.0, boxes=8)
    assert explorer.error is None and rectangles(explorer.figure.axes[0]) == 8
    assert legend_names(explorer.figure.axes[0]) <= {"circle", "square"}

    scores = sorted({float(s) for s in api.detect(model, images["scene 0"], ["circle", "square"])[0]["scores"]},
                    reverse=True)
    explorer.set(threshold=scores[4])                 # the 5th best (proposal, class) pair: at most 5 boxes
    assert 1 <= rectangles(explorer.figure.axes[0]) <= 5
    explorer.set(threshold=1.0)
    assert rectangles(explorer.figure.axes[0]) == 0 and "0 detection(s)" in explorer.summary

    explorer.set(threshold=0.0, classes="tiger shark")               # a name no training ever saw
    assert legend_names(explorer.figure.axes[0]) == {"tiger shark"}
    explorer.controls["classes"].value = "tiger shark,  hot-air balloon ,tiger shark"
    assert legend_names(explorer.figure.axes[0]) <= {"tiger shark", "hot-air balloon"}
    assert "2 class name(s)" in explorer.summary

    explorer.controls["proposals"].value = True
    image_axes = [ax for ax in explorer.figure.axes if ax.images]
    assert len(image_axes) == 2 and "proposals" in image_axes[1].get_title()
    assert rectangles(image_axes[1]) == 8
    explorer.controls["boxes"].value = 3
    assert rectangles([ax for ax in explorer.figure.axes if ax.images][1]) == 3

    explorer.set(image="scene 1")
    assert explorer.summary.startswith("scene 1") and bytes(explorer.image.value).startswith(b"\x89PNG")


def test_detection_captions_stay_whole_inside_the_image(model, images):
    """The explorer places its captions as notebook 08's figures do (``fit_captions``): none is cut by the image's
    border (drawn at a box's top-left corner, the caption of a box at the top edge would stick out of the image)."""
    for name in images:
        figure = explore.detections(model, {name: images[name]}, ["circle", "square"], boxes=8, interactive=False)
        ax = figure.axes[0]
        figure.draw_without_rendering()
        frame = ax.get_window_extent()
        extents = [text.get_window_extent() for text in ax.texts]
        assert len(extents) == 8, name
        assert all(frame.x0 - 1 <= e.x0 and e.x1 <= frame.x1 + 1 and frame.y0 - 1 <= e.y0 and e.y1 <= frame.y1 + 1
                   for e in extents), name


def test_ground_truth_panel_draws_the_annotated_objects_of_split_images(quick_suite_model, tmp_path):
    """``split_ground_truth`` reads each listed image's objects from its annotation file (checked against the
    file's own records, read here with plain json), and the explorer draws them beside the detections; an image file
    the annotation file does not list is an error naming it."""
    model, cfg = quick_suite_model
    truth = explore.split_ground_truth(cfg, ["val", "novel"], limit=2)
    assert list(truth) == list(explore.split_images(cfg, ["val", "novel"], limit=2))
    for name, objects in truth.items():
        split, file_name = name.split("/")
        annotations = json.loads(cfg.data.path(cfg.data.novel_annotations if split == "novel" else
                                               cfg.data.detection_annotations, split).read_text())
        image_id = next(image["id"] for image in annotations["images"] if image["file_name"] == file_name)
        names = {category["id"]: category["name"] for category in annotations["categories"]}
        records = [a for a in annotations["annotations"] if a["image_id"] == image_id and not a.get("iscrowd")]
        assert objects["names"] == [names[a["category_id"]] for a in records]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in records)])
        assert torch.allclose(objects["boxes"], expected.reshape(-1, 4), atol=1e-4)

    name = next(iter(truth))
    figure = explore.detections(model, {name: explore.split_images(cfg, ["val"], limit=1)[name]}, ["circle"],
                                boxes=4, ground_truth=truth, interactive=False)
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 2 and image_axes[1].get_title().startswith(f"ground truth: {len(truth[name]['names'])}")
    assert rectangles(image_axes[1]) == len(truth[name]["names"])
    key = {text.get_text().split("  ", 1)[1] for text in image_axes[1].get_legend().get_texts()}   # "1  circle"
    assert key == set(truth[name]["names"])

    folder = tmp_path / "scenes" / "val"                          # one scene more than its annotation file lists
    folder.mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    source = cfg.data.path(cfg.data.detection_annotations, "val")
    (tmp_path / "annotations" / source.name).write_bytes(source.read_bytes())
    for path in explore.split_images(cfg, ["val"], limit=1).values():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "0_unlisted.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8), "RGB"))
    other = cfg.copy()
    other.data.root = str(tmp_path)
    with pytest.raises(ValueError, match="0_unlisted.png: not listed in .*instances_val.json"):
        explore.split_ground_truth(other, ["val"])


def test_detections_report_bad_input_and_take_uploads_of_any_size_and_mode(model, images):
    explorer = explore.detections(model, images, ["circle"])
    explorer.controls["classes"].value = " ,  , "
    assert shows_message(explorer, "class name") and explorer.figure is None and bytes(explorer.image.value) == b""
    explorer.controls["classes"].value = "circle"
    assert explorer.error is None and explorer.figure is not None

    upload(explorer, "notes.txt", b"not a picture")
    assert shows_message(explorer, "notes.txt", "not an image")
    assert explorer.controls["image"].value == "scene 0"           # the choice is unchanged

    wide = np.random.default_rng(1).integers(0, 255, (300, 1500), dtype=np.uint8)     # grayscale, 1500 x 300
    upload(explorer, "wide.png", png(wide, "P"))
    assert explorer.error is None and explorer.controls["image"].value == "upload: wide.png"
    assert "upload: wide.png" in explorer.controls["image"].options
    height, width = explorer.figure.axes[0].images[0].get_array().shape[:2]
    assert (height, width) == (128, 640)             # shrunk to a longer side of 640, aspect kept
    assert explorer.extras["upload"].value == ()
    upload(explorer, "wide.png", png(wide.T.copy(), "L"))          # the same name again: a new entry, portrait
    assert explorer.controls["image"].value == "upload: wide.png (2)"
    assert explorer.figure.axes[0].images[0].get_array().shape[:2] == (640, 128)


# ---------------------------------------------------------------------------------------------------------- gating
@pytest.fixture(scope="module")
def calls(model, images):
    pictures = list(images.values())
    with gating.record_decoder_calls(model.decoder, keep_inputs=True) as recorder:
        api.classify(model, pictures, CLASS_NAMES)
        api.caption(model, pictures[:1], beam_size=1, max_length=3)
        api.retrieve(model, pictures[:2], CAPTIONS[:2])
    return recorder.calls


def heat_map(explorer) -> np.ndarray:
    return np.asarray(explorer.figure.axes[0].images[0].get_array())


def test_gating_heat_map_follows_task_layer_and_token_kind(model, calls):
    explorer = explore.gating(model.decoder, calls)
    assert explorer.controls["task"].options == ("classification", "captioning", "retrieval_i2t", "retrieval_t2i")
    usage = gating.expert_usage([c for c in calls if c.task == "classification"], num_experts=8)
    np.testing.assert_allclose(heat_map(explorer), usage.usage[0].numpy(), atol=1e-6)
    first = heat_map(explorer)
    explorer.controls["layer"].value = 1
    assert not np.allclose(heat_map(explorer), first)
    np.testing.assert_allclose(heat_map(explorer), usage.usage[1].numpy(), atol=1e-6)

    explorer.controls["task"].value = "captioning"
    kinds = explorer.controls["kind"]
    assert kinds.value == explore.ALL_KINDS and any("causal" in label for label, _ in kinds.options)
    assert heat_map(explorer).shape[0] == len(kinds.options) - 1
    code = kinds.options[2][1]
    kinds.value = code
    assert heat_map(explorer).shape == (1, 8) and explorer.error is None

    # merged and routed experts give the same hidden states up to float rounding (MoE paper Sec. 3.3)
    comparison = next(ax for ax in explorer.figure.axes if "merged" in ax.get_ylabel())
    bars = [patch.get_height() for patch in comparison.patches]
    assert len(bars) == 1 and 0.0 <= bars[0] < 1e-4


def test_gating_static_figure_and_calls_without_inputs(model, calls):
    figure = explore.gating(model.decoder, calls, task="retrieval_t2i", layer=2, interactive=False)
    assert isinstance(figure, Figure) and "retrieval_t2i, layer 2" in figure.axes[0].get_title()
    assert figure.get_suptitle() == "" and "mean gate value" in figure.axes[-1].get_ylabel()   # the colour bar
    labelled = explore.gating(model.decoder, calls, interactive=False, model_label="the untrained model")
    assert labelled.get_suptitle() == "gates of the untrained model"
    with gating.record_decoder_calls(model.decoder) as recorder:
        api.classify(model, [torch.rand(3, 32, 32)], CLASS_NAMES)
    with pytest.raises(ValueError, match="keep_inputs=True"):
        explore.gating(model.decoder, recorder.calls)


# -------------------------------------------------------------------------------------------------------- captions
def steps_axes(explorer):
    return next(ax for ax in explorer.figure.axes if "probability of each token" in ax.get_title())


def beam_lines(explorer) -> list[str]:
    ax = next(ax for ax in explorer.figure.axes if "beam search" in ax.get_title(loc="left"))
    return [text.get_text() for text in ax.texts]


def test_captions_list_the_beams_and_score_each_step(model, images):
    explorer = explore.captions(model, images, beam_size=1, max_length=4)
    greedy = api.caption(model, images["scene 0"], beam_size=1, max_length=4)[0]
    lines = beam_lines(explorer)
    assert len(lines) == 1 and lines[0].startswith("beam 1:") and f"({greedy['score']:.3f})" in lines[0]
    explorer.controls["beam_size"].value = 3
    lines = beam_lines(explorer)
    best = api.caption(model, images["scene 0"], beam_size=3, max_length=4, all_beams=True)[0]
    assert [line.split(":")[0] for line in lines] == ["beam 1", "beam 2", "beam 3"]
    scores = [beam["score"] for beam in best["beams"]]
    assert scores == sorted(scores, reverse=True) and best["beams"][0]["score"] == best["score"]
    assert all(f"({score:.3f})" in line for score, line in zip(scores, lines))
    # a wider beam never ends worse than the greedy caption (both sum log-probabilities; no length normalisation)
    assert best["score"] >= greedy["score"] - 1e-5

    # teacher forcing scores the caption exactly as the search did (v1 appendix B): sum of log p = the score
    bars = [patch.get_height() for patch in steps_axes(explorer).patches]
    assert math.isclose(sum(math.log(p) for p in bars), best["score"], abs_tol=1e-3)
    assert len(bars) == len(best["token_ids"]) + (len(best["token_ids"]) < 4)

    explorer.controls["beam_size"].value = 2
    assert [line.split(":")[0] for line in beam_lines(explorer)] == ["beam 1", "beam 2"]


# ------------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_in_both_directions(model, images):
    pictures = list(images.values())
    captions = [[text] for text in CAPTIONS]
    explorer = explore.retrieval(model, pictures, captions, names=list(images), top=3)
    assert explorer.error is None and len(explorer.figure.axes) == 3
    scores = api.retrieve(model, pictures, [CAPTIONS[0]])
    best = list(images)[int(scores["t2i_ranking"][0, 0])]
    assert f"best image {best}" in explorer.summary
    marks = [ax.get_title()[-1] for ax in explorer.figure.axes]            # a caption: its image is known
    assert set(marks) <= {"\u2713", "\u2717"} and marks.count("\u2713") == int(0 in scores["t2i_ranking"][0, :3])
    own_rank = 1 + int(sum(float(v) >= float(scores["t2i"][0, 0]) for v in scores["t2i"][0, 1:]))
    assert f"its own image at rank {own_rank}" in explorer.figure.get_suptitle()

    explorer.controls["sentence"].value = "two shapes on a sofa"                     # no known image: no marks
    titles = [ax.get_title() for ax in explorer.figure.axes]
    assert titles == ["1.", "2.", "3."]
    explorer.controls["top"].value = 2
    assert len(explorer.figure.axes) == 2

    explorer.controls["sentence"].value = " ?!  ... "
    assert shows_message(explorer, "at least one word") and explorer.figure is None

    explorer.set(direction=explore.IMAGE_TO_TEXT, image=1)
    assert explorer.error is None and explorer.summary.startswith("scene 1: best caption")
    ranked = api.retrieve(model, pictures, CAPTIONS)["i2t_ranking"][1, :2].tolist()
    drawn = " ".join(text.get_text() for text in explorer.figure.axes[1].texts)
    assert all(CAPTIONS[t] in drawn for t in ranked)


def test_retrieval_reuses_precomputed_examples(model, images, monkeypatch):
    from uniperceiver_v2 import walkthrough

    pictures = list(images.values())
    captions = [[text] for text in CAPTIONS]
    fresh = explore.retrieval(model, pictures, captions, names=list(images), top=3)
    examples = walkthrough.retrieval_examples(model, pictures, captions)
    monkeypatch.setattr(api, "retrieve", lambda *a, **k: pytest.fail("encoded again"))
    reused = explore.retrieval(model, pictures, captions, names=list(images), top=3, examples=examples)
    assert reused.error is None and reused.summary.split(" (")[0] == fresh.summary.split(" (")[0]
    assert reused.figure.get_suptitle() == fresh.figure.get_suptitle()
    assert [ax.get_title() for ax in reused.figure.axes] == [ax.get_title() for ax in fresh.figure.axes]
    reused.set(direction=explore.IMAGE_TO_TEXT, image=1)                         # the examples' scores, not encoded
    assert reused.error is None and reused.summary.startswith("scene 1: best caption")
    static = explore.retrieval(model, pictures, captions, top=3, interactive=False, examples=examples)
    assert static.get_suptitle() == fresh.figure.get_suptitle()
    with pytest.raises(ValueError, match="examples were not computed on these"):
        explore.retrieval(model, pictures[:3], captions[:3], examples=examples)


# ---------------------------------------------------------------------------------------------------------- curves
def write_run(folder: Path, tasks: list[str], slope: float) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as handle:
        for iteration in range(1, 11):
            for task in tasks:
                handle.write(json.dumps({"kind": "train", "iteration": iteration, "task": task, "count": 1,
                                         "loss": 5.0 - slope * iteration, "lr": 1e-3}) + "\n")
        handle.write(json.dumps({"kind": "eval", "iteration": 10, "split": "val", "task": tasks[0]}) + "\n")


def lines(explorer) -> list[str]:
    return [line.get_label() for line in explorer.figure.axes[0].get_lines()]


def test_curves_compare_runs_and_tasks(tmp_path):
    write_run(tmp_path / "quick" / "train", ["captioning", "classification"], 0.2)
    write_run(tmp_path / "quick" / "ablations" / "no_moe", ["captioning"], 0.1)
    explorer = explore.curves(tmp_path)
    assert explorer.controls["runs"].options == ("quick/ablations/no_moe", "quick/train")
    assert sorted(lines(explorer)) == ["quick/ablations/no_moe \u00b7 captioning", "quick/train \u00b7 captioning",
                                       "quick/train \u00b7 classification"]
    explorer.controls["tasks"].value = ("captioning",)
    assert len(lines(explorer)) == 2
    explorer.controls["runs"].value = ("quick/train",)
    assert lines(explorer) == ["quick/train \u00b7 captioning"]
    explorer.controls["metric"].value = "lr"
    assert explorer.figure.axes[0].get_ylabel() == "lr"
    explorer.controls["runs"].value = ()
    assert shows_message(explorer, "select at least one run")

    # the runs selected at first: those named that exist; none found -> every run
    chosen = explore.curves(tmp_path, runs=["quick/train", "missing"])
    assert chosen.controls["runs"].value == ("quick/train",) and len(chosen.controls["runs"].options) == 2
    assert sorted(lines(chosen)) == ["quick/train \u00b7 captioning", "quick/train \u00b7 classification"]
    static = explore.curves(tmp_path, runs=["quick/train"], interactive=False)
    assert len(static.axes[0].get_lines()) == 2
    # one run: each task in its colour of the series (viz.task_color), in the legend too
    from matplotlib.colors import to_rgb

    from uniperceiver_v2.viz import task_color
    for line in static.axes[0].get_lines():
        assert to_rgb(line.get_color()) == pytest.approx(task_color(line.get_label().split(" \u00b7 ")[-1]))
    legend = static.axes[0].get_legend()
    assert [to_rgb(handle.get_color()) for handle in legend.get_lines()] == [
        pytest.approx(task_color(text.get_text().split(" \u00b7 ")[-1])) for text in legend.get_texts()]
    assert explore.curves(tmp_path, runs=["missing"]).controls["runs"].value == explore.curves(tmp_path).controls[
        "runs"].value

    with pytest.raises(ValueError, match="no metrics.jsonl"):
        explore.curves(tmp_path / "nothing", interactive=False)
    assert shows_message(explore.curves(tmp_path / "nothing"), "no metrics.jsonl")


def test_curves_find_a_run_linked_into_the_folder_once_even_through_a_loop(tmp_path):
    write_run(tmp_path / "elsewhere" / "train", ["mlm"], 0.3)          # kept on another disk, say
    runs = tmp_path / "runs"
    (runs / "small").mkdir(parents=True)
    (runs / "small" / "train").symlink_to(tmp_path / "elsewhere" / "train", target_is_directory=True)
    (runs / "small" / "loop").symlink_to(runs, target_is_directory=True)   # a link back up: walked once
    explorer = explore.curves(runs)
    assert explorer.controls["runs"].options == ("small/train",)
    assert lines(explorer) == ["small/train \u00b7 mlm"]


# ---------------------------------------------------------------------------------------------- static and notebooks
def test_every_explorer_draws_one_static_figure_without_widgets(model, images, tmp_path):
    write_run(tmp_path / "run", ["mlm"], 0.3)
    figures = [explore.detections(model, images, ["circle"], interactive=False),
               explore.captions(model, images, max_length=2, interactive=False),
               explore.retrieval(model, list(images.values()), [[t] for t in CAPTIONS], interactive=False),
               explore.curves(tmp_path, interactive=False)]
    assert all(isinstance(figure, Figure) for figure in figures)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebooks_embed_their_explorers_behind_the_interactive_parameter(name):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    parameters = next(cell.source for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    assert "\ninteractive = False" in "\n" + parameters
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    for function in NOTEBOOKS[name]:
        assert f"explore.{function}(" in code, f"{name}: no explore.{function} call"
    assert code.count("interactive=interactive") >= len(NOTEBOOKS[name])


def test_the_figures_added_for_the_explorers_check_their_inputs():
    from uniperceiver_v2 import viz

    picture = torch.rand(3, 20, 30)
    with pytest.raises(ValueError, match="legend: needs labels"):
        viz.draw_detections(picture, torch.tensor([[1.0, 1.0, 9.0, 9.0]]), legend=True)
    figure = viz.draw_detections(picture, torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 8.0, 8.0]]),
                                 torch.tensor([3, 1]), torch.tensor([0.9, 0.1]), class_names=["a", "b", "c", "d"],
                                 score_threshold=0.5, legend=True)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["d"]   # only the drawn classes
    with pytest.raises(ValueError, match="probabilities: expected 2"):
        viz.plot_token_probabilities(["a", "b"], [0.5])
    # the best other tokens' names stand above their dots (which stay on top), punctuation quoted to be seen
    ax = viz.plot_token_probabilities([",", "cat"], [0.9, 0.2], [(".", 0.05), ("dog", 0.3)]).axes[0]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["','", "cat"]
    from uniperceiver_v2.viz.base import quoted_token  # the fill-mask table quotes them the same way

    assert [quoted_token(t) for t in (",", "...", "cat", "n't", "")] == ["','", "'...'", "cat", "n't", ""]
    assert [(t.get_text(), t.xy[1]) for t in ax.texts] == [("'.'", 0.05), ("dog", 0.3)]
    assert all(t.xyann[1] > 0 and t.get_zorder() < ax.collections[0].get_zorder() for t in ax.texts)
    with pytest.raises(ValueError, match="highlight"):
        viz.plot_ranked_texts(["one", "two"], highlight=2)
    figure = viz.plot_ranked_texts(["x" * 100], [1.0], width=20)
    assert figure.axes[0].texts[0].get_text() == "1. " + "x" * 20 + "\n" + "x" * 17 + "...  (1.000)"
    figure = viz.plot_ranked_texts(["a b c d e f g", "a b c d e f h"], width=8)    # they differ in the last word
    assert [text.get_text() for text in figure.axes[0].texts] == ["1. a b c d\ne f g", "2. a b c d\ne f h"]
    figure = viz.show_text_retrieval("a query", [picture, picture], None, [0.5, 0.25])
    assert [ax.get_title() for ax in figure.axes] == ["1.", "2."]
