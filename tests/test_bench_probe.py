"""``bench probe``: the linear probe's scoring on features with known content, and one run on the quick suite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_config

from uniperceiver_v2.bench import probe
from uniperceiver_v2.data.summary import DataError

COLOURS = np.array(["red", "green", "blue", "yellow"])


def _colour_features(n: int = 400, seed: int = 0):
    """Imbalanced colours (55 / 15 / 15 / 15 %) and 16-d features whose first 4 dimensions encode the colour."""
    rng = np.random.default_rng(seed)
    colour = rng.choice(len(COLOURS), size=n, p=[0.55, 0.15, 0.15, 0.15])
    features = rng.normal(size=(n, 16))
    features[np.arange(n), colour] += 6.0
    return features, COLOURS[colour], rng


def test_a_linearly_encoded_label_is_read_almost_perfectly():
    features, labels, _ = _colour_features()
    result = probe.probe_accuracy(features, labels)
    assert result["accuracy"] >= 0.97
    assert result["classes"] == 4 and result["objects"] == 400 and result["converged"]
    assert result["majority"] == pytest.approx(np.mean(labels[200:] == "red"))


def test_shuffled_labels_score_about_the_majority_rate():
    features, labels, rng = _colour_features()
    result = probe.probe_accuracy(features, rng.permutation(labels))
    assert 0.4 < result["majority"] < 0.7
    assert abs(result["accuracy"] - result["majority"]) < 0.1


def test_one_label_in_the_training_half_is_the_constant_prediction():
    features = np.random.default_rng(0).normal(size=(10, 3))
    result = probe.probe_accuracy(features, ["a"] * 5 + ["a", "b", "a", "b", "b"])
    assert result["accuracy"] == result["majority"] == 0.4 and result["classes"] == 2


@pytest.fixture(scope="module")
def quick_config(synthetic_root):
    cfg = tiny_config()
    cfg.data.root = str(synthetic_root)
    cfg.data.synthetic_profile = None
    return cfg


def test_random_backbone_on_the_quick_suite(quick_config, synthetic_root):
    backbone, described, cfg = probe.load_backbone(config=quick_config, seed=0)
    assert "random" in described
    features, labels = probe.object_features(backbone, cfg, "val", scenes=8)
    annotations = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    first = sorted({a["image_id"] for a in annotations["annotations"]})[:8]
    expected = [a["attributes"]["colour"] for a in sorted(annotations["annotations"], key=lambda a: a["id"])
                if a["image_id"] in first]
    assert sorted(labels["colour"]) == sorted(expected)
    channels = sum(quick_config.image_encoder.backbone_channels[:3])
    assert features.shape == (len(expected), channels * 4) and np.isfinite(features).all()
    results = probe.linear_probe(backbone, cfg, "val", scenes=20)
    for name in probe.LABELS:
        assert 0 <= results[name]["accuracy"] <= 1 and 0 <= results[name]["majority"] <= 1
        assert results[name]["classes"] >= 2 and results[name]["objects"] > len(expected)


def test_main_with_saved_weights_matches_the_random_backbone_they_came_from(quick_config, synthetic_root, tmp_path,
                                                                           capsys):
    import safetensors.torch

    backbone, _, _ = probe.load_backbone(config=quick_config, seed=3)
    weights = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(backbone.state_dict(), str(weights))
    common = ["--split", "val", "--scenes", "10", f"data.root={synthetic_root}", "data.synthetic_profile=null"]
    assert probe.main(["--random", "--seed", "3", *common]) == 0
    random_out = capsys.readouterr().out
    assert probe.main(["--backbone-weights", str(weights), *common]) == 0
    weights_out = capsys.readouterr().out
    rows = [line for line in random_out.splitlines() if "accuracy" in line]
    assert [line.split()[0] for line in rows] == ["colour", "category"]
    assert rows == [line for line in weights_out.splitlines() if "accuracy" in line]


def test_annotations_without_colour_are_an_error_naming_the_file(quick_config, synthetic_root, tmp_path, capsys):
    annotations = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    for annotation in annotations["annotations"]:
        annotation.pop("attributes", None)
    (tmp_path / "annotations").mkdir()
    ann_file = tmp_path / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps(annotations))
    cfg = probe.load_backbone(config=quick_config, overrides=[f"data.root={tmp_path}"])[2]
    with pytest.raises(DataError, match="instances_val.json.*attributes.colour"):
        probe.object_features(None, cfg, "val", scenes=4)
    assert probe.main(["--random", f"data.root={tmp_path}", "data.synthetic_profile=null"]) == 2
    assert str(ann_file) in capsys.readouterr().err


def test_token_features_are_the_covering_proposals_tokens(quick_config, synthetic_root, capsys, monkeypatch):
    """``--tokens``: per covered object, the regional token of the proposal of highest IoU and the global token of
    the F_L cell at the box centre, recounted here from the image encoder's own output."""
    import torch
    from helpers import tiny_model
    from torchvision.ops import box_iou

    from uniperceiver_v2.modeling import TOKEN_TYPES
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy

    model = tiny_model(quick_config).eval()
    # an untrained proposal network covers few objects at IoU 0.5: a lower threshold gives the recount objects
    features, labels, objects = probe.token_features(model, quick_config, "val", scenes=6, iou=0.1)
    found = len(labels["colour"])
    assert 0 < found <= objects and len(labels["category"]) == found
    width = model.image_encoder.cfg.hidden_dim
    assert features["regional token"].shape == features["global token"].shape == (found, width)
    assert features["backbone"].shape[0] == found

    batches = probe._scene_batches(quick_config, "val", 6, 16, model.device)
    regional, global_tokens = [], []
    with torch.no_grad():
        for images, boxes, _ in batches:
            encoded = model.encode_images(images, torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool))
            h, w = images.shape[-2:]
            proposals = box_cxcywh_to_xyxy(encoded.boxes) * torch.tensor([w, h, w, h])
            first = int(torch.nonzero(encoded.token_types[0] == TOKEN_TYPES["global_flattened"])[0])
            rows, cols = encoded.global_map_size
            for b, gt in enumerate(boxes):
                for box in gt:
                    overlap = box_iou(box[None], proposals[b])[0]
                    if overlap.max() < 0.1:
                        continue
                    regional.append(encoded.tokens[b, encoded.num_global + int(overlap.argmax())])
                    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
                    global_tokens.append(encoded.tokens[b, first + int(cy / h * rows) * cols + int(cx / w * cols)])
    assert np.allclose(features["regional token"], torch.stack(regional).numpy(), atol=1e-5)
    assert np.allclose(features["global token"], torch.stack(global_tokens).numpy(), atol=1e-5)

    from uniperceiver_v2 import bench

    monkeypatch.setattr(bench, "model_of_checkpoint", lambda checkpoint, overrides: (model, quick_config))
    at_iou_01 = probe.token_features
    monkeypatch.setattr(probe, "token_features", lambda *args, **kwargs: at_iou_01(*args, **kwargs, iou=0.1))
    assert probe.main(["--checkpoint", "unused", "--tokens", "--scenes", "12"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {source} |" in printed for source in probe.TOKEN_SOURCES)
    with pytest.raises(SystemExit):
        probe.main(["--random", "--tokens"])
