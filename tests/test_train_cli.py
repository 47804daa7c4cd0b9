"""The command lines ``python -m uniperceiver_v2.train`` / ``.evaluate`` with the real model (tiny preset, quick
synthetic suite): a run stopped by SIGTERM and resumed gives the same losses as an uninterrupted one.

The synthetic suite is generated once into pytest's cache folder (``ensure_synthetic`` regenerates it only
when missing or out of date).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uniperceiver_v2.config import load_config, load_yaml
from uniperceiver_v2.engine.logging import read_metrics
from uniperceiver_v2.evaluate import main as evaluate_main
from uniperceiver_v2.train import main as train_main


@pytest.fixture(scope="module")
def synthetic_root(pytestconfig, tmp_path_factory) -> Path:
    from uniperceiver_v2.data.synthetic import ensure_synthetic

    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("synthetic_quick") if cache is not None else tmp_path_factory.mktemp("synthetic_quick")
    ensure_synthetic(root, "quick")
    return Path(root)


def test_bad_overrides_exit_with_2_and_name_the_key(capsys):
    assert train_main(["--config", "tiny", "run.itrations=5"]) == 2
    assert "run.itrations" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "run.sampling=sometimes"]) == 2
    assert "run.sampling" in capsys.readouterr().err
    assert train_main(["--config", "no_such_preset"]) == 2
    assert "preset" in capsys.readouterr().err


def _overrides(root: Path, output_dir: Path) -> list[str]:
    """Two tasks of the tiny model, small batches and images; drop-path and MoE gate noise on (model RNG),
    random crops (data RNG) and random MLM masks, so an exact resume has to restore all of them."""
    return [
        f"data.root={root}", f"run.output_dir={output_dir}", "run.iterations=6", "run.log_every=1",
        "run.ckpt_every=0", "run.seed=5", "tasks.detection.enabled=false", "tasks.captioning.enabled=false",
        "tasks.retrieval.enabled=false", "tasks.classification.batch_size=4", "tasks.mlm.batch_size=4",
        "data.image_size=64", "decoder.drop_path=0.1", "text_encoder.freeze=true",
        "optim.warmup_iters=2", "optim.decay_at=[0.5]",
    ]


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(synthetic_root, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    assert train_main(["--config", "tiny", "--no-eval", "--no-progress", *_overrides(synthetic_root, full_dir)]) == 0
    expected = [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(full_dir / "metrics.jsonl")]
    assert [r[0] for r in expected] == list(range(1, 7)) and {r[1] for r in expected} == {"classification", "mlm"}

    # The same run as its own process, stopped by SIGTERM once it has logged iteration 2.
    command = [sys.executable, "-m", "uniperceiver_v2.train", "--config", "tiny", "--no-eval", "--no-progress",
               *_overrides(synthetic_root, split_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    metrics = split_dir / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and any(r["iteration"] >= 2 for r in read_metrics(metrics)):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by signal SIGTERM" in output
    stopped_at = int((split_dir / "checkpoints" / "latest").read_text().strip().removeprefix("iter_"))
    assert 2 <= stopped_at < 6

    assert train_main(["--config", "tiny", "--no-eval", "--no-progress", "--resume",
                       *_overrides(synthetic_root, split_dir)]) == 0
    resumed = [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(metrics)]
    assert resumed == expected

    # Run records: the full config, and both sessions' command lines.
    assert load_yaml(split_dir / "config.yaml") == load_config("tiny", _overrides(synthetic_root, split_dir))
    info = json.loads((split_dir / "run_info.json").read_text())
    assert "--resume" in info["command"] and info["resumed_from_iteration"] == stopped_at
    assert info["previous_sessions"][0]["resumed_from_iteration"] is None and info["seed"] == 5
    assert any((split_dir / "tb").iterdir())

    # Evaluate the final checkpoint from the command line.
    assert evaluate_main(["--checkpoint", str(split_dir), "--tasks", "classification,mlm", "--split", "val"]) == 0
    results = json.loads((split_dir / "eval_val_0000006.json").read_text())
    assert results["iteration"] == 6
    top1, top5 = results["results"]["classification"]["top1"], results["results"]["classification"]["top5"]
    assert 0.0 <= top1 <= top5 <= 1.0 and results["results"]["classification"]["num_images"] == 70
    assert 0.0 <= results["results"]["mlm"]["accuracy"] <= 1.0
