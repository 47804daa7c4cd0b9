"""The trainer's mechanism on a small toy model (CPU, seconds): weights, groups, accumulation, streams, resume.

The toy model has the parts the trainer treats specially (an image backbone and a text encoder at a lower lr,
norms, embeddings, a logit scale, an MoE-like gate, dropout) and three toy tasks named like the real ones.
tests/test_distributed.py imports these toys for its multi-process runs. The real model's end-to-end resume
is tested in tests/test_train_cli.py.
"""

from __future__ import annotations

import json
import math
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from uniperceiver_v2.config import get_preset
from uniperceiver_v2.engine.data_setup import EvalBatches, TaskStream, shard_of_epoch
from uniperceiver_v2.engine.distributed import all_gather_with_grad, get_rank
from uniperceiver_v2.engine.logging import read_metrics
from uniperceiver_v2.engine.optim import MTAdamW
from uniperceiver_v2.engine.schedule import WarmupStepSchedule
from uniperceiver_v2.engine.trainer import Trainer, build_optimizer, fail_fast

DIM, HIDDEN, VOCAB, CLASSES, SEQ = 12, 16, 20, 5, 6
TOY_TASKS = ("classification", "mlm", "retrieval")


# ------------------------------------------------------------------------------------------------ toy model
class ToyModel(nn.Module):
    """image_encoder.backbone (lr x encoder_lr_mult), text_encoder (lr x text lr_mult), a decoder with a norm,
    an embedding, a gate and a logit scale."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.backbone = nn.Linear(DIM, HIDDEN)
        self.image_encoder.proj = nn.Linear(HIDDEN, HIDDEN)
        self.text_encoder = nn.Embedding(VOCAB, HIDDEN)
        self.decoder = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.LayerNorm(HIDDEN))
        self.gate = nn.Linear(HIDDEN, 2)
        self.spe_embed = nn.Parameter(torch.randn(HIDDEN) * 0.02)
        self.class_embeddings = nn.Embedding(CLASSES, HIDDEN)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dropout = nn.Dropout(dropout)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, DIM) -> (B, HIDDEN)."""
        h = self.image_encoder.proj(torch.relu(self.image_encoder.backbone(x)))
        return self.decode(h)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, SEQ) -> per-token (B, SEQ, HIDDEN)."""
        return self.decode(self.text_encoder(ids))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.spe_embed
        gate = torch.softmax(self.gate(h), dim=-1)
        return self.dropout(self.decoder(h)) + gate[..., :1] * h

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp() * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


class ToyDataset(Dataset):
    """Fixed random samples of one toy task; ``noise`` adds a random 'augmentation' drawn at load time."""

    def __init__(self, task: str, size: int, noise: float = 0.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + len(task))
        self.task, self.noise = task, noise
        self.x = torch.randn(size, DIM, generator=g)
        self.labels = torch.randint(0, CLASSES, (size,), generator=g)
        self.ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        x = self.x[index] + self.noise * torch.randn(DIM)
        if self.task == "classification":
            return {"x": x, "label": self.labels[index]}
        if self.task == "mlm":
            # Which tokens are hidden is drawn at load time (seeded per sample by the trainer's streams).
            return {"ids": self.ids[index], "masked": torch.rand(SEQ) < 0.3}
        return {"x": x, "ids": self.ids[index]}


class ToyTask:
    """Duck-typed like the package's tasks (``tasks.base.Task``): name, config, collate, predict, and loss()
    whose "loss" is w_k times the task's loss terms.

    ``fail_at``: (rank, call number) at which loss() raises. Retrieval returns the number of candidates it
    scored as a logged term.
    """

    def __init__(self, name: str, config=None, gather: bool = True, fail_at: tuple[int, int] | None = None) -> None:
        self.name, self.config, self.gather = name, config, gather
        self.fail_at = tuple(fail_at) if fail_at is not None else None
        self.calls = 0

    def collate(self, samples: list[dict]) -> dict:
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def loss(self, model: ToyModel, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail_at is not None and (get_rank(), self.calls) == self.fail_at:
            raise RuntimeError(f"toy task {self.name} failed on rank {get_rank()} at call {self.calls}")
        if self.name == "classification":
            logits = model.similarity(model.encode_image(batch["x"]), model.decode(model.class_embeddings.weight))
            loss = F.cross_entropy(logits, batch["label"])
            return {"loss": self.config.loss_weight * loss, "loss_cls": loss.detach()}
        if self.name == "mlm":
            hidden = model.encode_text(batch["ids"] * ~batch["masked"])          # 0 = the mask token
            vocab = model.decode(model.text_encoder.weight)
            logits = model.similarity(hidden.flatten(0, 1), vocab)
            targets = batch["ids"].masked_fill(~batch["masked"], -100).flatten()
            labelled = bool((targets >= 0).any())
            loss = F.cross_entropy(logits, targets, ignore_index=-100) if labelled else logits.sum() * 0
            return {"loss": self.config.loss_weight * loss, "loss_mlm": loss.detach()}
        image = model.encode_image(batch["x"])
        text = model.encode_text(batch["ids"]).mean(dim=1)
        rank_offset = 0
        if self.gather:
            all_text, all_image = all_gather_with_grad(text), all_gather_with_grad(image)
            rank_offset = get_rank() * len(image)
        else:
            all_text, all_image = text, image
        targets = torch.arange(len(image)) + rank_offset
        i2t = F.cross_entropy(model.similarity(image, all_text), targets)
        t2i = F.cross_entropy(model.similarity(text, all_image), targets)
        loss = (i2t + t2i) / 2
        return {"loss": self.config.loss_weight * loss, "loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(),
                "num_candidates": torch.tensor(float(len(all_text)))}

    def predict(self, model: ToyModel, batch: dict) -> torch.Tensor:
        return model.encode_image(batch["x"])


def toy_config(tmp_path, **overrides):
    """The tiny preset with only the toy tasks enabled and small batches; ``overrides`` are dotted keys."""
    from uniperceiver_v2.config import apply_overrides

    cfg = get_preset("tiny")
    for name in ("detection", "captioning"):
        cfg.tasks.get(name).enabled = False
    settings = {
        "run.output_dir": str(tmp_path / "run"), "run.iterations": 8, "run.log_every": 1, "run.ckpt_every": 4,
        "run.seed": 3, "optim.lr": 1e-2, "optim.warmup_iters": 2, "optim.decay_at": [0.75],
        "tasks.classification.batch_size": 4, "tasks.mlm.batch_size": 4, "tasks.retrieval.batch_size": 4,
        "tasks.classification.loss_weight": 1.0, "tasks.mlm.loss_weight": 0.5, "tasks.retrieval.loss_weight": 2.0,
        # exact arithmetic: these tests compare steps that are equal in float32 (bf16 rounding would blur them)
        "run.precision": "fp32",
    }
    settings.update(overrides)
    return apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in settings.items()])


def toy_setup(cfg, dropout=0.0, noise=0.0, dataset_size=24, model_seed=0, **task_kwargs):
    """(model, tasks, datasets) for the enabled toy tasks."""
    torch.manual_seed(model_seed)
    model = ToyModel(dropout)
    tasks, datasets = {}, {}
    for i, name in enumerate(cfg.tasks.names()):
        kwargs = {key: value[name] for key, value in task_kwargs.items() if name in value}
        tasks[name] = ToyTask(name, cfg.tasks.get(name), gather=cfg.tasks.retrieval.gather, **kwargs)
        datasets[name] = ToyDataset(name, dataset_size, noise, seed=i)
    return model, tasks, datasets


def make_trainer(cfg, **kwargs) -> Trainer:
    model, tasks, datasets = toy_setup(cfg, **kwargs)
    return Trainer(cfg, model, tasks, datasets, progress=False, tensorboard=False, argv=["--config", "toy"])


def train_losses(output_dir) -> list[tuple[int, str, float]]:
    return [(r["iteration"], r["task"], r["loss"]) for r in read_metrics(output_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------------ param groups
def test_parameter_groups_lr_multipliers_and_no_weight_decay(tmp_path):
    cfg = toy_config(tmp_path, **{"optim.encoder_lr_mult": 0.1, "text_encoder.lr_mult": 0.25})
    model = ToyModel()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, MTAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    placement = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert set(placement) == set(names.values())          # every parameter exactly once
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    assert placement["image_encoder.backbone.weight"] == pytest.approx((0.1 * lr, wd))
    assert placement["image_encoder.backbone.bias"] == pytest.approx((0.1 * lr, 0.0))
    assert placement["image_encoder.proj.weight"] == pytest.approx((lr, wd))       # not the backbone
    assert placement["text_encoder.weight"] == pytest.approx((0.25 * lr, 0.0))     # an nn.Embedding
    assert placement["decoder.0.weight"] == pytest.approx((lr, wd))
    for no_decay in ("decoder.0.bias", "decoder.2.weight", "decoder.2.bias", "gate.weight", "gate.bias",
                     "spe_embed", "class_embeddings.weight", "logit_scale"):
        assert placement[no_decay] == pytest.approx((lr, 0.0)), no_decay
    # The first group is the base lr with decay: logs call its lr "the" lr.
    assert optimizer.param_groups[0]["lr"] == lr and optimizer.param_groups[0]["weight_decay"] == wd

    cfg = toy_config(tmp_path, **{"optim.name": "adamw", "optim.normalize": False, "optim.compensate": False})
    assert type(build_optimizer(cfg, model)) is torch.optim.AdamW


# ------------------------------------------------------------------------------------------------ loss weights
def _reference_gradients(cfg, task, batch_samples):
    """The gradient of the task's "loss" (w_k inside), computed by hand, and the task's (s_k, w_k)."""
    model, tasks, _ = toy_setup(cfg)
    from uniperceiver_v2.engine.trainer import seed_iteration
    seed_iteration(cfg.run.seed, 0, 0)
    tasks[task].loss(model, tasks[task].collate(batch_samples))["loss"].backward()
    names = cfg.tasks.names()
    s_k = cfg.tasks.get(task).sampling_weight / sum(cfg.tasks.get(n).sampling_weight for n in names)
    return model, s_k, cfg.tasks.get(task).loss_weight


@pytest.fixture
def float64():
    """Float64 toys, so the comparison with a hand-made step is not blurred by float32 summation order
    (Adam's first step divides tiny gradients by their own size, which amplifies such differences)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("optimizer_name, normalize", [("mt_adamw", True), ("mt_adamw", False), ("adamw", False)])
def test_loss_weight_counts_exactly_once(tmp_path, optimizer_name, normalize, float64):
    """The gradient is that of the task's "loss" (w_k inside, not multiplied again); normalising MT-AdamW also
    gets task_weight=w_k (its normalisation removed the loss scale), the others get no second w_k."""
    overrides = {"optim.name": optimizer_name, "optim.normalize": normalize, "run.iterations": 1,
                 "optim.warmup_iters": 0, "optim.decay_at": [1.0], "tasks.classification.loss_weight": 3.0}
    if optimizer_name == "adamw":
        overrides.update({"optim.compensate": False, "optim.grad_clip": 0.05})
    cfg = toy_config(tmp_path, **overrides)
    trainer = make_trainer(cfg)
    task = trainer.plan(0)[0]
    stream = TaskStream(task, toy_setup(cfg)[2][task], lambda s: s, cfg.tasks.get(task).batch_size,
                        seed=cfg.run.seed)
    samples = next(stream)

    seen = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen["grads"] = [p.grad.clone() if p.grad is not None else None for p in trainer.model.parameters()]
        seen["kwargs"] = kwargs
        return step(*args, **kwargs)

    # patched on the instance, after the scheduler wrapped the method (hence its warning, filtered above)
    trainer.optimizer.step = recording_step
    trainer.train_step(0)

    reference, s_k, w_k = _reference_gradients(cfg, task, samples)
    assert w_k != 1.0
    if optimizer_name == "mt_adamw":
        expected_kwargs = {"sampling_ratio": pytest.approx(s_k), "task_weight": w_k if normalize else 1.0}
        assert seen["kwargs"] == expected_kwargs
        expected = [None if p.grad is None else p.grad.clone() for p in reference.parameters()]
        build_optimizer(cfg, reference).step(sampling_ratio=s_k, task_weight=expected_kwargs["task_weight"])
    else:
        assert seen["kwargs"] == {}
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        expected = [None if p.grad is None else p.grad.clone() for p in reference.parameters()]
        build_optimizer(cfg, reference).step()
    for name, got, want in zip([n for n, _ in reference.named_parameters()], seen["grads"], expected):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_mixed_sampling_layout_and_unit_optimizer_weights(tmp_path):
    cfg = toy_config(tmp_path, **{"run.sampling": "mixed", "run.grad_accum": 3})
    trainer = make_trainer(cfg)
    assert trainer.plan(5) == trainer.sampler.slots_for_iteration(5)    # one process: slot m = micro-batch m
    assert trainer.optimizer_kwargs(5) == {}                              # MT-AdamW steps with s_k = 1, w_k = 1

    unmixed = make_trainer(toy_config(tmp_path))
    task = unmixed.plan(5)[0]
    assert unmixed.plan(5) == [task]
    assert unmixed.optimizer_kwargs(5) == {"sampling_ratio": unmixed.sampler.sampling_ratio(task),
                                           "task_weight": cfg.tasks.get(task).loss_weight}


# ------------------------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """grad_accum=2 with batch b takes the same step as grad_accum=1 with batch 2b (mean losses, no dropout)."""
    big = make_trainer(toy_config(tmp_path / "a", **{f"tasks.{t}.batch_size": 8 for t in TOY_TASKS},
                                  **{"tasks.retrieval.enabled": False}))
    small = make_trainer(toy_config(tmp_path / "b", **{"run.grad_accum": 2}, **{"tasks.retrieval.enabled": False}))
    for iteration in range(3):
        assert big.plan(iteration)[0] == small.plan(iteration)[0]
        big.train_step(iteration)
        small.train_step(iteration)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ data streams
def test_shards_are_disjoint_and_cover_each_epoch():
    shards = [shard_of_epoch(10, epoch=2, rank=r, world_size=3, seed=1, task="mlm") for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set().union(*map(set, shards)) == set(range(10))   # padding repeats 2 indices, nothing is missing
    assert not (shard_of_epoch(10, 0, 0, 1, 1, "mlm") == shard_of_epoch(10, 1, 0, 1, 1, "mlm")).all()


def test_stream_resumes_exactly_and_does_not_depend_on_workers():
    dataset = ToyDataset("mlm", 10, noise=0.5)
    collate = ToyTask("mlm").collate
    reference = TaskStream("mlm", dataset, collate, batch_size=4, seed=7)
    batches = [next(reference) for _ in range(6)]                # 24 samples: batches straddle epochs
    assert reference.state_dict() == {"epoch": 2, "position": 4, "shard_size": 10}

    resumed = TaskStream("mlm", dataset, collate, batch_size=4, seed=7)
    for _ in range(2):
        next(resumed)
    state = resumed.state_dict()
    restarted = TaskStream("mlm", dataset, collate, batch_size=4, seed=7, num_workers=2)
    restarted.load_state_dict(state)
    torch.manual_seed(12345)      # the trainer's own RNG state must not matter
    for expected in batches[2:]:
        got = next(restarted)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_eval_batches_cover_every_sample_once_with_equal_batch_counts():
    dataset = list(range(11))
    parts = [EvalBatches(dataset, list, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert {len(part) for part in parts} == {2}                       # shards of 4, 4, 3 -> 2 batches each
    seen = []
    for part in parts:
        for indices, batch, filler in part:
            assert batch == indices                                   # the batch holds exactly those samples
            if not filler:
                seen += indices
    assert sorted(seen) == list(range(11))
    lonely = EvalBatches(dataset[:1], list, batch_size=4, rank=1, world_size=2)    # rank 1 has no sample
    assert [(indices, filler) for indices, _, filler in lonely] == [([0], True)]


# ------------------------------------------------------------------------------------------------ exact resume
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    """SIGTERM in iteration 5 -> checkpoint at 5, clean return; resume -> the same losses as without stopping.

    Dropout, random 'augmentation' noise and random MLM masks are all on, so model and data RNGs are tested.
    """
    full_cfg = toy_config(tmp_path / "full")
    full = make_trainer(full_cfg, dropout=0.2, noise=0.1)
    result = full.train()
    assert result.iteration == 8 and result.interrupted_by is None
    expected = train_losses(tmp_path / "full" / "run")
    assert [r[0] for r in expected] == list(range(1, 9))

    cfg = toy_config(tmp_path / "split")
    first = make_trainer(cfg, dropout=0.2, noise=0.1)
    original_step = first.train_step

    def step_with_sigterm(iteration):
        if iteration == 4:                        # during the 5th iteration, as a scheduler would
            signal.raise_signal(signal.SIGTERM)
        return original_step(iteration)

    first.train_step = step_with_sigterm
    interrupted = first.train()
    assert interrupted.interrupted_by == signal.SIGTERM and interrupted.iteration == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL       # handlers restored
    run_dir = tmp_path / "split" / "run"
    assert (run_dir / "checkpoints" / "iter_0000005" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "iter_0000004").is_dir()      # the regular ckpt_every=4 one

    # A fresh process would build a differently initialised model: the checkpoint must override it.
    second = make_trainer(cfg, dropout=0.2, noise=0.1, model_seed=99)
    assert second.resume()
    assert second.iteration == 5
    second.train()
    assert train_losses(run_dir) == expected            # bit-exact on the CPU, iteration by iteration
    for p, q in zip(full.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 3 and info["resumed_from_iteration"] == 5
    assert "uniperceiver_v2.train --config toy" in info["command"] and "start_time" in info
    assert len(info["previous_sessions"]) == 1 and info["previous_sessions"][0]["resumed_from_iteration"] is None
    stopped = info["previous_sessions"][0]["end"]
    assert (stopped["status"], stopped["signal"], stopped["iteration"]) == ("stopped", "SIGTERM", 5)
    assert stopped["checkpoint"].endswith("iter_0000005") and info["end"]["status"] == "finished"
    assert "run:" in (run_dir / "config.yaml").read_text()


def test_extending_a_finished_run_keeps_or_replaces_the_schedule(tmp_path):
    """A run of 8 iterations (decay at 6) resumed with run.iterations=16 (decay at 12): by default the saved
    schedule stays (lr decayed from 6 on); with new_schedule the lr follows the new one (base lr until 12)."""
    cfg = toy_config(tmp_path, **{"run.ckpt_every": 8})
    make_trainer(cfg).train()
    base = cfg.optim.lr
    longer = toy_config(tmp_path, **{"run.ckpt_every": 8, "run.iterations": 16})

    kept = make_trainer(longer)
    assert kept.resume() and kept.iteration == 8
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(base * 0.1)           # the saved schedule
    replaced = make_trainer(longer)
    assert replaced.resume(new_schedule=True) and replaced.iteration == 8
    new = WarmupStepSchedule(16, 2, (0.75,), 0.1)
    for group in replaced.optimizer.param_groups:                                       # every group, ratios kept
        assert group["lr"] == pytest.approx(group["initial_lr"] * new.lr_factor(8))
    assert replaced.optimizer.param_groups[0]["lr"] == pytest.approx(base)
    replaced.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for r in records:
        if r["iteration"] > 8:
            assert r["lr"] == pytest.approx(base * new.lr_factor(r["iteration"])), r["iteration"]
    # The replaced schedule is the one saved in the new checkpoints: resuming again keeps it.
    again = make_trainer(longer)
    assert again.resume() and again.iteration == 16
    assert again.scheduler.lr_lambdas[0].total_iterations == 16


def test_metrics_records_schedule_and_tensorboard(tmp_path):
    cfg = toy_config(tmp_path, **{"run.log_every": 2, "run.ckpt_every": 0, "run.iterations": 6})
    model, tasks, datasets = toy_setup(cfg)
    trainer = Trainer(cfg, model, tasks, datasets, progress=True, tensorboard=True)
    result = trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted({r["iteration"] for r in records}) == [2, 4, 6]
    # each window's batch counts add up to its iterations (one batch per iteration, one process)
    for it in (2, 4, 6):
        assert sum(r["count"] for r in records if r["iteration"] == it) == 2
    schedule = WarmupStepSchedule(6, 2, (0.75,), 0.1)
    for r in records:
        # lr of the last step of the window = lr_factor(iteration - 1); then the scheduler stepped once more
        assert r["lr"] == pytest.approx(cfg.optim.lr * schedule.lr_factor(r["iteration"]))
        assert r["grad_norm"] > 0 and r["time"] > 0 and r["iter_time"] > 0
        if r["task"] == "retrieval":
            assert r["num_candidates"] == 4 and "loss_i2t" in r
    assert set(result.final_losses) <= set(TOY_TASKS)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())


def test_non_finite_loss_names_task_and_iteration(tmp_path):
    cfg = toy_config(tmp_path, **{"run.iterations": 2})
    trainer = make_trainer(cfg)
    task = trainer.plan(0)[0]
    trainer.tasks[task].loss = lambda model, batch: {"loss": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(FloatingPointError, match=f"iteration 0: task '{task}' loss is nan"):
        trainer.train_step(0)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    trainer = make_trainer(toy_config(tmp_path, **{"run.precision": "bf16", "run.iterations": 2}))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    records = trainer.train_step(0)
    assert math.isfinite(records[0][1]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_fp16_on_cpu_and_missing_task_are_config_errors(tmp_path):
    from uniperceiver_v2.config import ConfigError

    with pytest.raises(ConfigError, match="run.precision"):
        make_trainer(toy_config(tmp_path, **{"run.precision": "fp16"}))
    cfg = toy_config(tmp_path)
    model, tasks, datasets = toy_setup(cfg)
    del tasks["mlm"]
    with pytest.raises(ConfigError, match="tasks.mlm"):
        Trainer(cfg, model, tasks, datasets, progress=False, tensorboard=False)


def test_fail_fast_reraises_in_a_single_process():
    with pytest.raises(ValueError, match="boom"), fail_fast():
        raise ValueError("boom")


def test_a_task_that_joins_late_trains_only_from_its_start_iteration(tmp_path):
    """tasks.classification.start_iteration=5: iterations 0-4 draw only the other tasks (the logged records say
    which task trained when), later ones draw it too, as the sampler predicts; the MT-AdamW s_k stays the preset's."""
    cfg = toy_config(tmp_path, **{"run.iterations": 40, "run.ckpt_every": 40,
                                  "tasks.classification.start_iteration": 5,
                                  "tasks.classification.sampling_weight": 0.6})
    trainer = make_trainer(cfg)
    trainer.train()
    trained = train_losses(tmp_path / "run")
    assert [task for iteration, task, _ in trained] == [trainer.sampler.task_for_iteration(i) for i in range(40)]
    assert all(task != "classification" for iteration, task, _ in trained if iteration <= 5)
    assert any(task == "classification" for iteration, task, _ in trained if iteration > 5)
    assert trainer.sampler.start_iterations == {"classification": 5, "mlm": 0, "retrieval": 0}
    assert trainer.sampler.sampling_ratio("classification") == pytest.approx(0.6 / (0.6 + 0.1 + 0.2))


# ------------------------------------------------------------------------------------------------ time budget
def test_fit_to_budget_closed_form():
    from uniperceiver_v2.engine.trainer import fit_to_budget

    # 100 iterations in 50 s, 0.5 s each from here: 250 s more = 500 iterations -> 600; a multiple of 100 already
    assert fit_to_budget(300.0, 50.0, 0.5, at=100, cap=10_000, multiple=100) == 600
    assert fit_to_budget(300.0, 50.0, 0.5, at=100, cap=10_000, multiple=1) == 600
    assert fit_to_budget(330.0, 50.0, 0.5, at=100, cap=10_000, multiple=100) == 600      # 660 rounded down
    assert fit_to_budget(330.0, 50.0, 0.5, at=100, cap=10_000, multiple=7) == 658        # 660 -> 94 x 7
    assert fit_to_budget(330.0, 50.0, 0.5, at=100, cap=650, multiple=100) == 650         # the cap, not rounded
    assert fit_to_budget(40.0, 50.0, 0.5, at=100, cap=10_000, multiple=100) == 100       # spent: end now
    assert fit_to_budget(52.0, 50.0, 0.5, at=100, cap=10_000, multiple=100) == 100       # 104 rounded down to at
    assert fit_to_budget(52.0, 50.0, 0.5, at=101, cap=10_000, multiple=100) == 105       # never below at: unrounded
    # the lr schedule's condition: the first decay (at 0.5 x length) must not fall inside a warm-up of 20
    assert fit_to_budget(1.0, 0.0, 0.5, at=10, cap=1000, warmup=20, first_decay=0.5) == 39   # round(19.5) = 20
    with pytest.raises(ValueError, match="seconds_per_iteration"):
        fit_to_budget(1.0, 0.0, 0.0, at=1, cap=10)


class StepClock:
    """A fake clock that advances ``seconds`` whenever the trainer runs a step: every iteration takes exactly
    ``seconds`` of the loop's time, whatever the machine does."""

    def __init__(self, trainer: Trainer, seconds: float) -> None:
        self.now, self.seconds = 0.0, seconds
        step = trainer.train_step

        def timed_step(iteration):
            self.now += self.seconds
            return step(iteration)

        trainer.train_step = timed_step
        trainer.clock = lambda: self.now


def budget_config(tmp_path, **overrides):
    # a cap of 400 iterations, a budget of 30 s decided at iteration 10; every iteration takes 0.5 s
    settings = {"run.iterations": 400, "run.time_budget_minutes": 0.5, "run.budget_check_at": 10,
                "run.ckpt_every": 4, "run.log_every": 1, "optim.decay_at": [0.75]}
    settings.update(overrides)
    return toy_config(tmp_path, **settings)


def test_a_time_budget_sets_the_runs_length_and_its_lr_schedule(tmp_path):
    """30 s at 0.5 s per iteration: 60 iterations (5 s spent at the decision, 25 s = 50 more), the lr decayed
    from 45 = 0.75 x 60 on (not from 300, the cap's), the decision in time_budget.json for the notebooks."""
    from uniperceiver_v2.walkthrough import time_budget_decision, training_status

    cfg = budget_config(tmp_path)
    trainer = make_trainer(cfg)
    StepClock(trainer, 0.5)
    result = trainer.train()
    assert result.iteration == trainer.total_iterations == 60
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert max(r["iteration"] for r in records) == 60
    schedule = WarmupStepSchedule(60, 2, (0.75,), 0.1)
    for r in records:   # a record's lr is the one the next iteration uses: factor(iteration)
        assert r["lr"] == pytest.approx(cfg.optim.lr * schedule.lr_factor(r["iteration"])), r["iteration"]
    decision = time_budget_decision(tmp_path / "run")
    assert decision["iterations"] == 60 and decision["cap"] == 400 and decision["decided_at"] == 10
    assert decision["seconds_per_iteration"] == pytest.approx(0.5)
    assert decision["measured_iterations"] == 10 and decision["spent_seconds"] == pytest.approx(4.5 + 0.5)
    status = training_status(tmp_path / "run", 400)
    assert status.finished and status.target == 60 and status.iteration == 60
    assert not training_status(tmp_path / "run", 800).finished          # another cap: not this decision's


def test_a_run_stopped_after_the_budgets_decision_resumes_to_the_same_length_and_losses(tmp_path):
    """Stopped at iteration 20 (after the decision at 10), resumed on a machine twice as slow: the length stays 60,
    the losses equal the uninterrupted run's. Resumed with another budget, the decision is taken anew."""
    full = make_trainer(budget_config(tmp_path / "full"))
    StepClock(full, 0.5)
    full.train()
    expected = train_losses(tmp_path / "full" / "run")

    cfg = budget_config(tmp_path / "split")
    first = make_trainer(cfg)
    clock = StepClock(first, 0.5)
    step = first.train_step

    def step_with_sigterm(iteration):
        if iteration == 19:
            signal.raise_signal(signal.SIGTERM)
        return step(iteration)

    first.train_step = step_with_sigterm
    assert first.train().iteration == 20 and first.total_iterations == 60 and clock.now == 10.0
    shutil.copytree(tmp_path / "split" / "run", tmp_path / "other" / "run")
    second = make_trainer(cfg)
    StepClock(second, 1.0)
    assert second.resume() and second.total_iterations == 60 and second.budget["decided_at"] == 10
    assert second.loop_seconds == pytest.approx(9.5)     # the 20th iteration's own time is after its checkpoint
    assert second.train().iteration == 60
    assert train_losses(tmp_path / "split" / "run") == expected

    # a budget of 60 s instead: the checkpoint's decision does not hold; the new attempt measures 1.0 s per
    # iteration over its first 10 (iterations 20-30: a window of min(200, budget_check_at) of its own) and
    # decides at 30 with 9.5 + 10 s spent: 30 + floor(40.5 / 1.0) = 70, rounded down to 68 (ckpt_every 4)
    other = make_trainer(budget_config(tmp_path / "other", **{"run.time_budget_minutes": 1.0}))
    assert other.resume() and other.iteration == 20
    assert other.budget is None and other.total_iterations == 400
    StepClock(other, 1.0)
    assert other.train().iteration == 68 and other.budget["decided_at"] == 30


def test_time_budget_config_checks(tmp_path):
    from uniperceiver_v2.config import ConfigError

    with pytest.raises(ConfigError, match="run.time_budget_minutes"):
        budget_config(tmp_path, **{"run.time_budget_minutes": -1})
    with pytest.raises(ConfigError, match="run.budget_check_at"):
        budget_config(tmp_path, **{"run.budget_check_at": 400})
