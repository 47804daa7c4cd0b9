"""The paper's ablation studies (v2 Sec. 5.3, Tab. 2-5) as sets of training runs, and a runner that trains,
evaluates and caches each run (notebook 09).

A table (``AblationTable``) is a list of rows; a row (``AblationRow``) is one training run written as config
overrides (``key.sub=value``, as on the ``python -m uniperceiver_v2.train`` command line). A run's config is

    preset  +  ABLATION_BASE  +  scale (QUICK_SCALE in the quick profile)  +  run settings  +  the row's overrides

Entry points: ``profile_plan`` (which tables and rows a profile runs), ``plan_runs``, ``build_config``,
``run_ablation`` / ``run_ablations`` (train, evaluate, cache) and ``table_rows`` / ``table_report`` (the tables
next to the paper's).

Each run lives in ``<run_dir>/ablations/<table>/<row>/`` with the trainer's files and ``result.json``; a run whose
result was written for the same configuration and process count (``run_key``) is not trained again, and rows
that are the same model share one run. What each table varies, and why Tab. 4 needs several sampling slots
and Tab. 5 asks its question of the text encoder: docs/design.md, "Ablations".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, apply_overrides, get_preset
from .paper_results import ABLATION_COLUMNS, PaperTable, metric_value, ours_vs_paper, paper_table

__all__ = [
    "ABLATION_BASE",
    "ABLATION_TASKS",
    "FULL_MODEL_ROWS",
    "NOTABLE_GAP",
    "PROFILE_PLANS",
    "QUICK_ITERATIONS",
    "QUICK_SCALE",
    "TABLES",
    "VERDICTS",
    "AblationRow",
    "AblationRun",
    "AblationSettings",
    "AblationTable",
    "TableReport",
    "build_config",
    "full_model_result",
    "gap_agreement",
    "gap_directions",
    "load_result",
    "plan_runs",
    "profile_plan",
    "run_ablation",
    "run_ablations",
    "run_key",
    "run_overrides",
    "runs_table",
    "table_report",
    "table_rows",
]

# The four tasks of the paper's ablations (Sec. 5.3), in the order of the tables' columns.
ABLATION_TASKS = ("detection", "classification", "retrieval", "captioning")

ABLATION_BASE: tuple[str, ...] = ("tasks.mlm.enabled=false", "tasks.detection.segmentation=false")

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
    """

    key: str
    title: str
    rows: tuple[AblationRow, ...]
    reference: str
    paper_rows: Mapping[str, str | None]
    paper_reference: str
    slots_per_iteration: int = 1

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
                         "pre-trained, ours starts from scratch)"),
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

TAB4 = AblationTable(
    key="tab4",
    title="Tab. 4: unmixed sampling, Gather Feature and MT-AdamW (Sec. 4.4)",
    rows=(
        AblationRow("mixed", ("run.sampling=mixed", "tasks.retrieval.gather=false", *_ADAMW),
                    note="tasks mixed across the slots of one iteration; plain AdamW"),
        AblationRow("unmixed", ("tasks.retrieval.gather=false", *_ADAMW), note="plain AdamW"),
        AblationRow("unmixed + gather", _ADAMW, note="plain AdamW; gathering needs more than one process"),
        AblationRow("unmixed + gather + MT-AdamW", note="the default"),
    ),
    reference="unmixed + gather + MT-AdamW",
    paper_rows=_same_rows("mixed", "unmixed", "unmixed + gather", "unmixed + gather + MT-AdamW"),
    paper_reference="unmixed + gather + MT-AdamW",
    slots_per_iteration=len(ABLATION_TASKS),
)

TAB5 = AblationTable(
    key="tab5",
    title="Tab. 5 analogue: encoder pre-training (our text encoder; the paper varies the image encoder's)",
    rows=(
        # Both rows train the text encoder (the tiny preset keeps it frozen for speed), as the paper tunes its
        # pre-trained encoders: the question is what the initialisation is worth once the encoder learns.
        AblationRow("pre-trained text encoder", ("text_encoder.freeze=false",),
                    note="all-MiniLM-L6-v2, trained at 0.1 x the lr"),
        AblationRow("random text encoder", ("text_encoder.pretrained=false", "text_encoder.freeze=false"),
                    note="same architecture, random initialisation, trained"),
    ),
    reference="pre-trained text encoder",
    paper_rows={"pre-trained text encoder": None, "random text encoder": None},
    paper_reference="Supervised (IN-1k & COCO)",
)

TABLES: dict[str, AblationTable] = {table.key: table for table in (TAB2, TAB3, TAB4, TAB5)}

# Which rows each reproduction profile runs; a profile not listed runs every row of every table.
PROFILE_PLANS: dict[str, dict[str, tuple[str, ...]]] = {
    "quick": {
        "tab2": ("Global", "Regional", "Global + Regional"),
        "tab4": ("mixed", "unmixed", "unmixed + gather", "unmixed + gather + MT-AdamW"),
    },
    # Eight distinct runs on one process (the full model is shared by Tab. 2, 3 and 5, "unmixed + gather" by
    # "unmixed"; Tab. 4 runs 4 batches per iteration): 4436 s on one CPU core at 400 batches each (measured 2026-11-29).
    # Tab. 3's leave-one-out and single-task rows (eight more runs) are left to tables=["tab3"]; its MoE question
    # ("All Tasks" vs "All Tasks w/ MoE") is here.
    "small": {
        "tab2": ("Global", "Regional", "Global + Regional"),
        "tab3": ("All Tasks", "All Tasks w/ MoE"),
        "tab4": ("mixed", "unmixed", "unmixed + gather", "unmixed + gather + MT-AdamW"),
        "tab5": ("pre-trained text encoder", "random text encoder"),
    },
}


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
        nproc: processes per run (``torchrun`` when > 1).
        seed: ``run.seed`` of every run (``data.seed`` stays: it is the synthetic suite's generation seed).
        device: ``run.device``.
        scale: overrides applied to every run before the row's (e.g. :data:`QUICK_SCALE`).
        threads: torch threads per process (None: torch's default, all cores). On a CPU shared with other
            processes one thread is much faster: idle threads busy-wait for their peers, and with two other
            trainings on two cores a quick run took 9 s with one thread and 53 s with two.
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

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"AblationSettings.iterations: must be >= 1, got {self.iterations}")
        if self.nproc < 1:
            raise ValueError(f"AblationSettings.nproc: must be >= 1, got {self.nproc}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"AblationSettings.threads: must be >= 1 or None, got {self.threads}")

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "ablations"


@dataclass(frozen=True)
class AblationRun:
    """One training run of a row.

    Attributes:
        table, row: the table key and row name it belongs to.
        name: its folder under ``<run_dir>/ablations`` ("tab2/global", "tab3/single_task/detection").
        overrides: the row's overrides (plus, for a single-task run, the other tasks disabled).
        task: for a single-task run, the task whose metrics the row takes; None = all.
        slots_per_iteration: the table's (see :class:`AblationTable`).
    """

    table: str
    row: str
    name: str
    overrides: tuple[str, ...]
    task: str | None = None
    slots_per_iteration: int = 1


def plan_runs(plan: Mapping[str, Sequence[str]]) -> list[AblationRun]:
    """The runs of the rows in ``plan`` (table -> row names), in table and row order."""
    runs = []
    for key, names in plan.items():
        table = _table(key)
        for name in names:
            row = table.row(name)
            base = f"{key}/{row.slug}"
            if not row.single_task:
                runs.append(AblationRun(key, row.name, base, row.overrides,
                                        slots_per_iteration=table.slots_per_iteration))
                continue
            for task in ABLATION_TASKS:
                others = tuple(f"tasks.{other}.enabled=false" for other in ABLATION_TASKS if other != task)
                runs.append(AblationRun(key, row.name, f"{base}/{task}", row.overrides + others, task=task,
                                        slots_per_iteration=table.slots_per_iteration))
    return runs


def run_overrides(run: AblationRun, settings: AblationSettings) -> list[str]:
    """Every override of ``run`` on top of ``settings.preset``, in the order they apply."""
    grad_accum = math.ceil(run.slots_per_iteration / settings.nproc)
    iterations = max(1, settings.iterations // grad_accum)
    preset = get_preset(settings.preset)
    data_root = Path(settings.data_root) if settings.data_root is not None else Path(preset.data.root)
    # A short run cannot hold the preset's warm-up; keep it to a fifth of the run at most.
    warmup = min(preset.optim.warmup_iters, iterations // 5)
    data_profile = "null" if settings.data_profile is None else settings.data_profile
    run_settings = [
        f"data.root={data_root.resolve()}", f"data.synthetic_profile={data_profile}",
        f"run.seed={settings.seed}", f"run.device={settings.device}", f"run.iterations={iterations}",
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
    """A digest of what determines a run's result: the config without its output folder, and the process count.

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
    """The ``result.json`` of a run folder, or None if the run has not finished."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); delete it to rerun this ablation run") from exc
    for key in ("key", "metrics"):
        if key not in data:
            raise ValueError(f"{path}: no {key!r}; delete it to rerun this ablation run")
    return data


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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "uniperceiver_v2.train", "--resume", "--no-progress", *argv]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif cfg.run.device == "cpu" or (cfg.run.device == "auto" and not _cuda_available()):
        # Processes sharing the CPU: split its cores instead of each taking all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log_path = output_dir / "train.log"
    with open(log_path, "a") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{output_dir}: torchrun exited with {completed.returncode}; the end of {log_path}:\n"
                           f"{tail}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def run_ablation(run: AblationRun, settings: AblationSettings, keep_checkpoints: bool = True,
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train and evaluate one run unless its result is already there; returns its ``result.json`` content.

    Args:
        run: the run (from :func:`plan_runs`).
        settings: what all runs share.
        keep_checkpoints: False deletes the run's checkpoints once its result is written (the tiny preset's are
            about 300 MB each, text encoder and optimizer state included).
        log: called with one line per event (None: silent).

    Returns:
        ``{"table", "row", "run", "task", "key", "nproc", "iterations", "grad_accum", "overrides", "metrics"
        (task -> metrics, as ``evaluate()`` returns them), "final_losses", "train_seconds", "wall_seconds",
        "finished", "shared_with"}``; ``shared_with`` names the run whose training this one reuses.
    """
    say = log or (lambda message: None)
    cfg = build_config(run, settings)
    key = run_key(cfg, settings.nproc)
    folder = settings.root / run.name
    cached = load_result(folder)
    if cached is not None and cached["key"] == key:
        say(f"{run.name}: finished earlier, result reused")
        return cached
    plan_path = folder / PLAN_FILE
    if folder.is_dir() and (cached is not None or not plan_path.is_file()
                            or json.loads(plan_path.read_text()).get("key") != key):
        # Files of another configuration: its checkpoints must not be resumed, its result must not be shown.
        say(f"{run.name}: the folder holds a run of another configuration; starting over")
        shutil.rmtree(folder)

    overrides = run_overrides(run, settings)
    record: dict[str, Any] = {
        "table": run.table, "row": run.row, "run": run.name, "task": run.task, "key": key, "nproc": settings.nproc,
        "iterations": cfg.run.iterations, "grad_accum": cfg.run.grad_accum, "overrides": list(run.overrides),
    }
    twin = _find_finished(settings.root, key)
    if twin is not None:
        source = load_result(twin)
        say(f"{run.name}: same training as {source['run']}, result shared")
        record.update({k: source[k] for k in ("metrics", "final_losses", "train_seconds", "wall_seconds")},
                      finished=_now(), shared_with=source["run"])
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / RESULT_FILE, record)
        return record

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, {"key": key, "preset": settings.preset, "nproc": settings.nproc, "overrides": overrides})
    argv = ["--config", settings.preset, *overrides]
    resuming = (folder / "checkpoints").is_dir()
    say(f"{run.name}: {'resuming' if resuming else 'training'} {cfg.run.iterations} iterations x "
        f"{cfg.run.grad_accum} batch(es), {settings.nproc} process(es), then evaluating "
        f"{', '.join(cfg.tasks.names())}")
    start = time.perf_counter()
    if settings.nproc == 1:
        _train_in_process(cfg, argv, settings.threads)
    else:
        _train_with_torchrun(cfg, argv, settings.nproc, settings.threads)
    eval_path = folder / f"eval_{cfg.data.val_split}_{cfg.run.iterations:07d}.json"
    if not eval_path.is_file():
        raise RuntimeError(f"{run.name}: training finished without writing its evaluation {eval_path}")
    losses, seconds = _final_losses(folder)
    record.update(metrics=json.loads(eval_path.read_text())["results"], final_losses=losses, train_seconds=seconds,
                  wall_seconds=round(time.perf_counter() - start, 2), finished=_now(), shared_with=None)
    _write_json(folder / RESULT_FILE, record)
    if not keep_checkpoints:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    say(f"{run.name}: done in {record['wall_seconds']:.0f} s")
    return record


def run_ablations(runs: Sequence[AblationRun], settings: AblationSettings, keep_checkpoints: bool = True,
                  log: Callable[[str], None] | None = print) -> dict[str, dict[str, Any]]:
    """:func:`run_ablation` for each run, in order; returns run name -> result."""
    return {run.name: run_ablation(run, settings, keep_checkpoints, log) for run in runs}


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
        (``viz_tables.plot_ablation``); the paper's rows carry our labels where they have a counterpart.
        Without our reference row (not run) only the paper's gaps are drawn."""
        from ..viz.tables import plot_ablation

        table = _table(self.key)
        ours_label = {paper: ours for ours, paper in table.paper_rows.items() if paper is not None}
        paper = {ours_label.get(label, label): values for label, values in table.paper.rows.items()}
        paper_reference = ours_label.get(table.paper_reference, table.paper_reference)
        return plot_ablation([m.header for m in ABLATION_COLUMNS], self.ours, paper, self.reference,
                             paper_reference, title=f"{self.title}: gap to the reference row, in points")

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
    """Our table ``key`` (rows from ``results``, see :func:`table_rows`) next to the paper's, with notes."""
    table = _table(key)
    ours = table_rows(key, results, rows)
    side_by_side = ours_vs_paper(ours, table.paper, {name: table.paper_rows.get(name) for name in ours})
    notes = [f"{name}: {table.row(name).note}" for name in ours if table.row(name).note]
    shared = sorted({(r["run"], r["shared_with"]) for r in results.values()
                     if r.get("table") == key and r.get("row") in ours and r.get("shared_with")})
    notes += [f"run {run} trained identically to {twin}; its result is reused" for run, twin in shared]
    if key == "tab4" and nproc == 1 and {"unmixed", "unmixed + gather"} & set(ours):
        notes.append("with one process Gather Feature has nothing to gather: 'unmixed' and 'unmixed + gather' "
                     "train identically (run with nproc > 1 to measure it)")
    grad_accum = math.ceil(table.slots_per_iteration / nproc)
    if not ours:
        notes.append(f"not run in this profile (only the paper's numbers); tables=[{key!r}] runs it")
    elif grad_accum > 1:
        notes.append(f"every row runs {grad_accum} batches per iteration (run.grad_accum={grad_accum}) so that "
                     f"'mixed' has slots to mix tasks in, and 1/{grad_accum} of the iterations of the other tables")
    return TableReport(key=key, title=table.title, ours=ours, side_by_side=side_by_side, notes=notes,
                       reference=table.reference if table.reference in ours else None,
                       paper_reference=table.paper_reference)


# The paper's threshold for a gap worth colouring in Tab. 3 ("gaps of at least +-0.5 point").
NOTABLE_GAP = 0.5
# Verdicts of gap_directions: both gaps notable with the same / opposite sign, or one or both under NOTABLE_GAP.
VERDICTS = ("same", "opposite", "ours flat", "paper flat", "both flat")


def gap_directions(*reports: TableReport) -> dict[str, list]:
    """For each of our rows (the reference excepted) and column of each report: the paper's gap to its reference
    row, ours, and whether they point the same way.

    A gap smaller than :data:`NOTABLE_GAP` points is flat (the paper colours only gaps of at least 0.5 point).
    Returns ``{"columns": [...], "rows": [[table, row, column, paper gap, our gap, verdict], ...]}`` with a
    verdict of :data:`VERDICTS`, or None (a value missing, or no paper counterpart); a report without its
    reference row contributes nothing.
    """
    rows = []
    for report in reports:
        rows += _gap_rows(report)
    return {"columns": ["table", "row", "column", "paper gap", "our gap", "direction"], "rows": rows}


def _gap_rows(report: TableReport) -> list[list]:
    table = _table(report.key)
    rows = []
    if report.reference is not None:
        base = report.ours[report.reference]
        paper_base = table.paper.rows[table.paper_reference]
        for label, values in report.ours.items():
            if label == report.reference:
                continue
            paper_label = table.paper_rows.get(label)
            paper_values = table.paper.rows[paper_label] if paper_label is not None else (None,) * len(values)
            for index, metric in enumerate(ABLATION_COLUMNS):
                ours_gap = (None if values[index] is None or base[index] is None
                            else round(values[index] - base[index], 2))
                paper_gap = (None if paper_values[index] is None or paper_base[index] is None
                             else round(paper_values[index] - paper_base[index], 6))
                if ours_gap is None or paper_gap is None:
                    verdict = None
                elif abs(ours_gap) < NOTABLE_GAP and abs(paper_gap) < NOTABLE_GAP:
                    verdict = "both flat"
                elif abs(ours_gap) < NOTABLE_GAP:
                    verdict = "ours flat"
                elif abs(paper_gap) < NOTABLE_GAP:
                    verdict = "paper flat"
                else:
                    verdict = "same" if (ours_gap > 0) == (paper_gap > 0) else "opposite"
                rows.append([report.key, label, metric.header, paper_gap, ours_gap, verdict])
    return rows


def gap_agreement(directions: Mapping[str, Sequence]) -> dict[str, int]:
    """How many rows of :func:`gap_directions` have each verdict (rows without one are not counted)."""
    verdicts = [row[-1] for row in directions["rows"]]
    return {verdict: verdicts.count(verdict) for verdict in VERDICTS}


def runs_table(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """One line per run: iterations x batches per iteration, training and wall seconds, the run it shares, and
    the last logged loss of each task."""
    rows = [[name, f"{r['iterations']} x {r['grad_accum']}", r["train_seconds"], r["wall_seconds"], r["shared_with"],
             ", ".join(f"{task} {loss:.3g}" for task, loss in sorted(r["final_losses"].items()))]
            for name, r in results.items()]
    return {"columns": ["run", "iterations x batches", "train [s]", "wall [s]", "shared with", "last losses"],
            "rows": rows}


# Rows that are the full model (the paper's 49.9 / 76.9 / 51.3 / 38.8 / 30.6), in order of preference.
FULL_MODEL_ROWS = (("tab2", "Global + Regional"), ("tab3", "All Tasks w/ MoE"), ("tab5", "pre-trained text encoder"),
                   ("tab4", "unmixed + gather + MT-AdamW"))


def full_model_result(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The result of the first run among ``results`` that trained the full model (:data:`FULL_MODEL_ROWS`), or None."""
    for key, row in FULL_MODEL_ROWS:
        for result in results.values():
            if result.get("table") == key and result.get("row") == row:
                return dict(result)
    return None
