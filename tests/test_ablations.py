"""Ablation definitions (every run is a valid config that changes what its row says), the runner's caching
(finished runs are skipped, identical trainings shared, stale folders cleared, interrupted runs resumed), and the
table builder on fake results. One slow test trains and evaluates a real (tiny, two-iteration) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniperceiver_v2.config import ConfigError
from uniperceiver_v2.walkthrough import ablations as A
from uniperceiver_v2.walkthrough.paper_results import ABLATION_COLUMNS


def _settings(tmp_path: Path, **kwargs) -> A.AblationSettings:
    defaults = dict(run_dir=tmp_path / "runs", data_root=tmp_path / "data", data_profile="quick", iterations=16)
    return A.AblationSettings(**{**defaults, **kwargs})


ALL_RUNS = A.plan_runs(A.profile_plan("paper"))


def _run(name: str) -> A.AblationRun:
    return next(run for run in ALL_RUNS if run.name == name)


# ---------------------------------------------------------------------------------------------- definitions
def test_the_full_plan_covers_every_row_of_every_table():
    assert {run.table for run in ALL_RUNS} == {"tab2", "tab3", "tab4", "tab5"}
    for key, table in A.TABLES.items():
        assert {run.row for run in ALL_RUNS if run.table == key} == {row.name for row in table.rows}
        assert table.reference in {row.name for row in table.rows}
        assert table.paper_reference in table.paper.rows
        for row in table.rows:
            assert table.paper_rows[row.name] is None or table.paper_rows[row.name] in table.paper.rows
    names = [run.name for run in ALL_RUNS]
    assert len(names) == len(set(names))
    # Tab. 3's "Single Task" row is one run per task.
    single = [run for run in ALL_RUNS if run.row == "Single Task"]
    assert sorted(run.task for run in single) == sorted(A.ABLATION_TASKS)


@pytest.mark.parametrize("preset,scale", [("tiny", ()), ("tiny", A.QUICK_SCALE), ("r50", ())])
@pytest.mark.parametrize("nproc", [1, 2])
def test_every_run_is_a_valid_config(tmp_path, preset, scale, nproc):
    settings = _settings(tmp_path, preset=preset, scale=scale, nproc=nproc)
    for run in ALL_RUNS:
        cfg = A.build_config(run, settings)
        assert cfg.preset == preset
        # the paper's ablation setting: no instance segmentation, no language modelling
        assert not cfg.tasks.mlm.enabled and not cfg.tasks.detection.segmentation, run.name
        assert cfg.run.output_dir == str((settings.root / run.name).resolve())
        assert cfg.optim.warmup_iters <= cfg.run.iterations // 5
        assert set(cfg.tasks.names()) <= set(A.ABLATION_TASKS)


def test_rows_change_what_they_say(tmp_path):
    settings = _settings(tmp_path)
    cfg = {run.name: A.build_config(run, settings) for run in ALL_RUNS}
    full = cfg["tab2/global_regional"]
    assert full.image_encoder.use_global and full.image_encoder.use_regional
    assert full.decoder.moe.routing == "attribute" and full.optim.name == "mt_adamw"
    assert full.run.sampling == "unmixed" and full.tasks.retrieval.gather
    assert full.tasks.names() == ["classification", "detection", "captioning", "retrieval"]

    assert not cfg["tab2/global"].image_encoder.use_regional and not cfg["tab2/global"].tasks.detection.enabled
    assert not cfg["tab2/regional"].image_encoder.use_global and cfg["tab2/regional"].tasks.detection.enabled

    for run in ALL_RUNS:
        if run.table == "tab3":
            expected = "attribute" if run.row == "All Tasks w/ MoE" else "none"
            assert cfg[run.name].decoder.moe.routing == expected, run.name
        if run.row == "Single Task":
            assert cfg[run.name].tasks.names() == [run.task]
    assert "detection" not in cfg["tab3/w_o_detection"].tasks.names()
    assert len(cfg["tab3/w_o_captioning"].tasks.names()) == 3

    mixed, unmixed = cfg["tab4/mixed"], cfg["tab4/unmixed"]
    assert mixed.run.sampling == "mixed" and mixed.optim.name == "adamw" and not mixed.optim.normalize
    assert unmixed.run.sampling == "unmixed" and unmixed.optim.name == "adamw" and not unmixed.tasks.retrieval.gather
    assert cfg["tab4/unmixed_gather"].tasks.retrieval.gather and cfg["tab4/unmixed_gather"].optim.name == "adamw"
    assert cfg["tab4/unmixed_gather_mt_adamw"].optim.name == "mt_adamw"

    assert cfg["tab5/pre_trained_text_encoder"].text_encoder.pretrained
    assert not cfg["tab5/random_text_encoder"].text_encoder.pretrained


@pytest.mark.parametrize("nproc,grad_accum", [(1, 4), (2, 2), (3, 2), (4, 1), (8, 1)])
def test_tab4_has_a_slot_per_task_and_sees_as_many_batches(tmp_path, nproc, grad_accum):
    settings = _settings(tmp_path, nproc=nproc, iterations=40)
    tab4 = A.build_config(_run("tab4/mixed"), settings)
    tab2 = A.build_config(_run("tab2/global_regional"), settings)
    assert tab4.run.grad_accum == grad_accum and nproc * grad_accum >= len(A.ABLATION_TASKS)
    assert tab4.run.iterations == 40 // grad_accum
    assert tab2.run.grad_accum == 1 and tab2.run.iterations == 40


def test_bad_override_names_the_run_and_the_key(tmp_path):
    run = A.AblationRun("tab2", "typo", "tab2/typo", ("image_encoder.use_regionall=false",))
    with pytest.raises(ConfigError, match=r"tab2/typo: image_encoder\.use_regionall"):
        A.build_config(run, _settings(tmp_path))


def test_run_key_ignores_the_folder_and_gather_where_it_cannot_act(tmp_path):
    one, two = _settings(tmp_path, nproc=1), _settings(tmp_path, nproc=2)

    def key(name, settings):
        return A.run_key(A.build_config(_run(name), settings), settings.nproc)

    # tab2's full model and tab3's "All Tasks w/ MoE" are the same training in different folders
    assert key("tab2/global_regional", one) == key("tab3/all_tasks_w_moe", one)
    # gathering does nothing in one process: the two rows train identically there, not with two processes
    assert key("tab4/unmixed", one) == key("tab4/unmixed_gather", one)
    assert key("tab4/unmixed", two) != key("tab4/unmixed_gather", two)
    assert key("tab4/unmixed", one) != key("tab4/unmixed", two)
    assert key("tab4/mixed", one) != key("tab4/unmixed", one)


def test_profile_plan():
    quick = A.profile_plan("quick")
    assert set(quick) == {"tab2", "tab4"} and all(len(rows) >= 2 for rows in quick.values())
    assert A.profile_plan("paper") == {key: tuple(r.name for r in t.rows) for key, t in A.TABLES.items()}
    small = A.profile_plan("small")
    assert set(small) == set(A.TABLES) and small["tab3"] == ("All Tasks", "All Tasks w/ MoE")
    # Nine distinct trainings in one process: the full model is shared by Tab. 2 and 3 and "unmixed + gather"
    # = "unmixed" (nothing to gather); Tab. 4's rows run 4 batches per iteration, so its full model is its own, and
    # Tab. 5's rows train the text encoder that the preset freezes, so its pre-trained row is its own too.
    small_runs = A.plan_runs(small)
    settings = _settings(Path("/tmp"))
    assert len({A.run_key(A.build_config(run, settings), 1) for run in small_runs}) == 9
    assert A.profile_plan("quick", ["tab5"]) == {"tab5": ("pre-trained text encoder", "random text encoder")}
    with pytest.raises(KeyError, match="tab7"):
        A.profile_plan("quick", ["tab7"])
    with pytest.raises(KeyError, match="no row 'Glob'"):
        A.plan_runs({"tab2": ["Glob"]})


# ---------------------------------------------------------------------------------------------- the runner
class FakeTrainer:
    """Stands in for training + evaluation: writes what the trainer writes (metrics.jsonl, eval JSON, a checkpoint)
    and counts its calls."""

    def __init__(self, top1: float = 0.25):
        self.calls: list[str] = []
        self.top1 = top1

    def __call__(self, cfg, argv, threads=None):
        folder = Path(cfg.run.output_dir)
        self.calls.append(folder.name)
        (folder / "checkpoints" / "iter_1").mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "w") as handle:
            for task in cfg.tasks.names():
                handle.write(json.dumps({"kind": "train", "iteration": cfg.run.iterations, "task": task,
                                         "loss": 1.5, "time": 2.0}) + "\n")
        results = {task: {"top1": self.top1} if task == "classification" else {} for task in cfg.tasks.names()}
        eval_path = folder / f"eval_{cfg.data.val_split}_{cfg.run.iterations:07d}.json"
        eval_path.write_text(json.dumps({"iteration": cfg.run.iterations, "results": results}))


@pytest.fixture
def fake_trainer(monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(A, "_train_in_process", fake)
    return fake


def test_runner_trains_records_and_skips_finished_runs(tmp_path, fake_trainer):
    settings = _settings(tmp_path)
    run = _run("tab2/global")
    lines = []
    result = A.run_ablation(run, settings, keep_checkpoints=False, log=lines.append)
    folder = settings.root / "tab2" / "global"
    assert fake_trainer.calls == ["global"]
    assert result["metrics"]["classification"]["top1"] == 0.25 and result["shared_with"] is None
    assert result["final_losses"] == {"classification": 1.5, "captioning": 1.5, "retrieval": 1.5}
    assert result["train_seconds"] == 2.0 and result["iterations"] == 16
    assert A.load_result(folder) == result
    assert not (folder / "checkpoints").exists()      # keep_checkpoints=False

    again = A.run_ablation(run, settings, log=lines.append)
    assert fake_trainer.calls == ["global"] and again == result
    assert "finished earlier" in lines[-1]


def test_runner_shares_identical_trainings(tmp_path, fake_trainer, monkeypatch):
    settings = _settings(tmp_path)
    results = A.run_ablations([_run("tab4/unmixed"), _run("tab4/unmixed_gather")], settings, log=None)
    assert fake_trainer.calls == ["unmixed"]
    shared = results["tab4/unmixed_gather"]
    assert shared["shared_with"] == "tab4/unmixed" and shared["metrics"] == results["tab4/unmixed"]["metrics"]
    assert A.load_result(settings.root / "tab4" / "unmixed_gather")["shared_with"] == "tab4/unmixed"
    # With two processes gathering acts, so both rows train (torchrun is replaced by the fake as well).
    fake_trainer.calls.clear()
    two = _settings(tmp_path, nproc=2)
    monkeypatch.setattr(A, "_train_with_torchrun", lambda cfg, argv, nproc, threads: fake_trainer(cfg, argv))
    A.run_ablations([_run("tab4/unmixed"), _run("tab4/unmixed_gather")], two, log=None)
    assert fake_trainer.calls == ["unmixed", "unmixed_gather"]


def test_runner_clears_a_stale_folder_and_resumes_an_interrupted_one(tmp_path, fake_trainer):
    settings = _settings(tmp_path)
    run = _run("tab2/regional")
    A.run_ablation(run, settings, log=None)
    # Other settings (more iterations): the cached result is stale, the folder starts over.
    longer = _settings(tmp_path, iterations=32)
    lines = []
    result = A.run_ablation(run, longer, log=lines.append)
    assert fake_trainer.calls == ["regional", "regional"] and result["iterations"] == 32
    assert "another configuration" in lines[0]

    # An interrupted run (plan written, checkpoint there, no result) resumes in place.
    folder = longer.root / run.name
    (folder / A.RESULT_FILE).unlink()
    marker = folder / "checkpoints" / "iter_1" / "weights"
    marker.write_text("kept")
    lines.clear()
    A.run_ablation(run, longer, log=lines.append)
    assert lines[0].startswith("tab2/regional: resuming") and marker.read_text() == "kept"


def test_runner_refuses_a_run_without_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "_train_in_process", lambda cfg, argv, threads: None)
    with pytest.raises(RuntimeError, match="without writing its evaluation"):
        A.run_ablation(_run("tab2/global"), _settings(tmp_path), log=None)


# ---------------------------------------------------------------------------------------------- tables
def _fake_result(run: A.AblationRun, metrics: dict, shared_with: str | None = None) -> dict:
    return {"table": run.table, "row": run.row, "run": run.name, "task": run.task, "metrics": metrics,
            "shared_with": shared_with}


def test_table_rows_take_single_task_columns_from_their_own_run():
    full = {"detection": {"bbox_AP": 0.1}, "classification": {"top1": 0.2}, "retrieval": {"i2t_R@1": 0.3,
            "t2i_R@1": 0.4}, "captioning": {"BLEU-4": 0.05}}
    results = {}
    for run in ALL_RUNS:
        if run.table != "tab3":
            continue
        if run.task is not None:      # single task k: only k's metrics, each 0.5 + position of k
            offset = A.ABLATION_TASKS.index(run.task) / 100
            metrics = {run.task: {k: 0.5 + offset for k in ("bbox_AP", "top1", "i2t_R@1", "t2i_R@1", "BLEU-4")}}
        else:
            metrics = {task: value for task, value in full.items()
                       if f"tasks.{task}.enabled=false" not in run.overrides}
        results[run.name] = _fake_result(run, metrics)
    rows = A.table_rows("tab3", results)
    assert list(rows) == [row.name for row in A.TABLES["tab3"].rows]
    assert rows["Single Task"] == pytest.approx((50.0, 51.0, 52.0, 52.0, 53.0))
    assert rows["All Tasks"] == pytest.approx((10.0, 20.0, 30.0, 40.0, 5.0))
    assert rows["w/o Retrieval"][2:4] == (None, None) and rows["w/o Retrieval"][0] == pytest.approx(10.0)
    assert len(rows["w/o Detection"]) == len(ABLATION_COLUMNS) and rows["w/o Detection"][0] is None


def test_table_report_side_by_side_with_notes():
    runs = [run for run in ALL_RUNS if run.table == "tab4"]
    metrics = {"classification": {"top1": 0.1}}
    results = {run.name: _fake_result(run, metrics, "tab4/unmixed" if run.name == "tab4/unmixed_gather" else None)
               for run in runs}
    report = A.table_report("tab4", results, nproc=1)
    assert report.reference == "unmixed + gather + MT-AdamW"
    assert [row[0] for row in report.side_by_side["rows"]] == list(A.TABLES["tab4"].paper_rows)
    assert report.side_by_side["rows"][0][3:5] == [pytest.approx(10.0), 76.7]
    text = report.markdown
    assert "| mixed |" in text and "nothing to gather" in text and "trained identically to tab4/unmixed" in text
    assert "run.grad_accum=4" in text
    saved = report.as_results()
    assert saved["rows"]["mixed"][1] == pytest.approx(10.0) and saved["reference"] == report.reference
    # Only some rows run: no reference, the others are left out; a missing run is named.
    partial = A.table_report("tab4", {"tab4/mixed": results["tab4/mixed"]})
    assert list(partial.ours) == ["mixed"] and partial.reference is None
    with pytest.raises(KeyError, match="tab4/unmixed"):
        A.table_rows("tab4", {"tab4/mixed": results["tab4/mixed"]}, rows=["unmixed"])


def test_tab5_has_no_paper_counterpart_rows():
    runs = [_run("tab5/pre_trained_text_encoder"), _run("tab5/random_text_encoder")]
    results = {run.name: _fake_result(run, {"classification": {"top1": 0.3}}) for run in runs}
    report = A.table_report("tab5", results)
    labels = [row[0] for row in report.side_by_side["rows"]]
    assert labels[:2] == ["pre-trained text encoder", "random text encoder"]
    assert labels[2:] == [f"(paper) {label}" for label in A.TABLES["tab5"].paper.rows]


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_real_run_trains_evaluates_and_is_then_skipped(pytestconfig, tmp_path, monkeypatch):
    from uniperceiver_v2.data.synthetic import ensure_synthetic

    root = Path(pytestconfig.cache.mkdir("synthetic_quick"))
    ensure_synthetic(root, "quick")
    settings = A.AblationSettings(run_dir=tmp_path, data_root=root, data_profile="quick", iterations=2,
                                  scale=A.QUICK_SCALE, threads=1)
    run = _run("tab3/single_task/classification")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = A.run_ablation(run, settings, keep_checkpoints=False, log=None)
        assert torch.get_num_threads() == 2      # the run's thread count is restored afterwards
    finally:
        torch.set_num_threads(previous)
    top1 = result["metrics"]["classification"]["top1"]
    assert set(result["metrics"]) == {"classification"} and 0.0 <= top1 <= 1.0
    assert result["final_losses"]["classification"] > 0 and result["iterations"] == 2
    assert A.table_rows("tab3", {run.name: result}, rows=[]) == {}

    def fail(cfg, argv, threads):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(A, "_train_in_process", fail)
    assert A.run_ablation(run, settings, log=None) == result


def test_gap_directions_and_agreement():
    runs = [_run(name) for name in ("tab2/global", "tab2/regional", "tab2/global_regional")]
    # The paper's gaps to Global + Regional: Global - / -0.1 / -5.0 / -4.2 / -1.8,
    # Regional -1.7 / -1.0 / +1.0 / +0.4 / +0.6; the comments below give ours vs the paper's, in points.
    full = {"detection": {"bbox_AP": 0.20}, "classification": {"top1": 0.50}, "retrieval": {"i2t_R@1": 0.30,
            "t2i_R@1": 0.20}, "captioning": {"BLEU-4": 0.10}}
    global_only = {"classification": {"top1": 0.52}, "retrieval": {"i2t_R@1": 0.33, "t2i_R@1": 0.198},
                   "captioning": {"BLEU-4": 0.05}}
    regional = {"detection": {"bbox_AP": 0.10}, "classification": {"top1": 0.45}, "retrieval": {"i2t_R@1": 0.30,
                "t2i_R@1": 0.21}, "captioning": {"BLEU-4": 0.10}}
    results = {run.name: _fake_result(run, m) for run, m in zip(runs, (global_only, regional, full))}
    directions = A.gap_directions(A.table_report("tab2", results))
    verdict = {(row[1], row[2]): row[-1] for row in directions["rows"]}
    headers = [m.header for m in ABLATION_COLUMNS]
    assert verdict[("Global", headers[0])] is None                 # no detection without regional tokens
    assert verdict[("Global", headers[1])] == "paper flat"         # +2.0 vs -0.1
    assert verdict[("Global", headers[2])] == "opposite"           # +3.0 vs -5.0
    assert verdict[("Global", headers[3])] == "ours flat"          # -0.2 vs -4.2
    assert verdict[("Global", headers[4])] == "same"               # -5.0 vs -1.8
    assert verdict[("Regional", headers[0])] == "same"             # -10 vs -1.7
    assert verdict[("Regional", headers[3])] == "paper flat"       # +1.0 vs +0.4
    assert verdict[("Regional", headers[2])] == "ours flat"        # 0 vs +1.0
    counts = A.gap_agreement(directions)
    assert set(counts) == set(A.VERDICTS) and sum(counts.values()) == 9
    # without the reference row there is nothing to compare
    partial = A.table_report("tab2", {"tab2/global": results["tab2/global"]})
    assert A.gap_directions(partial)["rows"] == []


def test_saved_report_round_trip_full_model_and_runs_table(tmp_path, fake_trainer):
    settings = _settings(tmp_path)
    results = A.run_ablations([_run("tab4/mixed"), _run("tab4/unmixed_gather_mt_adamw")], settings, log=None)
    report = A.table_report("tab4", results, nproc=1)
    rebuilt = A.TableReport.from_results("tab4", json.loads(json.dumps(report.as_results())))
    assert rebuilt.ours == report.ours and rebuilt.side_by_side == report.side_by_side
    assert rebuilt.notes == report.notes and rebuilt.reference == report.reference
    assert report.figure().axes[0].get_title() == ABLATION_COLUMNS[0].header
    with pytest.raises(ValueError, match="columns"):
        A.TableReport.from_results("tab4", {**report.as_results(), "columns": ["a"]})

    assert A.full_model_result(results)["run"] == "tab4/unmixed_gather_mt_adamw"
    assert A.full_model_result({"tab4/mixed": results["tab4/mixed"]}) is None
    table = A.runs_table(results)
    assert [row[0] for row in table["rows"]] == ["tab4/mixed", "tab4/unmixed_gather_mt_adamw"]
    assert table["rows"][0][1] == "4 x 4" and "classification 1.5" in table["rows"][0][-1]
