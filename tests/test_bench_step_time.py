"""`python -m uniperceiver_v2.bench step_time`: a fresh model and a checkpoint timed on the same steps."""

import io
import re

import pytest

from uniperceiver_v2.bench import available_benchmarks, step_time
from uniperceiver_v2.engine.checkpoint import read_checkpoint_meta
from uniperceiver_v2.train import main as train_main


def test_step_time_compares_fresh_and_checkpoint_on_the_same_steps(synthetic_root, tmp_path):
    assert "step_time" in available_benchmarks()
    run_dir = tmp_path / "run"
    overrides = [f"data.root={synthetic_root}", "tasks.detection.enabled=false", "tasks.captioning.enabled=false",
                 "tasks.retrieval.enabled=false", "tasks.classification.batch_size=4", "tasks.mlm.batch_size=4",
                 "data.image_size=64", "text_encoder.freeze=true", "optim.warmup_iters=0", "run.iterations=2"]
    assert train_main(["--config", "tiny", "--no-eval", "--no-progress", *overrides,
                       f"run.output_dir={run_dir}", "run.ckpt_every=2"]) == 0
    checkpoint = run_dir / "checkpoints" / "iter_0000002"
    args = step_time.argparse.Namespace(checkpoint=str(checkpoint), config=None, iterations=3, warmup=1,
                                        overrides=[])
    out = io.StringIO()
    rows = step_time.run(args, out=out)
    assert set(rows) <= {"classification", "mlm"} and sum(r["steps"] for r in rows.values()) == 3
    for row in rows.values():
        assert row["fresh_s"] > 0 and row["checkpoint_s"] > 0
        assert row["ratio"] == pytest.approx(row["checkpoint_s"] / row["fresh_s"])
    # The printed table: the checkpoint's iteration, then one line per task whose columns, named like the returned
    # keys ("fresh s" -> fresh_s), hold the returned values to the printed precision.
    lines = out.getvalue().splitlines()
    assert int(re.search(r"\(iteration (\d+)\)", lines[0]).group(1)) == read_checkpoint_meta(checkpoint)["iteration"]
    columns = [name.replace(" ", "_") for name in re.findall(r"\S+(?: s\b)?", lines[1])]
    assert len(lines) == 2 + len(rows)
    tolerance = {"steps": 0, "fresh_s": 5e-4, "checkpoint_s": 5e-4, "ratio": 5e-3}
    for line in lines[2:]:
        shown = dict(zip(columns, line.split(), strict=True))
        task = shown.pop("task")
        assert set(shown) == set(rows[task]) == set(tolerance)
        for key, value in rows[task].items():
            assert float(shown[key]) == pytest.approx(value, abs=tolerance[key] * 1.01), (key, line)


def test_step_time_needs_a_config_when_the_run_has_none(tmp_path):
    args = step_time.argparse.Namespace(checkpoint=str(tmp_path / "x" / "checkpoints" / "iter_0000001"),
                                        config=None, iterations=1, warmup=0, overrides=[])
    with pytest.raises(SystemExit, match="config.yaml does not exist"):
        step_time.run(args)
