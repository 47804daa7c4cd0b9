"""The real Trainer under torchrun with 2 CPU processes (gloo), on the toy model of tests/test_trainer.py.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2`` on a small worker script
(written to tmp_path) that builds the toys, runs ``Trainer.train`` inside ``fail_fast`` and saves each rank's
parameters. The toys run in float64 so "2 processes x batch b == 1 process x batch 2b" can be checked tightly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer, toy_config

from uniperceiver_v2.engine.logging import read_metrics
from uniperceiver_v2.engine.trainer import Trainer

TESTS_DIR = Path(__file__).resolve().parent
# A guard against a hung process group, not a speed check: a real-model launch took over 90 s on a 2-core machine
# running two other trainings beside the suite (2026-12-07), so the guard leaves room for a loaded machine.
TIMEOUT = 300


WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    args = json.loads(sys.argv[1])
    if not args.get("float32"):
        torch.set_default_dtype(torch.float64)
    from test_trainer import make_trainer, toy_config
    from uniperceiver_v2.engine.distributed import barrier, get_rank
    from uniperceiver_v2.engine.trainer import fail_fast

    out = args["out"]
    with fail_fast():
        cfg = toy_config(__import__("pathlib").Path(out), **args["config"])
        if args.get("setup") == "real_retrieval":
            from test_distributed import real_retrieval_trainer
            trainer = real_retrieval_trainer(cfg)
        else:
            trainer = make_trainer(cfg, fail_at=args.get("fail_at", {}))
        if args.get("step_seconds"):
            from test_trainer import StepClock
            StepClock(trainer, args["step_seconds"][get_rank()])
        trainer.train()
        torch.save(trainer.model.state_dict(), f"{out}/params_rank{get_rank()}.pt")
        with open(f"{out}/length_rank{get_rank()}.json", "w") as file:
            json.dump(trainer.total_iterations, file)
        if hasattr(trainer.model, "candidate_counts"):
            with open(f"{out}/candidates_rank{get_rank()}.json", "w") as file:
                json.dump(trainer.model.candidate_counts, file)
        if args.get("resume_from"):
            # A second trainer resumes from an earlier checkpoint of the same run and must end identically.
            resumed = make_trainer(cfg, model_seed=7)
            resumed.resume(f"{out}/run/checkpoints/{args['resume_from']}")
            resumed.train()
            torch.save(resumed.model.state_dict(), f"{out}/resumed_rank{get_rank()}.pt")
        barrier()
    # Both ranks passed the barrier: leave without tearing gloo down. Its teardown at exit, racing the peer's, aborted
    # a rank now and then in CI (SIGABRT, "terminate called without an active exception") after every check had
    # passed, as in tests/test_distributed_utils.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


def real_retrieval_trainer(cfg) -> Trainer:
    """The real Trainer, RetrievalTask and UniPerceiverV2 (tiny preset with the small random text encoder of
    tests/helpers.py) on 16 image-caption pairs; ``model.candidate_counts`` records the number of
    candidates of every similarity matrix the task computes."""
    from helpers import caption_samples, tiny_model

    from uniperceiver_v2.tasks.retrieval import RetrievalTask

    model = tiny_model(cfg, seed=0)
    model.candidate_counts = []
    similarity = model.similarity

    def recording_similarity(inputs, targets, task):
        model.candidate_counts.append(int(targets.shape[0]))
        return similarity(inputs, targets, task)

    model.similarity = recording_similarity
    task = RetrievalTask(cfg.tasks.retrieval)
    return Trainer(cfg, model, {"retrieval": task}, {"retrieval": caption_samples(16)}, progress=False,
                   tensorboard=False)


def launch(tmp_path: Path, args: dict, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run the worker on 2 processes; returns the finished process (stdout and stderr merged)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), json.dumps({"out": str(tmp_path), **args})]
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, float64):
    """Unmixed sampling + gathered retrieval negatives + gradient accumulation on 2 ranks:
    the same task on both ranks every iteration, 2 x batch candidates, identical parameters on both ranks,
    and the same parameters and losses as one process with batch 2b."""
    common = {"tasks.mlm.enabled": False, "run.iterations": 6, "run.grad_accum": 2, "run.ckpt_every": 0,
              "tasks.retrieval.gather": True}
    batch = 3
    per_rank = {f"tasks.{t}.batch_size": batch for t in ("classification", "retrieval")}
    result = launch(tmp_path / "two", {"config": {**common, **per_rank}})
    assert result.returncode == 0, result.stdout[-3000:]

    rank0, rank1 = load(tmp_path / "two" / "params_rank0.pt"), load(tmp_path / "two" / "params_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    records = read_metrics(tmp_path / "two" / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, 7))   # one record per iteration: one task
    assert all(r["count"] == 4 for r in records)         # ... trained by both ranks, 2 micro-batches each
    retrieval = [r for r in records if r["task"] == "retrieval"]
    assert retrieval and all(r["num_candidates"] == 2 * batch for r in retrieval)

    single_cfg = toy_config(tmp_path / "one", **common,
                            **{f"tasks.{t}.batch_size": 2 * batch for t in ("classification", "retrieval")})
    single = make_trainer(single_cfg)
    single.train()
    single_records = read_metrics(tmp_path / "one" / "run" / "metrics.jsonl")
    assert [(r["iteration"], r["task"]) for r in single_records] == [(r["iteration"], r["task"]) for r in records]
    for a, b in zip(single_records, records):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-9, atol=1e-12)


def test_real_model_retrieval_gathers_the_global_batch_of_negatives(tmp_path):
    """UniPerceiverV2 + RetrievalTask under unmixed sampling on 2 ranks: each query is contrasted with 2 x batch
    candidates, the ranks stay identical, and the losses match one process with batch 2b (MoE gate noise off
    and the text encoder frozen, i.e. without dropout, so the model is deterministic)."""
    config = {"tasks.classification.enabled": False, "tasks.mlm.enabled": False, "run.iterations": 3,
              "run.ckpt_every": 0, "tasks.retrieval.gather": True, "decoder.moe.noise_std": 0.0,
              "text_encoder.freeze": True, "optim.lr": 1e-3, "run.precision": "fp32"}
    batch = 2
    result = launch(tmp_path / "two", {"setup": "real_retrieval", "float32": True,
                                       "config": {**config, "tasks.retrieval.batch_size": batch}})
    assert result.returncode == 0, result.stdout[-3000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / "two" / f"candidates_rank{rank}.json").read_text())
        assert counts == [2 * batch] * (2 * 3)          # both directions, every iteration
    rank0, rank1 = load(tmp_path / "two" / "params_rank0.pt"), load(tmp_path / "two" / "params_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    single = real_retrieval_trainer(toy_config(tmp_path / "one", **config, **{"tasks.retrieval.batch_size": 2 * batch}))
    single.train()
    assert single.model.candidate_counts == [2 * batch] * (2 * 3)
    two = read_metrics(tmp_path / "two" / "run" / "metrics.jsonl")
    one = read_metrics(tmp_path / "one" / "run" / "metrics.jsonl")
    for key in ("loss", "loss_i2t", "loss_t2i"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=1e-4), key


def test_mixed_sampling_keeps_ranks_identical_and_resumes_exactly(tmp_path):
    """Mixed sampling: ranks train different tasks in one step (DDP with unused parameters, no_sync);
    parameters stay identical, and resuming from iteration 3 reproduces the end state on each rank."""
    config = {"run.sampling": "mixed", "run.grad_accum": 2, "tasks.retrieval.gather": False,
              "run.iterations": 6, "run.ckpt_every": 3, "run.keep_checkpoints": 0}
    result = launch(tmp_path, {"config": config, "resume_from": "iter_0000003"})
    assert result.returncode == 0, result.stdout[-3000:]
    rank0, rank1 = load(tmp_path / "params_rank0.pt"), load(tmp_path / "params_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    for rank in (0, 1):
        resumed = load(tmp_path / f"resumed_rank{rank}.pt")
        for name in rank0:
            assert torch.equal(resumed[name], rank0[name]), name
    # With mixed sampling several tasks appear in one iteration's records (4 slots per iteration).
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for iteration in range(1, 7):
        assert sum(r["count"] for r in records if r["iteration"] == iteration) == 4


def test_ranks_follow_rank_zeros_time_budget_decision(tmp_path):
    """A time budget decided from rank 0's clock (0.5 s per iteration: 30 s -> 60 iterations) while rank 1's
    clock says 2 s per iteration (it alone would stop at 22): both ranks train 60 iterations and stay identical."""
    config = {"run.iterations": 400, "run.time_budget_minutes": 0.5, "run.budget_check_at": 10,
              "run.ckpt_every": 4, "run.log_every": 1, "optim.decay_at": [0.75]}
    result = launch(tmp_path, {"config": config, "step_seconds": [0.5, 2.0]})
    assert result.returncode == 0, result.stdout[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"length_rank{rank}.json").read_text()) == 60
    rank0, rank1 = load(tmp_path / "params_rank0.pt"), load(tmp_path / "params_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert max(r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) == 60


def test_a_failing_rank_ends_the_whole_job_with_its_error(tmp_path):
    """Rank 1 raises in its 2nd loss call; rank 0 would otherwise wait forever in the next all-reduce."""
    config = {"run.iterations": 50, "run.ckpt_every": 0, "tasks.mlm.enabled": False}
    fail_at = {name: [1, 2] for name in ("classification", "retrieval")}
    start = time.monotonic()
    result = launch(tmp_path, {"config": config, "fail_at": fail_at}, timeout=TIMEOUT)
    assert result.returncode != 0
    assert time.monotonic() - start < TIMEOUT
    assert "failed on rank 1 at call 2" in result.stdout
    assert "[rank 1] training failed" in result.stdout
