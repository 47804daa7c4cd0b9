"""The tiny preset's speed switches (docs/benchmarks.md, "Training speed"): each does what it says and can be
switched off, and switching it off gives the old numbers."""

import tempfile

import pytest
import torch

from uniperceiver_v2.config import ConfigError, get_preset, load_config
from uniperceiver_v2.engine import runtime
from uniperceiver_v2.engine.build import build_training
from uniperceiver_v2.engine.runtime import resolve_precision
from uniperceiver_v2.engine.trainer import Trainer

SMALL = ["tasks.detection.enabled=false", "tasks.captioning.enabled=false", "tasks.retrieval.enabled=false",
         "tasks.classification.batch_size=4", "tasks.mlm.batch_size=4", "data.image_size=64",
         "optim.warmup_iters=0", "run.ckpt_every=0"]


def trainer(synthetic_root, folder, *overrides):
    cfg = load_config("tiny", [f"data.root={synthetic_root}", *SMALL, f"run.output_dir={folder}", *overrides])
    model, tasks, datasets = build_training(cfg)
    return Trainer(cfg, model, tasks, datasets, progress=False, tensorboard=False)


def test_the_tiny_preset_freezes_the_text_encoder_and_lets_precision_follow_the_cpu():
    tiny = get_preset("tiny")
    assert tiny.text_encoder.freeze and tiny.run.precision == "auto"
    for paper in ("r50", "swin_base"):
        preset = get_preset(paper)
        assert not preset.text_encoder.freeze and preset.text_encoder.lr_mult == 0.1
        assert preset.run.precision == "bf16"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_device_multiplies_bf16_natively(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, torch.device("cpu")) == explicit


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(flags if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    flags.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    assert runtime.native_bf16(torch.device("cpu"))
    flags.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert not runtime.native_bf16(torch.device("cpu"))


def test_frozen_text_encoder_gets_no_gradient_no_optimizer_state_and_does_not_change(synthetic_root):
    with tempfile.TemporaryDirectory() as folder:
        run = trainer(synthetic_root, folder, "run.precision=fp32")
        text = dict(run.model.text_encoder.named_parameters())
        before = {name: p.detach().clone() for name, p in text.items()}
        optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
        assert not any(id(p) in optimized for p in text.values())
        for iteration in range(3):
            run.train_step(iteration)
        assert all(torch.equal(p, before[name]) for name, p in text.items())
        assert all(p.grad is None for p in text.values())
        assert not run.model.text_encoder.model.training             # no dropout in a frozen encoder


def test_autocast_off_gives_the_old_numbers(synthetic_root, monkeypatch):
    """precision "auto" on a CPU without native bf16 is exactly fp32; "bf16" trains close to it, not equal."""
    losses = {}
    for label, precision, native in (("fp32", "fp32", True), ("auto_no_bf16", "auto", False),
                                     ("bf16", "bf16", True)):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        with tempfile.TemporaryDirectory() as folder:
            run = trainer(synthetic_root, folder, f"run.precision={precision}")
            losses[label] = [terms["loss"] for i in range(2) for _, terms, _ in run.train_step(i)]
    assert losses["auto_no_bf16"] == pytest.approx(losses["fp32"], rel=1e-6, abs=1e-6)
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)


def test_cached_target_features_equal_the_recomputed_ones_and_follow_the_weights(synthetic_root):
    from uniperceiver_v2.engine.build import build_model

    cfg = load_config("tiny", [f"data.root={synthetic_root}"])
    model = build_model(cfg)       # evaluation mode: no gate noise, so two passes give the same numbers
    encoder = model.text_encoder
    names = ["circle", "digit three", "hexagon"]
    words = torch.tensor([1037, 4937, 2417])
    first = model.class_name_embeddings(names, "classification")
    assert len(encoder._target_features) == 1                      # the names' features, kept
    vocab_first = encoder.encode_tokens(words)
    assert len(encoder._target_features) == 2
    cached = {key: value for key, value in encoder._target_features.items()}
    encoder.cfg.cache_targets = False                                # the same computation without the cache
    model.clear_target_cache()                                       # the model's own cache of decoder outputs
    try:
        torch.testing.assert_close(model.class_name_embeddings(names, "classification"), first, rtol=0, atol=0)
        torch.testing.assert_close(encoder.encode_tokens(words), vocab_first, rtol=0, atol=0)
    finally:
        encoder.cfg.cache_targets = True
    assert encoder._target_features.keys() == cached.keys()
    # new weights for the encoder: the kept features go
    encoder.load_state_dict({k: v + 0.01 for k, v in encoder.state_dict().items()})
    assert encoder._target_features == {}
    assert not torch.equal(encoder.encode_tokens(words), vocab_first)


def test_a_trained_text_encoder_keeps_nothing(synthetic_root):
    from uniperceiver_v2.engine.build import build_model

    model = build_model(load_config("tiny", [f"data.root={synthetic_root}", "text_encoder.freeze=false"])).train()
    features = model.text_encoder.encode_tokens(torch.tensor([1037, 4937]))
    assert features.requires_grad and model.text_encoder._target_features == {}


def test_text_encoder_tuned_by_mlm_changes_on_mlm_steps_only(synthetic_root):
    """text_encoder.tuned_by=[mlm] with its two lowest layers frozen: a classification step leaves every text-encoder
    weight as it was (no gradient, and the class names' features are kept), an MLM step changes the top layers
    only and the kept features go."""
    tuned = ["text_encoder.freeze=false", "text_encoder.frozen_layers=2", "text_encoder.tuned_by=[mlm]",
             "run.precision=fp32"]
    with tempfile.TemporaryDirectory() as folder:
        run = trainer(synthetic_root, folder, *tuned)
        encoder = run.model.text_encoder
        text = dict(encoder.named_parameters())
        tasks = [run.sampler.task_for_iteration(i) for i in range(12)]
        assert {"classification", "mlm"} <= set(tasks)
        for iteration, task in enumerate(tasks):
            before = {name: p.detach().clone() for name, p in text.items()}
            run.train_step(iteration)
            changed = {name for name, p in text.items() if not torch.equal(p, before[name])}
            if task == "mlm":
                assert changed and all(name.startswith(("model.encoder.layer.2.", "model.encoder.layer.3.",
                                                        "model.encoder.layer.4.", "model.encoder.layer.5."))
                                       for name in changed), sorted(changed)
                assert encoder._target_features == {}
            else:
                assert not changed
                assert encoder._target_features                      # the class names' features, kept
        assert encoder.tuning and encoder.model.training             # the step left the encoder as it found it
        assert all(p.grad is None for p in text.values())


def test_text_encoder_tuned_outside_a_tuning_step_gives_the_frozen_features_without_gradient(synthetic_root):
    from uniperceiver_v2.engine.build import build_model

    model = build_model(load_config("tiny", [f"data.root={synthetic_root}", "text_encoder.freeze=false"])).train()
    encoder = model.text_encoder
    batch = encoder.tokenize(["a red circle left of a blue square"])
    with encoder.tuned(False):
        first, second = encoder(**batch), encoder(**batch)           # no dropout: the same twice
        assert not first.requires_grad and not encoder.model.training
        words = encoder.encode_tokens(torch.tensor([1037, 4937]))
        assert len(encoder._target_features) == 1 and not words.requires_grad
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert encoder.model.training and encoder(**batch).requires_grad
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch), first, rtol=0, atol=0)
    encoder.weights_changed()
    assert encoder._target_features == {}


def test_text_encoder_tuned_by_names_tasks_and_needs_an_unfrozen_encoder():
    with pytest.raises(ConfigError, match=r"text_encoder.tuned_by: unknown task\(s\) \['mlmx'\]"):
        load_config("tiny", ["text_encoder.freeze=false", "text_encoder.tuned_by=[mlmx]"])
    with pytest.raises(ConfigError, match="text_encoder.tuned_by: .*freeze=true"):
        load_config("tiny", ["text_encoder.tuned_by=[mlm]"])
    with pytest.raises(ConfigError, match="text_encoder.frozen_layers"):
        load_config("tiny", ["text_encoder.frozen_layers=-1"])
