"""Region proposal losses: each term against a dense float64 computation, empty images, normalisation, denoising."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from uniperceiver_v2.config import ImageEncoderConfig
from uniperceiver_v2.modeling.denoising import build_denoising_queries
from uniperceiver_v2.modeling.proposal_criterion import PredictionSet, RegionProposalCriterion

torch.set_num_threads(1)


def _cfg(**overrides) -> ImageEncoderConfig:
    return dataclasses.replace(ImageEncoderConfig(), mask_points=64, **overrides)


def _box_mask(box: list[float], size: int) -> torch.Tensor:
    cx, cy, w, h = box
    m = torch.zeros(size, size)
    m[round((cy - h / 2) * size):round((cy + h / 2) * size), round((cx - w / 2) * size):round((cx + w / 2) * size)] = 1
    return m


def _targets(boxes: list[list[float]], size: int = 32) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    masks = torch.stack([_box_mask(x, size) for x in boxes]) if boxes else torch.zeros(0, size, size)
    return {"boxes": b, "masks": masks}


def test_focal_term_matches_closed_form():
    crit = RegionProposalCriterion(_cfg())
    logits = torch.randn(2, 7, dtype=torch.float64) * 3
    target = (torch.rand(2, 7) > 0.7).double()
    p = logits.sigmoid()
    p_t = torch.where(target > 0, p, 1 - p)
    alpha_t = torch.where(target > 0, 0.25, 0.75)
    expected = (alpha_t * (1 - p_t) ** 2 * -p_t.log()).sum() / 3.0
    torch.testing.assert_close(crit.focal_loss(logits, target, None, 3.0), expected)


def test_mask_terms_match_dense_computation():
    crit = RegionProposalCriterion(_cfg())
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64) * 2
    coarse = (torch.rand(3, 8, 8, generator=gen) > 0.5).double()
    gt = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)              # (3, 16, 16) on the same canvas
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    points = torch.stack([(xs + 0.5) / 8, (ys + 0.5) / 8], -1).view(1, 64, 2).expand(3, -1, -1).double()
    bce, dice = crit.mask_losses(logits, gt, 2.0, points=points)
    p = logits.sigmoid()
    dense_bce = -(coarse * p.log() + (1 - coarse) * (1 - p).log()).mean((1, 2)).sum() / 2.0
    dense_dice = (1 - (2 * (p * coarse).sum((1, 2)) + 1) / (p.sum((1, 2)) + coarse.sum((1, 2)) + 1)).sum() / 2.0
    torch.testing.assert_close(bce, dense_bce)
    torch.testing.assert_close(dice, dense_dice)


def test_dice_hand_computed():
    crit = RegionProposalCriterion(_cfg())
    logits = torch.tensor([[[30.0, 30.0, -30.0, -30.0]]], dtype=torch.float64)   # prediction 1 1 0 0
    gt = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)            # target     1 0 1 0
    points = torch.tensor([[[0.125, 0.5], [0.375, 0.5], [0.625, 0.5], [0.875, 0.5]]], dtype=torch.float64)
    _, dice = crit.mask_losses(logits, gt, 1.0, points=points)
    assert dice.item() == pytest.approx(1 - (2 * 1 + 1) / (2 + 2 + 1), abs=1e-9)


def _predictions(batch: int, n: int, seed: int = 0) -> PredictionSet:
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.cat([torch.rand(batch, n, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(batch, n, 2, generator=gen) * 0.3 + 0.1], -1)
    return PredictionSet(torch.randn(batch, n, generator=gen).requires_grad_(),
                         boxes.requires_grad_(), torch.randn(batch, n, 8, 8, generator=gen).requires_grad_())


def test_empty_image_only_pushes_objectness_down():
    crit = RegionProposalCriterion(_cfg())
    preds = _predictions(1, 6)
    losses = crit({"dec0": preds}, [_targets([])])
    for term in ("l1", "giou", "mask", "dice"):
        assert losses[f"rpn_dec0_{term}"].item() == 0.0
    assert losses["rpn_dec0_focal"].item() > 0
    sum(losses.values()).backward()
    assert (preds.objectness.grad > 0).all()          # gradient descent lowers every objectness
    assert preds.boxes.grad.abs().sum() == 0


def test_perfect_boxes_have_zero_box_losses_and_keys():
    crit = RegionProposalCriterion(_cfg())
    gt = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]]
    preds = _predictions(1, 5)
    with torch.no_grad():
        preds.boxes[0, 1] = torch.tensor(gt[1])
        preds.boxes[0, 3] = torch.tensor(gt[0])
    losses = crit({"enc": preds, "dec0": preds}, [_targets(gt)])
    assert set(losses) == {f"rpn_{s}_{t}" for s in ("enc", "dec0") for t in ("focal", "l1", "giou", "mask", "dice")}
    assert losses["rpn_dec0_l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["rpn_dec0_giou"].item() == pytest.approx(0.0, abs=1e-5)   # torchvision adds eps=1e-7 to areas


def test_losses_are_normalised_by_the_number_of_objects():
    crit = RegionProposalCriterion(_cfg())
    single = _predictions(1, 5, seed=3)
    double = PredictionSet(*(x.detach().repeat(2, *([1] * (x.ndim - 1))) for x in
                             (single.objectness, single.boxes, single.masks)))
    target = _targets([[0.4, 0.4, 0.3, 0.3], [0.6, 0.7, 0.2, 0.2]])
    one = crit({"dec0": single}, [target])
    two = crit({"dec0": double}, [target, target])
    for term in ("focal", "l1", "giou"):
        torch.testing.assert_close(one[f"rpn_dec0_{term}"], two[f"rpn_dec0_{term}"])


def test_coefficients_weight_the_terms():
    preds = _predictions(1, 5, seed=4)
    target = [_targets([[0.4, 0.4, 0.3, 0.3]])]
    base = RegionProposalCriterion(_cfg())({"dec0": preds}, target)
    scaled = RegionProposalCriterion(_cfg(bbox_loss_coef=10.0, cls_loss_coef=1.0))({"dec0": preds}, target)
    torch.testing.assert_close(scaled["rpn_dec0_l1"], 2 * base["rpn_dec0_l1"])
    torch.testing.assert_close(scaled["rpn_dec0_focal"], 0.5 * base["rpn_dec0_focal"])


def test_denoising_losses_use_known_assignment_and_ignore_padding():
    crit = RegionProposalCriterion(_cfg())
    targets = [_targets([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]]), _targets([[0.5, 0.5, 0.3, 0.3]])]
    dn = build_denoising_queries(targets, num_matching=4, content_embedding=torch.zeros(2, 4), dn_num_queries=8,
                                 box_noise_scale=1.0, label_noise_ratio=0.5)
    assert dn.num_groups == 2 and dn.num_queries == 8
    preds = _predictions(2, 8, seed=5)
    with torch.no_grad():   # positives predict their GT box exactly
        for b, t in enumerate(targets):
            pos = dn.gt_index[b] >= 0
            preds.boxes[b, pos] = t["boxes"][dn.gt_index[b, pos]]
    losses = crit({"dec0": _predictions(2, 4)}, targets, dn, {"dn0": preds})
    assert losses["rpn_dn0_l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["rpn_dn0_giou"].item() == pytest.approx(0.0, abs=1e-5)   # torchvision adds eps=1e-7 to areas
    # focal over valid slots, positives -> 1, negatives -> 0, normalised by objects * groups
    v = dn.valid
    expected = RegionProposalCriterion(_cfg()).focal_loss(preds.objectness[v], dn.objectness_target[v], None, 3 * 2)
    torch.testing.assert_close(losses["rpn_dn0_focal"], crit.weights["focal"] * expected)
    # padded slots do not matter
    changed = PredictionSet(preds.objectness.detach().clone(), preds.boxes, preds.masks)
    changed.objectness[~v] = 50.0
    again = crit({"dec0": _predictions(2, 4)}, targets, dn, {"dn0": changed})
    torch.testing.assert_close(again["rpn_dn0_focal"], losses["rpn_dn0_focal"])


def test_object_count_is_all_reduced_only_when_synchronized(monkeypatch):
    """Under mixed sampling another rank may run another task in the same micro-batch, so the count's all-reduce
    would pair with that rank's gradient all-reduce (a collective mismatch): the model then keeps counts local."""
    import torch.distributed as dist
    from helpers import tiny_config, tiny_model

    from uniperceiver_v2.modeling.proposal_criterion import num_objects_global

    reduced = []

    def fake_all_reduce(tensor):
        reduced.append(tensor.item())
        tensor.mul_(3.0)                                   # as if two more ranks held the same count

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    targets = [_targets([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]), _targets([[0.6, 0.6, 0.2, 0.2]])]
    assert num_objects_global(targets, torch.device("cpu")) == 3.0 and reduced == [3.0]
    assert num_objects_global(targets, torch.device("cpu"), synchronize=False) == 3.0 and reduced == [3.0]

    unmixed, mixed = tiny_config(), tiny_config()
    mixed.run.sampling = "mixed"
    assert tiny_model(unmixed).image_encoder.criterion.synchronize_counts
    assert not tiny_model(mixed).image_encoder.criterion.synchronize_counts
