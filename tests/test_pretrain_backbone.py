"""Backbone pre-training (the stand-in for ImageNet weights): it learns, writes weights the image encoder loads,
and refuses bad arguments with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uniperceiver_v2.config import load_config
from uniperceiver_v2.engine.backbone_pretraining import _cosine_lr, pretrain_backbone
from uniperceiver_v2.modeling.backbone import build_backbone
from uniperceiver_v2.modeling.image_encoder import ImageEncoder
from uniperceiver_v2.pretrain_backbone import main


def _config(root: Path):
    return load_config("tiny", [f"data.root={root}", "data.image_size=64", "run.device=cpu"])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    values = [_cosine_lr(i, 100, 10) for i in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert _cosine_lr(100, 100, 10) == pytest.approx(0.0)


def test_pretraining_fits_the_training_split_and_writes_loadable_weights(synthetic_root, tmp_path):
    cfg = _config(synthetic_root)
    out = tmp_path / "backbone.safetensors"
    summary = pretrain_backbone(cfg, out, iterations=60, batch_size=32, lr=2e-3, warmup=5, progress=False)

    history = summary["history"]
    assert len(history) == 60
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < first - 0.2, (first, last)                     # it learns (14 classes: ln 14 = 2.64 at chance)
    assert 0.0 <= summary["val_top1"] <= 1.0 and len(summary["classes"]) == 14

    saved = json.loads(out.with_name(out.name + ".json").read_text())
    assert saved["val_top1"] == summary["val_top1"] and not out.with_name(out.name + ".partial").exists()
    # the file holds exactly the backbone's state dict, and the image encoder starts from it
    state = load_file(str(out))
    reference = build_backbone("tiny_convnet", cfg.image_encoder.backbone_channels).state_dict()
    assert set(state) == set(reference)
    cfg.image_encoder.backbone_weights = str(out)
    encoder = ImageEncoder(cfg.image_encoder)
    for name, tensor in encoder.backbone.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_bad_arguments_exit_with_2_and_say_why(synthetic_root, tmp_path, capsys):
    out = str(tmp_path / "b.safetensors")
    assert main(["--config", "tiny", "--out", out, "--iterations", "0", f"data.root={synthetic_root}"]) == 2
    assert "iterations" in capsys.readouterr().err
    assert main(["--config", "tiny", "--out", out, "data.crop_min_scale=0"]) == 2
    assert "data.crop_min_scale" in capsys.readouterr().err
    assert main(["--config", "tiny", "--out", out, "image_encoder.backbone_weights=/no/such/file.safetensors",
                 f"data.root={synthetic_root}", "--iterations", "1"]) == 2
    assert "/no/such/file.safetensors" in capsys.readouterr().err
    assert not Path(out).exists()
