"""Ablation definitions (every run is a valid config that changes what its row says; Tab. 4's runs have at least
two processes, the other tables' the study's, whose keys did not change), the runner's caching
(finished runs are skipped, identical trainings shared, stale folders cleared, interrupted runs resumed), the
parallel scheduler on fake trainings (never more processes than slots, a two-process run counted as two, shared
keys trained once, failures named),
the noise band and the three-way marks on hand-made results, the table builder on fake results, and the task
interference of the trained runs. Three slow tests train real (tiny) runs: one in this process, one as a subprocess
that is stopped midway and resumed, one whose interference matrix is checked against a float64 slow path."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from uniperceiver_v2.config import ConfigError
from uniperceiver_v2.walkthrough import ablations as A
from uniperceiver_v2.walkthrough.paper_results import ABLATION_COLUMNS


def _settings(tmp_path: Path, **kwargs) -> A.AblationSettings:
    """Settings of a test study; ``parallel=1`` (runs in this process, where the fake trainer replaces training)
    unless a test asks for more."""
    defaults = dict(run_dir=tmp_path / "runs", data_root=tmp_path / "data", data_profile="quick", iterations=16,
                    parallel=1)
    return A.AblationSettings(**{**defaults, **kwargs})


ALL_RUNS = A.plan_runs(A.profile_plan("paper"))


def _run(name: str) -> A.AblationRun:
    return next(run for run in ALL_RUNS if run.name == name)


def _key(run: A.AblationRun, settings: A.AblationSettings) -> str:
    """The key the runner gives ``run``: its config and its own process count."""
    return A.run_key(A.build_config(run, settings), A.run_nproc(run, settings))


def _old_key(run: A.AblationRun, settings: A.AblationSettings) -> str:
    """The key the runner gave ``run`` before tables had a minimum process count: every run at ``settings.nproc``
    (its config's ``run.grad_accum`` included)."""
    return A.run_key(A.build_config(dataclasses.replace(run, min_nproc=1), settings), settings.nproc)


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

    tab5 = {name.split("/")[1]: c for name, c in cfg.items() if name.startswith("tab5/")}
    assert tab5["pre_trained_text_encoder"].text_encoder.pretrained
    assert not tab5["random_text_encoder"].text_encoder.pretrained
    # every Tab. 5 row trains its text encoder (the preset freezes it), so that only the initialisation differs
    assert all(not c.text_encoder.freeze for c in tab5.values())
    imagenet, random_image = tab5["imagenet_image_backbone"].image_encoder, tab5["random_image_backbone"].image_encoder
    assert imagenet.backbone == random_image.backbone == "efficientnet_lite0"
    assert imagenet.backbone_weights == "imagenet" and random_image.backbone_weights is None
    assert tab5["pre_trained_text_encoder"].image_encoder.backbone == full.image_encoder.backbone


def test_tab5_random_backbone_drops_the_weights_every_run_starts_from(tmp_path):
    # notebook 09 gives every run the backbone notebook 06 pre-trained; the image rows replace it
    settings = _settings(tmp_path, scale=("image_encoder.backbone_weights=/x/backbone.safetensors",))
    cfg = {name: A.build_config(_run(name), settings).image_encoder
           for name in ("tab5/pre_trained_text_encoder", "tab5/imagenet_image_backbone", "tab5/random_image_backbone")}
    assert cfg["tab5/pre_trained_text_encoder"].backbone_weights == "/x/backbone.safetensors"
    assert cfg["tab5/imagenet_image_backbone"].backbone_weights == "imagenet"
    assert cfg["tab5/random_image_backbone"].backbone_weights is None


# nproc 1: Tab. 4's runs have two processes all the same (its min_nproc), hence two batches per iteration
@pytest.mark.parametrize("nproc,processes,grad_accum", [(1, 2, 2), (2, 2, 2), (3, 3, 2), (4, 4, 1), (8, 8, 1)])
def test_tab4_has_a_slot_per_task_and_sees_as_many_batches(tmp_path, nproc, processes, grad_accum):
    settings = _settings(tmp_path, nproc=nproc, iterations=40)
    for name in ("tab4/mixed", "tab4/unmixed", "tab4/unmixed_gather", "tab4/unmixed_gather_mt_adamw"):
        assert A.run_nproc(_run(name), settings) == processes
        tab4 = A.build_config(_run(name), settings)
        assert tab4.run.grad_accum == grad_accum and processes * grad_accum >= len(A.ABLATION_TASKS)
        assert tab4.run.iterations == 40 // grad_accum
    tab2 = A.build_config(_run("tab2/global_regional"), settings)
    assert tab2.run.grad_accum == 1 and tab2.run.iterations == 40


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_runs_have_the_studys_processes_or_their_tables_minimum(tmp_path, nproc):
    assert {key: table.min_nproc for key, table in A.TABLES.items()} == {"tab2": 1, "tab3": 1, "tab4": 2, "tab5": 1}
    settings = _settings(tmp_path, nproc=nproc, noise_seeds=(0, 1))
    runs = A.plan_runs(A.profile_plan("paper"), settings)       # every row, and the baseline's noise run
    assert {run.table for run in runs} == set(A.TABLES)
    for run in runs:
        assert A.run_nproc(run, settings) == (max(nproc, 2) if run.table == "tab4" else nproc), run.name
    # the rows say so, and why (gathering needs more than one process)
    assert all("2 processes" in row.note for row in A.TABLES["tab4"].rows)
    assert "needs more than one" in A.TABLES["tab4"].row("unmixed + gather").note
    assert A.run_nproc(A.AblationRun("tab2", "x", "tab2/x", ()), settings) == nproc    # default: no minimum
    with pytest.raises(ValueError, match="min_nproc"):
        dataclasses.replace(A.TABLES["tab4"], min_nproc=0)


def test_bad_override_names_the_run_and_the_key(tmp_path):
    run = A.AblationRun("tab2", "typo", "tab2/typo", ("image_encoder.use_regionall=false",))
    with pytest.raises(ConfigError, match=r"tab2/typo: image_encoder\.use_regionall"):
        A.build_config(run, _settings(tmp_path))


def test_run_key_ignores_the_folder_and_gather_where_it_cannot_act(tmp_path):
    one, two = _settings(tmp_path, nproc=1), _settings(tmp_path, nproc=2)

    def key(name, settings):
        return _key(_run(name), settings)

    # tab2's full model and tab3's "All Tasks w/ MoE" are the same training in different folders
    assert key("tab2/global_regional", one) == key("tab3/all_tasks_w_moe", one)
    # gathering does nothing in one process: a config keyed for one process ignores it, for two it does not
    unmixed, gather = (A.build_config(_run(name), one) for name in ("tab4/unmixed", "tab4/unmixed_gather"))
    assert A.run_key(unmixed, 1) == A.run_key(gather, 1) and A.run_key(unmixed, 2) != A.run_key(gather, 2)
    assert key("tab2/global", one) != key("tab2/global", two)
    assert key("tab4/mixed", one) != key("tab4/unmixed", one)


def test_tab4_gather_row_is_its_own_run_with_one_process_per_study(tmp_path):
    one, two = _settings(tmp_path, nproc=1), _settings(tmp_path, nproc=2)
    unmixed, gather = _run("tab4/unmixed"), _run("tab4/unmixed_gather")
    # before, with nproc 1, "unmixed + gather" was "unmixed" (one run, nothing gathered); now two processes each
    assert _old_key(unmixed, one) == _old_key(gather, one)
    assert _key(unmixed, one) != _key(gather, one)
    # the study's nproc 1 trains Tab. 4 exactly as nproc 2 does (and as nproc 2 did before)
    for run in (unmixed, gather, _run("tab4/mixed"), _run("tab4/unmixed_gather_mt_adamw")):
        assert _key(run, one) == _key(run, two) == _old_key(run, two)
        assert A.run_overrides(run, one) == A.run_overrides(run, two)


@pytest.mark.parametrize("nproc", [1, 2])
def test_keys_of_the_other_tables_did_not_change(tmp_path, nproc):
    # finished runs are found by key: a key that changed would train Tab. 2, 3 and 5 again
    settings = _settings(tmp_path, nproc=nproc)
    runs = [run for run in A.plan_runs(A.profile_plan("paper"), settings) if run.table != "tab4"]
    assert {run.table for run in runs} == {"tab2", "tab3", "tab5"}
    for run in runs:
        assert _key(run, settings) == _old_key(run, settings), run.name
        assert A.run_overrides(run, settings) == A.run_overrides(dataclasses.replace(run, min_nproc=1), settings)


def test_profile_plan():
    smoke = A.profile_plan("smoke")
    assert set(smoke) == {"tab2", "tab4"} and all(len(rows) >= 2 for rows in smoke.values())
    assert A.profile_plan("quick") == {"tab2": smoke["tab2"]}      # beside notebook 06: no two-process runs
    assert A.profile_plan("paper") == {key: tuple(r.name for r in t.rows) for key, t in A.TABLES.items()}
    # the small profile: Tab. 2, Tab. 3's MoE question and "w/o Classification": five distinct trainings (the full
    # model shared), six with the baseline's second seed: three rounds of two on two cores
    small = A.profile_plan("small")
    assert small == {"tab2": ("Global", "Regional", "Global + Regional"),
                     "tab3": ("All Tasks", "w/o Classification", "All Tasks w/ MoE")}
    settings = _settings(Path("/tmp"))
    assert len({_key(run, settings) for run in A.plan_runs(small, settings)}) == 6
    small = {**small, "tab3": ("All Tasks", "All Tasks w/ MoE")}
    # Adding Tab. 4 and 5 (tables=[...] or a plan like this one): eleven distinct trainings with nproc 1. The full
    # model is shared by Tab. 2 and 3; Tab. 4's rows run on two processes (so "unmixed + gather" gathers and is its
    # own run) with 2 batches per iteration, so its full model is its own, and Tab. 5's rows train the text encoder
    # that the preset freezes, so its pre-trained row is its own too.
    small = {**small, "tab4": tuple(row.name for row in A.TABLES["tab4"].rows),
             "tab5": ("pre-trained text encoder", "random text encoder", "ImageNet image backbone")}
    small_runs = A.plan_runs(small)
    assert len({_key(run, settings) for run in small_runs}) == 11
    assert len({_old_key(run, settings) for run in small_runs}) == 10     # before: "unmixed + gather" = "unmixed"
    # with the baseline at a second seed for the noise band: one more
    with_noise = A.plan_runs(small, settings)
    assert [run.name for run in with_noise[len(small_runs):]] == ["tab2/global_regional@seed1"]
    assert len({_key(run, settings) for run in with_noise}) == 12
    assert A.profile_plan("quick", ["tab5"]) == {"tab5": tuple(row.name for row in A.TABLES["tab5"].rows)}
    with pytest.raises(KeyError, match="tab7"):
        A.profile_plan("quick", ["tab7"])
    with pytest.raises(KeyError, match="no row 'Glob'"):
        A.plan_runs({"tab2": ["Glob"]})


# ---------------------------------------------------------------------------------------------- the runner
class FakeTrainer:
    """Stands in for training + evaluation: writes what the trainer writes (metrics.jsonl, eval JSON, a checkpoint)
    and counts its calls (and the processes of each)."""

    def __init__(self, top1: float = 0.25):
        self.calls: list[str] = []
        self.nprocs: dict[str, int] = {}
        self.top1 = top1

    def __call__(self, cfg, argv, threads=None, nproc=1):
        folder = Path(cfg.run.output_dir)
        self.calls.append(folder.name)
        self.nprocs[folder.name] = nproc
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
    """Training in this process and through torchrun (Tab. 4's two processes) both replaced by a FakeTrainer."""
    fake = FakeTrainer()
    monkeypatch.setattr(A, "_train_in_process", fake)
    monkeypatch.setattr(A, "_train_with_torchrun",
                        lambda cfg, argv, nproc, threads: fake(cfg, argv, threads, nproc=nproc))
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


def test_runner_shares_identical_trainings(tmp_path, fake_trainer):
    settings = _settings(tmp_path)
    results = A.run_ablations([_run("tab2/global_regional"), _run("tab3/all_tasks_w_moe")], settings, log=None)
    assert fake_trainer.calls == ["global_regional"]
    shared = results["tab3/all_tasks_w_moe"]
    assert shared["shared_with"] == "tab2/global_regional"
    assert shared["metrics"] == results["tab2/global_regional"]["metrics"]
    assert A.load_result(settings.root / "tab3" / "all_tasks_w_moe")["shared_with"] == "tab2/global_regional"
    # the shared wall time is the twin's, so is the mark of the twin's resumed last start
    source = settings.root / "tab2" / "global_regional" / A.RESULT_FILE
    source.write_text(json.dumps({**json.loads(source.read_text()), "resumed_from": 3}))
    shutil.rmtree(settings.root / "tab3" / "all_tasks_w_moe")
    again = A.run_ablation(_run("tab3/all_tasks_w_moe"), settings, log=None)
    assert again["resumed_from"] == 3 and "(resumed at iteration 3)" in A.runs_table({"r": again})["rows"][0][3]
    # Tab. 4's rows train on two processes (torchrun, here the fake): gathering acts, so both rows train.
    fake_trainer.calls.clear()
    results = A.run_ablations([_run("tab4/unmixed"), _run("tab4/unmixed_gather")], settings, log=None)
    assert fake_trainer.calls == ["unmixed", "unmixed_gather"]
    assert fake_trainer.nprocs == {"global_regional": 1, "unmixed": 2, "unmixed_gather": 2}
    assert all(r["nproc"] == 2 and r["grad_accum"] == 2 and r["shared_with"] is None for r in results.values())


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
    resumed = A.run_ablation(run, longer, log=lines.append)
    assert lines[0].startswith("tab2/regional: resuming") and marker.read_text() == "kept"
    # its wall time covers this start alone, and the table of runs says so
    assert result["resumed_from"] is None and resumed["resumed_from"] == 1            # checkpoints/iter_1
    wall = A.runs_table({run.name: resumed})["rows"][0][3]
    assert wall == f"{resumed['wall_seconds']} (resumed at iteration {resumed['resumed_from']})"
    # a result written before results recorded it: the trainer's run_info.json of the folder says where it resumed
    legacy = {k: v for k, v in resumed.items() if k != "resumed_from"}
    (folder / A.RESULT_FILE).write_text(json.dumps(legacy))
    assert "resumed_from" not in A.load_result(folder)                    # no run_info.json (the fake trainer)
    (folder / "run_info.json").write_text(json.dumps({"attempt": 2, "resumed_from_iteration": 7}))
    assert A.load_result(folder)["resumed_from"] == 7


def test_runner_refuses_a_run_without_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "_train_in_process", lambda cfg, argv, threads: None)
    with pytest.raises(RuntimeError, match="without writing its evaluation"):
        A.run_ablation(_run("tab2/global"), _settings(tmp_path), log=None)


# ---------------------------------------------------------------------------------------------- tables
def _fake_result(run: A.AblationRun, metrics: dict, shared_with: str | None = None, seed: int | None = None
                 ) -> dict:
    return {"table": run.table, "row": run.row, "run": run.name, "task": run.task, "metrics": metrics,
            "shared_with": shared_with, "seed": seed}


def test_a_single_task_run_trains_its_task_from_the_first_iteration():
    """A profile may let a task join late (tasks.<name>.start_iteration); alone it has nothing to wait for."""
    settings = A.AblationSettings(run_dir="/tmp/x", iterations=100,
                                  scale=("tasks.classification.start_iteration=1000",))
    single = [run for run in A.plan_runs({"tab3": ("Single Task",)}, settings) if run.task == "classification"][0]
    cfg = A.build_config(single, settings)
    assert cfg.tasks.names() == ["classification"] and cfg.tasks.classification.start_iteration == 0
    full = A.build_config(A.plan_runs({"tab3": ("All Tasks",)}, settings)[0], settings)
    assert full.tasks.classification.start_iteration == 1000


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
    results = {run.name: _fake_result(run, metrics) for run in runs}
    report = A.table_report("tab4", results, nproc=1)
    assert report.reference == "unmixed + gather + MT-AdamW"
    assert [row[0] for row in report.side_by_side["rows"]] == list(A.TABLES["tab4"].paper_rows)
    assert report.side_by_side["rows"][0][3:5] == [pytest.approx(10.0), 76.7]
    text = report.markdown
    # Tab. 4 ran on two processes although the study's nproc is 1: the notes say so, and that gathering acted
    assert "| mixed |" in text and "nothing to gather" not in text
    assert "every row trains on 2 processes" in text and "the study's other runs on 1" in text
    assert "unmixed + gather: plain AdamW; retrieval negatives all-gathered" in text
    assert "run.grad_accum=2" in text
    # with nproc 2 the study's runs have as many: no such note
    assert not any(note.startswith("every row trains on") for note in A.table_report("tab4", results, nproc=2).notes)
    with_shared = {**results, "tab4/unmixed_gather": _fake_result(runs[2], metrics, "tab4/unmixed")}
    assert "trained identically to tab4/unmixed" in A.table_report("tab4", with_shared).markdown
    saved = report.as_results()
    assert saved["rows"]["mixed"][1] == pytest.approx(10.0) and saved["reference"] == report.reference
    # Only some rows run: no reference, the others are left out; a missing run is named.
    partial = A.table_report("tab4", {"tab4/mixed": results["tab4/mixed"]})
    assert list(partial.ours) == ["mixed"] and partial.reference is None
    with pytest.raises(KeyError, match="tab4/unmixed"):
        A.table_rows("tab4", {"tab4/mixed": results["tab4/mixed"]}, rows=["unmixed"])


def test_tab5_maps_the_image_backbones_to_the_papers_rows():
    runs = [run for run in ALL_RUNS if run.table == "tab5"]
    results = {run.name: _fake_result(run, {"classification": {"top1": 0.3}}) for run in runs}
    report = A.table_report("tab5", results)
    labels = [row[0] for row in report.side_by_side["rows"]]
    assert labels[:4] == ["pre-trained text encoder", "random text encoder", "ImageNet image backbone",
                          "random image backbone"]
    paper_of = {row[0]: row[4] for row in report.side_by_side["rows"]}      # the paper's IN-1k Acc column
    assert paper_of["pre-trained text encoder"] == 76.9 and paper_of["ImageNet image backbone"] == 76.8
    assert paper_of["random text encoder"] is None and paper_of["random image backbone"] is None
    # the paper's rows without a counterpart follow
    assert labels[4:] == ["(paper) Supervised (IN-21k)", "(paper) MoCo v2 (IN-1k)", "(paper) CLIP (CLIP data)"]


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


def _tab2_results() -> dict:
    """Tab. 2 with the baseline at two seeds. The paper's gaps to Global + Regional: Global - / -0.1 / -5.0 /
    -4.2 / -1.8, Regional -1.7 / -1.0 / +1.0 / +0.4 / +0.6."""
    runs = [_run(name) for name in ("tab2/global", "tab2/regional", "tab2/global_regional")]
    full = {"detection": {"bbox_AP": 0.20}, "classification": {"top1": 0.50}, "retrieval": {"i2t_R@1": 0.30,
            "t2i_R@1": 0.20}, "captioning": {"BLEU-4": 0.10}}
    # seed 1: spreads 1.0 / 0.2 / 2.0 / 0 points and no caption score -> band 1.0 / 0.5 / 2.0 / 0.5 / 0.5
    seed1 = {"detection": {"bbox_AP": 0.21}, "classification": {"top1": 0.502}, "retrieval": {"i2t_R@1": 0.32,
             "t2i_R@1": 0.20}, "captioning": {"skipped": "no captions"}}
    global_only = {"classification": {"top1": 0.52}, "retrieval": {"i2t_R@1": 0.33, "t2i_R@1": 0.198},
                   "captioning": {"BLEU-4": 0.05}}
    regional = {"detection": {"bbox_AP": 0.10}, "classification": {"top1": 0.45}, "retrieval": {"i2t_R@1": 0.315,
                "t2i_R@1": 0.21}, "captioning": {"BLEU-4": 0.10}}
    results = {run.name: _fake_result(run, m, seed=0) for run, m in zip(runs, (global_only, regional, full))}
    noise = dataclasses.replace(runs[2], name="tab2/global_regional@seed1", seed=1)
    results[noise.name] = _fake_result(noise, seed1, seed=1)
    return results


def test_noise_band_is_the_spread_over_seeds_with_a_floor():
    band = A.noise_band(_tab2_results())
    assert sorted(band.values) == [0, 1]
    assert band.spread == pytest.approx((1.0, 0.2, 2.0, 0.0, None))
    assert band.widths == pytest.approx((1.0, A.NOISE_FLOOR, 2.0, A.NOISE_FLOOR, A.NOISE_FLOOR))
    assert A.noise_band(_tab2_results(), floor=1.5).widths == pytest.approx((1.5, 1.5, 2.0, 1.5, 1.5))
    rebuilt = A.NoiseBand.from_results(json.loads(json.dumps(band.as_results())))
    assert rebuilt == band and rebuilt.widths == band.widths
    table = band.table()
    assert [row[0] for row in table["rows"]][:2] == ["baseline, seed 0", "baseline, seed 1"]
    assert table["rows"][-1][1:] == list(band.widths)
    # one seed, or none: the floor alone
    one = {name: r for name, r in _tab2_results().items() if "@" not in name}
    assert A.noise_band(one).spread == (None,) * 5 and A.noise_band({}).widths == (A.NOISE_FLOOR,) * 5
    assert A.NoiseBand.from_results(None) == A.NoiseBand()


def test_gap_directions_marks_every_cell_and_tally_scores_them():
    results = _tab2_results()
    band = A.noise_band(results)
    directions = A.gap_directions(A.table_report("tab2", results), noise=band)
    assert directions["columns"][-3:] == ["noise band", "mark", "verdict"]
    cell = {(row[1], row[2]): row for row in directions["rows"]}
    headers = [m.header for m in ABLATION_COLUMNS]

    def verdict(row, column):
        return cell[(row, headers[column])][-1]

    def mark(row, column):
        return cell[(row, headers[column])][-2]

    assert verdict("Global", 0) is None and mark("Global", 0) is None    # no detection without regional tokens
    assert verdict("Global", 1) == "paper flat" and mark("Global", 1) == "opposite"   # +2.0 vs -0.1
    assert verdict("Global", 2) == "opposite"          # +3.0 vs -5.0, outside the band of 2.0
    assert verdict("Global", 3) == "within noise"      # -0.2 vs -4.2, inside the floor 0.5
    assert verdict("Global", 4) == "same"              # -5.0 vs -1.8
    assert verdict("Regional", 0) == "same"            # -10 vs -1.7
    assert verdict("Regional", 1) == "same"            # -5.0 vs -1.0: a paper gap of exactly 1 point counts
    assert verdict("Regional", 2) == "within noise"    # +1.5 vs +1.0, inside the band of 2.0
    assert verdict("Regional", 3) == "paper flat" and mark("Regional", 3) == "same"           # +1.0 vs +0.4
    assert verdict("Regional", 4) == "paper flat" and mark("Regional", 4) == "within noise"   # 0 vs +0.6
    assert cell[("Global", headers[2])][3:6] == [-5.0, 3.0, 2.0]     # paper gap, ours, band

    counts = A.tally(directions)
    assert {k: counts[k] for k in ("same", "opposite", "within noise", "paper flat")} == {
        "same": 3, "opposite": 1, "within noise": 2, "paper flat": 3}
    assert counts["notable"] == 6 and counts["compared"] == 9 and counts["paper flat, ours within noise"] == 1
    assert counts["agreement"] == 0.5 and counts["goal"] == A.AGREEMENT_GOAL and counts["goal met"] is False
    assert A.gap_agreement(directions) == {"same": 3, "opposite": 1, "within noise": 2, "paper flat": 3}
    assert A.tally(directions, "tab3")["agreement"] is None
    by_table = A.tally_table(directions)
    assert by_table["rows"] == [["tab2", 3, 1, 2, 3, 50.0]]           # one table: no "all" line repeating it

    # Without a band every column's is the floor: Regional's +1.5 R@1 is then outside it and agrees.
    floor_only = A.gap_directions(A.table_report("tab2", results))
    assert {(r[1], r[2]): r[-1] for r in floor_only["rows"]}[("Regional", headers[2])] == "same"
    # without the reference row there is nothing to compare
    partial = A.table_report("tab2", {"tab2/global": results["tab2/global"]})
    assert A.gap_directions(partial, noise=band)["rows"] == []


def test_a_zero_paper_gap_has_no_direction():
    assert A._mark(0.0, 2.0, 0.5) == "opposite" and A._mark(0.0, 0.3, 0.5) == "within noise"
    assert A._mark(-1.2, -0.6, 0.5) == "same" and A._mark(-1.2, 0.6, 0.5) == "opposite"
    assert A._mark(1.2, 0.5, 0.5) == "within noise"       # the band's edge is inside
    # the verdict: the mark, except where the paper's gap is under PAPER_FLAT
    assert A.cell_verdict(A.PAPER_FLAT / 2, 3.0, 0.5) == "paper flat"
    assert A.cell_verdict(-A.PAPER_FLAT, -3.0, 0.5) == "same"
    assert A.cell_verdict(1.2, 0.5, 0.5) == "within noise" and A.cell_verdict(1.2, -0.6, 0.5) == "opposite"


def test_band_figure_draws_the_band_and_colours_bars_by_verdict():
    from matplotlib.colors import to_rgba

    from uniperceiver_v2.viz.ablation_bands import BAND_COLOR, VERDICT_COLORS

    results = _tab2_results()
    band = A.noise_band(results)
    fig = A.table_report("tab2", results).band_figure(band)
    shown = [ax for ax in fig.axes if ax.axison]          # five panels in rows of three, the sixth cell hidden
    assert len(shown) == len(ABLATION_COLUMNS) and len(fig.axes) == 6
    det, cls = shown[:2]

    def bars(ax):
        return [p for p in ax.patches if p.get_width() == pytest.approx(0.7)]

    # detection: no Global bar ("n/a"); Regional agrees with the paper; the reference is grey; band 20 +- 1
    assert [round(p.get_height(), 3) for p in bars(det)] == [10.0, 20.0]
    assert bars(det)[0].get_facecolor() == to_rgba(VERDICT_COLORS["same"])
    assert "n/a" in [t.get_text() for t in det.texts]
    spans = [p for p in det.patches if p.get_facecolor()[:3] == to_rgba(BAND_COLOR)[:3]]
    assert len(spans) == 1 and spans[0].get_y() == pytest.approx(19.0) and spans[0].get_height() == pytest.approx(2.0)
    # classification: Global's +2.0 against the paper's -0.1 is "paper flat"; the paper's gap is marked as a line
    assert bars(cls)[0].get_facecolor() == to_rgba(VERDICT_COLORS["paper flat"])
    assert any(list(line.get_ydata()) == pytest.approx([49.9, 49.9]) for line in cls.get_lines())
    from uniperceiver_v2.viz.ablation_bands import plot_ablation_band

    with pytest.raises(ValueError, match="band widths"):
        plot_ablation_band(["a", "b"], {"x": (1.0, 2.0)}, "x", [0.5])
    # a band wider than the reference value stops at 0 (a percentage): 8 +- 21 is drawn from 0 to 29
    (ax,) = plot_ablation_band(["R@1"], {"ref": (8.0,), "row": (22.0,)}, "ref", [21.0]).axes
    (span,) = [p for p in ax.patches if p.get_facecolor()[:3] == to_rgba(BAND_COLOR)[:3]]
    assert span.get_y() == pytest.approx(0.0) and span.get_height() == pytest.approx(29.0)
    # a bar of height 0 shows its verdict's colour as a marker at 0
    (ax,) = plot_ablation_band(["B@4"], {"ref": (3.0,), "row": (0.0,)}, "ref", [0.5],
                               verdicts={("row", 0): "opposite"}).axes
    (marker,) = [line for line in ax.get_lines() if line.get_marker() == "s"]
    assert list(marker.get_ydata()) == [0.0] and marker.get_color() == VERDICT_COLORS["opposite"]
    (zero,) = [t for t in ax.texts if t.get_text() == "0.0"]
    assert zero.xy[1] == 0.0 and zero.xyann[1] >= 5          # written above the square, not over it
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert "our reference value" in legend and "a bar of height 0 (its colour: its verdict)" in legend
    # ... and so does one that only rounds to 0 (a BLEU of 1e-11 %), with the paper's tick at 0 drawn over the axis
    (ax,) = plot_ablation_band(["B@4"], {"ref": (0.5,), "row": (1.2e-11,)}, "ref", [0.5],
                               verdicts={("row", 0): "within noise"}, paper_gaps={("row", 0): -0.5}).axes
    (marker,) = [line for line in ax.get_lines() if line.get_marker() == "s"]
    assert marker.get_color() == VERDICT_COLORS["within noise"]
    assert any(list(line.get_ydata()) == [0.0, 0.0] and not line.get_clip_on() for line in ax.get_lines())
    # values far above 0 (top-1 of 92-97): the axis starts a round step below them and the title says so; each
    # value is written at its bar's foot, away from the band and the paper's tick near the top
    (ax,) = plot_ablation_band(["top-1"], {"ref": (95.7,), "row": (91.7,)}, "ref", [1.9],
                               paper_gaps={("row", 0): -1.0}).axes
    bottom = ax.get_ylim()[0]
    assert 80 <= bottom < 91.7 - 1.9 and bottom == int(bottom) and ax.get_title() == f"top-1 (axis from {bottom:g})"
    assert sorted((t.get_text(), t.xy[1]) for t in ax.texts) == [("91.7", bottom), ("95.7", bottom)]
    # values near 0 keep the axis at 0; a bar too short to hold its value has it written above
    (ax,) = plot_ablation_band(["AP"], {"ref": (25.5,), "row": (1.0,)}, "ref", [3.5]).axes
    assert ax.get_ylim()[0] == 0 and ax.get_title() == "AP"
    assert dict((t.get_text(), t.xy[1]) for t in ax.texts) == {"25.5": 0.0, "1.0": 1.0}


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
    # two processes, each 16 // 2 iterations of 2 batches
    assert table["rows"][0][1] == "8 x 2" and "classification 1.5" in table["rows"][0][-1]
    assert results["tab4/mixed"]["nproc"] == 2 and fake_trainer.nprocs["mixed"] == 2


def _tick_labels(figure) -> list[str]:
    return [tick.get_text() for tick in figure.axes[0].get_xticklabels()]


def test_figure_labels_a_paper_row_with_ours_only_where_ours_ran():
    """Tab. 5's paper rows have other names than ours: a paper row is drawn under our name only where our row of it
    ran (as the side-by-side table does), so a table of which nothing ran shows the paper's rows under their own
    names, not as if ours had been measured."""
    paper = A.TABLES["tab5"].paper
    nothing = A.table_report("tab5", {}, ())
    assert nothing.ours == {} and _tick_labels(nothing.figure()) == list(paper.rows)
    assert "not run in this study" in nothing.figure()._suptitle.get_text()
    headers = [metric.header for metric in ABLATION_COLUMNS]
    partial = A.TableReport.from_results("tab5", {
        "columns": headers, "reference": "pre-trained text encoder",
        "rows": {"pre-trained text encoder": [1.0] * len(headers), "random text encoder": [0.5] * len(headers)}})
    labels = _tick_labels(partial.figure())
    assert labels[:2] == ["pre-trained text encoder", "random text encoder"]
    # the paper's "IN-1k & COCO" stands under our reference's name; "IN-1k" keeps its own (our row did not run)
    assert "Supervised (IN-1k & COCO)" not in labels and "Supervised (IN-1k)" in labels
    assert "ImageNet image backbone" not in labels
    assert sorted(labels[2:]) == sorted(set(paper.rows) - {"Supervised (IN-1k & COCO)"})


# ---------------------------------------------------------------------------------------------- runs side by side
class FakeProcess:
    """A training subprocess that takes ``polls`` looks to finish: meanwhile it logs a first iteration, at the end
    it writes what the trainer writes (metrics.jsonl, the evaluation JSON) and exits 0, or fails with exit code 1
    and a log line."""

    def __init__(self, launcher: FakeLauncher, name: str, cfg, nproc: int, log_path: Path):
        self.launcher, self.name, self.cfg, self.nproc, self.log_path = launcher, name, cfg, nproc, log_path
        self.remaining = launcher.polls
        self.returncode = None
        self.signals: list[int] = []

    def poll(self):
        if self.returncode is not None:
            return self.returncode
        self.remaining -= 1
        folder = Path(self.cfg.run.output_dir)
        if self.remaining > 0:
            with open(folder / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"kind": "train", "iteration": 1, "task": "classification", "loss": 2.0,
                                         "time": 1.0}) + "\n")
            return None
        if self.name in self.launcher.fail:
            with open(self.log_path, "a") as handle:
                handle.write("Traceback (most recent call last):\nValueError: the fake training broke\n")
            self.returncode = 1
        else:
            FakeTrainer(self.launcher.top1)(self.cfg, [])
            self.returncode = 0
        self.launcher.live -= self.nproc
        return self.returncode

    def send_signal(self, signum):
        self.signals.append(signum)
        self.returncode = 128 + signum
        self.launcher.live -= self.nproc

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        self.returncode = -9


class FakeLauncher:
    """Stands in for ``_launch_training``: records what starts, the most processes alive at once, and the
    arguments each launch got."""

    def __init__(self, root: Path, polls: int = 3, fail: tuple[str, ...] = (), top1: float = 0.25):
        self.root, self.polls, self.fail, self.top1 = root.resolve(), polls, fail, top1
        self.launched: list[str] = []
        self.calls: dict[str, dict] = {}
        self.processes: dict[str, FakeProcess] = {}
        self.live = 0
        self.most_live = 0

    def __call__(self, cfg, argv, nproc, threads, devices, log_path):
        name = Path(cfg.run.output_dir).resolve().relative_to(self.root).as_posix()
        self.launched.append(name)
        self.calls[name] = {"argv": argv, "nproc": nproc, "threads": threads, "devices": devices, "log": log_path}
        self.live += nproc
        self.most_live = max(self.most_live, self.live)
        process = FakeProcess(self, name, cfg, nproc, log_path)
        self.processes[name] = process
        return process


@pytest.fixture
def launcher(monkeypatch, tmp_path):
    fake = FakeLauncher(tmp_path / "runs" / "ablations")
    monkeypatch.setattr(A, "_launch_training", fake)
    monkeypatch.setattr(A, "_ensure_data", lambda cfg: None)

    def no_training_here(*args):
        raise AssertionError("with parallel > 1 nothing trains in this process")

    monkeypatch.setattr(A, "_train_in_process", no_training_here)
    monkeypatch.setattr(A, "_train_with_torchrun", no_training_here)
    return fake


TAB4 = [run for run in ALL_RUNS if run.table == "tab4"]
DISTINCT = [_run(name) for name in ("tab2/global", "tab2/regional", "tab2/global_regional", "tab4/mixed",
                                    "tab4/unmixed")]


@pytest.mark.parametrize("parallel", [2, 3])
def test_at_most_parallel_runs_at_once(tmp_path, launcher, parallel):
    settings = _settings(tmp_path, parallel=parallel)
    lines = []
    results = A.run_ablations(DISTINCT, settings, log=lines.append, progress=False, poll_seconds=0)
    assert launcher.most_live == parallel and sorted(launcher.launched) == sorted(run.name for run in DISTINCT)
    assert list(results) == [run.name for run in DISTINCT]          # the order of the runs, not of finishing
    assert all(r["metrics"]["classification"]["top1"] == 0.25 and r["shared_with"] is None for r in results.values())
    # each run is one subprocess with --resume, one thread unless set, its log in its folder
    call = launcher.calls["tab2/global"]
    assert call["threads"] == 1 and call["nproc"] == 1 and call["devices"] is None
    assert call["log"] == settings.root / "tab2" / "global" / A.LOG_FILE
    assert call["argv"] == ["--config", "tiny", *A.run_overrides(_run("tab2/global"), settings)]
    assert "--resume" in A._train_command(call["argv"], 1)
    assert A._train_command(call["argv"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node=2"]
    assert any(line.startswith("tab2/global: training") and str(call["log"]) in line for line in lines)
    assert sum("done in" in line for line in lines) == len(DISTINCT)


def test_parallel_results_equal_the_sequential_ones(tmp_path, monkeypatch, launcher):
    fake = FakeTrainer()
    monkeypatch.setattr(A, "_train_in_process", fake)
    monkeypatch.setattr(A, "_train_with_torchrun", lambda cfg, argv, nproc, threads: fake(cfg, argv, threads, nproc))
    # another study folder, the same data: the same keys
    sequential = A.run_ablations(DISTINCT, _settings(tmp_path / "a", data_root=tmp_path / "data"), log=None,
                                 progress=False)
    parallel = A.run_ablations(DISTINCT, _settings(tmp_path, parallel=2), log=None, progress=False, poll_seconds=0)
    assert len(fake.calls) == len(DISTINCT) and len(launcher.launched) == len(DISTINCT)

    def content(record):
        return {k: v for k, v in record.items() if k not in ("finished", "wall_seconds")}

    assert [content(r) for r in sequential.values()] == [content(r) for r in parallel.values()]


def test_a_shared_training_waits_for_the_run_under_way(tmp_path, launcher):
    # Tab. 2's full model is Tab. 3's MoE row; Tab. 4's rows (two processes, gathering acts) are four trainings
    runs = [*TAB4, _run("tab2/global_regional"), _run("tab3/all_tasks_w_moe")]
    results = A.run_ablations(runs, _settings(tmp_path, parallel=4), log=None, progress=False, poll_seconds=0)
    assert sorted(launcher.launched) == ["tab2/global_regional", "tab4/mixed", "tab4/unmixed",
                                         "tab4/unmixed_gather", "tab4/unmixed_gather_mt_adamw"]
    assert results["tab4/unmixed_gather"]["shared_with"] is None
    assert results["tab3/all_tasks_w_moe"]["shared_with"] == "tab2/global_regional"
    assert results["tab3/all_tasks_w_moe"]["metrics"] == results["tab2/global_regional"]["metrics"]
    # everything is reused the second time
    again = A.run_ablations(runs, _settings(tmp_path, parallel=4), log=None, progress=False, poll_seconds=0)
    assert len(launcher.launched) == 5 and again == results


@pytest.mark.parametrize("parallel,most", [(4, 4), (3, 2), (2, 2), (1, 2)])
def test_a_run_of_several_processes_takes_as_many_slots(tmp_path, launcher, monkeypatch, parallel, most):
    def torchrun_here(cfg, argv, nproc, threads):      # parallel=1: torchrun from this process, blocking
        launcher.live += nproc
        launcher.most_live = max(launcher.most_live, launcher.live)
        FakeTrainer()(cfg, argv)
        launcher.live -= nproc

    monkeypatch.setattr(A, "_train_with_torchrun", torchrun_here)
    settings = _settings(tmp_path, nproc=2, parallel=parallel)
    A.run_ablations(DISTINCT[:4], settings, log=None, progress=False, poll_seconds=0)
    # two processes each: 4 slots hold two runs, 3 slots one; a run larger than all slots runs alone
    assert launcher.most_live == most
    assert all(call["nproc"] == 2 for call in launcher.calls.values())


class LiveAtLaunch(FakeLauncher):
    """A FakeLauncher that also notes, at each launch, which runs are alive (the new one included)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.alive_at_launch: list[list[str]] = []

    def __call__(self, cfg, argv, nproc, threads, devices, log_path):
        process = super().__call__(cfg, argv, nproc, threads, devices, log_path)
        self.alive_at_launch.append(sorted(name for name, p in self.processes.items() if p.returncode is None))
        return process


# study nproc 1: Tab. 4's runs have two processes and take two slots each, Tab. 2's one
@pytest.mark.parametrize("parallel,first_wave", [
    (2, ["tab4/mixed"]),                          # both slots: nothing beside it
    (3, ["tab2/global", "tab4/mixed"]),           # two slots and one
    (4, ["tab2/global", "tab2/regional", "tab4/mixed"]),
])
def test_the_scheduler_counts_a_two_process_run_as_two_slots(tmp_path, monkeypatch, parallel, first_wave):
    launcher = LiveAtLaunch(tmp_path / "runs" / "ablations")
    monkeypatch.setattr(A, "_launch_training", launcher)
    monkeypatch.setattr(A, "_ensure_data", lambda cfg: None)
    runs = [_run(name) for name in ("tab4/mixed", "tab2/global", "tab2/regional", "tab4/unmixed")]
    results = A.run_ablations(runs, _settings(tmp_path, parallel=parallel), log=None, progress=False, poll_seconds=0)
    assert launcher.most_live == parallel                      # never more processes than slots
    assert launcher.alive_at_launch[len(first_wave) - 1] == first_wave
    assert {name: call["nproc"] for name, call in launcher.calls.items()} == {
        "tab4/mixed": 2, "tab2/global": 1, "tab2/regional": 1, "tab4/unmixed": 2}
    assert {name: (r["nproc"], r["grad_accum"]) for name, r in results.items()} == {
        "tab4/mixed": (2, 2), "tab2/global": (1, 1), "tab2/regional": (1, 1), "tab4/unmixed": (2, 2)}
    plan = json.loads((tmp_path / "runs" / "ablations" / "tab4" / "mixed" / A.PLAN_FILE).read_text())
    assert plan["nproc"] == 2 and plan["key"] == results["tab4/mixed"]["key"]
    # the keys the runner saved: Tab. 2's as before, Tab. 4's those of two processes
    settings = _settings(tmp_path, parallel=parallel)
    assert results["tab2/global"]["key"] == _old_key(_run("tab2/global"), settings)
    assert results["tab4/mixed"]["key"] == _old_key(_run("tab4/mixed"), _settings(tmp_path, nproc=2))


def test_a_two_process_run_with_one_slot_starts_alone(tmp_path, launcher, monkeypatch):
    """parallel=1 trains from this process, one run after the other; a Tab. 4 run goes through torchrun with its
    two processes (more than the one slot: it runs alone)."""
    live, most, order = [0], [0], []

    def train(nproc):
        def fake(cfg, argv, *args):
            live[0] += nproc
            most[0] = max(most[0], live[0])
            order.append((Path(cfg.run.output_dir).name, nproc))
            FakeTrainer()(cfg, argv)
            live[0] -= nproc
        return fake

    monkeypatch.setattr(A, "_train_in_process", train(1))
    monkeypatch.setattr(A, "_train_with_torchrun", lambda cfg, argv, nproc, threads: train(nproc)(cfg, argv))
    lines = []
    runs = [_run("tab2/global"), _run("tab4/unmixed_gather")]
    results = A.run_ablations(runs, _settings(tmp_path, parallel=1), log=lines.append, progress=False)
    assert order == [("global", 1), ("unmixed_gather", 2)] and most[0] == 2
    assert results["tab4/unmixed_gather"]["nproc"] == 2 and results["tab2/global"]["nproc"] == 1
    assert any(line.startswith("tab4/unmixed_gather: training") and "2 process(es)" in line for line in lines)
    assert launcher.launched == []


def test_failures_are_named_after_the_others_finished(tmp_path, launcher):
    launcher.fail = ("tab2/regional",)
    runs = [*DISTINCT, _run("tab3/all_tasks_w_moe")]
    lines = []
    with pytest.raises(A.AblationError) as caught:
        A.run_ablations([_run("tab2/regional"), *runs[2:], runs[0]], _settings(tmp_path, parallel=2),
                        log=lines.append, progress=False, poll_seconds=0)
    error = caught.value
    assert list(error.failures) == ["tab2/regional"]
    log_path = tmp_path / "runs" / "ablations" / "tab2" / "regional" / A.LOG_FILE
    message = str(error)
    assert "tab2/regional: exit code 1" in message and str(log_path) in message
    assert "ValueError: the fake training broke" in message
    # every other run finished and its result is there
    assert set(error.results) == {run.name for run in runs} - {"tab2/regional"}
    assert any(line == f"tab2/regional: FAILED, see {log_path}" for line in lines)
    assert A.load_result(log_path.parent) is None
    # A second attempt trains only the failed run.
    launcher.fail = ()
    launcher.launched.clear()
    results = A.run_ablations(runs, _settings(tmp_path, parallel=2), log=None, progress=False, poll_seconds=0)
    assert launcher.launched == ["tab2/regional"] and len(results) == len(runs)


def test_a_failed_training_fails_the_runs_that_share_it(tmp_path, launcher):
    launcher.fail = ("tab2/global_regional",)
    with pytest.raises(A.AblationError) as caught:
        A.run_ablations([_run("tab2/global_regional"), _run("tab3/all_tasks_w_moe"), _run("tab2/global")],
                        _settings(tmp_path, parallel=2), log=None, progress=False, poll_seconds=0)
    assert list(caught.value.failures) == ["tab2/global_regional", "tab3/all_tasks_w_moe"]
    assert "its training is that of tab2/global_regional, which failed" in caught.value.failures["tab3/all_tasks_w_moe"]
    assert launcher.launched.count("tab2/global_regional") == 1 and "tab3/all_tasks_w_moe" not in launcher.launched


def test_failures_in_this_process_are_named_too(tmp_path, monkeypatch):
    def broken(cfg, argv, threads):
        if cfg.run.output_dir.endswith("global"):
            raise ValueError("no data")
        FakeTrainer()(cfg, argv)

    monkeypatch.setattr(A, "_train_in_process", broken)
    with pytest.raises(A.AblationError, match=r"tab2/global: ValueError: no data") as caught:
        A.run_ablations([_run("tab2/global"), _run("tab2/regional")], _settings(tmp_path), log=None, progress=False)
    assert list(caught.value.results) == ["tab2/regional"]


def test_an_interrupt_is_passed_on_to_the_running_trainings(tmp_path, launcher, monkeypatch):
    launcher.polls = 100
    sleeps = []

    def interrupt_on_the_third_look(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(A.time, "sleep", interrupt_on_the_third_look)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        A.run_ablations(DISTINCT, _settings(tmp_path, parallel=2), log=lines.append, progress=False)
    assert sorted(launcher.processes) == ["tab2/global", "tab2/regional"]
    assert all(p.signals == [signal.SIGINT] for p in launcher.processes.values())
    assert "save a checkpoint" in lines[-1]


def test_a_stopped_run_resumes_in_the_parallel_path(tmp_path, launcher):
    settings = _settings(tmp_path, parallel=2)
    run = _run("tab2/regional")
    # an earlier attempt: its plan written, a checkpoint of iteration 5 and a log, no result
    cfg = A.build_config(run, settings)
    job = A._start(run, cfg, A.run_key(cfg, 1), settings)
    checkpoint = job.folder / "checkpoints" / "iter_0000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / "weights").write_text("kept")
    lines = []
    result = A.run_ablations([run], settings, log=lines.append, progress=False, poll_seconds=0)
    assert lines[0].startswith("tab2/regional: resuming from iteration 5 of 16 iterations")
    assert (checkpoint / "weights").read_text() == "kept" and launcher.launched == ["tab2/regional"]
    assert result["tab2/regional"]["iterations"] == 16
    # a folder of another configuration is not resumed: cleared, trained from the start
    longer = _settings(tmp_path, parallel=2, iterations=32)
    (job.folder / A.RESULT_FILE).unlink()
    lines.clear()
    A.run_ablations([run], longer, log=lines.append, progress=False, poll_seconds=0)
    assert "another configuration" in lines[0] and lines[1].startswith("tab2/regional: training")
    assert not checkpoint.exists()


def test_parallel_default_and_gpus(tmp_path, launcher, monkeypatch):
    monkeypatch.setattr(A.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(A, "_cuda_available", lambda: False)
    assert A.resolve_parallel(_settings(tmp_path, parallel=None)) == 8
    assert A.resolve_parallel(_settings(tmp_path, parallel=None, threads=3)) == 2
    assert A.resolve_parallel(_settings(tmp_path, parallel=None), parallel=5) == 5
    assert A.resolve_parallel(_settings(tmp_path, parallel=3)) == 3
    monkeypatch.setattr(A.os, "cpu_count", lambda: 1)
    assert A.resolve_parallel(_settings(tmp_path, parallel=None, threads=4)) == 1
    with pytest.raises(ValueError, match="parallel"):
        _settings(tmp_path, parallel=0)
    # on CUDA one run per GPU, each run given its own
    monkeypatch.setattr(A, "_visible_gpus", lambda: [4, 6])
    cuda = _settings(tmp_path, parallel=None, device="cuda")
    assert A.resolve_parallel(cuda) == 2
    A.run_ablations(DISTINCT[:2], cuda, log=None, progress=False, poll_seconds=0)
    assert sorted(call["devices"][0] for call in launcher.calls.values()) == [4, 6]
    monkeypatch.undo()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")     # GPUs handed out are those this process may use
    assert A._visible_gpus() == [2, 3]


def test_progress_bars_follow_each_runs_log(tmp_path, launcher, monkeypatch):
    import tqdm.auto

    bars = []

    class RecordingBar:
        def __init__(self, total, initial, desc, position, **kwargs):
            self.total, self.n, self.desc, self.position, self.closed = total, initial, desc, position, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    A.run_ablations(DISTINCT[:3], _settings(tmp_path, parallel=2), log=None, poll_seconds=0)
    assert [bar.desc for bar in bars] == ["tab2/global", "tab2/regional", "tab2/global_regional"]
    assert [bar.position for bar in bars] == [0, 1, 0]          # a free slot is reused
    assert all(bar.closed and bar.total == 16 for bar in bars)
    assert all(bar.n >= 1 for bar in bars)                      # the first logged iteration reached the bar


def test_last_iteration_reads_the_end_of_a_growing_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert A._last_iteration(path) is None
    records = [{"kind": "train", "iteration": i, "task": "x" * 300} for i in range(1, 60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "itera')   # torn last line
    assert A._last_iteration(path) == 59
    assert A._checkpoint_iteration(tmp_path) is None
    for name in ("iter_0000004", "iter_0000012", "iter_tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert A._checkpoint_iteration(tmp_path) == 12


def test_noise_runs_train_the_baseline_at_each_seed(tmp_path, launcher):
    settings = _settings(tmp_path, parallel=2, noise_seeds=(0, 1, 2))
    noise = A.noise_runs(settings)
    assert [run.name for run in noise] == ["tab2/global_regional", "tab2/global_regional@seed1",
                                           "tab2/global_regional@seed2"]
    configs = [A.build_config(run, settings) for run in noise]
    assert [cfg.run.seed for cfg in configs] == [0, 1, 2]
    assert configs[1].run.output_dir.endswith("tab2/global_regional@seed1")
    # all else equal: the same config but for the seed and the folder
    assert A.run_key(configs[0], 1) != A.run_key(configs[1], 1)
    other = dataclasses.replace(configs[1].run, seed=0, output_dir=configs[0].run.output_dir)
    assert other == configs[0].run
    # plan_runs adds them once; another study seed makes the baseline's own seed a noise run too
    runs = A.plan_runs({"tab2": ["Global", "Global + Regional"]}, settings)
    assert [run.name for run in runs] == ["tab2/global", "tab2/global_regional", "tab2/global_regional@seed1",
                                          "tab2/global_regional@seed2"]
    seeded = A.noise_runs(_settings(tmp_path, seed=5, noise_seeds=(0, 1)))
    assert [run.seed for run in seeded] == [0, 1]
    assert A.noise_runs(_settings(tmp_path, noise_seeds=())) == []
    with pytest.raises(ValueError, match="noise_seeds"):
        _settings(tmp_path, noise_seeds=(1, 1))

    launcher.top1 = 0.25
    results = A.run_ablations(runs, settings, log=None, progress=False, poll_seconds=0)
    assert [results[run.name]["seed"] for run in noise] == [0, 1, 2]
    band = A.noise_band(results)
    assert sorted(band.values) == [0, 1, 2] and band.spread[1] == 0.0 and band.widths[1] == A.NOISE_FLOOR
    # the noise runs are not rows of a table, and not the full model of notebook 10
    assert list(A.table_rows("tab2", results)) == ["Global", "Global + Regional"]
    assert A.full_model_result(results)["run"] == "tab2/global_regional"


@pytest.mark.slow
def test_a_real_run_stopped_midway_resumes_from_its_checkpoint(synthetic_root, tmp_path, monkeypatch):
    """A subprocess run (the parallel path) is stopped by SIGTERM after its first checkpoint: the trainer saves one
    and exits, the runner names the run; run again, it continues from that checkpoint instead of starting over."""
    settings = A.AblationSettings(run_dir=tmp_path, data_root=synthetic_root, data_profile="quick", iterations=8,
                                  scale=(*A.QUICK_SCALE, "run.ckpt_every=1", "run.log_every=1"), threads=1,
                                  parallel=2, noise_seeds=())
    run = _run("tab3/single_task/classification")
    folder = settings.root / run.name
    real_launch = A._launch_training

    class StoppedAfterTheFirstCheckpoint:
        def __init__(self, process):
            self.process = process
            self.stopped = False

        def poll(self):
            code = self.process.poll()
            if code is None and not self.stopped and A._checkpoint_iteration(folder) is not None:
                self.process.send_signal(signal.SIGTERM)
                self.stopped = True
            return code

        def __getattr__(self, name):
            return getattr(self.process, name)

    with monkeypatch.context() as patch:
        patch.setattr(A, "_launch_training", lambda *args: StoppedAfterTheFirstCheckpoint(real_launch(*args)))
        with pytest.raises(A.AblationError, match=r"tab3/single_task/classification: exit code 143 \(stopped by "
                                                  r"signal 15 after saving a checkpoint; run again to resume\)"):
            A.run_ablations([run], settings, log=None, progress=False, poll_seconds=0.05)
    first = json.loads((folder / "run_info.json").read_text())
    stopped_at = first["end"]["iteration"]
    assert first["end"]["status"] == "stopped" and 1 <= stopped_at < 8
    assert A._checkpoint_iteration(folder) == stopped_at and A.load_result(folder) is None

    lines = []
    result = A.run_ablations([run], settings, log=lines.append, progress=False, poll_seconds=0.2)[run.name]
    assert lines[0].startswith(f"{run.name}: resuming from iteration {stopped_at} of 8 iterations")
    second = json.loads((folder / "run_info.json").read_text())
    assert second["attempt"] == 2 and second["resumed_from_iteration"] == stopped_at    # resumed, not restarted
    assert second["end"]["status"] == "finished" and second["end"]["iteration"] == 8
    assert f"resuming from iteration {stopped_at}" in (folder / A.LOG_FILE).read_text()
    assert result["iterations"] == 8 and 0.0 <= result["metrics"]["classification"]["top1"] <= 1.0
    assert result["train_seconds"] > 0


def test_progress_bar_closes_at_the_iteration_the_run_reached(tmp_path):
    """A run that finishes between two refreshes of its bar closes it at its last logged iteration, not at 0 %."""
    from types import SimpleNamespace

    folder = tmp_path / "tab2" / "global"
    folder.mkdir(parents=True)
    job = SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(iterations=16)), folder=folder,
                          run=SimpleNamespace(name="tab2/global"))
    progress = A._Progress(enabled=True)
    progress.start(job, position=0)
    bar = progress._bars["tab2/global"][0]
    assert bar.n == 0
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 16, "loss": 1.0}) + "\n")
    progress.stop("tab2/global")
    assert bar.n == 16 and "tab2/global" not in progress._bars


def test_a_notebook_progress_bar_becomes_a_line_of_text_when_its_run_stops(tmp_path, monkeypatch):
    """A saved notebook keeps a widget's first text (``0%``) as its plain-text output: the bar's display is
    replaced by the iterations its run reached."""
    from types import SimpleNamespace

    import IPython.display
    import tqdm.auto
    import tqdm.notebook

    updates = []

    class Handle:
        def update(self, obj, raw=False):
            updates.append((obj, raw))

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: Handle())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 16, "loss": 1.0}) + "\n")
    job = SimpleNamespace(folder=tmp_path, cfg=SimpleNamespace(run=SimpleNamespace(iterations=16)),
                          run=SimpleNamespace(name="tab2/global"))
    progress = A._Progress(True)
    progress.start(job, 0)
    progress.stop("tab2/global")
    assert updates == [({"text/plain": "tab2/global: 16/16 iterations"}, True)]
    progress.stop("tab2/global")                                       # stopped once: nothing more
    assert len(updates) == 1


# ------------------------------------------------------------------------------------------ task interference
def test_interference_is_measured_on_runs_of_several_tasks_and_shared(tmp_path, fake_trainer, monkeypatch):
    calls = []

    def fake_interference(checkpoint, num_batches, threads=None):
        calls.append((Path(checkpoint).parent.name, num_batches, threads))
        assert (Path(checkpoint) / "iter_1").is_dir()       # measured before the checkpoints are deleted
        return {"tasks": ["a", "b"], "matrix": [[1.0, -0.5], [0.25, 1.0]], "parameters": ["decoder"],
                "num_batches": num_batches, "split": "train"}

    monkeypatch.setattr(A, "run_interference", fake_interference)
    settings = _settings(tmp_path, interference_batches=4, threads=1)
    runs = [_run("tab2/global_regional"), _run("tab3/all_tasks_w_moe"), _run("tab3/single_task/classification")]
    results = A.run_ablations(runs, settings, keep_checkpoints=False, log=None)
    assert calls == [("global_regional", 4, 1)]        # one task: no interference; the shared row is not re-measured
    assert results["tab3/all_tasks_w_moe"]["interference"] == results["tab2/global_regional"]["interference"]
    assert "interference" not in results["tab3/single_task/classification"]
    assert not (settings.root / "tab2" / "global_regional" / "checkpoints").exists()
    # the table lists the run that trained it once, with the median over the ordered pairs: (-0.5 + 0.25) / 2
    table = A.interference_table(results)
    assert table["columns"][3:5] == ["lowest I(i -> j)", "highest I(i -> j)"]   # the lowest need not be negative
    assert [row[0] for row in table["rows"]] == ["tab2/global_regional"]
    assert table["rows"][0][2] == -0.125 and table["rows"][0][3] == "a -> b (-0.50)"
    assert table["rows"][0][4] == "b -> a (+0.25)"
    figure = A.interference_figure(results, ["tab3/all_tasks", "tab3/all_tasks_w_moe"])
    assert len(figure.axes) == 2                          # one matrix and the shared colour bar
    assert A.interference_figure(results, ["tab3/all_tasks"]) is None
    # interference does not change what is trained: the run keys are those without it
    assert A.run_key(A.build_config(runs[0], settings), 1) == A.run_key(
        A.build_config(runs[0], _settings(tmp_path, threads=1)), 1)


def test_interference_settings_and_summaries():
    with pytest.raises(ValueError, match="interference_batches"):
        A.AblationSettings(run_dir="/tmp", interference_batches=1)
    table = A.interference_table({"r": {"shared_with": None, "interference": {"error": "zero gradient",
                                                                              "num_batches": 2}}})
    assert table["rows"] == [["r", 2, None, None, None, "not measured: zero gradient"]]
    # a task whose own gradients disagree across batches: its column is None, left out of the pairs
    measured = {"tasks": ["a", "b", "c"], "matrix": [[1.0, None, 0.5], [0.2, None, -0.1], [0.4, None, 1.0]],
                "undefined": ["b"], "num_batches": 16}
    assert A._pair_values(measured) == {("a", "c"): 0.5, ("b", "a"): 0.2, ("b", "c"): -0.1, ("c", "a"): 0.4}
    (row,) = A.interference_table({"r": {"shared_with": None, "interference": measured}})["rows"]
    assert row[3] == "b -> c (-0.10)" and row[4] == "a -> c (+0.50)" and "column(s) b undefined" in row[5]
    # every pair helps: the lowest I is positive, and the column does not call it negative
    helping = {"tasks": ["a", "b"], "matrix": [[1.0, 0.06], [0.3, 1.0]], "num_batches": 2}
    table = A.interference_table({"r": {"shared_with": None, "interference": helping}})
    assert table["rows"][0][3] == "a -> b (+0.06)" and "negative" not in table["columns"][3]
    # a batch with a zero gradient was replaced: the note says which task's and how many
    redrawn = {**helping, "redrawn": {"b": 1}}
    (row,) = A.interference_table({"r": {"shared_with": None, "interference": redrawn}})["rows"]
    assert row[5] == "batches redrawn because their gradient on the shared parameters was exactly zero: b 1 batch"
    figure = A.interference_figure({"r": {"interference": measured}}, ["r"])
    assert [text.get_text() for text in figure.axes[0].texts].count("n/a") == 3
    # a column of ratios of small numbers: the median ignores it, the note names it, the colours saturate
    noisy = {"tasks": ["a", "b", "c"], "matrix": [[1.0, 0.1, -900.0], [0.2, 1.0, 1200.0], [0.3, 0.4, 1.0]],
             "num_batches": 16}
    (row,) = A.interference_table({"r": {"shared_with": None, "interference": noisy}})["rows"]
    assert row[2] == pytest.approx(0.25) and row[3] == "a -> c (-900.00)"
    assert "column(s) c beyond +-2" in row[5]
    figure = A.interference_figure({"r": {"interference": noisy}}, ["r"])
    assert figure.axes[0].images[0].get_clim() == (-A.LARGE_INTERFERENCE, A.LARGE_INTERFERENCE)
    assert "1200.00" in [text.get_text() for text in figure.axes[0].texts]


@pytest.mark.slow
def test_run_interference_matches_a_float64_slow_path(synthetic_root, tmp_path):
    """run_interference on a real (2-iteration) checkpoint against MoE eq. (2) computed pair by pair in float64
    from the same batches: I(i -> j) = mean over batch pairs of g_j . d_i over mean over pairs n != m of
    g_j^n . d_j^m."""
    from uniperceiver_v2.bench import model_of_checkpoint
    from uniperceiver_v2.engine.data_setup import TaskStream, build_task_dataset
    from uniperceiver_v2.engine.runtime import move_to_device
    from uniperceiver_v2.tasks import TASKS

    settings = A.AblationSettings(run_dir=tmp_path, data_root=synthetic_root, data_profile="quick", iterations=2,
                                  scale=A.QUICK_SCALE, threads=1, parallel=1, interference_batches=3)
    result = A.run_ablation(_run("tab2/global"), settings, keep_checkpoints=True, log=None)
    measured = result["interference"]
    assert measured["tasks"] == ["classification", "captioning", "retrieval"] and measured["num_batches"] == 3
    assert measured["undefined"] == [], measured        # a run of two iterations: every task's gradients agree
    checkpoints = settings.root / "tab2" / "global" / "checkpoints"
    again = A.run_interference(checkpoints, 3, threads=1)
    assert again == measured                              # same batches, same seed: the same matrix

    model, cfg = model_of_checkpoint(checkpoints)
    params = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("decoder.")]
    streams = {}
    for name in measured["tasks"]:
        dataset = build_task_dataset(cfg, name, "train", train=True)
        task = TASKS[name].from_dataset(cfg.tasks.get(name), dataset)
        streams[name] = (task, TaskStream(name, dataset, task.collate, cfg.tasks.get(name).batch_size,
                                          seed=cfg.run.seed))
    model.train()
    torch.manual_seed(cfg.run.seed)
    grads = {name: [] for name in measured["tasks"]}
    for _ in range(3):
        for name, (task, stream) in streams.items():
            loss = task.loss(model, move_to_device(next(stream), model.device))["loss"]
            flat = torch.autograd.grad(loss, params, allow_unused=True)
            grads[name].append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                          for g, p in zip(flat, params)]))
    names = measured["tasks"]
    for i, source in enumerate(names):
        for j, target in enumerate(names):
            if i == j:
                assert measured["matrix"][i][j] == 1.0
                continue
            cross = [g @ (d / d.norm()) for g in grads[target] for d in grads[source]]
            own = [g @ (d / d.norm()) for n, g in enumerate(grads[target]) for m, d in enumerate(grads[target])
                   if n != m]
            expected = float(sum(cross) / len(cross) / (sum(own) / len(own)))
            assert measured["matrix"][i][j] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_interference_comparison_against_the_seed_spread():
    def record(matrix, tasks=("a", "b", "c")):
        return {"tasks": list(tasks), "matrix": matrix, "num_batches": 16}

    # a's column undefined in the second seed: every summary is taken over the four pairs defined everywhere
    dense = record([[1.0, 0.1, 0.1], [0.0, 1.0, 0.2], [0.0, 0.3, 1.0]])
    moe = record([[1.0, 0.5, 0.3], [0.9, 1.0, 0.4], [0.9, 0.1, 1.0]])
    seed1 = record([[None, 0.2, 0.2], [None, 1.0, 0.3], [None, 0.1, 1.0]])
    results = {
        "tab3/all_tasks": {"table": "tab3", "row": "All Tasks", "seed": 0, "interference": dense},
        "tab3/all_tasks_w_moe": {"table": "tab3", "row": "All Tasks w/ MoE", "seed": 0, "interference": moe},
        "tab2/global_regional": {"table": "tab2", "row": "Global + Regional", "seed": 0, "interference": moe},
        "tab2/global_regional@seed1": {"table": "tab2", "row": "Global + Regional", "seed": 1,
                                       "interference": seed1},
    }
    found = A.interference_comparison(results)
    assert found["pairs"] == ["a -> b", "a -> c", "b -> c", "c -> b"]
    # medians of four values: the mean of the middle two
    assert found["without"] == pytest.approx((0.1 + 0.2) / 2)
    assert found["with"] == pytest.approx((0.3 + 0.4) / 2)
    assert found["seeds"] == {0: pytest.approx(0.35), 1: pytest.approx(0.2)}
    assert found["means"]["tab3/all_tasks"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.3) / 4)
    assert found["means"]["seed 1"] == pytest.approx((0.2 + 0.2 + 0.3 + 0.1) / 4)
    # the MoE's gain (0.20) is above the seeds' spread (0.15)
    assert found["spread"] == pytest.approx(0.15)
    assert found["difference"] == pytest.approx(0.2) and found["verdict"] == "less interference with the MoE"
    # one column near a zero denominator (b's, in the hundreds) moves the second seed's mean, not its median
    results["tab2/global_regional@seed1"]["interference"] = record([[None, 900.0, 0.2], [None, 1.0, 0.3],
                                                                    [None, 0.1, 1.0]])
    found = A.interference_comparison(results)
    assert found["means"]["seed 1"] > 200 and found["seeds"][1] == pytest.approx(0.25)
    assert found["verdict"] == "less interference with the MoE"
    # a second seed far from the first: the same gain is within the spread
    results["tab2/global_regional@seed1"]["interference"] = record([[1.0, -0.5, 0.0], [0.0, 1.0, 0.0],
                                                                    [0.0, 0.0, 1.0]])
    assert A.interference_comparison(results)["verdict"] == "within the seeds' spread"
    # one seed only: no spread, the sign decides
    del results["tab2/global_regional@seed1"]
    found = A.interference_comparison(results)
    assert found["spread"] is None and found["seeds"] == {0: pytest.approx(found["with"])}
    assert found["verdict"] == "less interference with the MoE"
    results["tab3/all_tasks"]["interference"] = moe
    results["tab3/all_tasks_w_moe"]["interference"] = dense
    assert A.interference_comparison(results)["verdict"] == "more interference with the MoE"
    # a run not measured: nothing to compare
    results["tab3/all_tasks"]["interference"] = {"error": "zero gradient", "num_batches": 2}
    assert A.interference_comparison(results) is None
    assert A.interference_comparison({}) is None


def test_a_gap_that_ties_the_band_is_within_noise():
    """A row at seed 0 that scores what the baseline scored at seed 1 has a gap equal to the baseline's spread: the
    gap and the band are compared as shown, both to 0.01 point, so a rounding of one of them cannot push the gap
    outside the band (5 of 70 images against 6 of 70: 1.428571... points either way)."""
    results = _tab2_results()
    low, high = 100 * 5 / 70, 100 * 6 / 70
    results["tab2/global_regional"]["metrics"]["classification"]["top1"] = high / 100
    results["tab2/global_regional@seed1"]["metrics"]["classification"]["top1"] = low / 100
    results["tab2/regional"]["metrics"]["classification"]["top1"] = low / 100
    band = A.noise_band(results)
    directions = A.gap_directions(A.table_report("tab2", results), noise=band)
    row = {(r[1], r[2]): r for r in directions["rows"]}[("Regional", ABLATION_COLUMNS[1].header)]
    assert row[4] == -1.43 and row[5] == 1.43 and band.widths[1] == pytest.approx(high - low, abs=1e-6)
    assert row[6] == "within noise"


def test_the_noise_band_is_at_least_one_query_where_the_metric_counts_queries():
    results = _tab2_results()
    for result in results.values():                   # 70 classification images, 20 retrieval images, 100 texts
        if "classification" in result["metrics"]:
            result["metrics"]["classification"]["num_images"] = 70
        result["metrics"]["retrieval"].update(num_images=20, num_texts=100)
    band = A.noise_band(results)
    assert band.steps == pytest.approx((None, 100 / 70, 5.0, 1.0, None))   # AP and BLEU count no queries
    # spreads 1.0 / 0.2 / 2.0 / 0 / - : one image of 70 (1.43) and one of 20 (5.0) widen the band, 1 text of 100
    # (1.0) too; detection keeps its spread, captioning the floor
    assert band.widths == pytest.approx((1.0, 100 / 70, 5.0, 1.0, A.NOISE_FLOOR))
    assert A.NoiseBand.from_results(json.loads(json.dumps(band.as_results()))) == band
    assert [row[0] for row in band.table()["rows"]][-2] == "one query (100 / queries evaluated)"
    # Global's I2T gap of +3.0 (under one retrieval image of 20) was "opposite" against the band of 2.0: no longer
    directions = A.gap_directions(A.table_report("tab2", results), noise=band)
    i2t = {row[1]: row for row in directions["rows"] if row[2] == "COCO I2T R@1"}
    assert i2t["Global"][3:6] == [-5.0, 3.0, 5.0] and i2t["Global"][-2] == "within noise"
    assert A.metric_step({"classification": {"top1": 0.5}}, A.ABLATION_COLUMNS[1]) is None   # no count recorded
    with pytest.raises(ValueError, match="steps"):
        A.NoiseBand.from_results({**band.as_results(), "steps": [1.0]})
