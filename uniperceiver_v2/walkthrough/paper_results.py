"""The paper's numbers (Uni-Perceiver v2, Tab. 2-6), typed in from the paper's tables, and the tables that
put our numbers next to them.

Every value is in the paper's units (percent, CIDEr x100); ``None`` stands for the paper's "-" (no result).

Ablation tables (Sec. 5.3; ResNet-50, COCO-detection pre-trained backbone, 150k iterations on 16 A100s, no
instance segmentation or language modelling, no YFCC). Their five columns are :data:`ABLATION_COLUMNS`:

* COCO Detection mAP, ImageNet-1k Classification Acc (top-1), COCO Retrieval I2T R@1 and T2I R@1
  (the paper prints both under one "COCO Retrieval" header, image-to-text first, as its caption says), COCO
  Caption BLEU-4.

* Tab. 2 "Ablation of different representation types": rows Global / Regional / Global + Regional.
* Tab. 3 "Ablation of collaboration and interference between tasks": rows Single Task, All Tasks, w/o
  Detection, w/o Classification, w/o Retrieval, w/o Captioning (all without MoE) and All Tasks w/ MoE.
  The paper prints each row's gap to "All Tasks" in brackets; :data:`TAB3_PRINTED_GAPS` keeps them. Two of them
  disagree with the printed values: in the Caption column "w/o Detection" 30.4 (+0.5) and "All Tasks w/ MoE"
  30.6 (+0.7) imply an "All Tasks" of 29.9, while the printed 28.9 agrees with the other two gaps
  (25.9 (-3.0), 27.4 (-1.5)) and is what we keep. :data:`TAB3_INCONSISTENT_GAPS` lists the two cells.
* Tab. 4 "Ablation of sampling strategies and improved optimizer": rows mixed, unmixed, unmixed + Gather
  Feature, unmixed + Gather Feature + MT-AdamW.
* Tab. 5 "Ablation of different pre-trained image encoders": rows "<pre-training method> (<data>)".

The row "Global + Regional" of Tab. 2, "All Tasks w/ MoE" of Tab. 3, the last row of Tab. 4 and "Supervised
(IN-1k & COCO)" of Tab. 5 are the same model (49.9 / 76.9 / 51.3 / 38.8 / 30.6).

Tab. 6 "Comparison ... to recent generalist models", without task-specific fine-tuning: ImageNet-1k Acc, COCO
detection mAP, COCO instance segmentation mAP, COCO caption BLEU-4 and CIDEr, text retrieval (image-to-text)
R@1 on COCO and Flickr30k, image retrieval (text-to-image) R@1 on COCO and Flickr30k; "#params" as printed.
The paper prints the gains of Uni-Perceiver-v2 LARGE over the best earlier generalist in brackets
(:data:`TAB6_PRINTED_GAINS`); the BLEU-4 gain (+1.6) is measured to Pix2Seq v2 (34.9), not to the best earlier
value (Uni-Perceiver-MoE LARGE, 35.5), see :data:`TAB6_INCONSISTENT_GAINS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ABLATION_COLUMNS",
    "MAIN_COLUMNS",
    "PAPER_TABLES",
    "PAPER_SCALE",
    "PaperTable",
    "TAB3_INCONSISTENT_GAPS",
    "TAB3_PRINTED_GAPS",
    "TAB6_INCONSISTENT_GAINS",
    "TAB6_PRINTED_GAINS",
    "encoder_initialisation",
    "evaluation_scope",
    "find_eval_metrics",
    "main_column_chance",
    "main_results_table",
    "metric_value",
    "ours_vs_paper",
    "paper_table",
    "paper_ticks_below_zero",
    "scale_table",
]

Value = float | None


@dataclass(frozen=True)
class Metric:
    """One column: a paper header and where our number comes from in ``evaluate()``'s output.

    Attributes:
        header: the column as the paper names it.
        task: our task name (key of ``evaluate()``'s result).
        key: the metric inside that task's result (a fraction; shown x100 like the paper).
    """

    header: str
    task: str
    key: str


# The ablation tables' columns (Tab. 2-5), in the paper's order.
ABLATION_COLUMNS: tuple[Metric, ...] = (
    Metric("COCO Det. mAP", "detection", "bbox_AP"),
    Metric("IN-1k Acc", "classification", "top1"),
    Metric("COCO I2T R@1", "retrieval", "i2t_R@1"),
    Metric("COCO T2I R@1", "retrieval", "t2i_R@1"),
    Metric("COCO Caption B@4", "captioning", "BLEU-4"),
)

# Tab. 6's columns that have a counterpart in our evaluation (Flickr30k has none: it is a zero-shot transfer set).
MAIN_COLUMNS: tuple[Metric, ...] = (
    Metric("IN-1k Acc", "classification", "top1"),
    Metric("COCO Det. mAP", "detection", "bbox_AP"),
    Metric("COCO Seg. mAP", "detection", "segm_AP"),
    Metric("COCO Caption B@4", "captioning", "BLEU-4"),
    Metric("COCO Caption CIDEr", "captioning", "CIDEr"),
    Metric("COCO TR R@1", "retrieval", "i2t_R@1"),
    Metric("COCO IR R@1", "retrieval", "t2i_R@1"),
)


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper.

    Attributes:
        key: "tab2" ... "tab6".
        title: the paper's caption, shortened.
        columns: column headers (the row label column excluded).
        rows: row label -> one value per column (None = "-").
        source: where in the paper the numbers are.
    """

    key: str
    title: str
    columns: tuple[str, ...]
    rows: Mapping[str, tuple[Any, ...]]
    source: str

    def __post_init__(self) -> None:
        for label, values in self.rows.items():
            if len(values) != len(self.columns):
                raise ValueError(f"paper table {self.key}, row {label!r}: {len(values)} values for "
                                 f"{len(self.columns)} columns")

    def value(self, row: str, column: str) -> Any:
        """The paper's value in ``row`` / ``column`` (None = "-")."""
        if row not in self.rows:
            raise KeyError(f"paper table {self.key}: no row {row!r}; rows are {list(self.rows)}")
        if column not in self.columns:
            raise KeyError(f"paper table {self.key}: no column {column!r}; columns are {list(self.columns)}")
        return self.rows[row][self.columns.index(column)]

    def as_table(self) -> dict[str, list]:
        """``{"columns": [...], "rows": [[label, values...], ...]}`` as ``save_results`` stores tables."""
        return {"columns": ["row", *self.columns], "rows": [[label, *values] for label, values in self.rows.items()]}


_ABLATION_HEADERS = tuple(m.header for m in ABLATION_COLUMNS)

TAB2 = PaperTable(
    key="tab2",
    title="Tab. 2: global and regional image representations (R50)",
    columns=_ABLATION_HEADERS,
    rows={
        "Global": (None, 76.8, 46.3, 34.6, 28.8),
        "Regional": (48.2, 75.9, 52.3, 39.2, 31.2),
        "Global + Regional": (49.9, 76.9, 51.3, 38.8, 30.6),
    },
    source="paper Tab. 2 (Sec. 5.3); the Global model has no regional proposals and no detection result",
)

TAB3 = PaperTable(
    key="tab3",
    title="Tab. 3: task collaboration and interference (R50; no MoE except the last row)",
    columns=_ABLATION_HEADERS,
    rows={
        "Single Task": (50.1, 76.1, 50.0, 37.6, 30.2),
        "All Tasks": (49.8, 76.3, 46.0, 34.7, 28.9),
        "w/o Detection": (None, 76.6, 47.0, 34.6, 30.4),
        "w/o Classification": (50.1, None, 51.6, 38.6, 25.9),
        "w/o Retrieval": (49.5, 76.3, None, None, 27.4),
        "w/o Captioning": (49.7, 76.3, 51.2, 38.3, None),
        "All Tasks w/ MoE": (49.9, 76.9, 51.3, 38.8, 30.6),
    },
    source="paper Tab. 3 (Sec. 5.3); values without the bracketed gaps (see TAB3_PRINTED_GAPS)",
)

# The bracketed gaps to "All Tasks" as printed in Tab. 3 (None where the paper prints none).
TAB3_PRINTED_GAPS: dict[str, tuple[Value, ...]] = {
    "w/o Detection": (None, 0.3, 1.0, -0.1, 0.5),
    "w/o Classification": (0.3, None, 5.6, 3.9, -3.0),
    "w/o Retrieval": (-0.3, 0.0, None, None, -1.5),
    "w/o Captioning": (-0.1, 0.0, 5.2, 3.6, None),
    "All Tasks w/ MoE": (0.1, 0.6, 5.3, 4.1, 0.7),
}
# (row, column) cells whose printed gap disagrees with the printed values (see the module docstring).
TAB3_INCONSISTENT_GAPS: tuple[tuple[str, str], ...] = (
    ("w/o Detection", "COCO Caption B@4"),
    ("All Tasks w/ MoE", "COCO Caption B@4"),
)

TAB4 = PaperTable(
    key="tab4",
    title="Tab. 4: sampling strategy, Gather Feature and MT-AdamW (R50)",
    columns=_ABLATION_HEADERS,
    rows={
        "mixed": (49.6, 76.7, 40.1, 31.9, 27.6),
        "unmixed": (49.2, 76.6, 39.8, 30.9, 27.5),
        "unmixed + gather": (49.3, 76.8, 50.4, 37.3, 27.6),
        "unmixed + gather + MT-AdamW": (49.9, 76.9, 51.3, 38.8, 30.6),
    },
    source="paper Tab. 4 (Sec. 5.3); 'gather' = the Gather Feature column, 'MT-AdamW' = the MT-AdamW column",
)

TAB5 = PaperTable(
    key="tab5",
    title="Tab. 5: pre-training of the image encoder (R50)",
    columns=_ABLATION_HEADERS,
    rows={
        "Supervised (IN-1k)": (45.7, 76.8, 51.2, 38.9, 27.3),
        "Supervised (IN-21k)": (48.3, 80.1, 55.1, 41.2, 30.2),
        "Supervised (IN-1k & COCO)": (49.9, 76.9, 51.3, 38.8, 30.6),
        "MoCo v2 (IN-1k)": (48.3, 75.0, 54.8, 40.5, 29.6),
        "CLIP (CLIP data)": (47.2, 73.8, 55.3, 41.3, 32.0),
    },
    source="paper Tab. 5 (Sec. 5.3); rows are 'Pretrained Method (Pretrained Data)'",
)

_TAB6_HEADERS = ("#params", "IN-1k Acc", "COCO Det. mAP", "COCO Seg. mAP", "COCO Caption B@4", "COCO Caption CIDEr",
                 "COCO TR R@1", "Flickr30k TR R@1", "COCO IR R@1", "Flickr30k IR R@1")
TAB6 = PaperTable(
    key="tab6",
    title="Tab. 6: generalist models without task-specific fine-tuning",
    columns=_TAB6_HEADERS,
    rows={
        "Pix2Seq v2": ("132M", None, 46.5, 38.2, 34.9, None, None, None, None, None),
        "UniTab": ("185M", None, None, None, None, 115.8, None, None, None, None),
        "Unified-IO LARGE": ("776M", 71.8, None, None, None, None, None, None, None, None),
        "Unified-IO XL": ("2.9B", 79.1, None, None, None, 122.3, None, None, None, None),
        "Flamingo-3B": ("3.2B", None, None, None, None, None, 65.9, 89.3, 48.0, 79.5),
        "Uni-Perceiver BASE": ("124M", 79.2, None, None, 32.0, None, 64.9, 82.3, 50.7, 71.1),
        "Uni-Perceiver LARGE": ("354M", 82.7, None, None, 35.3, None, 67.8, 83.7, 54.1, 74.2),
        "Uni-Perceiver-MoE BASE": ("167M", 80.3, None, None, 33.2, None, 64.6, 82.1, 51.6, 72.4),
        "Uni-Perceiver-MoE LARGE": ("505M", 83.4, None, None, 35.5, None, 67.9, 83.6, 55.3, 75.9),
        "Uni-Perceiver-v2 BASE": ("308M", 86.3, 58.6, 50.6, 35.4, 116.9, 71.8, 88.1, 55.6, 73.8),
        "Uni-Perceiver-v2 LARGE": ("446M", 87.2, 61.9, 53.6, 36.5, 122.5, 75.0, 89.3, 58.5, 79.6),
    },
    source="paper Tab. 6 (Sec. 5.4); TR = text retrieval (image-to-text), IR = image retrieval (text-to-image); "
           "Uni-Perceiver-v2 BASE = Swin-B, LARGE = Swin-L",
)

# Gains of Uni-Perceiver-v2 LARGE printed in brackets in Tab. 6, one per numeric column (#params excluded).
TAB6_PRINTED_GAINS: tuple[float, ...] = (3.8, 15.4, 15.4, 1.6, 0.2, 7.1, 0.0, 3.2, 0.1)
TAB6_INCONSISTENT_GAINS: tuple[str, ...] = ("COCO Caption B@4",)

PAPER_TABLES: dict[str, PaperTable] = {table.key: table for table in (TAB2, TAB3, TAB4, TAB5, TAB6)}


def paper_table(key: str) -> PaperTable:
    """The paper's table ``key`` ("tab2" ... "tab6")."""
    if key not in PAPER_TABLES:
        raise KeyError(f"no paper table {key!r}; expected one of {sorted(PAPER_TABLES)}")
    return PAPER_TABLES[key]


# --------------------------------------------------------------------------------------------------------------
# Our numbers next to the paper's
# --------------------------------------------------------------------------------------------------------------
def metric_value(metrics: Mapping[str, Any] | None, metric: Metric) -> Value:
    """Our value of ``metric`` in the paper's units (x100) from ``evaluate()``-shaped ``{task: {key: value}}``.

    None when the task was not evaluated (disabled, or skipped for missing data) or the metric is undefined
    (pycocotools reports -1 / None for an area range without objects).
    """
    if not metrics:
        return None
    task = metrics.get(metric.task)
    if not isinstance(task, Mapping) or "skipped" in task:
        return None
    value = task.get(metric.key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    return 100.0 * value


def ours_vs_paper(ours: Mapping[str, Sequence[Value]], paper: PaperTable,
                  row_map: Mapping[str, str | None] | None = None) -> dict[str, list]:
    """A table with, for each column, our value and the paper's side by side.

    Args:
        ours: our row label -> one value per column of ``paper`` (paper units).
        paper: the paper's table (its columns are ours too).
        row_map: our row label -> the paper's row it stands for (a label missing from it, or mapped to None, has
            no counterpart); default: every row stands for the paper's row of the same label.

    Returns:
        ``{"columns": ["row", "<col> ours", "<col> paper", ...], "rows": [...]}`` (ours rounded to 2 decimals,
        one more than the paper prints); paper rows without a counterpart among ours follow with empty "ours"
        cells.
    """
    columns = ["row"] + [f"{c} {side}" for c in paper.columns for side in ("ours", "paper")]
    rows, used = [], set()
    for label, values in ours.items():
        if len(values) != len(paper.columns):
            raise ValueError(f"ours_vs_paper({paper.key}): row {label!r} has {len(values)} values for "
                             f"{len(paper.columns)} columns {list(paper.columns)}")
        target = label if row_map is None else row_map.get(label)
        reference = paper.rows.get(target) if target is not None else None
        if target is not None and reference is None:
            raise KeyError(f"ours_vs_paper({paper.key}): row {label!r} maps to {target!r}, which is not a row of "
                           f"the paper's table ({list(paper.rows)})")
        if target is not None:
            used.add(target)
        cells: list[Any] = [label]
        for index, value in enumerate(values):
            cells += [_rounded(value), reference[index] if reference is not None else None]
        rows.append(cells)
    for label, reference in paper.rows.items():
        if label not in used:
            cells = [f"(paper) {label}"]
            for value in reference:
                cells += [None, value]
            rows.append(cells)
    return {"columns": columns, "rows": rows}


def _rounded(value: Value, digits: int = 2) -> Value:
    """Our value with one more decimal than the paper prints (the paper prints one)."""
    return None if value is None else round(value, digits) + 0.0   # + 0.0 turns -0.0 into 0.0


_EVAL_SIGNATURE = {metric.task: metric.key for metric in ABLATION_COLUMNS}


def _looks_like_evaluation(value: Any) -> bool:
    """An ``evaluate()`` result: task names mapping to dicts of metrics, at least one known metric present."""
    if not isinstance(value, Mapping):
        return False
    hits = [task for task, key in _EVAL_SIGNATURE.items()
            if isinstance(value.get(task), Mapping) and key in value[task]]
    return bool(hits) and all(isinstance(v, Mapping) for k, v in value.items() if k in _EVAL_SIGNATURE)


def find_eval_metrics(results: Mapping[str, Any], path: str = "") -> list[tuple[str, dict]]:
    """Every ``evaluate()``-shaped mapping inside a notebook's results, with its dotted key path.

    Notebooks save their evaluation as ``evaluate()`` returns it (``{task: {metric: value}}``), under a key of
    their choice; this finds them without depending on the key. ``"tables"`` is not searched.
    """
    found = []
    if _looks_like_evaluation(results):
        found.append((path, dict(results)))
        return found
    if isinstance(results, Mapping):
        for key, value in results.items():
            if not path and key == "tables":
                continue
            if isinstance(value, Mapping):
                found += find_eval_metrics(value, f"{path}.{key}" if path else str(key))
    return found


def main_results_table(ours: Mapping[str, Mapping[str, Any]],
                       paper_rows: Sequence[str] = ("Uni-Perceiver-v2 BASE", "Uni-Perceiver-v2 LARGE")
                       ) -> dict[str, list]:
    """Tab. 6 analogue: our models' ``evaluate()`` metrics (label -> metrics) above the paper's rows.

    Columns are :data:`MAIN_COLUMNS` (the Tab. 6 columns we can measure: no Flickr30k), in paper units, ours
    rounded to 2 decimals.
    """
    columns = ["model", *(m.header for m in MAIN_COLUMNS)]
    rows = [[label, *(_rounded(metric_value(metrics, m)) for m in MAIN_COLUMNS)] for label, metrics in ours.items()]
    for label in paper_rows:
        rows.append([f"(paper) {label}", *(TAB6.value(label, m.header) for m in MAIN_COLUMNS)])
    return {"columns": columns, "rows": rows}


# What the paper trains (Sec. 5.2, Sec. 5.3, Tab. 6, Tab. 8), next to which our runs are placed by scale_table.
PAPER_SCALE: dict[str, str] = {
    "training data": "ImageNet-1k 1.28M images, COCO 118K images, 29.9M image-text pairs from six data sets, "
                     "Books&Wiki text (Tab. 8; the ablations leave out YFCC, segmentation and language modelling)",
    "model": "ResNet-50 (ablations); Swin-B, 308M parameters; Swin-L, 446M parameters (Tab. 6)",
    "image size": "224 (R50) / 384 (Swin) for whole-image tasks; detection crops up to 1600 x 1600",
    "iterations": "150k (R50, ablations), 200k (Swin), batch of 1 to 256 samples per GPU and task (Tab. 8)",
    "hardware": "16 A100 GPUs (R50), 32 (Swin-B), 64 (Swin-L)",
}


def scale_table(ours: Mapping[str, Any]) -> dict[str, list]:
    """The paper's training scale (:data:`PAPER_SCALE`) next to ours, one row per aspect.

    Args:
        ours: aspect (the keys of :data:`PAPER_SCALE`) -> our description; every aspect must be given.
    """
    missing = [aspect for aspect in PAPER_SCALE if aspect not in ours]
    if missing:
        raise KeyError(f"scale_table: no value for {missing}; aspects are {list(PAPER_SCALE)}")
    return {"columns": ["", "paper", "ours"], "rows": [[aspect, PAPER_SCALE[aspect], ours[aspect]]
                                                       for aspect in PAPER_SCALE]}


def evaluation_scope(metrics: Mapping[str, Any] | None, num_classes: int | None = None) -> list[str | None]:
    """What each of :data:`MAIN_COLUMNS` measures in one of our ``evaluate()`` results, where the paper's header
    (ImageNet-1k, COCO) would suggest otherwise: "synthetic", with the number of classes, images or candidates the
    result records (``num_images``, ``num_texts``) and, for top-1 and R@1, the chance level they give (x100: one in
    the classes; one in the images for both retrieval directions, whose texts are the images' captions, equally
    many per image); None where the result has no value for the column.

    Args:
        metrics: ``evaluate()``'s result (task -> metrics).
        num_classes: the classification candidates (class names), if known.
    """
    scope: list[str | None] = []
    chance = main_column_chance(metrics, num_classes)
    for metric, level in zip(MAIN_COLUMNS, chance):
        task = (metrics or {}).get(metric.task)
        if metric_value(metrics, metric) is None or not isinstance(task, Mapping):
            scope.append(None)
            continue
        counts: list[str] = []
        if metric.task == "classification":
            counts += [f"{num_classes} classes"] if num_classes else []
            counts += [f"{task['num_images']} images"] if task.get("num_images") else []
            counts += [f"chance {level:.2g}"] if level is not None else []
        elif metric.task == "captioning" and task.get("num_images"):
            counts.append(f"{task['num_images']} images")
        elif metric.task == "retrieval":
            # image-to-text (TR) ranks every text for an image; text-to-image (IR) every image for a text
            key, noun = ("num_texts", "texts") if metric.key.startswith("i2t") else ("num_images", "images")
            counts += [f"{task[key]} candidate {noun}"] if task.get(key) else []
            counts += [f"chance {level:.2g}"] if level is not None else []
        elif metric.task == "detection":
            # evaluate() records the scenes' count since 2026-12-07; older results have none
            scope.append(f"synthetic: {task['num_images']} scenes" if task.get("num_images") else "synthetic scenes")
            continue
        scope.append("synthetic" + (": " + ", ".join(counts) if counts else ""))
    return scope


def main_column_chance(metrics: Mapping[str, Any] | None, num_classes: int | None = None) -> list[float | None]:
    """The chance level (x100) of each of :data:`MAIN_COLUMNS` in one of our ``evaluate()`` results, from the closed
    forms of ``walkthrough.results.chance_levels``: top-1 over ``num_classes`` classes and R@1 in both directions
    (1 / images either way: each image has equally many captions); None for the other columns (AP and caption
    scores have no such baseline) and where the result lacks the column or its counts."""
    from .results import chance_levels  # the closed forms live there, beside notebook 07's chance column

    closed = chance_levels(metrics or {}, num_classes=num_classes)
    return [None if metric_value(metrics, metric) is None or (metric.task, metric.key) not in closed
            else 100 * closed[(metric.task, metric.key)] for metric in MAIN_COLUMNS]


def encoder_initialisation(config: Mapping[str, Any]) -> str:
    """How a run's two encoders started, read from its configuration as a dict (a checkpoint's ``meta.json``
    ``config``, or ``Config.to_dict()``): the image backbone from random weights, from a weights file (in this
    series the one notebook 06 pre-trains as a classifier on the synthetic classification images) or with
    ImageNet weights; the text encoder pre-trained or random, frozen or not. The rest of the model always starts
    from random weights."""
    image = config.get("image_encoder") or {}
    text = config.get("text_encoder") or {}
    weights = image.get("backbone_weights")
    backbone = f"image backbone `{image.get('backbone', '?')}`"
    if not weights:
        backbone += " from random weights"
    elif weights == "imagenet":
        backbone += " with ImageNet weights"
    else:
        backbone += (f" pre-trained on the synthetic classification images (`{str(weights).split('/')[-1]}`, "
                     f"notebook 06)")
    encoder = f"text encoder `{text.get('name', '?')}` " + ("pre-trained" if text.get("pretrained", True)
                                                             else "from random weights")
    if text.get("freeze"):
        encoder += " and frozen"
    return f"{backbone}; {encoder}; the rest from random weights"


def paper_ticks_below_zero(ours: Mapping[str, Sequence[Value]], reference: str | None,
                           directions: Mapping[str, Sequence], table: str | None = None
                           ) -> list[tuple[str, str, float]]:
    """The cells whose "reference + the paper's gap" tick (``TableReport.band_figure``) lies below 0: the paper's
    drop there is larger than our whole reference value, a value no percentage can take.

    Args:
        ours: our table, row -> one value per column of :data:`ABLATION_COLUMNS`.
        reference: our reference row (None: no tick is drawn).
        directions: ``ablations.gap_directions`` (rows ``[table, row, column, paper gap, ...]``).
        table: only the cells of this table key.

    Returns:
        (row, column, tick value) per such cell, in the order of ``directions``.
    """
    if reference is None or reference not in ours:
        return []
    index = {metric.header: i for i, metric in enumerate(ABLATION_COLUMNS)}
    below = []
    for key, label, column, paper_gap, *_ in directions["rows"]:
        if (table is not None and key != table) or paper_gap is None or column not in index:
            continue
        base = ours[reference][index[column]]
        if base is not None and base + paper_gap < 0:
            below.append((label, column, round(base + paper_gap, 2)))
    return below
