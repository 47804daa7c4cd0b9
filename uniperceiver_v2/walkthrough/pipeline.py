"""The reproduction pipeline: run the numbered notebook series with papermill for one profile and collect every
notebook's results into one summary (the command line is ``python -m uniperceiver_v2.reproduce``).

A *profile* is one set of parameters for the whole series (:data:`PROFILES`): ``quick`` runs everything on the
small synthetic suite in minutes on a CPU, ``small`` trains the tiny model long enough to learn something,
``paper`` is the ResNet-50 setting of the paper on real data. Each notebook declares its defaults in the cell
tagged ``parameters`` and receives only the profile parameters it declares there, plus ``run_dir`` (where the
profile's checkpoints and logs live) and ``results_path`` (where it saves its results with
:func:`save_results`).

Layout of ``<out>/<profile>/``:
    notebooks/NN_name.ipynb   the executed copies, outputs included
    results/NN_name.json      what each notebook saved with :func:`save_results`
    state.json                per notebook: status, parameters, a hash of parameters + source, timing, error
    summary.md, summary.csv   every results file rendered as Markdown / CSV (tables under ``"tables"``)

A notebook whose parameters and source are unchanged since it last completed is skipped (``--force`` reruns).
The hash covers the notebook itself only: after changing a notebook whose outputs later notebooks read
(training in 06, evaluated in 07), rerun those with ``--force --only 07 ...``.

The notebooks run in the kernel ``uniperceiver-v2``, which must start *this* interpreter; it is registered in
``sys.prefix`` on first use (as ``python -m ipykernel install --sys-prefix --name uniperceiver-v2`` would).
"""

from __future__ import annotations

import ast
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

KERNEL_NAME = "uniperceiver-v2"
NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb$")
PARAMETERS_TAG = "parameters"

# One dict per profile. Relative paths are resolved against the directory the command runs in.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "profile": "quick",
        "data_profile": "quick",          # the synthetic suite's size; None = real data under data_root
        "data_root": "data/synthetic",
        "preset": "tiny",                 # uniperceiver_v2.config preset
        "iterations": 60,
        "backbone_iterations": 30,        # the backbone's pre-training before the run (notebook 06)
        "ablation_iterations": None,      # notebook 09: batches per ablation run (None: its quick default, 16)
        "nproc": 1,                       # processes (one per GPU with --gpus)
        "device": "auto",
        "seed": 0,
        "quick": True,                    # notebooks may shorten demonstrations (fewer samples, smaller grids)
    },
    "small": {
        "profile": "small",
        "data_profile": "small",
        "data_root": "data/synthetic_small",   # its own folder: switching profiles must not regenerate
        "preset": "tiny",
        "iterations": 2000,               # with the backbone's pre-training, about an hour on 2 CPU cores
        "backbone_iterations": 800,
        "ablation_iterations": 400,       # notebook 09: batches per ablation run (9 runs)
        "nproc": 1,
        "device": "auto",
        "seed": 0,
        "quick": False,
    },
    "paper": {
        "profile": "paper",
        "data_profile": None,
        "data_root": "data/real",
        "preset": "r50",
        "iterations": 150_000,            # Sec. 5.2: R50, 150k iterations on 16 GPUs
        "backbone_iterations": 0,         # bring ImageNet weights: image_encoder.backbone_weights in the config
        "ablation_iterations": 150_000,   # the paper's ablations train as long as its R50 model
        "nproc": 16,
        "device": "cuda",
        "seed": 0,
        "quick": False,
    },
}
PATH_PARAMETERS = ("data_root", "run_dir", "results_path")


# --------------------------------------------------------------------------------------------------------------
# Helpers notebooks call
# --------------------------------------------------------------------------------------------------------------
def project_path(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path; a relative one is taken relative to the project checkout.

    The checkout is the nearest directory, from the working directory upwards, that holds the
    ``uniperceiver_v2`` package; so ``data/synthetic`` means the same folder whether a notebook runs in
    ``notebooks/`` (JupyterLab) or the repository root. Outside a checkout, the working directory is used.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "uniperceiver_v2" / "__init__.py").is_file():
            return folder / path
    return cwd / path


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
    """The series ``NN_name.ipynb`` in ``notebook_dir``, sorted; ``only`` keeps the given numbers ("3" = "03")."""
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise FileNotFoundError(f"--notebooks: {notebook_dir} is not a directory")
    notebooks = sorted(p for p in notebook_dir.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    numbers = [NOTEBOOK_PATTERN.match(p.name).group(1) for p in notebooks]
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicated:
        raise ValueError(f"{notebook_dir}: several notebooks share the number(s) {duplicated}")
    if not notebooks:
        raise FileNotFoundError(f"{notebook_dir}: no notebooks named NN_name.ipynb")
    if only:
        wanted = []
        for number in only:
            if not str(number).isdigit():
                raise ValueError(f"--only: {number!r} is not a notebook number")
            wanted.append(str(number).zfill(2))
        unknown = sorted(set(wanted) - set(numbers))
        if unknown:
            raise ValueError(f"--only: no notebook numbered {unknown} in {notebook_dir}; available: {numbers}")
        notebooks = [p for p, n in zip(notebooks, numbers) if n in wanted]
    return notebooks


def profile_parameters(profile: str, run_dir: Path, gpus: int | None = None) -> dict[str, Any]:
    """The parameters a profile offers every notebook; paths absolute, ``--gpus`` applied."""
    if profile not in PROFILES:
        raise ValueError(f"--profile: unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    parameters = dict(PROFILES[profile])
    parameters["run_dir"] = str(run_dir)
    if gpus is not None:
        if gpus < 1:
            raise ValueError(f"--gpus: expected at least 1 GPU, got {gpus}")
        parameters["nproc"] = gpus
        parameters["device"] = "cuda"
    for key in PATH_PARAMETERS:
        if parameters.get(key) is not None:
            parameters[key] = str(Path(parameters[key]).expanduser().resolve())
    return parameters


def parameters_cell_index(notebook: Mapping[str, Any], source: str) -> int:
    """The index of the one cell tagged ``parameters``; a notebook without exactly one is refused."""
    tagged = [i for i, cell in enumerate(notebook["cells"])
              if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{source}: expected exactly one cell tagged '{PARAMETERS_TAG}', found {len(tagged)}")
    return tagged[0]


def declared_parameters(notebook_path: Path) -> list[str]:
    """The names assigned in the notebook's ``parameters`` cell, as papermill reads them.

    papermill's line parser drops, with only a log warning, every line holding more than one ``=`` (one in the
    comment is enough), and would then call the runner's value for it an unknown parameter; such a cell is
    refused.
    """
    import papermill

    notebook = nbformat.read(notebook_path, as_version=4)
    cell = notebook.cells[parameters_cell_index(notebook, str(notebook_path))]
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as exc:
        raise ValueError(f"{notebook_path}: the parameters cell is not valid Python: {exc}") from exc
    assigned = [target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)]
    parsed = list(papermill.inspect_notebook(str(notebook_path)))
    unread = [name for name in assigned if name not in parsed]
    if unread:
        raise ValueError(f"{notebook_path}: papermill cannot read the parameter(s) {unread} in the cell tagged "
                         f"'{PARAMETERS_TAG}'; write one `name = value  # comment` per line with no other '=' on it "
                         "(not even in the comment)")
    return parsed


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


def load_state(layout: Layout) -> dict[str, Any]:
    if not layout.state.is_file():
        return {"notebooks": {}}
    try:
        state = json.loads(layout.state.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{layout.state}: not valid JSON ({exc.msg}); delete it to rerun everything") from exc
    if not isinstance(state, dict) or not isinstance(state.get("notebooks"), dict):
        raise ValueError(f"{layout.state}: expected {{'notebooks': {{...}}}}; delete it to rerun everything")
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


def run_notebook(source: Path, executed: Path, parameters: dict[str, Any], parameters_index: int,
                 kernel_name: str) -> None:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the failing cell."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    executed.parent.mkdir(parents=True, exist_ok=True)
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


def reproduce(profile: str, notebook_dir: str | os.PathLike = "notebooks", out: str | os.PathLike = "runs",
              only: Sequence[str] | None = None, gpus: int | None = None, force: bool = False,
              command: str | None = None) -> int:
    """Run the series for one profile; returns the exit code (0 = every selected notebook completed)."""
    notebooks = find_notebooks(notebook_dir, only)
    layout = Layout(Path(out).expanduser().resolve() / profile)
    offered = profile_parameters(profile, layout.root, gpus)
    kernel_name = ensure_kernel()
    state = load_state(layout)
    started = time.perf_counter()
    failure: NotebookFailed | None = None

    # Check every parameters cell before running anything: a typo in notebook 09 should not wait for 06's training.
    plans = []
    for source in notebooks:
        notebook = nbformat.read(source, as_version=4)
        plans.append((source, notebook, parameters_cell_index(notebook, str(source)), declared_parameters(source)))

    for position, (source, notebook, parameters_index, declared) in enumerate(plans, start=1):
        name = source.stem
        results_path = layout.results / f"{name}.json" if "results_path" in declared else None
        parameters = {k: v for k, v in offered.items() if k in declared}
        if results_path is not None:
            parameters["results_path"] = str(results_path)
        digest = notebook_hash(notebook, parameters)
        executed = layout.notebooks / source.name
        prefix = f"[{position}/{len(notebooks)}] {name}"
        entry = state["notebooks"].get(name)
        if not force and _is_up_to_date(entry, digest, executed, results_path):
            print(f"{prefix}: unchanged since {entry.get('finished')}, skipped", flush=True)
            continue

        print(f"{prefix}: running ...", flush=True)
        if results_path is not None:
            results_path.unlink(missing_ok=True)   # never let a stale file pass as this run's results
        entry = {"hash": digest, "status": "running", "parameters": parameters, "source": str(source),
                 "executed": str(executed), "results": str(results_path) if results_path else None,
                 "started": _now()}
        state = update_state(layout, profile, name, entry)
        tick = time.perf_counter()
        try:
            run_notebook(source, executed, parameters, parameters_index, kernel_name)
            if results_path is not None and not results_path.is_file():
                raise NotebookFailed(name, f"{source.name}: finished but did not write its results to "
                                           f"{results_path} (call save_results(results_path, {{...}}) at the end)")
        except NotebookFailed as exc:
            failure = exc
            entry.update(status="failed", error=str(exc), cell_index=exc.cell_index, cell_line=exc.cell_line)
        else:
            entry.update(status="completed", error=None)
        entry.update(elapsed_s=round(time.perf_counter() - tick, 2), finished=_now())
        state = update_state(layout, profile, name, entry)
        if failure is not None:
            print(f"{prefix}: FAILED after {entry['elapsed_s']:.1f} s\n{failure}", flush=True)
            break
        print(f"{prefix}: done in {entry['elapsed_s']:.1f} s (elapsed {time.perf_counter() - started:.1f} s)",
              flush=True)

    all_notebooks = find_notebooks(notebook_dir)
    state = load_state(layout)   # with what other runs of this profile recorded meanwhile
    md_path, csv_path = write_summary(layout, profile, offered, state, [p.stem for p in all_notebooks], command)
    print(f"summary: {md_path} and {csv_path}", flush=True)
    if failure is not None:
        print(f"stopped at {failure.notebook}; the notebooks before it are kept (rerun skips them)", flush=True)
        return 1
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



def prepare_data(profile: str) -> None:
    """Generate the profile's synthetic suite when it is missing or stale (real data is the user's to lay out)."""
    settings = PROFILES[profile]
    root = project_path(settings["data_root"])
    if settings["data_profile"] is None:
        print(f"data: real data expected under {root} (data/README.md says how to lay it out)", flush=True)
        return
    from uniperceiver_v2.data.synthetic import ensure_synthetic

    tick = time.perf_counter()
    manifest = ensure_synthetic(root, settings["data_profile"], seed=settings["seed"])
    print(f"data: synthetic suite '{settings['data_profile']}' at {root} ready ({len(manifest['files'])} files, "
          f"{time.perf_counter() - tick:.1f} s)", flush=True)
