"""The papermill runner: parameters in, results out, skips what is done, stops at a failure with its cell named.

The run tests execute the tiny fixture notebooks in tests/fixtures/notebooks (a kernel start each, ~1-3 s):
00 declares profile/iterations/quick/results_path and saves a table, 01 saves numpy values, 02 fails in cell 3.
"""

import ast
import contextlib
import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from uniperceiver_v2 import reproduce as reproduce_cli
from uniperceiver_v2.walkthrough import pipeline as reproduce

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


def _run(notebooks: Path, out: Path, *extra: str) -> int:
    return reproduce_cli.main(["--profile", "quick", "--notebooks", str(notebooks), "--out", str(out), *extra])


def _injected_names(executed: Path) -> set[str]:
    notebook = nbformat.read(executed, as_version=4)
    cells = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return {node.targets[0].id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One run over all three fixtures; it stops at 02 with exit code 1."""
    root = tmp_path_factory.mktemp("reproduce")
    notebooks = root / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    (notebooks / "README.md").write_text("# the series\n")
    out = root / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _run(notebooks, out)
    return {"notebooks": notebooks, "out": out, "profile_dir": out / "quick", "code": code,
            "printed": printed.getvalue()}


def test_failure_names_notebook_cell_and_error_and_exits_nonzero(first_run):
    assert first_run["code"] == 1
    printed = first_run["printed"]
    assert ("02_fails_on_purpose.ipynb: cell 3 (`# this cell fails on purpose`) raised ValueError: "
            "failing on purpose, x=1") in printed
    state = json.loads((first_run["profile_dir"] / "state.json").read_text())["notebooks"]
    assert state["02_fails_on_purpose"]["status"] == "failed"
    assert state["02_fails_on_purpose"]["cell_index"] == 3
    # The executed copy keeps the traceback for whoever investigates.
    executed = nbformat.read(first_run["profile_dir"] / "notebooks" / "02_fails_on_purpose.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["ValueError"]


def test_completed_notebooks_are_kept_with_their_results(first_run):
    # the executed copies keep the series' index beside them: every notebook's footer links to README.md
    assert (first_run["profile_dir"] / "notebooks" / "README.md").read_text() == "# the series\n"
    results = first_run["profile_dir"] / "results"
    assert sorted(p.name for p in results.glob("*.json")) == ["00_parameters.json", "01_numpy_results.json"]
    state = json.loads((first_run["profile_dir"] / "state.json").read_text())["notebooks"]
    assert state["00_parameters"]["status"] == state["01_numpy_results"]["status"] == "completed"


def test_profile_parameters_are_injected_and_filtered_to_the_declared_ones(first_run):
    quick = reproduce.PROFILES["quick"]
    saved = json.loads((first_run["profile_dir"] / "results" / "00_parameters.json").read_text())
    assert saved["profile"] == "quick" and saved["quick"] is quick["quick"]
    assert saved["iterations"] == quick["iterations"] and saved["total"] == 2 * quick["iterations"]
    executed = first_run["profile_dir"] / "notebooks"
    assert _injected_names(executed / "00_parameters.ipynb") == {"profile", "iterations", "quick", "results_path"}
    assert _injected_names(executed / "01_numpy_results.ipynb") == {"seed", "results_path"}
    numpy_results = json.loads((first_run["profile_dir"] / "results" / "01_numpy_results.json").read_text())
    assert numpy_results == {"value": 0.5 + quick["seed"], "counts": {"images": 3}}


def test_summary_renders_scalars_and_tables(first_run):
    md = (first_run["profile_dir"] / "summary.md").read_text()
    assert "| 02_fails_on_purpose | failed |" in md
    assert "| task | score |" in md and "| b\\|c | 2 |" in md
    assert "| counts.images | 3 |" in md
    with open(first_run["profile_dir"] / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"notebook": "00_parameters", "table": "scores", "row": "1", "column": "task", "value": "b|c"} in rows
    assert {"notebook": "01_numpy_results", "table": "", "row": "", "column": "counts.images", "value": "3"} in rows


def test_rerun_skips_unchanged_and_reruns_on_force_or_new_parameters(first_run, capsys, monkeypatch):
    executed = first_run["profile_dir"] / "notebooks"
    state_file = first_run["profile_dir"] / "state.json"
    mtimes = {p.name: p.stat().st_mtime_ns for p in executed.glob("0[01]_*.ipynb")}
    state_before = json.loads(state_file.read_text())["notebooks"]

    assert _run(first_run["notebooks"], first_run["out"], "--only", "0", "01") == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert {p.name: p.stat().st_mtime_ns for p in executed.glob("0[01]_*.ipynb")} == mtimes
    state_after = json.loads(state_file.read_text())["notebooks"]
    for name in ("00_parameters", "01_numpy_results"):
        assert state_after[name]["finished"] == state_before[name]["finished"]

    assert _run(first_run["notebooks"], first_run["out"], "--only", "00", "--force") == 0
    assert "00_parameters: done" in capsys.readouterr().out
    assert (executed / "00_parameters.ipynb").stat().st_mtime_ns > mtimes["00_parameters.ipynb"]

    # A parameter only 00 declares changes: 00 reruns, 01 (which does not declare it) is still skipped.
    monkeypatch.setitem(reproduce.PROFILES, "quick", {**reproduce.PROFILES["quick"], "iterations": 7})
    forced = (executed / "00_parameters.ipynb").stat().st_mtime_ns
    assert _run(first_run["notebooks"], first_run["out"], "--only", "00", "01") == 0
    printed = capsys.readouterr().out
    assert "00_parameters: done" in printed and "01_numpy_results: unchanged" in printed
    assert (executed / "00_parameters.ipynb").stat().st_mtime_ns > forced
    assert (executed / "01_numpy_results.ipynb").stat().st_mtime_ns == mtimes["01_numpy_results.ipynb"]
    saved = json.loads((first_run["profile_dir"] / "results" / "00_parameters.json").read_text())
    assert saved["total"] == 14


def test_overlapping_runs_of_a_profile_keep_each_others_records(tmp_path, monkeypatch):
    """``--only 01`` while another run of the profile finishes notebook 09: state.json ends with both entries."""
    notebooks = tmp_path / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    out = tmp_path / "runs"
    layout = reproduce.Layout(out / "quick")
    reproduce.update_state(layout, "quick", "00_parameters", {"status": "completed", "finished": "earlier"})

    def run_while_another_finishes(source, executed, parameters, parameters_index, kernel_name):
        reproduce.update_state(layout, "quick", "09_elsewhere", {"status": "completed", "finished": "meanwhile"})
        executed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, executed)
        reproduce.save_results(parameters["results_path"], {"value": 1})

    monkeypatch.setattr(reproduce, "run_notebook", run_while_another_finishes)
    with contextlib.redirect_stdout(io.StringIO()):
        assert _run(notebooks, out, "--only", "01") == 0
    state = json.loads(layout.state.read_text())
    assert state["profile"] == "quick"
    assert set(state["notebooks"]) == {"00_parameters", "01_numpy_results", "09_elsewhere"}
    assert state["notebooks"]["01_numpy_results"]["status"] == "completed"
    assert state["notebooks"]["09_elsewhere"]["finished"] == "meanwhile"
    assert not list(layout.root.glob("*.partial"))


# ---------------------------------------------------------------------------------------------------------------
# pieces that need no kernel
# ---------------------------------------------------------------------------------------------------------------
def test_find_notebooks_sorts_and_selects_by_number(tmp_path):
    for name in ("01_b.ipynb", "00_a.ipynb", "10_c.ipynb", "notes.ipynb", "3_bad.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in reproduce.find_notebooks(tmp_path)] == ["00_a.ipynb", "01_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in reproduce.find_notebooks(tmp_path, ["1", "10"])] == ["01_b.ipynb", "10_c.ipynb"]
    with pytest.raises(ValueError, match=r"no notebook numbered \['07'\]"):
        reproduce.find_notebooks(tmp_path, ["7"])
    (tmp_path / "01_again.ipynb").write_text("{}")
    with pytest.raises(ValueError, match="share the number"):
        reproduce.find_notebooks(tmp_path)


def test_notebook_hash_follows_source_and_parameters_not_outputs():
    notebook = nbformat.read(FIXTURES / "00_parameters.ipynb", as_version=4)
    digest = reproduce.notebook_hash(notebook, {"iterations": 1})
    executed = nbformat.from_dict(json.loads(json.dumps(notebook)))
    executed.cells[2].outputs = [nbformat.v4.new_output("stream", text="2\n")]
    executed.cells[2].execution_count = 1
    assert reproduce.notebook_hash(executed, {"iterations": 1}) == digest
    assert reproduce.notebook_hash(notebook, {"iterations": 2}) != digest
    executed.cells[2].source = "total = 3 * iterations"
    assert reproduce.notebook_hash(executed, {"iterations": 1}) != digest


def test_save_results_converts_validates_and_skips_without_a_path(tmp_path):
    assert reproduce.save_results(None, {"a": 1}) is None
    path = reproduce.save_results(tmp_path / "r" / "00_x.json",
                                  {"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": (1, "x"), "p": tmp_path})
    assert reproduce.load_results(path) == {"a": 0.5, "b": [1, 2], "c": [1, "x"], "p": str(tmp_path)}
    assert not list((tmp_path / "r").glob("*.partial"))
    with pytest.raises(ValueError, match="row 0 must be a list of 2 cells"):
        reproduce.save_results(tmp_path / "t.json", {"tables": {"t": {"columns": ["a", "b"], "rows": [[1]]}}})
    with pytest.raises(ValueError, match=r"results\.loss: nan is not a finite number"):
        reproduce.save_results(tmp_path / "n.json", {"loss": float("nan")})
    with pytest.raises(TypeError, match="results.model"):
        reproduce.save_results(tmp_path / "o.json", {"model": object()})


def test_profile_parameters_resolve_paths_and_apply_gpus(tmp_path):
    parameters = reproduce.profile_parameters("paper", tmp_path / "runs" / "paper", gpus=8)
    assert parameters["nproc"] == 8 and parameters["device"] == "cuda"
    assert Path(parameters["data_root"]).is_absolute() and parameters["preset"] == "r50"
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        reproduce.profile_parameters("huge", tmp_path)
    keys = [set(parameters) for parameters in reproduce.PROFILES.values()]
    assert set(reproduce.PROFILES) >= {"smoke", "quick", "small", "paper"} and all(k == keys[0] for k in keys)


def test_paths_inside_the_checkout_reach_notebooks_relative_and_resolve_back_to_the_same_folder(tmp_path,
                                                                                                   monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "uniperceiver_v2").mkdir(parents=True)
    (checkout / "uniperceiver_v2" / "__init__.py").write_text("")
    (checkout / "notebooks").mkdir()
    elsewhere = tmp_path / "elsewhere" / "runs"
    parameters = {"run_dir": str(checkout / "runs" / "quick"), "data_root": str(checkout / "data" / "synthetic"),
                  "ablation_data_root": str(elsewhere), "results_path": None, "iterations": 7}
    given = reproduce.checkout_relative(parameters, checkout / "notebooks")
    assert given == {"run_dir": "runs/quick", "data_root": "data/synthetic", "ablation_data_root": str(elsewhere),
                     "results_path": None, "iterations": 7}
    assert parameters["run_dir"] == str(checkout / "runs" / "quick")      # the runner's own copy is untouched
    monkeypatch.chdir(checkout / "notebooks")                              # where papermill starts the kernel
    for key in ("run_dir", "data_root", "ablation_data_root"):
        assert reproduce.project_path(given[key]) == Path(parameters[key])
    # outside a checkout nothing can resolve a relative path the same way: every path stays as it was
    (tmp_path / "loose").mkdir()
    assert reproduce.checkout_relative(parameters, tmp_path / "loose") == parameters


def test_kernel_starts_this_interpreter_or_is_refused(monkeypatch):
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    name = reproduce.ensure_kernel()
    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] in ("python", sys.executable)

    foreign = KernelSpec(argv=["/elsewhere/venv/bin/python", "-m", "ipykernel_launcher"], resource_dir="/x")
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", lambda self, kernel_name: foreign)
    with pytest.raises(RuntimeError, match="starts /elsewhere/venv/bin/python, not this interpreter"):
        reproduce.ensure_kernel()


def test_notebook_without_a_parameters_cell_is_refused(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="exactly one cell tagged 'parameters', found 0"):
        reproduce.parameters_cell_index(notebook, "99_x.ipynb")


def test_parameters_papermill_cannot_read_are_refused(tmp_path):
    cell = nbformat.v4.new_code_cell('steps = 3  # iterations, 0 = none\nresults_path = None')
    cell.metadata["tags"] = ["parameters"]
    path = tmp_path / "00_x.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    with pytest.raises(ValueError, match=r"papermill cannot read the parameter\(s\) \['steps'\]"):
        reproduce.declared_parameters(path)


def test_p_overrides_reach_the_notebook_through_papermill(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    with contextlib.redirect_stdout(io.StringIO()):
        assert _run(notebooks, tmp_path / "runs", "--only", "00", "-p", "iterations", "5", "-p", "quick", "false") == 0
    saved = json.loads((tmp_path / "runs" / "quick" / "results" / "00_parameters.json").read_text())
    assert saved["iterations"] == 5 and saved["total"] == 10 and saved["quick"] is False


def test_kernel_threads_sets_omp_num_threads_only_while_a_kernel_starts_and_never_overrides_it(monkeypatch):
    kernel_threads = reproduce.kernel_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with kernel_threads(1):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ
    with kernel_threads(None):
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "4")         # the user's choice wins
    with kernel_threads(1):
        assert os.environ["OMP_NUM_THREADS"] == "4"
    assert os.environ["OMP_NUM_THREADS"] == "4"
    assert {p["threads"] for name, p in reproduce.PROFILES.items() if name != "paper"} == {1}


# ---------------------------------------------------------------------------------------------------------------
# --jobs: notebooks at once, each in its own process, after the notebooks they read from
# ---------------------------------------------------------------------------------------------------------------
def test_execution_order_runs_each_notebook_after_what_it_reads_and_otherwise_in_series_order():
    names = ["00_a", "01_b", "02_pools", "04_gates", "05_e", "06_train", "07_eval", "08_novel", "09_abl", "10_all"]
    order = reproduce.execution_order(names)
    assert order == ["00_a", "01_b", "05_e", "06_train", "02_pools", "04_gates", "07_eval", "08_novel", "09_abl",
                     "10_all"]
    assert reproduce.prerequisites("07_eval", names) == ["06_train"]
    assert reproduce.prerequisites("10_all", names) == names[:-1]
    assert reproduce.prerequisites("02_pools", ["02_pools", "03_x"]) == []     # 06 not selected: no wait
    assert reproduce.execution_order(["00_a", "01_b", "02_c"]) == ["00_a", "01_b", "02_c"]


def test_worker_command_passes_the_profile_output_and_only_the_overrides_its_notebook_declares(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    plan = reproduce.plan_run("quick", notebooks, tmp_path / "runs", ["00", "01"], None, {"iterations": 7})
    commands = {run.source.stem: reproduce.worker_command(plan, run, True, notebooks) for run in plan.notebooks}
    declares = {run.source.stem: "iterations" in run.parameters for run in plan.notebooks}
    assert any(declares.values())
    for name, command in commands.items():
        assert command[1:3] == ["-m", "uniperceiver_v2.reproduce"]
        assert command[command.index("--only") + 1] == name[:2]
        assert command[command.index("--out") + 1] == str((tmp_path / "runs").resolve())
        assert "--no-summary" in command and command[-1] == "--force"
        passed = command[command.index("-p"):command.index("-p") + 3] if "-p" in command else []
        assert passed == (["-p", "iterations", "7"] if declares[name] else [])


def test_jobs_runs_notebooks_in_worker_processes_and_records_them_like_one_runner(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    out = tmp_path / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _run(notebooks, out, "--jobs", "2")
    assert code == 1                                    # 02 fails on purpose; 00 and 01 complete beside it
    profile = out / "quick"
    state = json.loads((profile / "state.json").read_text())["notebooks"]
    assert state["00_parameters"]["status"] == state["01_numpy_results"]["status"] == "completed"
    assert state["02_fails_on_purpose"]["status"] == "failed" and state["02_fails_on_purpose"]["cell_index"] == 3
    assert "failing on purpose" in (profile / "logs" / "02_fails_on_purpose.log").read_text()
    text = printed.getvalue()
    assert "up to 2 at once" in text and "02_fails_on_purpose: FAILED" in text and "failing on purpose" in text
    assert json.loads((profile / "results" / "00_parameters.json").read_text())["profile"] == "quick"
    summary = (profile / "summary.md").read_text()
    assert "00_parameters" in summary and "01_numpy_results" in summary
    # a second run with --jobs skips what completed and retries only the failed notebook
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _run(notebooks, out, "--jobs", "2", "--only", "00", "01") == 0
    assert printed.getvalue().count("skipped") == 2


def test_the_notebooks_readme_states_each_profiles_training_length():
    readme = (Path(__file__).parents[1] / "notebooks" / "README.md").read_text()
    rows = {cells[1].strip(" `"): cells[4].strip() for cells in (line.split("|") for line in readme.splitlines())
            if len(cells) > 7 and cells[1].strip(" `") in reproduce.PROFILES}
    for name, parameters in reproduce.PROFILES.items():
        if parameters["time_budget_minutes"]:          # "what 50 minutes of its loop allow, at most 20000"
            assert f"{parameters['time_budget_minutes']} minutes" in rows[name], name
            assert f"at most {parameters['iterations']}" in rows[name], name
        else:
            assert int(rows[name].replace(" ", "")) == parameters["iterations"], name


def test_the_parallel_runner_starts_the_notebook_others_wait_for_first():
    names = ["00_a", "01_b", "02_pools", "03_c", "04_gates", "06_train", "07_eval", "08_novel", "09_abl", "10_all"]
    assert reproduce.dependents("06_train", names) == 5                 # 02, 04, 07, 08 and 10
    assert reproduce.dependents("09_abl", names) == 1 and reproduce.dependents("10_all", names) == 0
    order = reproduce.start_order(names)
    assert order[0] == "06_train" and order[-1] == "10_all"
    assert order.index("02_pools") > order.index("06_train")
    # of the notebooks that wait for 06, the longer first: 07 (evaluation) before the short 02, 04 and 08; the
    # independent ones in series order
    assert order.index("07_eval") < min(order.index(n) for n in ("02_pools", "04_gates", "08_novel"))
    assert order.index("00_a") < order.index("01_b") < order.index("03_c") < order.index("09_abl")


def test_a_profile_can_give_one_notebook_its_own_values(tmp_path):
    """The quick profile trains notebook 06 on two processes with split batches; 09 keeps the common nproc, and
    -p or --gpus win over the notebook's own values."""
    notebooks = Path(__file__).parents[1] / "notebooks"
    plan = reproduce.plan_run("quick", notebooks, tmp_path / "runs", ["06", "09"])
    by_number = {run.source.stem[:2]: run.parameters for run in plan.notebooks}
    own = reproduce.PROFILES["quick"]["notebook_parameters"]["06"]
    assert by_number["06"]["nproc"] == own["nproc"] == 2 and by_number["06"]["split_batches"] is True
    assert by_number["09"]["nproc"] == reproduce.PROFILES["quick"]["nproc"] == 1
    overridden = reproduce.plan_run("quick", notebooks, tmp_path / "runs", ["06"], overrides={"nproc": 1})
    assert overridden.notebooks[0].parameters["nproc"] == 1 and overridden.notebooks[0].parameters["split_batches"]
    with_gpus = reproduce.plan_run("quick", notebooks, tmp_path / "runs", ["06"], gpus=4)
    assert with_gpus.notebooks[0].parameters["nproc"] == 4
    # the small profile runs one notebook at a time, so its 06 trains on both cores as well; 09 keeps one process
    small = reproduce.plan_run("small", notebooks, tmp_path / "runs", ["06", "09"])
    small_by_number = {run.source.stem[:2]: run.parameters for run in small.notebooks}
    assert small_by_number["06"]["nproc"] == 2 and small_by_number["06"]["split_batches"] is True
    assert small_by_number["09"]["nproc"] == 1
    # the small profile's recipe reaches both the generalist's run and every ablation run; quick keeps the preset's
    late = ["tasks.classification.start_iteration=1000"]
    assert small_by_number["06"]["train_overrides"] == [*late, "tasks.classification.region_name_weight=0.5",
                                                        "data.zoom_out_prob=0.5", "data.zoom_out_min_scale=0.25",
                                                        "tasks.mlm.sampling_weight=0.13",
                                                        "tasks.retrieval.sampling_weight=0.17"]
    assert small_by_number["09"]["train_overrides"] == late      # the ablations leave the region-naming term out
    assert by_number["06"]["train_overrides"] == by_number["09"]["train_overrides"] == []


def test_a_notebook_value_the_notebook_does_not_declare_is_refused(monkeypatch):
    monkeypatch.setitem(reproduce.PROFILES, "quick", {**reproduce.PROFILES["quick"],
                                                      "notebook_parameters": {"06": {"nproc": 2, "npoc": 3}}})
    with pytest.raises(reproduce.RunSetupError, match=r"notebook_parameters for 06_x name \['npoc'\]"):
        reproduce.notebook_parameters("quick", "06_x", {"nproc": 1}, {})
    assert reproduce.notebook_parameters("quick", "07_y", {"nproc": 1}, {}) == {}


@pytest.mark.parametrize("native", [True, False])
def test_precision_note_says_what_the_cpu_trains_in(monkeypatch, native):
    """The runner's line on precision follows ``native_bf16``: bf16 autocast where the CPU multiplies bf16
    natively, float32 (and about twice the recorded times) elsewhere; nothing on a GPU or for a fixed precision."""
    from uniperceiver_v2.engine import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    note = reproduce.precision_note(reproduce.PROFILES["quick"])
    assert note.startswith("cpu: ")
    assert ("bfloat16 autocast" in note) == native
    assert ("float32" in note and "twice" in note) == (not native)
    assert reproduce.precision_note({**reproduce.PROFILES["quick"], "device": "cuda"}) is None
    assert reproduce.precision_note(reproduce.PROFILES["paper"]) is None      # r50: run.precision is not "auto"
