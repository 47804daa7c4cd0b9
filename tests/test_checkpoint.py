"""Checkpoints: exact round trips, crash safety, corruption detection, and resume == uninterrupted run."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from uniperceiver_v2.engine import checkpoint as ckpt
from uniperceiver_v2.engine.checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from uniperceiver_v2.engine.optim import MTAdamW
from uniperceiver_v2.engine.sampling import UnmixedTaskSampler
from uniperceiver_v2.engine.schedule import WarmupStepSchedule, build_lr_scheduler


class TiedModel(nn.Module):
    """Embedding tied to the output projection (shared storage, which safetensors refuses as is),
    a BatchNorm buffer and dropout, so weights, buffers and RNG all matter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        h = self.dropout(torch.relu(self.norm(self.hidden(self.embed(tokens)))))
        return self.out(h)


TASKS = {"a": 0.7, "b": 0.3}


def _train_step(model, optimizer, scheduler, sampler, iteration):
    """One iteration whose data and noise come from the global torch, numpy and python RNGs."""
    task = sampler.task_for_iteration(iteration)
    tokens = torch.randint(0, 11, (8,))
    targets = (tokens + (1 if task == "a" else 2)) % 11
    label_noise = np.random.rand() * 0.1 + random.random() * 0.1
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits, targets, label_smoothing=label_noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step(sampling_ratio=sampler.sampling_ratio(task), task_weight=1.0)
    scheduler.step()
    return loss.item()


def _fresh(seed):
    torch.manual_seed(seed)
    model = TiedModel()
    optimizer = MTAdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    scheduler = build_lr_scheduler(optimizer, WarmupStepSchedule(total_iterations=10, warmup_iterations=3))
    return model, optimizer, scheduler


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_gives_identical_losses(tmp_path):
    sampler = UnmixedTaskSampler(list(TASKS), TASKS, seed=0)
    _seed_everything(0)
    model, optimizer, scheduler = _fresh(0)
    uninterrupted = [_train_step(model, optimizer, scheduler, sampler, i) for i in range(10)]

    _seed_everything(0)
    model, optimizer, scheduler = _fresh(0)
    first_half = [_train_step(model, optimizer, scheduler, sampler, i) for i in range(5)]
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, extra_state={"sampler_seed": sampler.seed})
    del model, optimizer, scheduler

    _seed_everything(1234)  # a new process starts with other random states; the checkpoint restores them
    model, optimizer, scheduler = _fresh(99)
    extra = load_checkpoint(tmp_path, model, optimizer, scheduler)
    start = read_checkpoint_meta(tmp_path)["iteration"]
    resumed_sampler = UnmixedTaskSampler(list(TASKS), TASKS, seed=extra["sampler_seed"])
    second_half = [_train_step(model, optimizer, scheduler, resumed_sampler, i) for i in range(start, 10)]

    assert first_half + second_half == uninterrupted
    assert model.out.weight is model.embed.weight  # tying kept after loading


def test_round_trip_restores_params_optimizer_and_rng(tmp_path):
    sampler = UnmixedTaskSampler(list(TASKS), TASKS, seed=0)
    model, optimizer, scheduler = _fresh(0)
    for i in range(3):
        _train_step(model, optimizer, scheduler, sampler, i)
    extra = {"best": {"ap": 0.25, "at": 3}, "history": [1.0, 2.0], "tensor": torch.arange(4), "note": None}
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, extra_state=extra, config={"lr": 1e-2})
    after_save = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    assert path == tmp_path / "iter_0000003" and find_latest(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "training_state.pt"]
    torch.load(path / "training_state.pt", weights_only=True)  # loadable without unpickling arbitrary objects
    meta = json.loads((path / "meta.json").read_text())
    assert meta["iteration"] == 3 and meta["config"] == {"lr": 1e-2}
    assert meta["config_sha256"] == ckpt.config_hash({"lr": 1e-2})

    model_b, optimizer_b, scheduler_b = _fresh(7)
    torch.rand(100)  # move the RNG streams away from the saved point
    np.random.rand(100)
    random.random()
    extra_b = load_checkpoint(path, model_b, optimizer_b, scheduler_b)

    assert extra_b.keys() == extra.keys() and extra_b["best"] == extra["best"]
    assert torch.equal(extra_b["tensor"], extra["tensor"])
    for (name, a), (_, b) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    for p_a, p_b in zip(model.parameters(), model_b.parameters()):
        state_a, state_b = optimizer.state[p_a], optimizer_b.state[p_b]
        assert state_a["step"] == state_b["step"]
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert scheduler_b.state_dict() == scheduler.state_dict()
    after_load = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(after_save[0], after_load[0])
    assert np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]


def _save_simple(directory, iteration, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = MTAdamW(model.parameters())
    save_checkpoint(directory, iteration, model, optimizer)
    return model


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _save_simple(tmp_path, 1, seed=1)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        _save_simple(tmp_path, 2, seed=2)
    monkeypatch.undo()

    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]  # no half-written dir
    restored = nn.Linear(3, 2)
    load_checkpoint(tmp_path, restored)
    assert torch.equal(restored.weight, first.weight)


def test_crash_before_pointer_update_still_points_to_previous(tmp_path, monkeypatch):
    _save_simple(tmp_path, 1)
    monkeypatch.setattr(ckpt, "_write_latest", lambda *args: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        _save_simple(tmp_path, 2)
    monkeypatch.undo()
    assert find_latest(tmp_path) == tmp_path / "iter_0000001"


def test_leftover_temporary_directory_is_ignored_and_cleaned(tmp_path):
    _save_simple(tmp_path, 1)
    leftover = tmp_path / ".tmp-iter_0000002-99999"  # what a killed process leaves behind
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert find_latest(tmp_path) == tmp_path / "iter_0000001"
    _save_simple(tmp_path, 2)
    assert not leftover.exists()
    assert find_latest(tmp_path) == tmp_path / "iter_0000002"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = nn.Linear(2, 2)
    for iteration in (10, 20, 30, 40):
        save_checkpoint(tmp_path, iteration, model, None, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000030", "iter_0000040"]


def test_resaving_same_iteration_replaces_it(tmp_path):
    _save_simple(tmp_path, 5, seed=1)
    second = _save_simple(tmp_path, 5, seed=2)
    restored = nn.Linear(3, 2)
    load_checkpoint(tmp_path / "iter_0000005", restored)
    assert torch.equal(restored.weight, second.weight)


def test_find_latest_without_pointer_and_on_empty_dir(tmp_path):
    assert find_latest(tmp_path) is None
    _save_simple(tmp_path, 3)
    _save_simple(tmp_path, 12)
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "iter_0000012"


def test_corrupt_model_file_is_named(tmp_path):
    _save_simple(tmp_path, 1)
    model_file = tmp_path / "iter_0000001" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(tmp_path, nn.Linear(3, 2))


def test_missing_and_truncated_files_are_named(tmp_path):
    _save_simple(tmp_path, 1)
    state_file = tmp_path / "iter_0000001" / "training_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="training_state.pt is corrupt"):
        load_checkpoint(tmp_path, nn.Linear(3, 2))
    state_file.unlink()
    with pytest.raises(CheckpointError, match="training_state.pt is missing"):
        load_checkpoint(tmp_path, nn.Linear(3, 2))
    (tmp_path / "iter_0000001" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(tmp_path / "iter_0000001", nn.Linear(3, 2))


def test_dangling_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    first = _save_simple(tmp_path, 1, seed=1)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.warns(UserWarning, match=r"latest points to .*iter_0000009, which does not exist; using "
                                         r".*iter_0000001"):
        assert find_latest(tmp_path) == tmp_path / "iter_0000001"
    restored = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="iter_0000009"):
        load_checkpoint(tmp_path, restored)
    assert torch.equal(restored.weight, first.weight)

    shutil.rmtree(tmp_path / "iter_0000001")          # nothing left to fall back to: an error, not a fresh start
    with pytest.raises(CheckpointError, match=r"latest points to .*iter_0000009, which does not exist; no other "
                                              r"complete checkpoint"):
        load_checkpoint(tmp_path, nn.Linear(3, 2))


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: (folder / "meta.json").unlink(), "has no meta.json"),
    (lambda folder: (folder / "model.safetensors").unlink(), r"is incomplete: .*model.safetensors is missing"),
    (lambda folder: (folder / "training_state.pt").write_bytes(b"torn"),
     r"is incomplete: .*training_state.pt is corrupt: 4 bytes"),
    (lambda folder: (folder / "meta.json").write_text('{"files": '), "has an unreadable meta.json"),
])
def test_incomplete_latest_checkpoint_falls_back_with_a_warning(tmp_path, damage, reason):
    first = _save_simple(tmp_path, 1, seed=1)
    _save_simple(tmp_path, 2, seed=2)
    damage(tmp_path / "iter_0000002")
    with pytest.warns(UserWarning, match=rf"latest points to .*iter_0000002, which {reason}.*; using .*iter_0000001"):
        assert find_latest(tmp_path) == tmp_path / "iter_0000001"
    (tmp_path / "latest").unlink()                    # without a pointer the highest complete folder is taken
    with pytest.warns(UserWarning, match=r"skipped incomplete checkpoint\(s\) .*iter_0000002 .*; using .*iter_0000001"):
        assert find_latest(tmp_path) == tmp_path / "iter_0000001"
    restored = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="iter_0000002"):
        load_checkpoint(tmp_path, restored)
    assert torch.equal(restored.weight, first.weight)


def test_no_complete_checkpoint_without_pointer_is_an_error(tmp_path):
    _save_simple(tmp_path, 3)
    (tmp_path / "latest").unlink()
    (tmp_path / "iter_0000003" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint: .*iter_0000003 .*model.safetensors is "
                                              r"missing"):
        find_latest(tmp_path)


def test_tampered_latest_is_refused_not_skipped(tmp_path):
    """Same size, other bytes: the SHA-256 check refuses it; an older checkpoint is not silently used instead."""
    _save_simple(tmp_path, 1)
    _save_simple(tmp_path, 2)
    model_file = tmp_path / "iter_0000002" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0x01
    model_file.write_bytes(bytes(data))
    assert find_latest(tmp_path) == tmp_path / "iter_0000002"
    with pytest.raises(CheckpointError, match=r"iter_0000002/model.safetensors is corrupt: SHA-256"):
        load_checkpoint(tmp_path, nn.Linear(3, 2))


def test_non_finite_or_huge_saved_weights_are_refused_on_resume(tmp_path):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    save_checkpoint(tmp_path / "nan", 1, model, None)
    with pytest.raises(CheckpointError, match=r"iter_0000001/model.safetensors: NaN or inf in 1 tensor\(s\): "
                                              r"weight \(1 of 6 values\)"):
        load_checkpoint(tmp_path / "nan", nn.Linear(3, 2))
    with torch.no_grad():
        model.weight.fill_(0.1)
        model.bias[1] = 4e36
    save_checkpoint(tmp_path / "huge", 1, model, None)
    with pytest.raises(CheckpointError, match=r"beyond 1e\+06 .*: bias \(\|value\| up to 4e\+36\)"):
        load_checkpoint(tmp_path / "huge", nn.Linear(3, 2))


def test_write_text_atomic_keeps_the_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "run_info.json"
    ckpt.write_text_atomic(path, '{"attempt": 1}\n')
    assert path.read_text() == '{"attempt": 1}\n'

    def killed(*args):
        raise KeyboardInterrupt("killed between writing and renaming (simulated)")

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_text_atomic(path, '{"attempt": 2, "argv": ["a very long line"]}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"attempt": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]       # no temporary file left behind


def test_wrong_model_is_named(tmp_path):
    _save_simple(tmp_path, 1)
    with pytest.raises(CheckpointError, match="model.safetensors does not fit"):
        load_checkpoint(tmp_path, nn.Linear(4, 2))


def test_non_plain_extra_state_is_rejected_with_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"extra_state\['metrics'\]\['ap'\].*numpy"):
        save_checkpoint(tmp_path, 1, nn.Linear(2, 2), None, extra_state={"metrics": {"ap": np.float64(0.3)}})
    assert find_latest(tmp_path) is None


def test_missing_optimizer_state_is_an_error(tmp_path):
    save_checkpoint(tmp_path, 1, nn.Linear(2, 2), None)
    model = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path, model, MTAdamW(model.parameters()))


def test_nothing_to_load_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path, nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", nn.Linear(2, 2))


def test_a_checkpoint_with_the_obsolete_decoder_logit_scale_still_loads(tmp_path):
    """Decoders saved before 2026-12-03 carried an unused ``decoder.logit_scale``; their weights load, the rest
    must still match exactly (strict)."""
    import safetensors.torch

    from uniperceiver_v2.config import DecoderConfig
    from uniperceiver_v2.modeling.unified_decoder import UnifiedDecoder

    cfg = DecoderConfig(width=32, depth=1, heads=2, ffn_dim=64)
    torch.manual_seed(0)
    old = UnifiedDecoder(cfg, image_dim=8, text_dim=8)
    state = {key: value.clone() for key, value in old.state_dict().items()}
    assert "logit_scale.log_scale" not in state
    state["logit_scale.log_scale"] = torch.tensor(2.6593)                       # what an old checkpoint holds
    path = tmp_path / "old_decoder.safetensors"
    safetensors.torch.save_file(state, str(path))
    torch.manual_seed(1)
    new = UnifiedDecoder(cfg, image_dim=8, text_dim=8)
    safetensors.torch.load_model(new, str(path), strict=True)
    assert all(torch.equal(value, state[key]) for key, value in new.state_dict().items())
    state["blocks.0.not_a_weight"] = torch.zeros(1)                             # anything else is still an error
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(RuntimeError, match="not_a_weight"):
        safetensors.torch.load_model(new, str(path), strict=True)
