"""`python -m uniperceiver_v2.bench speed`: two configs timed side by side, per task, for the mix and per part."""

import argparse
import io
import re
import tempfile

import pytest
import torch

from uniperceiver_v2.bench import available_benchmarks, speed

SMALL = ["tasks.detection.enabled=false", "tasks.captioning.enabled=false", "tasks.classification.batch_size=4",
         "tasks.mlm.batch_size=4", "tasks.retrieval.batch_size=4", "data.image_size=64", "optim.warmup_iters=0"]


def test_speed_prints_per_task_mix_and_parts_of_both_configs(synthetic_root, tmp_path):
    assert "speed" in available_benchmarks()
    new = tmp_path / "new.yaml"
    new.write_text("preset: tiny\ntext_encoder:\n  freeze: true\n")
    args = argparse.Namespace(old="tiny", new=str(new), iterations=4, warmup=1,
                              overrides=[f"data.root={synthetic_root}", *SMALL])
    out = io.StringIO()
    rows = speed.run(args, out=out)
    tasks = set(rows) - {"mix", "mix_expected"}
    assert tasks <= {"classification", "mlm", "retrieval"} and sum(rows[t]["iterations"] for t in tasks) == 4
    for task in tasks:
        row = rows[task]
        assert row["ratio"] == pytest.approx(row["old_s"] / row["new_s"])
        for label in ("old", "new"):
            parts = row[f"{label}_parts"]
            assert set(parts) == set(speed.PARTS) and all(value >= 0 for value in parts.values())
            assert parts["decoder"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
    # the mix: the mean over all timed iterations, and the medians weighted by the sampling ratios s_k
    assert rows["mix"]["ratio"] == pytest.approx(rows["mix"]["old_s"] / rows["mix"]["new_s"])
    weights = {"classification": 0.2, "mlm": 0.1, "retrieval": 0.2}                      # the tiny preset's s_k
    for label in ("old", "new"):
        expected = sum(weights[t] * rows[t][f"{label}_s"] for t in tasks) / sum(weights[t] for t in tasks)
        assert rows["mix_expected"][f"{label}_s"] == pytest.approx(expected)
    text = out.getvalue()
    mix_line = next(line for line in text.splitlines() if line.startswith("mix"))
    old_s, new_s, ratio = (float(x) for x in re.findall(r"\d+\.\d+", mix_line))
    assert (old_s, new_s, ratio) == pytest.approx((rows["mix"]["old_s"], rows["mix"]["new_s"], rows["mix"]["ratio"]),
                                                  abs=6e-3)


def test_instrumenting_a_trainer_changes_nothing_it_computes(synthetic_root):
    overrides = [f"data.root={synthetic_root}", *SMALL]
    losses = []
    for instrumented in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            trainer = speed.build_trainer("tiny", overrides, folder)
            clock = speed._Clock()
            if instrumented:
                speed._instrument(trainer, clock)
            with speed._timed_backward(lambda clock=clock: clock):
                losses.append([trainer.train_step(i) for i in range(2)])
            if instrumented:
                assert {"data", "forward", "decoder", "backward", "optimizer"} <= set(clock.seconds)
            weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            losses[-1].append(weights)
    assert losses[0][:2] == losses[1][:2]
    assert torch.equal(losses[0][2], losses[1][2])


def test_loss_table_averages_the_windows_of_each_side_and_reports_the_seed_spread(tmp_path):
    import json

    def run(name, losses):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"kind": "train", "iteration": it, "task": "mlm", "loss": loss} for it, loss in losses]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(folder)

    old_a = run("old_a", [(10, 4.0), (20, 3.0), (30, 2.0)])
    old_b = run("old_b", [(10, 5.0), (20, 4.0), (30, 3.0)])
    new = run("new", [(10, 4.0), (20, 2.0), (30, 1.0)])
    out = io.StringIO()
    table = speed.loss_table(f"{old_a},{old_b}", new, at=(20, 30), window=15, out=out)
    # window (5, 20]: old runs 3.5 and 4.5 -> 4.0, spread 1.0; new 3.0.  (15, 30]: old 2.5 / 3.5, new 1.5
    assert table["mlm"][20] == pytest.approx({"old": 4.0, "new": 3.0, "old_spread": 1.0})
    assert table["mlm"][30] == pytest.approx({"old": 3.0, "new": 1.5, "old_spread": 1.0})
    assert "0.750" in out.getvalue() and "0.500" in out.getvalue()       # new / old
    with pytest.raises(ValueError, match="no mlm record"):
        speed.loss_table(old_a, new, at=(100,), window=10, out=io.StringIO())


def test_threads_option_gives_each_side_its_own_thread_count_and_restores_it(synthetic_root, monkeypatch):
    seen: dict[str, list[int]] = {"tiny": [], "other": []}
    build = speed.build_trainer

    def recording_build(config, overrides, folder):
        trainer = build(config if config == "tiny" else "tiny", overrides, folder)
        step = trainer.train_step

        def train_step(iteration):
            seen[config].append(torch.get_num_threads())
            return step(iteration)

        trainer.train_step = train_step
        return trainer

    monkeypatch.setattr(speed, "build_trainer", recording_build)
    before = torch.get_num_threads()
    args = argparse.Namespace(old="tiny", new="other", iterations=2, warmup=0, threads=[2, 1],
                              overrides=[f"data.root={synthetic_root}", *SMALL])
    out = io.StringIO()
    speed.run(args, out=out)
    assert seen == {"tiny": [2, 2], "other": [1, 1]}
    assert torch.get_num_threads() == before
    assert "torch threads: old 2, new 1" in out.getvalue()
    with pytest.raises(SystemExit):
        speed.main(["--old", "tiny", "--new", "tiny", "--threads", "0", "1"])
