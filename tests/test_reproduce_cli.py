"""The runner's command line refuses what it cannot run, before running anything, in one line with exit code 2;
``-p NAME VALUE`` overrides a profile's value in the notebooks that declare NAME; Ctrl-C is recorded.

No kernel starts here: the notebooks are tiny ones written to tmp_path, and a fake executor stands in for papermill
(it records the parameters it receives and saves them as the notebook's results).
"""

import contextlib
import io
import json
import math
from pathlib import Path

import nbformat
import pytest
from papermill.cli import _resolve_type as papermill_resolve_type

from uniperceiver_v2 import reproduce as reproduce_cli
from uniperceiver_v2.walkthrough import pipeline


def write_notebook(folder: Path, name: str, parameters: str) -> Path:
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("x = 1")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / name)
    return folder / name


@pytest.fixture
def series(tmp_path):
    """00 declares iterations and quick, 01 only seed and device; both save results."""
    folder = tmp_path / "notebooks"
    write_notebook(folder, "00_train.ipynb", "iterations = 1\nquick = False\nresults_path = None")
    write_notebook(folder, "01_plots.ipynb", 'seed = 0\ndevice = "auto"\nresults_path = None')
    return folder


@pytest.fixture
def executed(monkeypatch):
    """The parameters each notebook was run with, by notebook name, in the order they ran."""
    calls: dict[str, dict] = {}

    def fake_run_notebook(source, executed_path, parameters, parameters_index, kernel_name):
        calls[source.stem] = dict(parameters)
        executed_path.parent.mkdir(parents=True, exist_ok=True)
        executed_path.write_text(source.read_text())
        pipeline.save_results(parameters["results_path"], {"received": parameters})

    monkeypatch.setattr(pipeline, "run_notebook", fake_run_notebook)
    monkeypatch.setattr(pipeline, "ensure_kernel", lambda: "fake-kernel")
    monkeypatch.setattr(pipeline, "prepare_data", lambda profile, parameters: None)
    return calls


def run(notebooks: Path, out: Path, *extra: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return reproduce_cli.main(["--profile", "quick", "--notebooks", str(notebooks), "--out", str(out), *extra])


def refused(capsys, notebooks: Path, out: Path, *extra: str) -> str:
    """The one-line error of a run that must be refused with exit code 2."""
    assert run(notebooks, out, *extra) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m uniperceiver_v2.reproduce: error: ") and error.count("\n") == 1, error
    return error


# ---------------------------------------------------------------------------------------------------- refusals
def test_unknown_notebook_number_names_it_and_the_valid_ones(series, tmp_path, executed, capsys):
    error = refused(capsys, series, tmp_path / "runs", "--only", "00", "99")
    assert "no notebook numbered ['99']" in error and "available: ['00', '01']" in error
    assert executed == {}


@pytest.mark.parametrize("only, message", [
    (["3-1"], "the range 3-1 runs backwards; write 1-3"),
    (["5-9"], "no notebook numbered 5 to 9"),
    (["0x"], "'0x' is not a notebook number or range"),
    ([","], "no notebook number given"),
])
def test_malformed_only_is_refused(series, tmp_path, executed, capsys, only, message):
    assert message in refused(capsys, series, tmp_path / "runs", "--only", *only)


def test_only_takes_ranges_lists_and_repeated_numbers(tmp_path):
    for name in ("00_a.ipynb", "01_b.ipynb", "02_c.ipynb", "05_d.ipynb"):
        (tmp_path / name).write_text("{}")

    def selected(*only):
        return [p.name[:2] for p in pipeline.find_notebooks(tmp_path, only)]

    assert selected("1-3") == ["01", "02"]
    assert selected("0,5", "2") == ["00", "02", "05"]
    assert selected("1", "01", "0-1") == ["00", "01"]


@pytest.mark.parametrize("taken", ["out", "out/quick", "out/quick/results"])
def test_output_path_taken_by_a_file_is_named(series, tmp_path, executed, capsys, taken):
    path = tmp_path / taken
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    error = refused(capsys, series, tmp_path / "out")
    assert f"--out: {path} is a file" in error
    assert executed == {}


def test_data_root_that_is_a_file_is_refused_before_the_data_is_prepared(tmp_path, executed, capsys):
    folder = tmp_path / "notebooks"
    write_notebook(folder, "00_data.ipynb", 'data_root = "data"\nresults_path = None')
    (tmp_path / "data.txt").write_text("")
    error = refused(capsys, folder, tmp_path / "runs", "-p", "data_root", str(tmp_path / "data.txt"))
    assert f"data_root: {tmp_path / 'data.txt'} is a file, not a folder" in error


def test_unreadable_notebook_and_broken_state_are_named(series, tmp_path, executed, capsys):
    (series / "02_broken.ipynb").write_text("{ not json")
    assert "02_broken.ipynb: not a readable notebook" in refused(capsys, series, tmp_path / "runs")
    (series / "02_broken.ipynb").unlink()
    state = tmp_path / "runs" / "quick" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("[")
    assert f"{state}: not valid JSON" in refused(capsys, series, tmp_path / "runs")
    assert executed == {}


@pytest.mark.parametrize("arguments", [["--profile", "huge"], ["--gpus", "0"], ["-p", "iterations"]])
def test_malformed_options_are_argparse_errors(series, tmp_path, capsys, arguments):
    with pytest.raises(SystemExit) as exit_info:
        run(series, tmp_path / "runs", *arguments)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- -p NAME VALUE
def test_p_overrides_the_profile_in_the_notebooks_that_declare_it(series, tmp_path, executed):
    assert run(series, tmp_path / "runs", "-p", "iterations", "7", "-p", "device", "cpu") == 0
    assert executed["00_train"]["iterations"] == 7 and executed["00_train"]["quick"] is True
    assert "device" not in executed["00_train"]
    assert executed["01_plots"]["device"] == "cpu" and "iterations" not in executed["01_plots"]
    assert executed["01_plots"]["seed"] == pipeline.PROFILES["quick"]["seed"]

    # The override is part of the parameters, so a different value reruns 00 and only 00.
    executed.clear()
    assert run(series, tmp_path / "runs", "-p", "iterations", "8", "-p", "device", "cpu") == 0
    assert list(executed) == ["00_train"] and executed["00_train"]["iterations"] == 8
    summary = (tmp_path / "runs" / "quick" / "summary.md").read_text()
    assert "| iterations | 8 |" in summary and "-p iterations 8" in summary


def test_p_name_no_selected_notebook_declares_is_refused(series, tmp_path, executed, capsys):
    error = refused(capsys, series, tmp_path / "runs", "--only", "1", "-p", "iterations", "5")
    assert "-p iterations: no selected notebook declares this parameter; 00_train does (add it to --only)" in error
    error = refused(capsys, series, tmp_path / "runs", "-p", "iteration", "5")
    assert "-p iteration: no selected notebook declares this parameter; did you mean iterations" in error
    assert executed == {}


def test_p_value_of_another_type_than_the_default_names_the_notebook(tmp_path, executed, capsys):
    folder = tmp_path / "notebooks"
    write_notebook(folder, "00_any.ipynb", "iterations = None\nresults_path = None")
    write_notebook(folder, "01_count.ipynb", "iterations = 60\nresults_path = None")
    error = refused(capsys, folder, tmp_path / "runs", "-p", "iterations", "many")
    assert "-p iterations: 'many' (str) does not fit 01_count.ipynb, whose default is 60 (int)" in error
    assert executed == {}   # 00 accepts any value, but nothing runs before every notebook is checked


@pytest.mark.parametrize("name", ["run_dir", "results_path", "profile"])
def test_p_cannot_set_what_the_runner_sets(series, tmp_path, executed, capsys, name):
    assert f"-p {name}: set by the runner" in refused(capsys, series, tmp_path / "runs", "-p", name, "x")


def test_p_data_root_is_resolved_like_the_profiles_and_prepares_that_data(tmp_path, monkeypatch, executed):
    prepared = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda profile, parameters: prepared.append(dict(parameters)))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "notebooks"
    write_notebook(folder, "00_data.ipynb", 'data_root = "data/synthetic"\ndata_profile = "quick"\nresults_path = None')
    assert run(folder, tmp_path / "runs", "-p", "data_root", "mine") == 0
    assert executed["00_data"]["data_root"] == str(tmp_path / "mine")
    assert [p["data_root"] for p in prepared] == [str(tmp_path / "mine")]


def test_no_data_is_prepared_when_no_selected_notebook_reads_data(series, tmp_path, monkeypatch, executed):
    monkeypatch.setattr(pipeline, "prepare_data", lambda profile, parameters: pytest.fail("prepared data"))
    assert run(series, tmp_path / "runs") == 0


@pytest.mark.parametrize("text", ["True", "False", "None", "3", "-2", "06", "1e3", "0.5", "cpu", "data/x", "1/2"])
def test_p_values_are_read_as_papermill_reads_them(text):
    assert reproduce_cli.parse_parameter_value(text) == papermill_resolve_type(text)


def test_p_values_beyond_papermill_are_literals_or_yaml_constants():
    parse = reproduce_cli.parse_parameter_value
    assert parse("[1, 2]") == [1, 2] and parse('{"a": 1}') == {"a": 1} and parse("'06'") == "06"
    assert parse("true") is True and parse("false") is False and parse("null") is None
    assert parse("{") == "{" and parse("") == ""
    assert math.isinf(parse("inf"))


def test_check_parameters_refuses_a_parameter_the_cell_does_not_assign():
    defaults = pipeline.parameter_defaults(
        nbformat.v4.new_notebook(cells=[_tagged("steps = 3\nname: str = 'a'\nroot = Path('x')")]), "00_x.ipynb")
    assert defaults["steps"] == 3 and defaults["name"] == "a" and defaults["root"] is pipeline.NOT_A_LITERAL
    with pytest.raises(pipeline.RunSetupError, match=r"00_x.ipynb: parameter 'stpes' is not assigned in its cell"):
        pipeline.check_parameters({"steps": 1, "stpes": 2}, defaults, "00_x.ipynb")
    pipeline.check_parameters({"steps": 1, "root": 5}, defaults, "00_x.ipynb", overridden=["steps", "root"])
    with pytest.raises(pipeline.RunSetupError, match="""quote it: -p name "'5'\""""):
        pipeline.check_parameters({"name": 5}, defaults, "00_x.ipynb", overridden=["name"])


def _tagged(source: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


# ---------------------------------------------------------------------------------------------------- Ctrl-C
def test_interrupted_notebook_is_recorded_and_the_rerun_continues_there(series, tmp_path, monkeypatch, executed):
    fake = pipeline.run_notebook

    def interrupt_01(source, executed_path, parameters, parameters_index, kernel_name):
        if source.stem == "01_plots":
            raise KeyboardInterrupt
        fake(source, executed_path, parameters, parameters_index, kernel_name)

    monkeypatch.setattr(pipeline, "run_notebook", interrupt_01)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = reproduce_cli.main(["--notebooks", str(series), "--out", str(tmp_path / "runs")])
    assert code == 130
    assert "01_plots: INTERRUPTED after" in printed.getvalue()
    assert "the same command skips them and reruns 01_plots" in printed.getvalue()
    state = json.loads((tmp_path / "runs" / "quick" / "state.json").read_text())["notebooks"]
    assert state["00_train"]["status"] == "completed" and state["01_plots"]["status"] == "interrupted"
    assert "| 01_plots | interrupted |" in (tmp_path / "runs" / "quick" / "summary.md").read_text()

    monkeypatch.setattr(pipeline, "run_notebook", fake)
    executed.clear()
    assert run(series, tmp_path / "runs") == 0
    assert list(executed) == ["01_plots"]


def test_interrupt_outside_a_notebook_is_one_line(series, tmp_path, monkeypatch, executed, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "plan_run", interrupted)
    assert run(series, tmp_path / "runs") == 130
    assert capsys.readouterr().err.count("\n") == 1
