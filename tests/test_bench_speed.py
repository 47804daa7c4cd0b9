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
    tasks = set(rows) - {"mix"}
    assert tasks <= {"classification", "mlm", "retrieval"} and sum(rows[t]["iterations"] for t in tasks) == 4
    for task in tasks:
        row = rows[task]
        assert row["ratio"] == pytest.approx(row["old_s"] / row["new_s"])
        for label in ("old", "new"):
            parts = row[f"{label}_parts"]
            assert set(parts) == set(speed.PARTS) and all(value >= 0 for value in parts.values())
            assert parts["decoder"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
    # the frozen text encoder is still run forward by both; the mix is the mean over all timed iterations
    assert rows["mix"]["ratio"] == pytest.approx(rows["mix"]["old_s"] / rows["mix"]["new_s"])
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
            trainer = speed._trainer("tiny", overrides, folder)
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
