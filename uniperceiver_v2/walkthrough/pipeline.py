"""The reproduction pipeline: run the numbered notebook series with papermill for one profile and collect every
notebook's results into one summary (the command line is ``python -m uniperceiver_v2.reproduce``).

A *profile* is one set of parameters for the whole series (:data:`PROFILES`): ``smoke`` runs everything on the
smallest synthetic suite in a few minutes on a CPU (the test suite runs it: every cell executes, the numbers are
placeholders), ``quick`` (``make reproduce``) trains the tiny model for a few minutes on the ``small`` suite so
the figures show a model that works, ``small`` trains it for an hour, ``paper`` is the ResNet-50 setting of the
paper on real data. Each notebook declares its defaults in the cell
tagged ``parameters`` and receives only the profile parameters it declares there, plus ``run_dir`` (where the
profile's checkpoints and logs live) and ``results_path`` (where it saves its results with
:func:`save_results`). ``-p NAME VALUE`` on the command line overrides the profile's ``NAME`` for every selected
notebook that declares it.

Before anything runs, every selected notebook's parameters cell is read with ``ast`` and each parameter the run
would pass is checked against it (papermill itself only logs a warning for an unknown one, and the notebook then
runs with its default): a ``-p`` name no selected notebook declares, or a value of another type than the
notebook's default, is refused with an error naming the parameter and the notebook. So are an unknown ``--only``
number, an output or data folder that is a file, and a parameters cell the runner cannot read
(:class:`RunSetupError`; the command line prints its message and exits with code 2).

Layout of ``<out>/<profile>/``:
    notebooks/NN_name.ipynb   the executed copies, outputs included
    results/NN_name.json      what each notebook saved with :func:`save_results`
    state.json                per notebook: status, parameters, a hash of parameters + source, timing, error
    summary.md, summary.csv   every results file rendered as Markdown / CSV (tables under ``"tables"``)

A notebook whose parameters and source are unchanged since it last completed is skipped (``--force`` reruns).
The hash covers the notebook itself only: after changing a notebook whose outputs later notebooks read
(training in 06, evaluated in 07), rerun those with ``--force --only 07 ...``.

The notebooks run in the kernel ``uniperceiver-v2``, which must start *this* interpreter; it is registered in
``sys.prefix`` on first use (as ``python -m ipykernel install --sys-prefix --name uniperceiver-v2`` would). Each
kernel starts with ``OMP_NUM_THREADS`` set to the profile's ``threads`` (1 for the CPU profiles: the tiny model
trains faster on one torch thread than on two) unless the environment already sets it; the trainers a notebook
launches inherit it.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import datetime as _dt
import difflib
import hashlib
import io
import json
import keyword
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

KERNEL_NAME = "uniperceiver-v2"
NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb$")
PARAMETERS_TAG = "parameters"

# What a profile's trained model should reach, per (task, metric of evaluate()), as fractions: notebook 07 reads its
# run against them. The quick profile's aims (README, the profiles' table); the small profile's goals of the hour
# (README, the "goal" row of the small suite's table; MLM on the validation corpus, the novel AP50 on the
# novel-category scenes, the rest on the test split).
PROFILE_AIMS: dict[str, dict[tuple[str, str], float]] = {
    "quick": {("classification", "top1"): 0.80, ("detection", "bbox_AP50"): 0.30},
    "small": {("classification", "top1"): 0.97, ("detection", "bbox_AP"): 0.35, ("detection", "bbox_AP50"): 0.60,
              ("detection", "segm_AP"): 0.30, ("detection", "novel_bbox_AP50"): 0.20,
              ("captioning", "BLEU-4"): 0.30, ("captioning", "CIDEr"): 1.00, ("retrieval", "i2t_R@1"): 0.35,
              ("retrieval", "t2i_R@1"): 0.25, ("mlm", "accuracy"): 0.65},
}

# One dict per profile. Relative paths are resolved against the directory the command runs in.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "profile": "smoke",
        "data_profile": "quick",          # the synthetic suite's size; None = real data under data_root
        "data_root": "data/synthetic",
        "preset": "tiny",                 # uniperceiver_v2.config preset
        "iterations": 60,                 # the generalist's training (notebook 06)
        "rpn_iterations": 60,             # notebook 01's training of the proposal network alone
        "backbone_iterations": 30,        # the backbone's pre-training before the run (notebook 06)
        "time_budget_minutes": None,      # notebook 06: minutes of its training loop (run.time_budget_minutes):
                                          # the run ends where they run out, at most `iterations`; None: no budget
        "ablation_iterations": None,      # notebook 09: batches per ablation run (None: its short default, 16)
        "ablation_data_root": None,       # notebook 09's data (None: data_root / data_profile)
        "ablation_data_profile": None,
        "nproc": 1,                       # processes (one per GPU with --gpus)
        "device": "auto",
        "threads": 1,                     # torch threads of every notebook kernel and trainer (OMP_NUM_THREADS; a
                                          # value already in the environment wins): the tiny model's small operators
                                          # train faster on one thread than on two (docs/benchmarks.md)
        "seed": 0,
        "quick": True,                    # notebooks may shorten demonstrations (fewer samples, smaller grids)
        "train_overrides": [],            # config overrides of the generalist's run (06) and of every ablation
                                          # run (09), after the preset's
        "notebook_parameters": {},        # per notebook number, values for that notebook only, over the above
    },
    # The default of ``make reproduce``: minutes of training on the small suite, enough for the notebooks' figures
    # to show a model that classifies and detects (docs/benchmarks.md, "The quick profile").
    "quick": {
        "profile": "quick",
        "data_profile": "small",
        "data_root": "data/synthetic_small",
        "preset": "tiny",
        "iterations": 2700,               # box AP50 0.30: ~2000 with the mask head's embedding as appearance map
                                          # (0.295-0.322 in three runs); with the backbone's F_0 and the uniformity
                                          # term 0.264 after 2100, 0.298 after 2500 and 0.335 after 2700, 24.0
                                          # minutes in all (docs/benchmarks.md, "The quick profile on both cores",
                                          # "The quick profile with colour")
        "rpn_iterations": 300,
        "backbone_iterations": 800,       # 300 left classification at top-1 0.64 after 1000 iterations; 800: 0.94
        "time_budget_minutes": None,
        "ablation_iterations": None,
        # its placeholder ablation runs train and evaluate on the quick suite: on the small one, evaluating eight
        # runs' 500 validation scenes would take longer than the rest of the profile
        "ablation_data_root": "data/synthetic",
        "ablation_data_profile": "quick",
        "nproc": 1,
        "device": "auto",
        "threads": 1,
        "seed": 0,
        "quick": True,
        "train_overrides": [],            # every task from the first iteration (the preset's, and the paper's)
        # Notebook 06 trains on both cores, two processes of one thread with half of every task's batch each (the
        # one-process run's global batch): the other lane has nothing to run while 06 trains, and two processes
        # make an iteration about 1.25x faster (docs/benchmarks.md, "The quick profile on both cores")
        "notebook_parameters": {"06": {"nproc": 2, "split_batches": True}},
    },
    "small": {
        "profile": "small",
        "data_profile": "small",
        "data_root": "data/synthetic_small",   # its own folder: switching profiles must not regenerate
        "preset": "tiny",
        "iterations": 20000,              # the most notebook 06 trains: its length is the time budget's
        "rpn_iterations": 2000,
        "backbone_iterations": 800,
        # Notebook 06's training loop gets 54 minutes: with it the notebook took 55.7 minutes on the idle machine
        # (the loop ended 2.6 minutes inside its budget; the backbone's pre-training, the processes' start and the
        # figures took 4.3), 57.6 expected on a day 1.5x slower (0.30 s per iteration on 2026-12-05 against 0.20 on
        # 2026-12-06), as the budget bounds only the loop (docs/benchmarks.md, "The small profile with 54 minutes
        # and more MLM draws"); the length is decided at iteration 2000, a tenth of the most, by when
        # classification has joined
        "time_budget_minutes": 54,
        "ablation_iterations": 5000,      # notebook 09: batches per ablation run (rows: ablations.PROFILE_PLANS):
                                          # six runs, two at a time, on two cores; at 3500 the baseline's box AP
                                          # stayed under 0.2 (docs/benchmarks.md, "Notebook 09 in the small
                                          # profile with classification joining at iteration 1000")
        "ablation_data_root": None,
        "ablation_data_profile": None,
        "nproc": 1,
        "device": "auto",
        "threads": 1,
        "seed": 0,
        "quick": False,
        # Classification joins at iteration 1000 (the other tasks share its draws until then): beside it retrieval
        # takes off late, at a point that depends on the seed, and the ablation runs' retrieval band was 21 points
        # wide; held back for 1000 iterations, retrieval takes off by iteration ~800 (docs/benchmarks.md,
        # "Classification joins late"). The runs are long enough for classification to catch up (its backbone
        # is pre-trained as a classifier); the quick profile's 2700 iterations keep every task from the start.
        # The classification images' proposals are named too (region_name_weight 0.5), on crops shrunk to the
        # scenes' object sizes half of the time (zoom_out): the novel objects' regional tokens then tell the four
        # novel names apart 0.664 of the time (0.399 without the zoom-out, 0.242 without the term) and novel AP50
        # rose from 0.095 to 0.165, 0.279 with calibrated stacking (docs/benchmarks.md, "Novel names at the scenes'
        # scale"). The quick profile keeps both off: in its 2700 iterations the term cost box AP50 0.335 -> 0.188.
        # MLM gets 0.13 of the draws and retrieval 0.17 (the preset's 0.1 / 0.2), tried because MLM ended at
        # 0.638-0.645 in four hours at 0.1 while retrieval passed both its goals with room. 38 % more MLM steps gave
        # 0.634 against 0.639: steps are not what limits MLM, the frozen text encoder is (MLM alone: 0.646 after 2200
        # steps frozen, 0.684 after 1800 fine-tuned; its top four layers alone give that gain but, tuned by MLM's
        # steps only, cost 13 % of every iteration: docs/benchmarks.md, "Which layers of the text encoder MLM
        # needs"); the record was measured with these shares, retrieval came out at 0.484 / 0.296
        # (docs/benchmarks.md, "More MLM steps in the hour").
        "train_overrides": ["tasks.classification.start_iteration=1000", "tasks.classification.region_name_weight=0.5",
                            "data.zoom_out_prob=0.5", "data.zoom_out_min_scale=0.25",
                            "tasks.mlm.sampling_weight=0.13", "tasks.retrieval.sampling_weight=0.17"],
        # Notebook 06 trains on both cores as in the quick profile (two processes of one thread, half of every
        # task's batch each): with one job nothing else runs beside it (docs/benchmarks.md, "The hour on both
        # cores")
        "notebook_parameters": {"06": {"nproc": 2, "split_batches": True},
                                # the ablation runs keep the late start only: ablations.ABLATION_BASE leaves the
                                # region-naming term out of them (an extra decoder pass per classification step)
                                "09": {"train_overrides": ["tasks.classification.start_iteration=1000"]}},
    },
    "paper": {
        "profile": "paper",
        "data_profile": None,
        "data_root": "data/real",
        "preset": "r50",
        "iterations": 150_000,            # Sec. 5.2: R50, 150k iterations on 16 GPUs
        "rpn_iterations": 150_000,
        "backbone_iterations": 0,         # bring ImageNet weights: image_encoder.backbone_weights in the config
        "time_budget_minutes": None,
        "ablation_iterations": 150_000,   # the paper's ablations train as long as its R50 model
        "ablation_data_root": None,
        "ablation_data_profile": None,
        "nproc": 16,
        "device": "cuda",
        "threads": None,                  # torch's default (one per core); the GPUs do the work
        "seed": 0,
        "quick": False,
        "train_overrides": [],            # the paper's setting: every task from the first iteration
        "notebook_parameters": {},
    },
}
PATH_PARAMETERS = ("data_root", "ablation_data_root", "run_dir", "results_path")
# Parameters the runner sets itself, and the option that sets each: ``-p`` may not.
RUNNER_PARAMETERS = {"profile": "--profile", "run_dir": "--out", "results_path": "--out"}


class RunSetupError(ValueError):
    """The run cannot start as asked: an option, a notebook or a path is wrong. The message names it and what was
    expected, in one line (the command line prints it without a traceback)."""


# --------------------------------------------------------------------------------------------------------------
# Helpers notebooks call
# --------------------------------------------------------------------------------------------------------------
def read_json_record(path: str | os.PathLike, required: Sequence[str], remedy: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist.

    Raises:
        ValueError: the file is not valid JSON or lacks one of the ``required`` keys; the message names the file,
            what is wrong and ``remedy`` (e.g. "delete it to rerun this ablation run").
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}); {remedy}") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(repr(key) for key in missing)}; {remedy}")
    return data


def shown_path(path: str | os.PathLike) -> Path:
    """``path`` relative to the checkout when it lies inside it (shorter in a notebook's output, and the same on
    every machine), else as it is."""
    try:
        return Path(path).resolve().relative_to(project_path(".").resolve())
    except ValueError:
        return Path(path)


def project_path(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path; a relative one is taken relative to the project checkout.

    The checkout is the nearest directory, from the working directory upwards, that holds the
    ``uniperceiver_v2`` package; so ``data/synthetic`` means the same folder whether a notebook runs in
    ``notebooks/`` (JupyterLab) or the repository root. Outside a checkout, the working directory is used.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return (checkout_root(Path.cwd()) or Path.cwd()) / path


def checkout_root(folder: Path) -> Path | None:
    """The checkout seen from ``folder``: the nearest folder, ``folder`` or above, that holds the
    ``uniperceiver_v2`` package; None outside a checkout."""
    for candidate in (folder, *folder.parents):
        if (candidate / "uniperceiver_v2" / "__init__.py").is_file():
            return candidate
    return None


def _to_json(value: Any, where: str) -> Any:
    """Plain JSON types from numpy / torch scalars and small arrays, Paths and tuples."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number; JSON cannot hold it")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):   # numpy arrays and scalars, torch tensors
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return _to_json(value.tolist(), where)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a results file; use numbers, strings, "
                    "lists and dicts")


def _check_tables(tables: Any, source: str) -> None:
    if not isinstance(tables, Mapping):
        raise ValueError(f"{source}: 'tables' must map table names to {{'columns': [...], 'rows': [[...], ...]}}")
    for name, table in tables.items():
        if not isinstance(table, Mapping) or not isinstance(table.get("columns"), list) \
                or not isinstance(table.get("rows"), list):
            raise ValueError(f"{source}: table {name!r} must be {{'columns': [...], 'rows': [[...], ...]}}")
        for index, row in enumerate(table["rows"]):
            if not isinstance(row, list) or len(row) != len(table["columns"]):
                raise ValueError(f"{source}: table {name!r} row {index} must be a list of "
                                 f"{len(table['columns'])} cells (one per column), got {row!r}")


def save_results(path: str | os.PathLike | None, results: Mapping[str, Any]) -> Path | None:
    """Write a notebook's results as JSON; called at the end of every notebook as
    ``save_results(results_path, {...})``.

    ``path=None`` (the notebook's default, when it runs interactively) writes nothing and returns None.
    Numbers, strings, lists and dicts are stored as they are (numpy / torch scalars and arrays become
    numbers and lists). Final tables go under ``"tables"`` as
    ``{name: {"columns": [...], "rows": [[...], ...]}}``; the summary renders each as Markdown and CSV.
    The file is replaced atomically, so a crash never leaves half a results file behind.
    """
    if path is None:
        return None
    if not isinstance(results, Mapping):
        raise TypeError(f"save_results: results must be a dict, got {type(results).__name__}")
    path = project_path(path)
    data = _to_json(results, "results")
    if "tables" in data:
        _check_tables(data["tables"], str(path))
    _write_json(path, data)
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file written by :func:`save_results`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of results, got {type(data).__name__}")
    if "tables" in data:
        _check_tables(data["tables"], str(path))
    return data


def collect_results(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every ``NN_name.json`` in ``results_dir``, by notebook name (``NN_name``), in series order."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return {}
    return {path.stem: load_results(path) for path in sorted(results_dir.glob("[0-9][0-9]_*.json"))}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")   # one per process: runs may overlap
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------------------
# Notebooks, parameters and the kernel
# --------------------------------------------------------------------------------------------------------------
def find_notebooks(notebook_dir: str | os.PathLike, only: Sequence[str] | None = None) -> list[Path]:
    """The series ``NN_name.ipynb`` in ``notebook_dir``, sorted.

    ``only`` keeps the given numbers: ``"3"`` is ``"03"``, ``"06-08"`` the notebooks numbered 06 to 08,
    ``"06,07"`` both; a number given twice runs once.
    """
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise RunSetupError(f"--notebooks: {notebook_dir} is not a folder")
    notebooks = sorted(p for p in notebook_dir.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    numbers = [NOTEBOOK_PATTERN.match(p.name).group(1) for p in notebooks]
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicated:
        raise RunSetupError(f"{notebook_dir}: several notebooks share the number(s) {duplicated}")
    if not notebooks:
        raise RunSetupError(f"{notebook_dir}: no notebooks named NN_name.ipynb")
    if only is not None:
        selected = _select_numbers(only, numbers, notebook_dir)
        notebooks = [p for p, n in zip(notebooks, numbers) if n in selected]
    return notebooks


def _select_numbers(only: Sequence[str], numbers: Sequence[str], notebook_dir: Path) -> set[str]:
    """The notebook numbers ``--only`` asks for, each one of ``numbers``."""
    selected: set[str] = set()
    unknown: list[str] = []
    items = [item.strip() for text in only for item in str(text).split(",") if item.strip()]
    if not items:
        raise RunSetupError("--only: no notebook number given")
    for item in items:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item, flags=re.ASCII)
        if match is None:
            raise RunSetupError(f"--only: {item!r} is not a notebook number or range (e.g. 06 or 06-08)")
        first, last = match.group(1), match.group(2)
        if last is None:
            number = first.zfill(2)
            if number in numbers:
                selected.add(number)
            elif number not in unknown:
                unknown.append(number)
            continue
        if int(first) > int(last):
            raise RunSetupError(f"--only: the range {item} runs backwards; write {last}-{first}")
        in_range = {n for n in numbers if int(first) <= int(n) <= int(last)}
        if not in_range:
            raise RunSetupError(f"--only: no notebook numbered {first} to {last} in {notebook_dir}; "
                                f"available: {list(numbers)}")
        selected |= in_range
    if unknown:
        raise RunSetupError(f"--only: no notebook numbered {unknown} in {notebook_dir}; available: {list(numbers)}")
    return selected


def profile_parameters(profile: str, run_dir: Path, gpus: int | None = None) -> dict[str, Any]:
    """The parameters a profile offers every notebook; paths absolute, ``--gpus`` applied."""
    if profile not in PROFILES:
        raise RunSetupError(f"--profile: unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    parameters = dict(PROFILES[profile])
    parameters["run_dir"] = str(run_dir)
    if gpus is not None:
        if gpus < 1:
            raise RunSetupError(f"--gpus: expected at least 1 GPU, got {gpus}")
        parameters["nproc"] = gpus
        parameters["device"] = "cuda"
    for key in PATH_PARAMETERS:
        if parameters.get(key) is not None:
            parameters[key] = str(Path(parameters[key]).expanduser().resolve())
    return parameters


def apply_overrides(parameters: Mapping[str, Any], overrides: Mapping[str, Any],
                    gpus: int | None = None) -> dict[str, Any]:
    """``parameters`` with the command line's ``-p NAME VALUE`` pairs in place of the profile's values.

    Names the runner sets itself (:data:`RUNNER_PARAMETERS`), and ``nproc`` / ``device`` next to ``--gpus``, are
    refused; a relative ``data_root`` is taken relative to the working directory, as the profiles' paths are.
    """
    merged = dict(parameters)
    for name, value in overrides.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            raise RunSetupError(f"-p {name!r}: not a parameter name (a Python identifier such as iterations)")
        if name in RUNNER_PARAMETERS:
            raise RunSetupError(f"-p {name}: set by the runner from {RUNNER_PARAMETERS[name]}, not by -p")
        if gpus is not None and name in ("nproc", "device"):
            raise RunSetupError(f"-p {name}: --gpus sets nproc and device; give one or the other")
        if name in PATH_PARAMETERS:
            if not isinstance(value, str):
                raise RunSetupError(f"-p {name}: expected a path, got {value!r}")
            value = str(Path(value).expanduser().resolve())
        merged[name] = value
    return merged


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path``; one that is not a readable notebook file is refused with its path."""
    try:
        return nbformat.read(path, as_version=4)
    except (OSError, ValueError, TypeError, nbformat.ValidationError) as exc:
        detail = " ".join(str(exc).split())   # one line, however the reader formatted it
        detail = detail if len(detail) <= 200 else detail[:200] + " ..."
        raise RunSetupError(f"{path}: not a readable notebook ({type(exc).__name__}: {detail})") from exc


def parameters_cell_index(notebook: Mapping[str, Any], source: str) -> int:
    """The index of the one cell tagged ``parameters``; a notebook without exactly one is refused."""
    tagged = [i for i, cell in enumerate(notebook["cells"])
              if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise RunSetupError(f"{source}: expected exactly one cell tagged '{PARAMETERS_TAG}', found {len(tagged)}")
    return tagged[0]


# The default of a parameter assigned something other than a literal, e.g. ``Path("x")``: any value is accepted.
NOT_A_LITERAL = object()


def parameter_defaults(notebook: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Every name the ``parameters`` cell assigns (read with ``ast``) and its default value.

    A default that is not a Python literal is :data:`NOT_A_LITERAL`. A cell that is not valid Python is refused.
    """
    cell = notebook["cells"][parameters_cell_index(notebook, source)]
    text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise RunSetupError(f"{source}: the cell tagged '{PARAMETERS_TAG}' is not valid Python "
                            f"(line {exc.lineno}: {exc.msg})") from exc
    defaults: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                defaults[target.id] = _literal(value)
    return defaults


def _literal(node: ast.expr | None) -> Any:
    if node is None:   # `name: type` without a value
        return NOT_A_LITERAL
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_A_LITERAL


def declared_parameters(notebook_path: Path) -> list[str]:
    """The names assigned in the notebook's ``parameters`` cell, as papermill reads them.

    papermill's line parser drops, with only a log warning, every line holding more than one ``=`` (one in the
    comment is enough), and would then call the runner's value for it an unknown parameter; such a cell is
    refused.
    """
    import papermill

    notebook = read_notebook(notebook_path)
    assigned = parameter_defaults(notebook, str(notebook_path))
    parsed = list(papermill.inspect_notebook(str(notebook_path)))
    unread = [name for name in assigned if name not in parsed]
    if unread:
        raise RunSetupError(f"{notebook_path}: papermill cannot read the parameter(s) {unread} in the cell tagged "
                            f"'{PARAMETERS_TAG}'; write one `name = value  # comment` per line with no other '=' on "
                            "it (not even in the comment)")
    return parsed


def check_parameters(parameters: Mapping[str, Any], defaults: Mapping[str, Any], notebook: str,
                     overridden: Sequence[str] = ()) -> None:
    """Refuse what papermill would pass to ``notebook`` with only a warning: a parameter its ``parameters`` cell
    does not assign (``defaults``, from :func:`parameter_defaults`). The ``overridden`` ones (from ``-p``) must
    also have the type of the notebook's default; an int may stand for a float, None is always accepted, and any
    value where the default is None or not a literal."""
    for name in parameters:
        if name not in defaults:
            raise RunSetupError(f"{notebook}: parameter {name!r} is not assigned in its cell tagged "
                                f"'{PARAMETERS_TAG}' (it declares {sorted(defaults)})")
    for name in overridden:
        value, default = parameters[name], defaults[name]
        if value is None or default is None or default is NOT_A_LITERAL:
            continue
        if isinstance(default, bool):
            same_type = isinstance(value, bool)
        elif isinstance(default, int):
            same_type = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            same_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (list, tuple)):
            same_type = isinstance(value, (list, tuple))
        else:
            same_type = isinstance(value, type(default))
        if not same_type:
            hint = f"; to pass it as text, quote it: -p {name} \"'{value}'\"" if isinstance(default, str) else ""
            raise RunSetupError(f"-p {name}: {value!r} ({type(value).__name__}) does not fit {notebook}, whose "
                                f"default is {default!r} ({type(default).__name__}){hint}")


def notebook_hash(notebook: Mapping[str, Any], parameters: Mapping[str, Any]) -> str:
    """sha256 of the parameters and of every cell's type and source (outputs and metadata do not count)."""
    cells = [[cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
             for cell in notebook["cells"]]
    payload = json.dumps({"parameters": parameters, "cells": cells}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _same_executable(command: str) -> bool:
    # jupyter_client swaps these bare names for sys.executable when it starts the kernel.
    if command in {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}:
        return True
    # Compare paths without resolving symlinks: every venv's python links to the same base interpreter.
    return os.path.normpath(os.path.abspath(command)) == os.path.normpath(os.path.abspath(sys.executable))


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure the Jupyter kernel ``name`` exists and starts this interpreter; register it in sys.prefix
    if it is missing. Returns the kernel name."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(kernel_spec_manager=manager, kernel_name=name, display_name=f"Python ({name})", prefix=sys.prefix)
        spec = KernelSpecManager().get_kernel_spec(name)
    if not spec.argv or not _same_executable(spec.argv[0]):
        raise RuntimeError(
            f"kernel {name!r} ({spec.resource_dir}) starts {spec.argv[0] if spec.argv else 'nothing'}, not this "
            f"interpreter {sys.executable}; remove it (jupyter kernelspec remove {name}) and rerun, or register "
            f"this one: {shlex.quote(sys.executable)} -m ipykernel install --sys-prefix --name {name}")
    return name


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------
class NotebookFailed(RuntimeError):
    """A notebook stopped with an error; the message names the notebook, the cell and the error."""

    def __init__(self, notebook: str, message: str, cell_index: int | None = None, cell_line: str | None = None):
        self.notebook = notebook
        self.cell_index = cell_index
        self.cell_line = cell_line
        super().__init__(message)


@dataclass
class Layout:
    """Where a profile's outputs go: ``<out>/<profile>/...``."""

    root: Path

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def state(self) -> Path:
        return self.root / "state.json"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    return next(folder for folder in (path, *path.parents) if folder.exists())


def check_output(layout: Layout) -> None:
    """Refuse, before anything runs, an output folder that a file takes (``--out`` itself, ``<out>/<profile>`` or
    a folder inside it) or that cannot be created."""
    for folder in (layout.notebooks, layout.results):
        if folder.exists() and not folder.is_dir():
            raise RunSetupError(f"--out: {folder} is a file, but the run keeps its {folder.name} in a folder there; "
                                "move the file or choose another --out")
    if layout.state.exists() and not layout.state.is_file():
        raise RunSetupError(f"--out: {layout.state} is a folder, but the run keeps its state in a file there")
    existing = _nearest_existing(layout.root)
    if not existing.is_dir():
        raise RunSetupError(f"--out: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunSetupError(f"--out: cannot write to {existing}; choose another --out")


def load_state(layout: Layout) -> dict[str, Any]:
    if not layout.state.is_file():
        return {"notebooks": {}}
    try:
        state = json.loads(layout.state.read_text())
    except json.JSONDecodeError as exc:
        raise RunSetupError(f"{layout.state}: not valid JSON ({exc.msg}); delete it to rerun everything") from exc
    if not isinstance(state, dict) or not isinstance(state.get("notebooks"), dict):
        raise RunSetupError(f"{layout.state}: expected {{'notebooks': {{...}}}}; delete it to rerun everything")
    return state


def update_state(layout: Layout, profile: str, name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Record ``entry`` for notebook ``name`` in ``state.json`` and return the whole state.

    The file is re-read under an exclusive lock and only this notebook's entry is replaced, so two runs of the same
    profile on different notebooks (``--only 00 01`` next to ``--only 09``, e.g. one per free core) keep each
    other's records.
    """
    import fcntl

    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / "state.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state(layout)
        state["profile"] = profile
        state["notebooks"][name] = dict(entry)
        _write_json(layout.state, state)
    return state


def _is_up_to_date(entry: Mapping[str, Any] | None, digest: str, executed: Path, results: Path | None) -> bool:
    return (entry is not None and entry.get("status") == "completed" and entry.get("hash") == digest
            and executed.is_file() and (results is None or results.is_file()))


def _kernel_config():
    """nbclient configuration: CurveZMQ-encrypted kernel traffic where libzmq supports it (ipykernel warns on
    every start of an unencrypted TCP kernel otherwise, and the traffic includes every output)."""
    import zmq
    from traitlets.config import Config

    return Config({"KernelManager": {"transport_encryption": "auto"}}) if zmq.has("curve") else Config()


@contextlib.contextmanager
def kernel_threads(threads: int | None) -> Iterator[None]:
    """``OMP_NUM_THREADS=threads`` in this process's environment while a kernel starts (it inherits it, and so do
    the trainers it launches), unless the variable is already set or ``threads`` is None; restored afterwards."""
    if threads is None or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def checkout_relative(parameters: Mapping[str, Any], notebook_dir: Path) -> dict[str, Any]:
    """``parameters`` as a notebook in ``notebook_dir`` is given them: each path of :data:`PATH_PARAMETERS` that
    lies inside the checkout is written relative to it (``runs/quick``, not ``/home/.../runs/quick``), so the
    injected parameters cell reads the same on every machine. The notebooks resolve such a path with
    :func:`project_path`, which finds the same checkout; a path outside it stays absolute."""
    root = checkout_root(notebook_dir.resolve())
    shown = dict(parameters)
    for key in PATH_PARAMETERS:
        value = shown.get(key)
        if root is None or not isinstance(value, str) or not Path(value).is_absolute():
            continue
        try:
            shown[key] = Path(value).resolve().relative_to(root).as_posix()
        except ValueError:
            pass                                          # outside the checkout: kept as it is
    return shown


def run_notebook(source: Path, executed: Path, parameters: dict[str, Any], parameters_index: int,
                 kernel_name: str) -> None:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the failing cell."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    executed.parent.mkdir(parents=True, exist_ok=True)
    parameters = checkout_relative(parameters, source.parent)
    series_index = source.parent / "README.md"   # each notebook's footer links to it: keep it beside the copies
    if series_index.is_file():
        shutil.copyfile(series_index, executed.parent / series_index.name)
    try:
        papermill.execute_notebook(
            str(source), str(executed), parameters=parameters, kernel_name=kernel_name, cwd=str(source.parent),
            progress_bar=sys.stderr.isatty(), log_output=False, config=_kernel_config())
    except papermill.PapermillExecutionError as exc:
        # papermill counts cells of the executed copy, where its injected-parameters cell follows ours.
        injected = parameters_index + 1
        source_lines = [line for line in exc.source.splitlines() if line.strip()]
        first_line = source_lines[0].strip() if source_lines else ""
        if exc.cell_index == injected:
            where, index = "the injected parameters cell", None
        else:
            index = exc.cell_index - 1 if exc.cell_index > injected else exc.cell_index
            where = f"cell {index} (`{first_line}`)"
        raise NotebookFailed(
            source.stem, f"{source.name}: {where} raised {exc.ename}: {exc.evalue}\n"
                         f"  full traceback in {executed}", index, first_line) from exc
    except DeadKernelError as exc:
        raise NotebookFailed(source.stem, f"{source.name}: the kernel died ({exc}); out of memory?\n"
                                          f"  partial outputs in {executed}") from exc


@dataclass
class NotebookRun:
    """One selected notebook, checked: the parameters papermill will pass it and where its results go."""

    source: Path
    notebook: nbformat.NotebookNode
    parameters_index: int               # the cell tagged ``parameters``
    parameters: dict[str, Any]
    results_path: Path | None           # None when the notebook declares no ``results_path``


@dataclass
class RunPlan:
    """A run of one profile, checked by :func:`plan_run`; nothing has been executed or written yet."""

    profile: str
    layout: Layout
    parameters: dict[str, Any]          # the profile's, with --gpus and -p applied
    notebooks: list[NotebookRun]        # the selected ones, in series order
    series: list[str]                   # every notebook in the folder (the summary lists them all)
    overrides: dict[str, Any] = field(default_factory=dict)   # the -p values, as given
    gpus: int | None = None

    @property
    def uses_data(self) -> bool:
        return any("data_root" in run.parameters for run in self.notebooks)


def plan_run(profile: str, notebook_dir: str | os.PathLike = "notebooks", out: str | os.PathLike = "runs",
             only: Sequence[str] | None = None, gpus: int | None = None,
             overrides: Mapping[str, Any] | None = None) -> RunPlan:
    """Check everything a run needs before any notebook starts; raise :class:`RunSetupError` naming what is wrong.

    Every selected notebook's parameters cell is read (a typo in notebook 09 should not wait for 06's training);
    each receives the profile's parameters it declares, with ``overrides`` (``-p NAME VALUE``) in place of the
    profile's values. An override no selected notebook declares is refused.
    """
    overrides = dict(overrides or {})
    layout = Layout(Path(out).expanduser().resolve() / profile)
    offered = apply_overrides(profile_parameters(profile, layout.root, gpus), overrides, gpus)
    check_output(layout)
    series = find_notebooks(notebook_dir)
    runs = []
    undeclared = set(overrides)   # the -p names no selected notebook has declared so far
    for source in find_notebooks(notebook_dir, only):
        notebook = read_notebook(source)
        parameters_index = parameters_cell_index(notebook, str(source))
        declared_parameters(source)      # papermill must read every assignment the cell makes
        defaults = parameter_defaults(notebook, str(source))
        parameters = {k: v for k, v in offered.items() if k in defaults}
        parameters.update(notebook_parameters(profile, source.stem, defaults, overrides, gpus))
        results_path = layout.results / f"{source.stem}.json" if "results_path" in defaults else None
        if results_path is not None:
            parameters["results_path"] = str(results_path)
        overridden = [name for name in overrides if name in defaults]
        check_parameters(parameters, defaults, source.name, overridden)
        undeclared -= set(overridden)
        runs.append(NotebookRun(source, notebook, parameters_index, parameters, results_path))
    for name in overrides:
        if name in undeclared:
            raise RunSetupError(_undeclared_override(name, [run.source for run in runs], series, offered))
    load_state(layout)   # a broken state.json is refused now, not after the first notebook
    plan = RunPlan(profile, layout, offered, runs, [p.stem for p in series], overrides, gpus)
    if plan.uses_data:
        check_data(plan.parameters)
    return plan


def notebook_parameters(profile: str, stem: str, declared: Mapping[str, Any], overrides: Mapping[str, Any],
                        gpus: int | None = None) -> dict[str, Any]:
    """The values the profile gives notebook ``stem`` alone (``PROFILES[profile]["notebook_parameters"]`` under its
    number), over the profile's common ones: those the notebook declares, except a name ``-p`` sets (the command
    line wins) and ``nproc`` / ``device`` with ``--gpus``. A name the notebook does not declare is refused: it
    would be silently ignored otherwise."""
    own = PROFILES[profile].get("notebook_parameters", {}).get(stem[:2], {})
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise RunSetupError(f"profile {profile!r}: notebook_parameters for {stem} name {unknown}, which its "
                            "parameters cell does not declare")
    return {name: value for name, value in own.items()
            if name not in overrides and not (gpus is not None and name in ("nproc", "device"))}


def _undeclared_override(name: str, selected: Sequence[Path], series: Sequence[Path],
                         offered: Mapping[str, Any]) -> str:
    """The error for ``-p name`` that no selected notebook declares: which other notebooks do, or close names."""
    chosen = {path.stem for path in selected}
    elsewhere, known = [], set(offered)
    for path in series:
        try:
            declared = parameter_defaults(read_notebook(path), str(path))
        except RunSetupError:   # only for the hint; a selected notebook's cell was read without error
            continue
        known |= set(declared)
        if name in declared and path.stem not in chosen:
            elsewhere.append(path.stem)
    message = f"-p {name}: no selected notebook declares this parameter"
    if elsewhere:
        return f"{message}; {', '.join(elsewhere)} does (add it to --only)"
    close = difflib.get_close_matches(name, sorted(known - set(RUNNER_PARAMETERS) - {name}), n=3)
    return message + (f"; did you mean {' or '.join(close)}?" if close else "")


def reproduce(profile: str, notebook_dir: str | os.PathLike = "notebooks", out: str | os.PathLike = "runs",
              only: Sequence[str] | None = None, gpus: int | None = None, force: bool = False,
              command: str | None = None, overrides: Mapping[str, Any] | None = None, jobs: int = 1,
              summary: bool = True) -> int:
    """Check the run (:func:`plan_run`), prepare the data and the kernel, run the selected notebooks and write the
    summary. Returns the exit code: 0 = every selected notebook completed, 1 = one failed, 130 = interrupted.

    ``jobs`` > 1 runs that many notebooks at once, each in its own process (:func:`run_plan_parallel`);
    ``summary=False`` leaves ``summary.md`` to the caller (the parallel runner's workers)."""
    plan = plan_run(profile, notebook_dir, out, only, gpus, overrides)
    try:
        kernel_name = ensure_kernel()
    except RuntimeError as exc:   # the kernel of that name starts another interpreter
        raise RunSetupError(str(exc)) from exc
    if plan.uses_data:
        prepare_data(profile, plan.parameters)
    note = precision_note(plan.parameters)
    if note and summary:       # once, from the command the user typed (the parallel runner's workers stay quiet)
        print(note, flush=True)
    if jobs > 1:
        return run_plan_parallel(plan, jobs, force, command, notebook_dir)
    return run_plan(plan, kernel_name, force, command, summary)


# Notebooks that read what another one leaves behind run after it when both are selected (NN -> the numbers it
# waits for; "*" = every earlier one): 02 and 04 show the pools and gates of notebook 06's trained model, 07 and 08
# evaluate it, 10 collects every result. The others only need the data, so they may run in any order or at once.
RUNS_AFTER: dict[str, tuple[str, ...]] = {"02": ("06",), "04": ("06",), "07": ("06",), "08": ("06",), "10": ("*",)}


def prerequisites(name: str, selected: Sequence[str]) -> list[str]:
    """The selected notebooks (stems) that ``name`` runs after (:data:`RUNS_AFTER`)."""
    needs = RUNS_AFTER.get(name[:2], ())
    if "*" in needs:
        return [other for other in selected if other[:2] < name[:2]]
    return [other for other in selected if other[:2] in needs and other != name]


def execution_order(names: Sequence[str]) -> list[str]:
    """``names`` (stems, series order) in the order one runner executes them: each after its prerequisites,
    otherwise in series order (so 02 and 04 follow 06 when 06 is selected)."""
    order: list[str] = []
    pending = list(names)
    while pending:
        ready = next(name for name in pending if all(p in order for p in prerequisites(name, names)))
        order.append(ready)
        pending.remove(ready)
    return order


def dependents(name: str, names: Sequence[str]) -> int:
    """How many of ``names`` wait for ``name``, directly or through others (06: 02, 04, 07, 08 and 10)."""
    waiting, frontier = set(), {name}
    while frontier:
        frontier = {other for other in names
                    if other not in waiting and frontier & set(prerequisites(other, names))}
        waiting |= frontier
    return len(waiting)


# Seconds each notebook took in the quick profile with two jobs (docs/benchmarks.md, "The quick profile with two
# notebooks at once"): only their order matters, to start the longer of two ready notebooks first.
TYPICAL_SECONDS: dict[str, float] = {"00": 31, "01": 99, "02": 44, "03": 34, "04": 50, "05": 49, "06": 1259,
                                     "07": 204, "08": 62, "09": 228, "10": 24}


def start_order(names: Sequence[str]) -> list[str]:
    """The order in which the parallel runner considers starting notebooks: :func:`execution_order`, with the
    notebooks that others wait for first (most waiting first), so the long chain (06, then 07 and 08) starts at once.
    Of the notebooks that wait for others (and so become ready together), the longer first (:data:`TYPICAL_SECONDS`):
    after 06, notebook 07 starts at once while the short 02, 04 and 08 share the other lane, instead of 07 queueing
    behind them. The independent ones keep the series order (09 last: it waits for 06's backbone pre-training)."""
    order = execution_order(names)

    def length(name: str) -> float:
        return TYPICAL_SECONDS.get(name[:2], 0.0) if prerequisites(name, names) else 0.0

    return sorted(order, key=lambda name: (-dependents(name, names), -length(name), order.index(name)))


def run_plan(plan: RunPlan, kernel_name: str, force: bool = False, command: str | None = None,
             summary: bool = True) -> int:
    """Run a checked plan's notebooks in :func:`execution_order`, skipping those unchanged since they completed;
    stop at the first failure or at Ctrl-C (recorded as ``interrupted``). Returns the exit code as
    :func:`reproduce` does."""
    layout = plan.layout
    state = load_state(layout)
    started = time.perf_counter()
    failure: NotebookFailed | None = None
    interrupted: str | None = None
    by_name = {run.source.stem: run for run in plan.notebooks}
    ordered = [by_name[name] for name in execution_order(list(by_name))]
    for position, run in enumerate(ordered, start=1):
        source, name, results_path = run.source, run.source.stem, run.results_path
        digest = notebook_hash(run.notebook, run.parameters)
        executed = layout.notebooks / source.name
        prefix = f"[{position}/{len(plan.notebooks)}] {name}"
        entry = state["notebooks"].get(name)
        if not force and _is_up_to_date(entry, digest, executed, results_path):
            print(f"{prefix}: unchanged since {entry.get('finished')}, skipped", flush=True)
            continue

        print(f"{prefix}: running ...", flush=True)
        if results_path is not None:
            results_path.unlink(missing_ok=True)   # never let a stale file pass as this run's results
        entry = {"hash": digest, "status": "running", "parameters": run.parameters, "source": str(source),
                 "executed": str(executed), "results": str(results_path) if results_path else None,
                 "started": _now()}
        state = update_state(layout, plan.profile, name, entry)
        tick = time.perf_counter()
        try:
            with kernel_threads(plan.parameters.get("threads")):
                run_notebook(source, executed, run.parameters, run.parameters_index, kernel_name)
            if results_path is not None and not results_path.is_file():
                raise NotebookFailed(name, f"{source.name}: finished but did not write its results to "
                                           f"{results_path} (call save_results(results_path, {{...}}) at the end)")
        except NotebookFailed as exc:
            failure = exc
            entry.update(status="failed", error=str(exc), cell_index=exc.cell_index, cell_line=exc.cell_line)
        except KeyboardInterrupt:
            interrupted = name
            entry.update(status="interrupted", error="interrupted by the user (Ctrl-C)")
        else:
            entry.update(status="completed", error=None)
        entry.update(elapsed_s=round(time.perf_counter() - tick, 2), finished=_now())
        state = update_state(layout, plan.profile, name, entry)
        if failure is not None:
            print(f"{prefix}: FAILED after {entry['elapsed_s']:.1f} s\n{failure}", flush=True)
            break
        if interrupted is not None:
            print(f"{prefix}: INTERRUPTED after {entry['elapsed_s']:.1f} s; partial outputs in {executed}",
                  flush=True)
            break
        print(f"{prefix}: done in {entry['elapsed_s']:.1f} s (elapsed {time.perf_counter() - started:.1f} s)",
              flush=True)

    if summary:
        _summarise(plan, command)
    if failure is not None:
        print(f"stopped at {failure.notebook}; the notebooks before it are kept (rerun skips them)", flush=True)
        return 1
    if interrupted is not None:
        print(f"interrupted at {interrupted}; the notebooks completed before it are kept: the same command "
              f"skips them and reruns {interrupted}", flush=True)
        return 130
    return 0


def _summarise(plan: RunPlan, command: str | None) -> None:
    """Write ``summary.md`` / ``summary.csv`` from the state as it is now (with what other runs of this profile
    recorded meanwhile) and say where they are."""
    state = load_state(plan.layout)
    md_path, csv_path = write_summary(plan.layout, plan.profile, plan.parameters, state, plan.series, command)
    print(f"summary: {md_path} and {csv_path}", flush=True)


def worker_command(plan: RunPlan, run: NotebookRun, force: bool, notebook_dir: str | os.PathLike) -> list[str]:
    """The command that runs one notebook of ``plan`` on its own: this runner for ``--only NN`` with the plan's
    profile, output, ``--gpus`` and the ``-p`` values that notebook declares, and no summary of its own."""
    command = [sys.executable, "-m", "uniperceiver_v2.reproduce", "--profile", plan.profile,
               "--out", str(plan.layout.root.parent), "--notebooks", str(Path(notebook_dir).resolve()),
               "--only", run.source.stem[:2], "--no-summary"]
    if plan.gpus is not None:
        command += ["--gpus", str(plan.gpus)]
    for name, value in plan.overrides.items():
        if name in run.parameters:
            command += ["-p", name, repr(value)]     # repr: read back as the same Python literal
    if force:
        command.append("--force")
    return command


def run_plan_parallel(plan: RunPlan, jobs: int, force: bool = False, command: str | None = None,
                      notebook_dir: str | os.PathLike = "notebooks", poll: float = 0.5) -> int:
    """Run a checked plan's notebooks ``jobs`` at a time, each in its own process (:func:`worker_command`, its
    output in ``<profile>/logs/NN_name.log``), a notebook starting once its prerequisites (:data:`RUNS_AFTER`) have
    completed. After a failure or Ctrl-C no new notebook starts and the running ones finish (or, interrupted,
    record where they stopped); the summary is written at the end. Returns the exit code as :func:`reproduce`."""
    layout = plan.layout
    logs = layout.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {run.source.stem: run for run in plan.notebooks}
    names = list(by_name)
    pending = start_order(names)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    completed: set[str] = set()
    failed: list[str] = []
    interrupted: list[str] = []
    started = time.perf_counter()
    total = len(names)
    print(f"{total} notebook(s), up to {jobs} at once, one process each (output in {logs})", flush=True)

    def launch_ready() -> None:
        while pending and len(running) < jobs and not failed and not interrupted:
            name = next((n for n in pending if all(p in completed for p in prerequisites(n, names))), None)
            if name is None:
                return
            pending.remove(name)
            run = by_name[name]
            entry = load_state(layout)["notebooks"].get(name)
            digest = notebook_hash(run.notebook, run.parameters)
            if not force and _is_up_to_date(entry, digest, layout.notebooks / run.source.name, run.results_path):
                print(f"[{total - len(pending)}/{total}] {name}: unchanged since {entry.get('finished')}, skipped",
                      flush=True)
                completed.add(name)
                continue
            log = logs / f"{name}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(worker_command(plan, run, force, notebook_dir), stdout=handle,
                                           stderr=subprocess.STDOUT, cwd=os.getcwd())
            running[name] = (process, time.perf_counter(), log)
            print(f"[{total - len(pending)}/{total}] {name}: running ... (log {log})", flush=True)

    def reap() -> None:
        for name, (process, tick, log) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[name]
            seconds = time.perf_counter() - tick
            if code == 0:
                completed.add(name)
                print(f"{name}: done in {seconds:.1f} s (elapsed {time.perf_counter() - started:.1f} s)",
                      flush=True)
            elif code in (130, -signal.SIGINT):
                interrupted.append(name)
                print(f"{name}: INTERRUPTED after {seconds:.1f} s (log {log})", flush=True)
            else:
                failed.append(name)
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
                print(f"{name}: FAILED after {seconds:.1f} s (exit code {code}); the end of {log}:\n{tail}",
                      flush=True)

    try:
        launch_ready()
        while running:
            time.sleep(poll)
            reap()
            launch_ready()
    except KeyboardInterrupt:
        for process, _, _ in running.values():      # in a terminal they have had the SIGINT already
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for name, (process, _, _) in list(running.items()):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            interrupted.append(name)
        running.clear()
    _summarise(plan, command)
    not_run = [name for name in pending if name not in completed]
    if failed:
        print(f"stopped after {', '.join(failed)} failed" + (f"; not run: {', '.join(not_run)}" if not_run else "")
              + "; completed notebooks are kept (rerun skips them)", flush=True)
        return 1
    if interrupted:
        print(f"interrupted in {', '.join(interrupted)}; the notebooks completed before are kept: the same command "
              "skips them and reruns the rest", flush=True)
        return 130
    return 0


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------
def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1000:
            # four significant digits would round 1079.5 to "1080": keep every integer digit and one decimal
            return f"{value:.1f}".removesuffix(".0")
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _md_cell(value: Any) -> str:
    return _format_value(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar results with dotted keys; tables are rendered on their own."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if not prefix and key == "tables":
            continue
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_summary(layout: Layout, profile: str, parameters: Mapping[str, Any], state: Mapping[str, Any],
                  series: Sequence[str], command: str | None = None) -> tuple[Path, Path]:
    """Render every results file of the profile into ``summary.md`` and ``summary.csv``.

    ``summary.csv`` is long-format, one value per line: ``notebook, table, row, column, value``; scalar results
    have an empty ``table`` and ``row``.
    """
    results = collect_results(layout.results)
    entries = state.get("notebooks", {})
    md = [f"# Reproduction summary: profile `{profile}`", ""]
    md.append(f"Written {_now()}" + (f" by `{command}`" if command else "") + ".")
    md += ["", "## Parameters", "", markdown_table(["parameter", "value"], sorted(parameters.items())), ""]
    md += ["## Notebooks", ""]
    status_rows = []
    for name in sorted(set(series) | set(results)):
        entry = entries.get(name, {})
        status_rows.append([name, entry.get("status", "not run"), entry.get("elapsed_s"), entry.get("finished"),
                            "yes" if name in results else "no"])
    md += [markdown_table(["notebook", "status", "time [s]", "finished", "results"], status_rows), ""]
    failed = [(n, e) for n, e in entries.items() if e.get("status") == "failed"]
    for name, entry in failed:
        md += [f"**{name} failed:**", "", "```", str(entry.get("error", "")), "```", ""]

    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(["notebook", "table", "row", "column", "value"])
    for name, data in results.items():
        md += [f"## {name}", ""]
        flat = _flatten(data)
        if flat:
            md += [markdown_table(["result", "value"], sorted(flat.items())), ""]
        for key, value in sorted(flat.items()):
            writer.writerow([name, "", "", key, _format_value(value)])
        for table_name, table in data.get("tables", {}).items():
            md += [f"### {table_name}", "", markdown_table(table["columns"], table["rows"]), ""]
            for row_index, row in enumerate(table["rows"]):
                for column, value in zip(table["columns"], row):
                    writer.writerow([name, table_name, row_index, column, _format_value(value)])
    md_path = layout.root / "summary.md"
    csv_path = layout.root / "summary.csv"
    layout.root.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md).rstrip() + "\n")
    csv_path.write_text(csv_buffer.getvalue())
    return md_path, csv_path


def check_data(parameters: Mapping[str, Any]) -> None:
    """Refuse a data root that a file takes, or a synthetic suite that does not exist, before anything runs."""
    root = project_path(parameters["data_root"])
    existing = _nearest_existing(root)
    if not existing.is_dir():
        where = "" if existing == root else f" (in the way of {root})"
        raise RunSetupError(f"data_root: {existing} is a file, not a folder{where}; choose another with "
                            "-p data_root PATH")
    suite = parameters.get("data_profile")
    if suite is not None:
        from uniperceiver_v2.data.synthetic import PROFILES as SUITES

        if suite not in SUITES:
            raise RunSetupError(f"data_profile: no synthetic suite {suite!r}; expected one of {sorted(SUITES)}, "
                                "or None for real data under data_root")


def precision_note(parameters: Mapping[str, Any]) -> str | None:
    """One line on the precision the profile's training will use on this machine's CPU, or None on a GPU or for a
    preset with a fixed ``run.precision``. The times this project records for the CPU profiles were measured under
    bfloat16 autocast on a CPU that multiplies bf16 natively (AVX-512 BF16); without it ``run.precision=auto``
    trains in float32 and every notebook that trains takes about twice as long (docs/benchmarks.md, "Without
    native bf16")."""
    import torch

    from uniperceiver_v2.config import get_preset
    from uniperceiver_v2.engine.runtime import resolve_precision

    if get_preset(parameters["preset"]).run.precision != "auto":
        return None
    if parameters["device"] == "cuda" or (parameters["device"] == "auto" and torch.cuda.is_available()):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if resolve_precision("auto", torch.device("cpu")) == "bf16":
        return f"cpu: {capability} with native bf16: training runs under bfloat16 autocast (run.precision=auto)"
    return (f"cpu: {capability}, no native bf16 (AVX-512 BF16 or AMX): training runs in float32 "
            "(run.precision=auto) and takes about twice the times in README.md, which were measured with bf16 "
            "(docs/benchmarks.md, \"Without native bf16\")")


def prepare_data(profile: str, parameters: Mapping[str, Any] | None = None) -> None:
    """Generate the synthetic suite at ``data_root`` when it is missing or stale (real data, ``data_profile=None``,
    is the user's to lay out). ``parameters`` are the profile's with ``-p`` applied (default: the profile's)."""
    parameters = PROFILES[profile] if parameters is None else parameters
    root = project_path(parameters["data_root"])
    if parameters["data_profile"] is None:
        print(f"data: real data expected under {root} (data/README.md says how to lay it out)", flush=True)
        return
    from uniperceiver_v2.data.synthetic import ensure_synthetic

    tick = time.perf_counter()
    # The suite's seed is the profile's: -p seed changes what the notebooks draw, not the data they draw from.
    # Before any notebook starts, every core is free: one generator process per core (the bytes do not depend on it).
    manifest = ensure_synthetic(root, parameters["data_profile"], seed=PROFILES[profile]["seed"],
                                workers=min(os.cpu_count() or 1, 8))
    print(f"data: synthetic suite '{parameters['data_profile']}' at {root} ready ({len(manifest['files'])} files, "
          f"{time.perf_counter() - tick:.1f} s)", flush=True)
