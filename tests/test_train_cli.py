"""The command lines ``python -m uniperceiver_v2.train`` / ``.evaluate`` with the real model (tiny preset, quick
synthetic suite): a run stopped by SIGTERM and resumed gives the same losses as an uninterrupted one.

The quick synthetic suite comes from conftest.py (``synthetic_root``, generated once into pytest's cache folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from uniperceiver_v2.config import load_config, load_yaml
from uniperceiver_v2.engine.checkpoint import read_checkpoint_meta
from uniperceiver_v2.engine.logging import read_metrics
from uniperceiver_v2.evaluate import main as evaluate_main
from uniperceiver_v2.train import main as train_main


def test_bad_overrides_exit_with_2_and_name_the_key(capsys):
    assert train_main(["--config", "tiny", "run.itrations=5"]) == 2
    assert "run.itrations" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "run.sampling=sometimes"]) == 2
    assert "run.sampling" in capsys.readouterr().err
    assert train_main(["--config", "no_such_preset"]) == 2
    assert "preset" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "--new-schedule"]) == 2
    err = capsys.readouterr().err
    assert "--new-schedule" in err and "--resume" in err


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tmp_path, capsys):
    # Without --resume, a new run would mix its checkpoints with the earlier run's and prune them.
    earlier = tmp_path / "run" / "checkpoints" / "iter_0000040"
    earlier.mkdir(parents=True)
    (earlier / "meta.json").write_text("{}")
    assert train_main(["--config", "tiny", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "iter_0000040" in err and "--resume" in err and "run.output_dir" in err
    assert (earlier / "meta.json").read_text() == "{}"


def _overrides(root: Path, output_dir: Path) -> list[str]:
    """Two tasks of the tiny model, small batches and images; drop-path and MoE gate noise on (model RNG),
    random crops (data RNG) and random MLM masks, so an exact resume has to restore all of them."""
    return [
        f"data.root={root}", f"run.output_dir={output_dir}", "run.iterations=10", "run.log_every=1",
        "run.ckpt_every=0", "run.seed=5", "tasks.detection.enabled=false", "tasks.captioning.enabled=false",
        "tasks.retrieval.enabled=false", "tasks.classification.batch_size=4", "tasks.mlm.batch_size=4",
        "data.image_size=64", "decoder.drop_path=0.1", "text_encoder.freeze=true",
        "optim.warmup_iters=2", "optim.decay_at=[0.5]",
    ]


# Runs ``python -m uniperceiver_v2.train ARGS`` with one change: at the start of iteration PAUSE (1-based) the
# process prints a line and waits for one on stdin, so the parent can send it a real SIGTERM while it is inside
# that iteration, at a known point, whatever the speed of the machine.
_PAUSING_TRAIN = """
import sys

from uniperceiver_v2.engine.trainer import Trainer
from uniperceiver_v2.train import main

pause, train_step = int(sys.argv[1]), Trainer.train_step


def paused_train_step(self, iteration):
    if iteration + 1 == pause:
        print(f"paused in iteration {pause}", flush=True)
        sys.stdin.readline()
    return train_step(self, iteration)


Trainer.train_step = paused_train_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(synthetic_root, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    assert train_main(["--config", "tiny", "--no-eval", "--no-progress", *_overrides(synthetic_root, full_dir)]) == 0
    expected = [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(full_dir / "metrics.jsonl")]
    assert [r[0] for r in expected] == list(range(1, 11)) and {r[1] for r in expected} == {"classification", "mlm"}

    # The same run as its own process, sent SIGTERM while it is inside iteration 3: it finishes that iteration,
    # saves its checkpoint and exits with 128 + SIGTERM.
    pause = 3
    command = [sys.executable, "-c", _PAUSING_TRAIN, str(pause), "--config", "tiny", "--no-eval", "--no-progress",
               *_overrides(synthetic_root, split_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(600, process.kill)   # only so that a hung child cannot hang the test session
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.strip() == f"paused in iteration {pause}":
                break
        assert lines and lines[-1].strip() == f"paused in iteration {pause}", "".join(lines)[-3000:]
        metrics = split_dir / "metrics.jsonl"
        assert [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(metrics)] == expected[:pause - 1]
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(BrokenPipeError):   # a child killed by the signal shows in the return code
            process.stdin.write("\n")
            process.stdin.close()
        output = "".join(lines) + process.stdout.read()
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by signal SIGTERM" in output
    stopped_at = read_checkpoint_meta(split_dir / "checkpoints")["iteration"]
    assert stopped_at == pause
    assert sorted(p.name for p in (split_dir / "checkpoints").glob("iter_*")) == [f"iter_{pause:07d}"]
    # The interrupted session logged exactly the iterations it completed, with the uninterrupted run's losses.
    assert [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(metrics)] == expected[:pause]

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
    results = json.loads((split_dir / "eval_val_0000010.json").read_text())
    assert results["iteration"] == 10
    top1, top5 = results["results"]["classification"]["top1"], results["results"]["classification"]["top5"]
    assert 0.0 <= top1 <= top5 <= 1.0 and results["results"]["classification"]["num_images"] == 70
    assert 0.0 <= results["results"]["mlm"]["accuracy"] <= 1.0


def test_evaluate_wires_every_task_to_its_metrics(synthetic_root):
    """``evaluate`` on the quick suite's val split with the small test model: every task's metrics are present
    and in range, and classification / retrieval agree with a direct computation over the whole split."""
    from helpers import tiny_model

    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.engine.evaluation import evaluate
    from uniperceiver_v2.metrics.retrieval import retrieval_recall
    from uniperceiver_v2.tasks import TASKS

    cfg = load_config("tiny", [f"data.root={synthetic_root}", "data.image_size=64", "tasks.captioning.max_length=4",
                               "data.det_eval_size=96", "data.det_eval_max_long=128"])
    model = tiny_model(cfg, seed=0).eval()
    results = evaluate(model, cfg, cfg.tasks.names(), "val")
    assert set(results) == set(cfg.tasks.names())
    assert 0 <= results["classification"]["top1"] <= results["classification"]["top5"] <= 1
    for prefix in ("bbox_", "segm_", "novel_bbox_", "novel_segm_"):
        assert 0 <= results["detection"][prefix + "AP"] <= 1, prefix
    assert 0 <= results["detection"]["agnostic_bbox_AP"] <= results["detection"]["agnostic_bbox_AP50"] <= 1
    scenes = build_task_dataset(cfg, "detection", "val", train=False)
    assert results["detection"]["num_images"] == len(scenes.image_ids)          # the scenes the AP is over
    assert results["captioning"]["num_images"] == 20 and results["captioning"]["CIDEr"] >= 0
    assert 0 <= results["mlm"]["accuracy"] <= 1 and results["mlm"]["num_masked"] > 0
    assert not model.training

    # Retrieval by hand: all 20 images and 100 captions of the split in one batch, dataset order.
    dataset = build_task_dataset(cfg, "retrieval", "val", train=False)
    task = TASKS["retrieval"](cfg.tasks.retrieval)
    with torch.no_grad():
        batch = task.collate([dataset[i] for i in range(len(dataset))])
        embeddings, _ = task.embed(model, batch)
        i2t, t2i = task.logits(model, embeddings)
    expected = {**{k: v for k, v in retrieval_recall(i2t, batch.text_image_index).items() if k.startswith("i2t")},
                **{k: v for k, v in retrieval_recall(t2i.T, batch.text_image_index).items() if k.startswith("t2i")}}
    for key, value in expected.items():
        assert results["retrieval"][key] == pytest.approx(value), key
