"""Interactive explorers: ipywidgets that redraw the package's figures when a control changes.

| explorer | controls | figure |
| --- | --- | --- |
| ``detections`` | image (a split's or uploaded), class names, score threshold, boxes, proposals | ``draw_detections`` |
| ``gating`` | task, layer, token kind (attribute combination) | ``plot_gate_heatmap``, merged vs routed |
| ``captions`` | image (a split's or uploaded), beam width, maximum length | ``plot_token_probabilities`` |
| ``retrieval`` | direction, sentence (free text), image, top k | ``show_text_retrieval`` / ``show_retrieval`` |
| ``curves`` | runs of a ``runs/`` folder, tasks, metric, smoothing, log scale | ``plot_curves`` |

With ``interactive=True`` each function returns an :class:`Explorer`, an ipywidgets ``VBox`` of the controls, a
status line and the figure (a PNG). With ``interactive=False`` it returns the figure of the controls' initial
values instead: a notebook executed headless (papermill, the runner's default) keeps one static figure per explorer
and needs no widget front end.

``detections`` can draw an image's annotated objects beside its detections (``split_ground_truth`` reads them for
the images ``split_images`` lists).

Predictions come from ``uniperceiver_v2.api`` (the gate analysis from ``walkthrough.gating``) and are cached per
input (image and class names, image and beam width, sentence, task), so a control that only changes what is drawn
(threshold, boxes, top k, layer, smoothing) costs a redraw and no inference. Bad input (no class name, a file
that is not an image, a sentence without a word) raises ``ValueError`` inside the view; the explorer shows the
message in place of the figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import io
import os
import textwrap
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from PIL import Image

from .. import api
from ..data import CocoInstances
from ..engine.logging import read_metrics
from ..engine.runtime import evaluation_mode
from ..modeling.attributes import attribute_codes
from ..modeling.image_encoder import postprocess
from ..modeling.unified_decoder import UnifiedDecoder
from ..tasks.captioning import CaptioningTask
from ..tasks.vocabulary import end_token_id, start_token_id
from ..walkthrough.gating import DecoderCall, TokenGroup, attribute_label, expert_usage, replay, token_groups
from ..walkthrough.results import distinct_detections, retrieval_examples
from .base import subplots, task_color
from .curves import plot_curves
from .evaluation import plot_ranked_texts, plot_token_probabilities, show_text_retrieval
from .images import draw_detections, draw_proposals, show_image, show_retrieval
from .matrices import plot_gate_heatmap
from .regions import plot_bars

__all__ = ["Explorer", "ImageChoices", "captions", "curves", "detections", "gating", "parse_class_names",
           "retrieval", "split_ground_truth", "split_images"]

Drawing = tuple[Figure, str]            # a figure and a one-line summary of what it shows
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UPLOAD_MAX_SIDE = 640                   # uploads are shrunk to this longer side (the detector's input is smaller)
TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text \u2192 image", "image \u2192 text"
ALL_KINDS = -1                          # the token-kind option "all tokens of the task"
_WIDE = {"description_width": "initial"}


# --------------------------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------------------------
class Explorer(widgets.VBox):
    """Controls, a status line and a figure; every change of a control's value redraws the figure.

    Args:
        render: ``render(**values) -> (Figure, summary)`` with one keyword per control; raises ``ValueError`` with a
            readable message for input it cannot draw.
        controls: name -> value widget (the keyword it fills).
        extras: widgets shown with the controls that are not arguments of ``render`` (e.g. a file upload).
        reactions: name -> ``f(new value)`` run before the redraw when that control changes (e.g. to set the
            options of another control); the redraw happens once, after it.
        dpi: resolution of the PNG.

    Attributes:
        figure: the last figure drawn (None after an error); summary: its one-line summary; error: the message of
        the last failed redraw or upload (None after a good one); seconds: how long the last redraw took (render,
        PNG encoding and the widget update).
    """

    def __init__(self, render: Callable[..., Drawing], controls: Mapping[str, widgets.ValueWidget],
                 extras: Mapping[str, widgets.Widget] | None = None,
                 reactions: Mapping[str, Callable[[Any], None]] | None = None, dpi: int = 80):
        self.render = render
        self.controls = dict(controls)
        self.extras = dict(extras or {})
        self.reactions = dict(reactions or {})
        self.dpi = dpi
        self.status = widgets.HTML()
        self.status.add_class("explorer-status")
        self.image = widgets.Image(format="png")
        self.image.add_class("explorer-figure")
        self.figure: Figure | None = None
        self.summary = ""
        self.error: str | None = None
        self.seconds = 0.0
        self._held = 0
        self._pending = False
        row = widgets.HBox([*self.controls.values(), *self.extras.values()],
                           layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([row, self.status, self.image])
        for name, control in self.controls.items():
            control.observe(functools.partial(self._changed, name), names="value")
        self.redraw()

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Change several controls inside the block; the figure is redrawn once, when the block ends."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._pending:
                self._pending = False
                self.redraw()

    def set(self, **values: Any) -> None:
        """Set several controls by name, then redraw once (what a user does one control at a time)."""
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise KeyError(f"no control named {unknown}; controls: {sorted(self.controls)}")
        with self.hold():
            for name, value in values.items():
                self.controls[name].value = value

    def request_redraw(self) -> None:
        """Redraw now, or once the enclosing ``hold`` block ends."""
        with self.hold():
            self._pending = True

    def _changed(self, name: str, change: dict) -> None:
        with self.hold():
            self.request_redraw()
            if name in self.reactions:
                self.reactions[name](change["new"])

    def redraw(self) -> None:
        start = time.perf_counter()
        try:
            figure, summary = self.render(**self.values())
        except ValueError as error:
            self.figure, self.summary = None, ""
            self.image.value = b""
            self.fail(str(error))
        else:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=self.dpi)
            self.figure, self.summary, self.error = figure, summary, None
            self.image.value = buffer.getvalue()
            self.status.value = html.escape(summary)
        self.seconds = time.perf_counter() - start
        if self.error is None:
            self.status.value += f' <span style="color:grey">({self.seconds:.2f} s)</span>'

    def fail(self, message: str) -> None:
        """Show ``message`` in the status line (the figure of the last good redraw, if any, stays)."""
        self.error = message
        self.status.value = f'<span style="color:firebrick">{html.escape(message)}</span>'


class _Cache:
    """The ``size`` most recently used results of a computation, by key."""

    def __init__(self, size: int = 32):
        self.size = size
        self.items: OrderedDict = OrderedDict()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = compute()
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _slider(cls, value, low, high, step, description: str) -> widgets.ValueWidget:
    # continuous_update=False: dragging a slider redraws once, when it is released
    return cls(value=value, min=low, max=high, step=step, description=description, continuous_update=False,
               style=_WIDE)


# --------------------------------------------------------------------------------------------------------------
# Images to choose from
# --------------------------------------------------------------------------------------------------------------
def split_images(cfg, splits: Sequence[str], limit: int | None = None, kind: str = "detection") -> dict[str, Path]:
    """The image files of some splits of the configured data, by name "split/file", for the explorers' choice.

    Args:
        cfg: the configuration (its ``data`` paths); splits: e.g. ``["val", "novel"]`` ("novel" = the novel scenes).
        limit: at most this many files per split (in name order).
        kind: "detection" (``data.detection_images``) or "captioning" (``data.caption_images``).
    """
    if kind not in ("detection", "captioning"):
        raise ValueError(f"kind={kind!r}: expected 'detection' or 'captioning'")
    template = cfg.data.detection_images if kind == "detection" else cfg.data.caption_images
    found: dict[str, Path] = {}
    for split in splits:
        folder = cfg.data.path(cfg.data.novel_images if split == "novel" else template, split)
        if not folder.is_dir():
            raise ValueError(f"split {split!r}: image folder {folder} not found (data.root = {cfg.data.root})")
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:limit]:
            found[f"{split}/{path.name}"] = path
    if not found:
        raise ValueError(f"no image files in the splits {list(splits)} under {cfg.data.root}")
    return found


def split_ground_truth(cfg, splits: Sequence[str], limit: int | None = None) -> dict[str, dict[str, Any]]:
    """The annotated objects of the detection images ``split_images(cfg, splits, limit)`` lists, by the same names:
    ``{"boxes": (N, 4) xyxy in the file's pixels, "names": N category names}`` (crowd regions left out, as in
    training), for the ground-truth panel of ``detections``.

    Raises:
        ValueError: an image file of the split that its annotation file does not list (named with both files).
    """
    found: dict[str, dict[str, Any]] = {}
    for split in splits:
        novel = split == "novel"
        folder = cfg.data.path(cfg.data.novel_images if novel else cfg.data.detection_images, split)
        annotations = cfg.data.path(cfg.data.novel_annotations if novel else cfg.data.detection_annotations, split)
        dataset = CocoInstances(folder, annotations, with_masks=False)
        index = {file.path: i for i, file in enumerate(dataset.image_files())}
        for name, path in split_images(cfg, [split], limit).items():
            if path not in index:
                raise ValueError(f"{path}: not listed in {annotations}, so it has no ground truth to draw")
            sample = dataset[index[path]]
            found[name] = {"boxes": sample.boxes, "names": [dataset.class_names[int(k)] for k in sample.labels]}
    return found


def decode_image(content: bytes, name: str, max_side: int | None = UPLOAD_MAX_SIDE) -> torch.Tensor:
    """An image file's bytes as a (3, H, W) float image in [0, 1], its longer side shrunk to at most ``max_side``
    (None: kept).

    Raises:
        ValueError: the file is not an image Pillow can read, or of a mode without a defined intensity range.
    """
    try:
        with Image.open(io.BytesIO(content)) as opened:
            opened.load()
            picture = opened.copy()
    except (OSError, SyntaxError) as error:        # UnidentifiedImageError is an OSError; truncated files too
        raise ValueError(f"{name}: not an image file that can be read ({error})") from error
    if max_side is not None:
        picture.thumbnail((max_side, max_side))
    return api.to_image_tensor(picture)


class ImageChoices:
    """Named images to choose from: the given ones (PIL images of any mode, (3, H, W) tensors in [0, 1] or uint8,
    or image files, read on first use) and uploads (``add``). Each is kept as a (3, H, W) float tensor in [0, 1],
    which the inference API takes as it is and the figures draw as it is."""

    def __init__(self, images: Mapping[str, Any] | Sequence[Any]):
        sources = dict(images) if isinstance(images, Mapping) else {f"image {i}": im for i, im in enumerate(images)}
        if not sources:
            raise ValueError("no images to choose from")
        self._sources = sources
        self._tensors: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._sources:
            raise ValueError(f"no image named {name!r}")
        if name not in self._tensors:
            source = self._sources[name]
            if isinstance(source, (str, PathLike)):
                self._tensors[name] = decode_image(Path(source).read_bytes(), str(source), max_side=None)
            else:
                self._tensors[name] = api.to_image_tensor(source)
        return self._tensors[name]

    def add(self, filename: str, content: bytes) -> str:
        """Add an uploaded file (``decode_image``); returns its name, "upload: <filename>" (a second upload of the
        same file name gets " (2)" and so on: the explorers cache their results by image name)."""
        picture = decode_image(content, filename)
        name, copy = f"upload: {filename}", 1
        while name in self._sources:
            copy += 1
            name = f"upload: {filename} ({copy})"
        self._sources[name] = picture
        self._tensors[name] = picture
        return name


def _image_chooser(choices: ImageChoices, value: str | None) -> tuple[widgets.Dropdown, widgets.FileUpload]:
    dropdown = widgets.Dropdown(options=choices.names, value=value or choices.names[0], description="image",
                                style=_WIDE)
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload an image")
    return dropdown, upload


def _wire_upload(explorer: Explorer, upload: widgets.FileUpload, choices: ImageChoices) -> None:
    """An upload becomes a new image option and is selected; a file that is not an image leaves a message."""

    def uploaded(change: dict) -> None:
        files = change["new"]
        if not files:
            return
        entry = files[-1]
        try:
            name = choices.add(entry["name"], bytes(entry["content"]))
        except ValueError as error:
            explorer.fail(str(error))
        else:
            dropdown = explorer.controls["image"]
            with explorer.hold():
                dropdown.options = choices.names
                dropdown.value = name
        upload.value = ()          # so that the same file can be uploaded again

    upload.observe(uploaded, names="value")


# --------------------------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------------------------
def parse_class_names(text: str) -> list[str]:
    """Comma-separated class names, spaces normalised, duplicates and empty entries dropped."""
    names: list[str] = []
    for part in str(text).split(","):
        name = " ".join(part.split())
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError("type at least one class name; separate several with commas, e.g. 'circle, square, zebra'")
    return names


class DetectionView:
    """``api.detect`` of an image against typed class names, and its class-agnostic proposals.

    Cached: the detections of each (image, class names) at threshold 0 and the proposals of each image, so the
    threshold, the number of boxes and the proposals toggle only redraw.
    """

    def __init__(self, model, images: ImageChoices, ground_truth: Mapping[str, Mapping[str, Any]] | None = None):
        self.model, self.images = model, images
        self.ground_truth = dict(ground_truth or {})
        self._detections = _Cache()
        self._proposals = _Cache()

    def detections(self, image: str, names: Sequence[str]) -> dict:
        return self._detections.get((image, tuple(names)), lambda: api.detect(
            self.model, self.images.tensor(image), list(names))[0])

    def proposals(self, image: str) -> dict[str, torch.Tensor]:
        """The O proposals of v2 eq. (2): ``boxes`` (O, 4) in the image's pixels, ``objectness`` (O,) sigmoid."""

        def compute():
            pixels, padding_mask, sizes = api.prepare_detection_images(self.model, self.images.tensor(image))
            with evaluation_mode(self.model), torch.no_grad():
                encoded = self.model.encode_images(pixels, padding_mask)
            if encoded.boxes is None:
                raise ValueError("this model has no region proposals (image_encoder.use_regional=false)")
            boxes = postprocess(encoded.boxes, None, encoded.image_sizes, sizes)[0]["boxes"]
            return {"boxes": boxes.cpu(), "objectness": encoded.objectness[0].sigmoid().cpu()}

        return self._proposals.get(image, compute)

    def render(self, image: str, classes: str, threshold: float, boxes: int, proposals: bool) -> Drawing:
        names = parse_class_names(classes)
        picture = self.images.tensor(image)
        found = self.detections(image, names)
        keep = (found["scores"] >= threshold).tolist()
        above = {key: [v for v, k in zip(value, keep) if k] if isinstance(value, list) else value[torch.tensor(keep)]
                 for key, value in found.items()}
        top = distinct_detections(above, boxes)
        truth = self.ground_truth.get(image)
        panels = 1 + (truth is not None) + bool(proposals)
        fig, axes = subplots(panels, ncols=panels, panel_size=(4.8, 4.2))
        count = len(top["boxes"])
        draw_detections(picture, top["boxes"], top["labels"], top["scores"], masks=top.get("masks"),
                        class_names=names, captions="key", fit_captions=True, mask_style="outline", ax=axes[0],
                        title=f"{count} detection(s) with score \u2265 {threshold:.2f}")
        if truth is not None:                   # a name typed above keeps its colour; the others follow it
            shown = names + [name for name in dict.fromkeys(truth["names"]) if name not in names]
            labels = torch.tensor([shown.index(name) for name in truth["names"]], dtype=torch.long)
            draw_detections(picture, truth["boxes"], labels, class_names=shown, captions="key", fit_captions=True,
                            ax=axes[1], title=f"ground truth: {len(truth['names'])} annotated object(s)")
        if proposals:
            objectness = self.proposals(image)
            draw_proposals(picture, objectness["boxes"], objectness["objectness"], top=boxes, ax=axes[-1],
                           title=f"class-agnostic: top {boxes} proposals by \u03c3(objectness)")
        best = float(found["scores"].max()) if len(found["scores"]) else 0.0
        summary = (f"{image}: {count} detection(s) \u2265 {threshold:.2f} over {len(names)} class name(s) "
                   f"({', '.join(names)}); best score {best:.3f}" + ("; proposals shown" if proposals else ""))
        return fig, summary


def detections(model, images: Mapping[str, Any] | Sequence[Any], class_names: Sequence[str], *,
               threshold: float = 0.0, boxes: int = 10, proposals: bool = False,
               ground_truth: Mapping[str, Mapping[str, Any]] | None = None,
               interactive: bool = True) -> Explorer | Figure:
    """Open-vocabulary detection: choose an image (or upload one), type class names, move the score threshold.

    Args:
        model: a ``UniPerceiverV2`` (``api.build_model``).
        images: name -> image (PIL, (3, H, W) tensor in [0, 1] or uint8, or a file; ``split_images``), or a list.
        class_names: the initial class names (the text box holds them comma-separated; any name can be typed).
        threshold: initial score threshold; boxes: at most this many boxes (one per proposal, its best class);
        proposals: start with the class-agnostic proposals shown next to the detections.
        ground_truth: image name -> ``{"boxes", "names"}`` (``split_ground_truth``): those images get a panel of
            their annotated objects beside the detections; None: none.
        interactive: False returns the figure of the initial values (for a notebook run headless).
    """
    choices = ImageChoices(images)
    view = DetectionView(model, choices, ground_truth)
    values = {"image": choices.names[0], "classes": ", ".join(str(name) for name in class_names),
              "threshold": float(threshold), "boxes": int(boxes), "proposals": bool(proposals)}
    if not interactive:
        return view.render(**values)[0]
    dropdown, upload = _image_chooser(choices, values["image"])
    controls = {
        "image": dropdown,
        "classes": widgets.Text(value=values["classes"], description="class names", continuous_update=False,
                                placeholder="comma-separated, e.g. circle, zebra", style=_WIDE,
                                layout=widgets.Layout(width="420px")),
        "threshold": _slider(widgets.FloatSlider, values["threshold"], 0.0, 1.0, 0.01, "score \u2265"),
        "boxes": _slider(widgets.IntSlider, values["boxes"], 1, 50, 1, "at most"),
        "proposals": widgets.ToggleButton(value=values["proposals"], description="proposals",
                                          tooltip="show the class-agnostic proposals and their objectness"),
    }
    explorer = Explorer(view.render, controls, extras={"upload": upload})
    _wire_upload(explorer, upload, choices)
    return explorer


# --------------------------------------------------------------------------------------------------------------
# MoE gating
# --------------------------------------------------------------------------------------------------------------
class GatingView:
    """Expert usage of the recorded decoder calls of one task at one layer (the MoE paper's Fig. 3, one panel),
    and the decoder's hidden states after that layer with the experts merged (one dense weight per condition, MoE
    paper Sec. 3.3) against routed (each token through its k experts, outputs added with the gate values, MoE
    eq. (4)), per attribute combination.

    Cached per task: the usage (all layers) and the merged-vs-routed differences (all layers), so the layer and the
    token kind only redraw.
    """

    def __init__(self, decoder, calls: Sequence[DecoderCall], num_experts: int | None = None,
                 sublayer: str = "ffn", model_label: str | None = None):
        self.decoder = decoder
        self.model_label = model_label
        self.calls = [call for call in calls if call.task_id is not None]
        if not self.calls:
            raise ValueError("no recorded decoder calls with a task id: record them with gating.run_tasks(..., "
                             "keep_inputs=True) or gating.record_decoder_calls(decoder, keep_inputs=True)")
        if any(call.x is None for call in self.calls):
            raise ValueError("the decoder calls were recorded without their inputs; record them with "
                             "keep_inputs=True (needed to compare merged and routed experts)")
        self.num_experts = num_experts or decoder.cfg.moe.num_experts
        self.sublayer = sublayer
        self.tasks = list(dict.fromkeys(call.task for call in self.calls))
        self.layers = len(self.calls[0].gates)
        self._usage: dict[str, Any] = {}
        self._groups: dict[str, dict[int, TokenGroup]] = {}
        self._differences: dict[str, tuple[torch.Tensor, int]] = {}
        self._routed: UnifiedDecoder | None = None

    def _calls_of(self, task: str) -> list[DecoderCall]:
        if task not in self.tasks:
            raise ValueError(f"no recorded calls of task {task!r}; recorded: {', '.join(self.tasks)}")
        return [call for call in self.calls if call.task == task]

    def groups(self, task: str) -> dict[int, TokenGroup]:
        """attribute code -> the task's token group with that code (one per code within a task)."""
        if task not in self._groups:
            self._groups[task] = {group.code: group for group in token_groups(self._calls_of(task))}
        return self._groups[task]

    def kind_options(self, task: str) -> list[tuple[str, int]]:
        """(label, attribute code) of every token kind of the task, after "all token kinds"."""
        return [("all token kinds", ALL_KINDS)] + [(attribute_label(code), code) for code in self.groups(task)]

    def usage(self, task: str):
        if task not in self._usage:
            self._usage[task] = expert_usage(self._calls_of(task), by="attribute", sublayer=self.sublayer,
                                             num_experts=self.num_experts)
        return self._usage[task]

    def routed_decoder(self) -> UnifiedDecoder:
        """A copy of the decoder, same weights and gates, that sends every token through its k experts and adds
        their outputs weighted by the gate values (MoE eq. (4) as written; ``decoder.moe.mix_per_condition=false``)."""
        if self._routed is None:
            cfg = self.decoder.cfg
            cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, mix_per_condition=False))
            with torch.random.fork_rng(devices=[]):          # the copy's initialisation is overwritten below
                copy = UnifiedDecoder(cfg, self.decoder.image_proj.in_features, self.decoder.text_proj.in_features)
            copy.load_state_dict(self.decoder.state_dict())
            self._routed = copy.to(next(self.decoder.parameters()).device).eval()
        return self._routed

    @torch.no_grad()
    def differences(self, task: str) -> tuple[torch.Tensor, int]:
        """(L, R) max |merged - routed| of the hidden states after each layer over the valid tokens of each row
        of ``usage(task)``, and the number of MoE layers that merging changed (0 for token / context routing)."""
        if task in self._differences:
            return self._differences[task]
        calls, keys = self._calls_of(task), self.usage(task).keys
        routed = self._hidden_states(self.routed_decoder(), calls)
        with evaluation_mode(self.decoder):
            merged_layers = self.decoder.merge_experts()
            try:
                merged = self._hidden_states(self.decoder, calls)
            finally:
                self.decoder.unmerge_experts()
        result = torch.zeros(self.layers, len(keys), dtype=torch.float64)
        for call, before, after in zip(calls, routed, merged):
            codes = attribute_codes(call.attributes)                                   # (B, T)
            for layer in range(self.layers):
                gap = (before[layer] - after[layer]).abs().amax(dim=-1).cpu().double()   # (B, T)
                for row, code in enumerate(keys):
                    where = call.valid & (codes == code)
                    if bool(where.any()):
                        result[layer, row] = max(float(result[layer, row]), float(gap[where].max()))
        self._differences[task] = (result, merged_layers)
        return self._differences[task]

    @staticmethod
    def _hidden_states(decoder: UnifiedDecoder, calls: Sequence[DecoderCall]) -> list[list[torch.Tensor]]:
        """Each call replayed through ``decoder``; per call the L hidden states (B, T, d) after its blocks."""
        hidden: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda module, args, output: hidden.append(output[0]))
                 for block in decoder.blocks]
        states = []
        try:
            for call in calls:
                hidden.clear()
                replay(call, decoder, record_gates=False)
                states.append(list(hidden))
        finally:
            for hook in hooks:
                hook.remove()
        return states

    def render(self, task: str, layer: int, kind: int) -> Drawing:
        usage = self.usage(task)
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer}: the decoder has layers 0..{self.layers - 1}")
        groups = self.groups(task)
        rows = [row for row, code in enumerate(usage.keys) if kind in (ALL_KINDS, code)]
        if not rows:
            raise ValueError(f"task {task!r} has no tokens of attribute combination {kind}")
        labels = [f"{'input' if groups[usage.keys[r]].is_input else 'target'} \u00b7 {groups[usage.keys[r]].kind} "
                  f"({int(usage.tokens[r])})" for r in rows]
        values = usage.usage[layer, rows]                                                   # (rows, E)
        differences, merged_layers = self.differences(task)
        fig, axes = subplots(2, ncols=2, panel_size=(5.2, 1.6 + 0.45 * len(rows)))
        plot_gate_heatmap(values, labels, ax=axes[0], colorbar_label="mean gate value $G_e(x)$",
                          title=f"{task}, layer {layer}: mean $G_e(x)$ (tokens in brackets)")
        axes[0].title.set_fontsize(10)                       # as the right panel's title
        if self.model_label:
            fig.suptitle(f"gates of {self.model_label}", fontsize=10)
        fig.get_layout_engine().set(wspace=0.12)             # the colour bar's label apart from the bars' y label
        gaps = {label.rsplit(" (", 1)[0]: float(differences[layer, r]) for label, r in zip(labels, rows)}
        largest = max(gaps.values())
        plot_bars(gaps, logy=largest > 0, ylabel="max |merged \u2212 routed|", ax=axes[1],
                  title=(f"hidden states after layer {layer}: merged vs routed" if merged_layers else
                         f"{self.decoder.cfg.moe.routing} routing depends on the token: nothing to merge"))
        if largest > 0:                                      # room above the tallest bar for its value
            axes[1].set_ylim(top=largest * 3)
        top = values.argmax(dim=1).tolist()
        summary = (f"{task}, layer {layer}: {len(rows)} attribute combination(s); heaviest expert per row "
                   f"{', '.join(f'E{e}' for e in top)}; max |merged \u2212 routed| "
                   f"{float(differences[layer, rows].max()):.1e}")
        return fig, summary


def gating(decoder, calls: Sequence[DecoderCall], *, task: str | None = None, layer: int = 0,
           num_experts: int | None = None, sublayer: str = "ffn", interactive: bool = True,
           model_label: str | None = None) -> Explorer | Figure:
    """Where the Conditional-MoE gates send a task's tokens: choose a task, a layer and a token kind.

    Args:
        decoder: the unified decoder the calls were recorded on (``model.decoder``).
        calls: decoder calls recorded with their inputs (``gating.run_tasks(..., keep_inputs=True)``).
        task: the initial task (default the first recorded); layer: the initial layer.
        num_experts: E (default ``decoder.moe.num_experts``); sublayer: "ffn" or "attn" (``decoder.moe.placement``).
        interactive: False returns the figure of the initial values (for a notebook run headless).
        model_label: which model the decoder is (e.g. "notebook 06's model"), shown above the figure as
            "gates of {model_label}"; None shows nothing.
    """
    view = GatingView(decoder, calls, num_experts, sublayer, model_label)
    values = {"task": task or view.tasks[0], "layer": int(layer), "kind": ALL_KINDS}
    if not interactive:
        return view.render(**values)[0]
    kind = widgets.Dropdown(options=view.kind_options(values["task"]), value=ALL_KINDS, description="tokens",
                            style=_WIDE, layout=widgets.Layout(width="520px"))
    controls = {
        "task": widgets.Dropdown(options=view.tasks, value=values["task"], description="task", style=_WIDE),
        "layer": widgets.Dropdown(options=list(range(view.layers)), value=values["layer"], description="layer",
                                  style=_WIDE),
        "kind": kind,
    }

    def new_task(name: str) -> None:
        kind.options = view.kind_options(name)
        kind.value = ALL_KINDS

    return Explorer(view.render, controls, reactions={"task": new_task})


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------
class CaptionView:
    """``api.caption(..., all_beams=True)`` of an image: the hypotheses one beam search ends with, and the best one
    scored token by token (one teacher-forced pass, ``CaptioningTask.teacher_forced_logits``).

    Searches are cached per (image, maximum length, width): a redraw runs at most one new search, which keeps a
    control change under 2 s on the tiny preset.
    """

    def __init__(self, model, images: ImageChoices):
        self.model, self.images = model, images
        self.task = CaptioningTask(model.config.tasks.captioning)
        self._captions = _Cache(64)
        self._steps = _Cache(64)

    def caption(self, image: str, width: int, max_length: int) -> dict:
        return self._captions.get((image, max_length, width), lambda: api.caption(
            self.model, self.images.tensor(image), beam_size=width, max_length=max_length, all_beams=True)[0])

    def steps(self, image: str, token_ids: Sequence[int], ended: bool) -> dict[str, list]:
        """Every token of a caption (and the end token when ``ended``) with its probability at its step, and the
        most likely other token of that step."""

        def compute():
            model = self.model
            tokenizer = model.text_encoder.tokenizer
            ids = [start_token_id(tokenizer), *token_ids] + ([end_token_id(tokenizer)] if ended else [])
            input_ids = torch.tensor([ids], device=model.device)
            with evaluation_mode(model), torch.no_grad():
                pixels, padding_mask = api.prepare_whole_images(model, self.images.tensor(image), "captioning")
                encoded = model.encode_images(pixels, padding_mask)
                logits, targets, _ = self.task.teacher_forced_logits(model, encoded, None, input_ids,
                                                                     torch.ones_like(input_ids))
            probabilities = logits[0].float().softmax(dim=-1).cpu()                     # (T, V)
            chosen = targets[0].cpu()                                                   # (T,) vocabulary rows
            picked = probabilities.gather(1, chosen[:, None])[:, 0]
            other, index = probabilities.scatter(1, chosen[:, None], -1.0).max(dim=1)
            names = tokenizer.convert_ids_to_tokens(model.vocabulary.cpu()[index].tolist())
            return {"tokens": tokenizer.convert_ids_to_tokens(ids[1:]), "probabilities": picked.tolist(),
                    "alternatives": list(zip(names, other.tolist()))}

        return self._steps.get((image, tuple(token_ids), ended), compute)

    def render(self, image: str, beam_size: int, max_length: int) -> Drawing:
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"beam width ({beam_size}) and maximum length ({max_length}) must be at least 1")
        chosen = self.caption(image, beam_size, max_length)
        beams = chosen["beams"]
        # a search that emitted the end token stopped before max_length; its score counts the end token
        steps = self.steps(image, chosen["token_ids"], len(chosen["token_ids"]) < max_length)
        fig = Figure(figsize=(10.0, 6.4), layout="constrained")
        axes = fig.subplot_mosaic([["image", "beams"], ["steps", "steps"]], width_ratios=[1.0, 2.4])
        caption = chosen["caption"] or "(empty caption)"
        caption = caption if len(caption) <= 72 else caption[:69] + "..."
        show_image(self.images.tensor(image), ax=axes["image"], title=textwrap.fill(caption, 24))
        axes["image"].title.set_fontsize(9)
        plot_ranked_texts([beam["caption"] or "(empty caption)" for beam in beams], [beam["score"] for beam in beams],
                          labels=[f"beam {rank}:" for rank in range(1, len(beams) + 1)], highlight=0,
                          ax=axes["beams"], title=f"beam search of width {beam_size}: the hypotheses it ends with "
                                                  f"(\u2264 {max_length} tokens; score = sum of log-probabilities)")
        plot_token_probabilities(steps["tokens"], steps["probabilities"], steps["alternatives"], ax=axes["steps"],
                                 title="beam 1: probability of each token at its step", fontsize=9)
        summary = f"{image}, width {beam_size}: \u201c{chosen['caption']}\u201d (score {chosen['score']:.3f})"
        return fig, summary


def captions(model, images: Mapping[str, Any] | Sequence[Any], *, beam_size: int = 2, max_length: int | None = None,
             interactive: bool = True) -> Explorer | Figure:
    """Captioning: choose an image (or upload one), a beam width and a maximum length; the hypotheses the beam
    search ends with are listed with their scores, and the best one's per-step token probabilities drawn.

    Args:
        model: a ``UniPerceiverV2``; images: name -> image or a list (as ``detections``).
        beam_size: the initial width; max_length: the initial maximum length (default ``tasks.captioning.max_length``).
        interactive: False returns the figure of the initial values (for a notebook run headless).
    """
    choices = ImageChoices(images)
    view = CaptionView(model, choices)
    values = {"image": choices.names[0], "beam_size": int(beam_size),
              "max_length": int(max_length or model.config.tasks.captioning.max_length)}
    if not interactive:
        return view.render(**values)[0]
    dropdown, upload = _image_chooser(choices, values["image"])
    controls = {
        "image": dropdown,
        "beam_size": _slider(widgets.IntSlider, values["beam_size"], 1, 5, 1, "beam width"),
        "max_length": _slider(widgets.IntSlider, values["max_length"], 1, max(32, values["max_length"]), 1,
                              "max tokens"),
    }
    explorer = Explorer(view.render, controls, extras={"upload": upload})
    _wire_upload(explorer, upload, choices)
    return explorer


# --------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------
def check_sentence(text: str) -> str:
    """``text`` with its spaces normalised; a ValueError when it has no letter or digit."""
    sentence = " ".join(str(text).split())
    if not any(character.isalnum() for character in sentence):
        raise ValueError(f"{text!r}: type a sentence with at least one word (letters or digits), e.g. "
                         "'a red circle above a square'")
    return sentence


class RetrievalView:
    """``api.retrieve`` over a set of images and their captions, in both directions.

    Cached: the scores of every image against every caption (image -> text, computed when the widget is built, or
    given as ``examples``, a ``walkthrough.retrieval_examples`` of the same images and captions) and the scores of
    each typed sentence against every image (text -> image; a sentence that is one of the captions reads its row of
    ``examples``), so top k, the image and going back to a sentence only redraw.
    """

    def __init__(self, model, images: Sequence[Any], captions: Sequence[Sequence[str]],
                 names: Sequence[str] | None = None, examples=None):
        if not images:
            raise ValueError("retrieval: no images")
        if len(images) != len(captions):
            raise ValueError(f"retrieval: {len(images)} images but {len(captions)} caption lists")
        self.model = model
        self.choices = ImageChoices(dict(zip(names or [f"image {i}" for i in range(len(images))], images)))
        if len(self.choices.names) != len(images):
            raise ValueError("retrieval: the image names are not unique")
        self.captions = [[str(text) for text in per_image] for per_image in captions]
        if examples is not None and (tuple(examples.i2t.shape) != (len(images), sum(map(len, self.captions)))
                                     or list(examples.texts) != [text for texts in self.captions for text in texts]):
            raise ValueError("retrieval: examples were not computed on these images and captions "
                             f"({tuple(examples.i2t.shape)} scores for {len(images)} images)")
        self._examples = examples
        self._sentences = _Cache(64)

    @property
    def names(self) -> list[str]:
        return self.choices.names

    def _pixels(self) -> list[torch.Tensor]:
        return [self.choices.tensor(name) for name in self.names]

    def examples(self):
        if self._examples is None:
            self._examples = retrieval_examples(self.model, self._pixels(), self.captions)
        return self._examples

    def sentence_scores(self, sentence: str) -> torch.Tensor:
        """(I,) logits of every image for ``sentence`` (v2 eq. (6), text -> image)."""
        if self._examples is not None and sentence in self._examples.texts:      # one of the captions: computed
            return self._examples.t2i[self._examples.texts.index(sentence)]
        return self._sentences.get(sentence, lambda: api.retrieve(self.model, self._pixels(), [sentence])["t2i"][0])

    def render(self, direction: str, sentence: str, image: int, top: int) -> Drawing:
        if direction == TEXT_TO_IMAGE:
            sentence = check_sentence(sentence)
            scores, order = self.sentence_scores(sentence).float().topk(min(top, len(self.names)))
            owners = {i for i, texts in enumerate(self.captions) if sentence in texts}
            correct = [i in owners for i in order.tolist()] if owners else None
            rank = ""
            if owners:             # 1 + the other images scoring at least as high as its best image (ties count)
                every = self.sentence_scores(sentence).float()
                best = max(float(every[i]) for i in owners)
                others = sum(float(value) >= best for i, value in enumerate(every.tolist()) if i not in owners)
                rank = f"; its own image at rank {others + 1}"
            fig = show_text_retrieval(sentence, [self.choices.tensor(self.names[i]) for i in order.tolist()], correct,
                                      scores.tolist(), title=f"text \u2192 image: best {len(order)} of "
                                                             f"{len(self.names)} images{rank}")
            best = self.names[int(order[0])]
            return fig, f"\u201c{sentence}\u201d: best image {best} ({float(scores[0]):.3f})"
        if direction != IMAGE_TO_TEXT:
            raise ValueError(f"direction {direction!r}: expected {TEXT_TO_IMAGE!r} or {IMAGE_TO_TEXT!r}")
        if not 0 <= image < len(self.names):
            raise ValueError(f"image {image}: expected an index in [0, {len(self.names)})")
        examples = self.examples()
        texts, correct, scores = examples.texts_for_image(image, top=top)
        fig = show_retrieval(self.choices.tensor(self.names[image]), texts, correct, scores, top=top,
                             title=f"image \u2192 text: best {len(texts)} of {len(examples.texts)} captions")
        return fig, f"{self.names[image]}: best caption \u201c{texts[0]}\u201d ({scores[0]:.3f})"


def retrieval(model, images: Sequence[Any], captions: Sequence[Sequence[str]], *,
              names: Sequence[str] | None = None, sentence: str | None = None, top: int = 5,
              interactive: bool = True, examples=None) -> Explorer | Figure:
    """Image-text retrieval: type a sentence and see the best images; or choose an image and see the best captions.

    Args:
        model: a ``UniPerceiverV2``; images: the I images to search (PIL or tensors); captions: per image its
            reference captions (the texts searched from an image, and the right answers marked in both directions).
        names: one name per image for the image menu (default "image 0", ...).
        sentence: the initial sentence (default the first image's first caption); top: how many results to show.
        interactive: False returns the figure of the initial values, text -> image (for a notebook run headless).
        examples: ``walkthrough.retrieval_examples(model, images, captions)`` if already computed: the explorer
            then encodes neither the images nor the captions again (a sentence typed that is no caption still is).
    """
    view = RetrievalView(model, images, captions, names, examples)
    first = next((texts[0] for texts in view.captions if texts), "a red circle")
    values = {"direction": TEXT_TO_IMAGE, "sentence": sentence or first, "image": 0, "top": int(top)}
    if not interactive:
        return view.render(**values)[0]
    view.examples()             # every image against every caption now, so that no control change waits for it
    controls = {
        "direction": widgets.ToggleButtons(options=[TEXT_TO_IMAGE, IMAGE_TO_TEXT], value=values["direction"]),
        "sentence": widgets.Text(value=values["sentence"], description="sentence", continuous_update=False,
                                 style=_WIDE, layout=widgets.Layout(width="420px")),
        "image": widgets.Dropdown(options=[(name, i) for i, name in enumerate(view.names)], value=0,
                                  description="image", style=_WIDE),
        "top": _slider(widgets.IntSlider, values["top"], 1, min(10, len(view.names) * 5), 1, "top k"),
    }
    return Explorer(view.render, controls)


# --------------------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------------------
def _metrics_files(root: Path) -> list[Path]:
    """Every ``metrics.jsonl`` under ``root``, through symbolic links too (a run kept on another disk and linked
    into the runs folder is a run of it; ``Path.rglob`` does not enter linked folders), each real folder once."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:                      # a link back up the tree: do not walk it again
            subfolders[:] = []
            continue
        seen.add(real)
        if "metrics.jsonl" in names:
            found.append(Path(folder) / "metrics.jsonl")
    return found


class CurvesView:
    """The training records of every ``metrics.jsonl`` under a folder (one run per file, named by its folder),
    read again when the file changed (a run still training)."""

    def __init__(self, runs_dir: str | PathLike):
        self.root = Path(runs_dir)
        files = sorted(_metrics_files(self.root)) if self.root.is_dir() else []
        self.files = {str(path.parent.relative_to(self.root)): path for path in files}
        self._records: dict[str, tuple[tuple[int, int], list[dict]]] = {}

    @property
    def runs(self) -> list[str]:
        return list(self.files)

    def records(self, run: str) -> list[dict]:
        path = self.files[run]
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if run not in self._records or self._records[run][0] != stamp:
            self._records[run] = (stamp, read_metrics(path, kind="train"))
        return self._records[run][1]

    def tasks(self) -> list[str]:
        return sorted({str(record.get("task", "all")) for run in self.runs for record in self.records(run)})

    def metrics(self) -> list[str]:
        """The numeric fields of the records, "loss" first."""
        names = {key for run in self.runs for record in self.records(run) for key, value in record.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)
                 and key not in ("iteration", "count")}
        return sorted(names, key=lambda name: (name != "loss", name))

    def render(self, runs: Sequence[str], tasks: Sequence[str], metric: str, smooth: int, logy: bool) -> Drawing:
        if not self.files:
            raise ValueError(f"no metrics.jsonl under {self.root}: train a run first (notebook 06, or "
                             "python -m uniperceiver_v2.train)")
        if not runs:
            raise ValueError("select at least one run")
        if not tasks:
            raise ValueError("select at least one task")
        records = [dict(record, series=f"{run} \u00b7 {record.get('task', 'all')}")
                   for run in runs for record in self.records(run) if str(record.get("task", "all")) in tasks]
        if not any(record.get(metric) is not None for record in records):
            raise ValueError(f"the selected runs have no '{metric}' records of the tasks {', '.join(tasks)}")
        fig = plot_curves(records, keys=(metric,), by="series", smooth=smooth, logy=logy)
        if len(runs) == 1:     # one line per task: each in its task's colour of the series (viz.task_color)
            ax = fig.axes[0]
            for line in ax.get_lines():
                line.set_color(task_color(line.get_label().rsplit(" \u00b7 ", 1)[-1]))
            if ax.get_legend() is not None:
                ax.legend(fontsize=7)
        last = max(int(record["iteration"]) for record in records)
        return fig, f"{metric}: {len(runs)} run(s) \u00d7 {len(tasks)} task(s), up to iteration {last}"


def curves(runs_dir: str | PathLike, *, runs: Sequence[str] | None = None, metric: str = "loss", smooth: int = 0,
           interactive: bool = True) -> Explorer | Figure:
    """Training curves of the runs under ``runs_dir`` (every ``metrics.jsonl``): choose runs, tasks and a metric.

    Args:
        runs_dir: a folder of training runs, e.g. ``runs/quick`` (its ``train/`` run and the ablation runs).
        runs: the runs selected at first, by their folder under ``runs_dir`` (e.g. ``["train"]``: one legend entry
            per task instead of one per run and task); those not found are left out, and None, or none found,
            selects every run. The others stay in the run menu.
        metric: the initial field to plot; smooth: the initial moving-average window (points).
        interactive: False returns the figure of the initial values, the selected runs and every task (for a
            notebook run headless).
    """
    view = CurvesView(runs_dir)
    selected = tuple(run for run in view.runs if runs is not None and run in set(runs)) or tuple(view.runs)
    values = {"runs": selected, "tasks": tuple(view.tasks()), "metric": metric, "smooth": int(smooth),
              "logy": False}
    if not interactive:
        return view.render(**values)[0]
    metrics = view.metrics() or [metric]
    controls = {
        "runs": widgets.SelectMultiple(options=view.runs, value=values["runs"], description="runs",
                                       rows=min(6, max(2, len(view.runs))), style=_WIDE),
        "tasks": widgets.SelectMultiple(options=values["tasks"], value=values["tasks"], description="tasks",
                                        rows=min(6, max(2, len(values["tasks"]))), style=_WIDE),
        "metric": widgets.Dropdown(options=metrics, value=metric if metric in metrics else metrics[0],
                                   description="metric", style=_WIDE),
        "smooth": _slider(widgets.IntSlider, values["smooth"], 0, 50, 1, "smoothing"),
        "logy": widgets.Checkbox(value=False, description="log scale"),
    }
    return Explorer(view.render, controls)
