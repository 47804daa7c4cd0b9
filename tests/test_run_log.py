"""A run's records across attempts (toy trainer of test_trainer.py, CPU, seconds): restarts cut ``metrics.jsonl``
and the evaluation files back to the iteration they start from, ``run_info.json`` keeps every attempt, and a
torn last line or an unreadable ``run_info.json`` does not block a resume.

A process killed by SIGKILL runs no clean-up: it is simulated by an exception that ``train`` cannot catch before
the end of the attempt is recorded (``_record_end`` does nothing), after the records it had flushed.
"""

from __future__ import annotations

import json

import pytest
from test_trainer import toy_config, toy_setup, train_losses

from uniperceiver_v2.engine.logging import cut_metrics, read_metrics
from uniperceiver_v2.engine.trainer import Trainer


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, nothing after it is recorded."""


def toy_evaluate(model, cfg, tasks, split):
    """A metric that depends on the weights, so a resumed run's evaluation must equal the uninterrupted one's."""
    return {"classification": {"weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}}


def attempt(cfg, *, resume=True, die_in=None, kill=True, evaluate=False):
    """One start of ``python -m uniperceiver_v2.train [--resume]``; ``die_in``: the 1-based iteration in which the
    process is killed (``kill``) or fails with a RuntimeError."""
    model, tasks, datasets = toy_setup(cfg)
    argv = ["--config", "toy", *(["--resume"] if resume else [])]
    trainer = Trainer(cfg, model, tasks, datasets, evaluate_fn=toy_evaluate if evaluate else None, progress=False,
                      tensorboard=False, argv=argv)
    if resume:
        trainer.resume()
    if die_in is None:
        trainer.train()
        return trainer
    step = trainer.train_step

    def dying_step(iteration):
        if iteration + 1 == die_in:
            raise Killed() if kill else RuntimeError("disk on fire (simulated)")
        return step(iteration)

    trainer.train_step = dying_step
    if kill:
        trainer._record_end = lambda end: None
    with pytest.raises(Killed if kill else RuntimeError):
        trainer.train()
    return trainer


def without_timing(records):
    return [{key: value for key, value in r.items() if key not in ("time", "iter_time")} for r in records]


def discarded_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl.discarded").read_text().splitlines()]


def test_restarts_before_the_first_checkpoint_leave_one_point_per_iteration(tmp_path):
    """The issue's case: attempts die in iterations 4 and 3, before the first checkpoint (6); each --resume starts
    from scratch. The log ends with iterations 1..8 once each, equal to an uninterrupted run, and run_info.json
    lists all three attempts and how they ended."""
    settings = {"run.ckpt_every": 6}
    attempt(toy_config(tmp_path / "full", **settings), resume=False)
    expected = train_losses(tmp_path / "full" / "run")

    cfg = toy_config(tmp_path / "split", **settings)
    run_dir = tmp_path / "split" / "run"
    attempt(cfg, resume=False, die_in=4, kill=False)
    assert [r[0] for r in train_losses(run_dir)] == [1, 2, 3]
    attempt(cfg, die_in=3)
    assert [r[0] for r in train_losses(run_dir)] == [1, 2]          # not 1, 2, 3, 1, 2
    attempt(cfg)
    assert train_losses(run_dir) == expected

    # The removed records are kept, each batch after a line saying why.
    side = discarded_lines(run_dir)
    assert [(r["kind"], r["iteration"]) for r in side] == [("discarded", 0), ("train", 1), ("train", 2),
                                                           ("train", 3), ("discarded", 0), ("train", 1),
                                                           ("train", 2)]
    assert side[0]["records"] == 3 and side[4]["records"] == 2

    info = json.loads((run_dir / "run_info.json").read_text())
    first, second = info["previous_sessions"]
    assert [first["attempt"], second["attempt"], info["attempt"]] == [1, 2, 3]
    assert first["argv"][-2:] == ["--config", "toy"] and info["argv"][-1] == "--resume"
    assert all(a["resumed_from_iteration"] is None and a["start_time"] for a in (first, second, info))
    assert first["end"]["status"] == "failed" and first["end"]["iteration"] == 3
    assert "RuntimeError: disk on fire" in first["end"]["error"]
    assert second["end"]["status"] == "unknown" and second["end"]["last_logged_iteration"] == 2
    assert second["discarded"] == {"metrics_records": 3, "eval_files": []}
    assert info["discarded"] == {"metrics_records": 2, "eval_files": []}
    assert info["end"]["status"] == "finished" and info["end"]["iteration"] == 8
    assert info["end"]["checkpoint"].endswith("iter_0000008")


def test_resume_sets_aside_the_records_and_evaluations_after_the_checkpoint(tmp_path):
    """Killed in iteration 7 (checkpoint at 4, evaluations at 2, 4, 6): the resumed run replaces the train and eval
    records of 5 and 6 and eval_val_0000006.json; the final log has one point per (iteration, task)."""
    settings = {"run.eval_every": 2}
    attempt(toy_config(tmp_path / "full", **settings), resume=False, evaluate=True)
    full = read_metrics(tmp_path / "full" / "run" / "metrics.jsonl", kind=None)

    cfg = toy_config(tmp_path / "split", **settings)
    run_dir = tmp_path / "split" / "run"
    attempt(cfg, resume=False, die_in=7, evaluate=True)
    assert sorted(p.name for p in run_dir.glob("eval_*")) == [f"eval_val_000000{i}.json" for i in (2, 4, 6)]
    kept_eval = (run_dir / "eval_val_0000004.json").read_text()
    resumed = attempt(cfg, evaluate=True)
    assert resumed.resumed_from == 4

    records = read_metrics(run_dir / "metrics.jsonl", kind=None)
    assert without_timing(records) == without_timing(full)          # bit-exact losses and evaluations
    points = [(r["kind"], r["iteration"], r["task"]) for r in records]
    assert len(points) == len(set(points))
    assert [r["iteration"] for r in records if r["kind"] == "eval"] == [2, 4, 6, 8]

    assert sorted(p.name for p in run_dir.glob("eval_*")) == [
        "eval_val_0000002.json", "eval_val_0000004.json", "eval_val_0000006.json",
        "eval_val_0000006.json.discarded", "eval_val_0000008.json"]
    assert (run_dir / "eval_val_0000004.json").read_text() == kept_eval
    side = discarded_lines(run_dir)
    assert side[0]["kind"] == "discarded" and side[0]["iteration"] == 4 and side[0]["records"] == 3
    assert sorted((r["kind"], r["iteration"]) for r in side[1:]) == [("eval", 6), ("train", 5), ("train", 6)]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumed_from_iteration"] == 4
    assert info["discarded"] == {"metrics_records": 3, "eval_files": ["eval_val_0000006.json.discarded"]}


def test_torn_last_line_and_torn_run_info_do_not_block_resume(tmp_path):
    attempt(toy_config(tmp_path / "full"), resume=False)
    expected = train_losses(tmp_path / "full" / "run")

    cfg = toy_config(tmp_path / "split")
    run_dir = tmp_path / "split" / "run"
    attempt(cfg, resume=False, die_in=6)                           # checkpoint 4, records 1..5
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"kind": "train", "iteration": 6, "ta')        # what a kill in the middle of a write leaves
    info_path = run_dir / "run_info.json"
    torn_info = info_path.read_text()[:40]
    info_path.write_text(torn_info)                                # as written by a version without atomic writes

    with pytest.warns(UserWarning) as caught:
        attempt(cfg)
    messages = [str(w.message) for w in caught]
    assert any("metrics.jsonl:6: dropped a torn last line" in m for m in messages), messages
    assert any("run_info.json: not valid JSON" in m and "run_info.json.unreadable" in m for m in messages), messages
    assert train_losses(run_dir) == expected
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")
    assert (run_dir / "run_info.json.unreadable").read_text() == torn_info
    info = json.loads(info_path.read_text())
    assert info["attempt"] == 1 and info["resumed_from_iteration"] == 4 and info["end"]["status"] == "finished"


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "iteration": i, "task": "mlm", "loss": 1.0 / i} for i in (1, 2)]
    lines = [json.dumps(r) for r in good]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "iter')         # the last write cut short
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line .*'\{\"kind\": .*\"iter'"):
        assert read_metrics(path) == good
    path.write_text("\n".join(lines) + '\n{"kind": "train", "iter\n')       # complete but invalid: not a torn write
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not valid JSON"):
        read_metrics(path)
    path.write_text("\n".join(lines))                                          # a complete record lacking its newline
    assert read_metrics(path) == good
    path.write_text(lines[0] + '\n{"kind": "tra\n' + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON .*only a torn last line"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        cut_metrics(path, 1)
    assert path.read_text() == lines[0] + '\n{"kind": "tra\n' + lines[1] + "\n"       # left as it was


def test_cut_metrics_moves_later_records_and_leaves_a_clean_log_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert cut_metrics(path, 3) == (0, None)                        # no log yet
    records = [{"kind": "train", "iteration": i, "task": "mlm"} for i in (1, 2, 3)]
    records.append({"kind": "eval", "iteration": 3, "split": "val", "task": "mlm", "accuracy": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    assert cut_metrics(path, 3) == (0, 3)
    assert path.read_text() == text and not (tmp_path / "metrics.jsonl.discarded").exists()
    assert cut_metrics(path, 1) == (3, 3)
    assert read_metrics(path, kind=None) == records[:1]
    side = discarded_lines(tmp_path)
    assert side[0]["kind"] == "discarded" and side[0]["records"] == 3 and side[1:] == records[1:]


def test_starting_from_scratch_over_old_checkpoints_says_so(tmp_path, capsys):
    cfg = toy_config(tmp_path, **{"run.iterations": 4})
    attempt(cfg, resume=False)
    capsys.readouterr()
    attempt(cfg, resume=False)
    err = capsys.readouterr().err
    assert "starting from scratch in" in err and "iter_0000004" in err
    assert "4 record(s) of metrics.jsonl -> metrics.jsonl.discarded" in err
    assert [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
