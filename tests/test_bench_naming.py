"""``bench naming``: found and named rates of the detection task, checked against a hand recount."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_v2.bench import naming


@pytest.fixture(scope="module")
def model_and_config(quick_suite_model):
    return quick_suite_model


def test_rates_are_consistent_and_every_miss_named_is_a_confusion(model_and_config):
    model, cfg = model_and_config
    result = naming.naming_rates(model, cfg, "val", images=6)
    assert result["objects"] > 0 and 0 <= result["named"] <= result["found"] <= result["objects"]
    assert sum(result["confusions"].values()) == result["found"] - result["named"]
    assert all(true != predicted for true, predicted in result["confusions"])


def _name_every_proposal_after_its_object(monkeypatch):
    """Replace the detection logits by the ground truth: each proposal names the object it overlaps most."""
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou
    from uniperceiver_v2.tasks.detection import DetectionTask

    original = DetectionTask.region_logits
    current = {}

    def oracle_logits(self, model, image, class_names):
        logits, aux = original(self, model, image, class_names)
        batch = current["batch"]
        height, width = image.image_sizes[:, 0], image.image_sizes[:, 1]
        scale = torch.stack([width, height, width, height], dim=1).to(image.boxes.dtype)
        proposals = box_cxcywh_to_xyxy(image.boxes) * scale[:, None]
        oracle = torch.zeros_like(logits)
        for b, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
            if len(boxes):
                best = box_iou(proposals[b], boxes.to(proposals.dtype)).argmax(dim=1)   # each proposal's object
                oracle[b, torch.arange(len(best)), labels[best]] = 1.0
        return oracle, aux

    original_collate = DetectionTask.collate

    def remembering_collate(self, samples):
        current["batch"] = original_collate(self, samples)
        return current["batch"]

    monkeypatch.setattr(DetectionTask, "region_logits", oracle_logits)
    monkeypatch.setattr(DetectionTask, "collate", remembering_collate)


def test_a_model_that_names_every_proposal_right_names_every_found_object(model_and_config, monkeypatch):
    # With the ground truth as logits every found object is named right, and the found rate is unchanged (naming
    # does not move the proposals).
    model, cfg = model_and_config
    before = naming.naming_rates(model, cfg, "val", images=6)
    _name_every_proposal_after_its_object(monkeypatch)
    after = naming.naming_rates(model, cfg, "val", images=6)
    assert after["found"] == before["found"] and after["objects"] == before["objects"]
    # the oracle names a proposal after the object it overlaps most; a found object's proposal overlaps it with
    # IoU >= 0.5, so it is named right unless another object overlaps that proposal even more (not so in these scenes)
    assert after["named"] == after["found"]


def test_novel_scenes_count_seen_and_novel_objects_apart(model_and_config, monkeypatch):
    model, cfg = model_and_config
    result = naming.naming_rates(model, cfg, "novel", images=8)
    seen, novel = result["groups"]["seen"], result["groups"]["novel"]
    for key in ("objects", "found", "named"):
        assert seen[key] + novel[key] == result[key]
    assert novel["objects"] > 0 and novel["novel_names"] == 4
    # the label beats every name, so it beats the novel names: named among all <= named among the novel ones
    assert novel["named"] <= novel["named_among_novel"] <= novel["found"]
    _name_every_proposal_after_its_object(monkeypatch)
    oracle = naming.naming_rates(model, cfg, "novel", images=8)["groups"]["novel"]
    assert oracle["named"] == oracle["named_among_novel"] == oracle["found"] == novel["found"]
    assert naming.naming_rates(model, cfg, "val", images=2)["groups"] == {}


def test_main_prints_both_rates(model_and_config, monkeypatch, capsys, synthetic_root):
    model, _ = model_and_config
    monkeypatch.setattr("uniperceiver_v2.engine.build.build_model", lambda config, checkpoint: model)
    assert naming.main(["--checkpoint", "runs/x", "--images", "4", f"data.root={synthetic_root}",
                        "data.synthetic_profile=null"]) == 0
    out = capsys.readouterr().out
    assert "found (a proposal with IoU >= 0.5)" in out and "named right" in out and "chance naming" in out
    with pytest.raises(SystemExit):
        naming.main(["--checkpoint", "x", "--images", "0"])


def test_gradient_split_matches_a_direct_computation(model_and_config):
    """``gradient_split`` with one batch: the class-name norm over all parameters equals the norm of the gradient
    of loss_cls computed directly, the groups add up, and the share follows the proposal-loss weight."""
    from dataclasses import replace

    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.tasks.detection import DetectionTask

    model, cfg = model_and_config
    norms = naming.gradient_split(model, cfg, split="train", batches=1, batch_size=2)
    for key in ("loss_cls", "loss_rpn"):
        groups = sum(norms[key][g] ** 2 for g in naming.GRADIENT_GROUPS)
        assert norms[key]["all"] ** 2 == pytest.approx(groups, rel=1e-5)
        assert norms[key]["all"] > 0
    assert norms["loss_rpn"]["unified decoder"] == 0                   # the proposal losses never reach g
    dataset = build_task_dataset(cfg, "detection", "train", train=False)
    task = DetectionTask.from_dataset(cfg.tasks.detection, dataset)
    model.train()
    torch.manual_seed(0)
    out = task.loss(model, task.collate([dataset[0], dataset[1]]))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss_cls"], params, allow_unused=True)
    direct = torch.sqrt(sum(g.float().square().sum() for g in grads if g is not None)).item()
    model.eval()
    assert norms["loss_cls"]["all"] == pytest.approx(direct, rel=1e-4)
    heavy = replace(cfg, tasks=replace(cfg.tasks, detection=replace(cfg.tasks.detection, proposal_loss_weight=1.0)))
    light = replace(cfg, tasks=replace(cfg.tasks, detection=replace(cfg.tasks.detection, proposal_loss_weight=0.01)))
    share = {w: naming.gradient_split(model, c, split="train", batches=1, batch_size=2)["weighted_rpn_share"]
             for w, c in ((1.0, heavy), (0.01, light))}
    assert 0 < share[0.01] < share[1.0] <= 1
