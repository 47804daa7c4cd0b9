"""uniperceiver_v2.walkthrough.rpn: the class-agnostic training loop and its log, the class-agnostic COCO evaluation
(checked against pycocotools on hand-made proposals), the forward trace (checked against the model's own outputs
and an independent top-k), the denoising helpers and the measured effect of eq. (2)'s detach."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from uniperceiver_v2.config import get_preset
from uniperceiver_v2.data import CocoInstances
from uniperceiver_v2.data.transforms import ResizeShorterSide
from uniperceiver_v2.metrics.coco import evaluate_coco
from uniperceiver_v2.modeling import ImageEncoder, normalize_targets
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy
from uniperceiver_v2.modeling.denoising import build_denoising_queries
from uniperceiver_v2.walkthrough.rpn import (
    LOSS_TERMS,
    OBJECT_CATEGORY_ID,
    boxes_to_pixels,
    class_agnostic_ground_truth,
    denoising_groups,
    denoising_mask_segments,
    evaluate_region_proposals,
    fusion_gradient_norms,
    loss_table,
    matching_costs,
    predict_proposals,
    proposal_recall,
    trace_forward,
    train_region_proposals,
)

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def micro_encoder(seed: int = 0, **overrides) -> ImageEncoder:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(
        get_preset("tiny").image_encoder, backbone_channels=[16, 32, 64, 64], hidden_dim=32, enc_layers=1,
        dec_layers=2, dim_feedforward=64, nheads=4, num_queries=20, topk_queries=10, dn_num_queries=12,
        mask_points=256, mask_pool_size=7, num_global_pools=2, **overrides)
    return ImageEncoder(cfg)


def rectangles(height: int, width: int, boxes: list[list[int]]) -> dict:
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = True
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "masks": masks,
            "labels": torch.zeros(len(boxes), dtype=torch.long), "size": torch.tensor([height, width])}


def fixture_dataset() -> CocoInstances:
    return CocoInstances(FIXTURES / "images", FIXTURES / "instances.json")


# -- losses ------------------------------------------------------------------------------------------------------
def test_loss_table_orders_sets_and_sums_terms():
    losses = {f"rpn_{name}_{term}": torch.tensor(float(i + j))
              for i, name in enumerate(["dn1", "dec1", "enc", "dn0", "dec0"]) for j, term in enumerate(LOSS_TERMS)}
    table = loss_table(losses)
    assert table["columns"] == ["set", *LOSS_TERMS, "total"]
    assert [row[0] for row in table["rows"]] == ["enc", "dec0", "dec1", "dn0", "dn1"]
    for row in table["rows"]:
        assert row[-1] == pytest.approx(sum(row[1:-1]))
        assert row[1:-1] == [float(losses[f"rpn_{row[0]}_{term}"]) for term in LOSS_TERMS]
    with pytest.raises(ValueError, match="rpn_enc_bogus"):
        loss_table({"rpn_enc_bogus": torch.tensor(1.0)})


# -- class-agnostic evaluation -----------------------------------------------------------------------------------
def test_class_agnostic_ground_truth_merges_categories(tmp_path):
    original = json.loads((FIXTURES / "instances.json").read_text())
    merged = class_agnostic_ground_truth(FIXTURES / "instances.json")
    assert merged["categories"] == [{"id": OBJECT_CATEGORY_ID, "name": "object"}]
    assert len(merged["annotations"]) == len(original["annotations"])
    for before, after in zip(original["annotations"], merged["annotations"]):
        assert after["category_id"] == OBJECT_CATEGORY_ID
        assert {k: v for k, v in after.items() if k != "category_id"} == \
               {k: v for k, v in before.items() if k != "category_id"}
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="captions.json: not a COCO instances file"):
        class_agnostic_ground_truth(bad)


def test_proposal_recall_against_hand_counted_overlaps():
    gt = {"annotations": [{"image_id": 1, "bbox": [0, 0, 10, 10]}, {"image_id": 1, "bbox": [20, 20, 10, 10]},
                          {"image_id": 2, "bbox": [0, 0, 4, 4]}, {"image_id": 2, "bbox": [5, 5, 4, 4], "iscrowd": 1}]}
    records = [{"image_id": 1, "bbox": [0, 0, 10, 12]},      # IoU 100 / 120 with GT 0: found
               {"image_id": 1, "bbox": [25, 20, 10, 10]},    # IoU 50 / 150 with GT 1: not found
               {"image_id": 2, "bbox": [0, 0, 4, 4]}]        # exact: found (the crowd region is not an object)
    assert proposal_recall(gt, records) == pytest.approx(2 / 3)
    assert proposal_recall(gt, records, iou_threshold=0.9) == pytest.approx(1 / 3)
    assert proposal_recall(gt, []) == 0.0


def test_evaluation_of_exact_proposals_gives_ap_one():
    """Proposals equal to the ground truth (boxes and masks from the annotations) score AP50 = 1 in pycocotools."""
    dataset = fixture_dataset()
    records = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if len(sample.boxes) == 0:
            continue
        rles = mask_utils.encode(np.asfortranarray(sample.masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
        for box, rle in zip(sample.boxes.tolist(), rles):
            records.append({"image_id": sample.image_id, "category_id": OBJECT_CATEGORY_ID, "score": 0.9,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    metrics = evaluate_coco(class_agnostic_ground_truth(FIXTURES / "instances.json"), records)
    assert metrics["bbox"]["AP50"] == pytest.approx(1.0)
    assert metrics["segm"]["AP50"] == pytest.approx(1.0)
    assert proposal_recall(class_agnostic_ground_truth(FIXTURES / "instances.json"), records) == 1.0


def test_predict_and_evaluate_untrained_proposals():
    dataset = fixture_dataset()
    encoder = micro_encoder().train()
    predictions = predict_proposals(encoder, [dataset[0], dataset[1]])
    assert encoder.training                                          # mode restored
    for sample, prediction in zip([dataset[0], dataset[1]], predictions):
        height, width = sample.orig_size
        num = encoder.cfg.topk_queries
        assert prediction["boxes"].shape == (num, 4) and prediction["masks"].shape == (num, height, width)
        assert (prediction["boxes"][:, 0::2] <= width).all() and (prediction["boxes"][:, 1::2] <= height).all()
        assert torch.all(prediction["scores"][:-1] >= prediction["scores"][1:])      # best first
        assert (prediction["labels"] == 0).all()
    # Resized twofold: the same proposals, twice as large in the resized image's pixels.
    resized = CocoInstances(FIXTURES / "images", FIXTURES / "instances.json", transform=ResizeShorterSide(24, 64))
    original = predict_proposals(encoder, [resized[0]])[0]
    drawn = predict_proposals(encoder, [resized[0]], in_original_pixels=False)[0]
    assert original["masks"].shape[1:] == (12, 16) and drawn["masks"].shape[1:] == (24, 32)
    assert torch.allclose(2 * original["boxes"], drawn["boxes"], atol=1e-4)
    assert torch.equal(original["scores"], drawn["scores"])
    metrics = evaluate_region_proposals(encoder, dataset, FIXTURES / "instances.json", batch_size=2)
    assert metrics["images"] == len(dataset) and metrics["proposals"] == len(dataset) * encoder.cfg.topk_queries
    for iou_type in ("bbox", "segm"):
        assert 0.0 <= metrics[iou_type]["AP50"] <= 1.0
    assert 0.0 <= metrics["recall50"] <= 1.0


# -- training ----------------------------------------------------------------------------------------------------
def test_training_logs_every_step_and_is_repeatable(tmp_path):
    dataset = fixture_dataset()
    runs = []
    for name in ("a", "b"):
        encoder = micro_encoder(seed=3)
        log = tmp_path / name / "rpn.jsonl"
        records = train_region_proposals(encoder, dataset, iterations=3, batch_size=2, seed=5, log_path=log,
                                         progress=False)
        assert [json.loads(line) for line in log.read_text().splitlines()] == records
        runs.append((records, encoder.state_dict()))
    records = runs[0][0]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["kind"] == "train"
        assert record["loss"] == pytest.approx(sum(record[term] for term in LOSS_TERMS), rel=1e-5)
        assert record["grad_norm"] > 0
    # Same seed, same initialisation: the same losses and the same weights.
    assert [r["loss"] for r in runs[0][0]] == [r["loss"] for r in runs[1][0]]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key


def test_training_changes_weights_and_rejects_bad_arguments():
    dataset = fixture_dataset()
    encoder = micro_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert train_region_proposals(encoder, dataset, iterations=0, progress=False) == []
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    train_region_proposals(encoder, dataset, iterations=1, batch_size=2, progress=False)
    after = encoder.state_dict()
    key = "region_proposals.objectness_head.weight"
    assert not torch.equal(before[key], after[key])
    # The proposal losses never see the tokens of eq. (2) or (3): their parameters wait for the unified decoder.
    for key in ("region_proposals.fusion.box_proj.weight", "global_representations.proj.0.weight"):
        assert torch.equal(before[key], after[key]), key
    with pytest.raises(ValueError, match="batch_size"):
        train_region_proposals(encoder, dataset, iterations=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="use_regional"):
        train_region_proposals(micro_encoder(use_regional=False), dataset, iterations=1, progress=False)


# -- tracing -----------------------------------------------------------------------------------------------------
def test_trace_agrees_with_the_output_and_an_independent_top_k():
    encoder = micro_encoder().eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    trace = trace_forward(encoder, images)
    cfg, out = encoder.cfg, trace.output
    assert not encoder.backbone._forward_hooks and not encoder.region_proposals.decoder._forward_pre_hooks
    assert [f.shape[-1] for f in trace.backbone_features] == [96 // s for s in (4, 8, 16, 32)]
    assert [lv.shape[-2:] for lv in trace.levels] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(lv.shape[1] == cfg.hidden_dim for lv in trace.levels)
    # The selected queries are the N best encoder positions (no padding: every anchor is valid here).
    flat = torch.cat([m.flatten(1) for m in out.encoder_objectness], dim=1)
    num_queries = cfg.num_queries
    assert torch.allclose(trace.query_objectness, flat.topk(num_queries, dim=1).values)
    assert trace.query_boxes.shape == (2, num_queries, 4)
    assert ((trace.query_boxes > 0) & (trace.query_boxes < 1)).all()
    # The decoder trace is the model's own visualisation extra, plus the weights.
    decoder = trace.decoder_attention
    assert torch.equal(decoder.locations, out.sampling_locations)
    heads, levels, points = cfg.nheads, cfg.num_feature_levels, cfg.dec_n_points
    assert decoder.weights.shape == (2, num_queries, heads, levels, points)
    assert torch.allclose(decoder.weights.sum((-1, -2)), torch.ones(2, num_queries, heads))
    assert decoder.reference.shape == (2, num_queries, levels, 4)
    encoder_attention = trace.encoder_attention
    positions = sum(h * w for h, w in [(8, 12), (4, 6), (2, 3), (1, 2)])
    assert encoder_attention.locations.shape == (2, positions, heads, levels, cfg.enc_n_points, 2)
    # Reference point of encoder position 0 is the centre of the first stride-8 cell on every level.
    assert torch.allclose(encoder_attention.reference[0, 0], torch.tensor([[0.5 / 12, 0.5 / 8]] * levels))


def test_trace_in_training_mode_separates_denoising_queries():
    encoder = micro_encoder().train()
    targets = [rectangles(64, 64, [[4, 4, 30, 30], [34, 10, 60, 40]]), rectangles(64, 64, [[10, 20, 50, 60]])]
    trace = trace_forward(encoder, torch.randn(2, 3, 64, 64), targets=targets)
    denoising = trace.proposals.denoising
    assert denoising is not None and trace.output.losses
    num_queries = trace.query_objectness.shape[1]
    assert trace.query_boxes.shape == (2, num_queries, 4)
    assert trace.decoder_attention.locations.shape[1] == num_queries
    assert any(key.startswith("rpn_dn") for key in trace.output.losses)


def test_denoising_groups_and_mask_segments():
    targets = normalize_targets([rectangles(64, 64, [[4, 4, 30, 30], [34, 10, 60, 40]]),
                                 rectangles(64, 64, [[10, 20, 50, 60]])])
    generator = torch.Generator().manual_seed(0)
    denoising = build_denoising_queries(targets, 20, torch.randn(2, 8), dn_num_queries=12, box_noise_scale=0.4,
                                        label_noise_ratio=0.5, generator=generator)
    assert denoising.num_groups == 3 and denoising.group_size == 4
    for image, target in enumerate(targets):
        positives, negatives = denoising_groups(denoising, image)
        num_gt = len(target["boxes"])
        assert positives.shape == negatives.shape == (3, num_gt, 4)
        gt = box_cxcywh_to_xyxy(target["boxes"])
        half = torch.cat([target["boxes"][:, 2:], target["boxes"][:, 2:]], dim=1) / 2
        shift = (box_cxcywh_to_xyxy(positives) - gt).abs() / half                 # (G, K, 4) in half-sizes
        assert (shift <= 0.4 + 1e-5).all()                                        # positives: within lambda
        negative_shift = (box_cxcywh_to_xyxy(negatives) - gt).abs() / half
        assert (negative_shift.amax(-1) > 0.4 - 1e-5).all()                       # negatives: beyond it somewhere
    segments = denoising_mask_segments(denoising, 20)
    assert [s[0] for s in segments] == ["dn group 1", "dn group 2", "dn group 3", "matching"]
    assert [(s[1], s[2]) for s in segments] == [(0, 4), (4, 8), (8, 12), (12, 32)]
    assert denoising.attn_mask.shape[-1] == segments[-1][2]


def test_boxes_to_pixels():
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]])
    expected = torch.tensor([[0.0, 0.0, 80.0, 60.0], [0.0, 24.0, 40.0, 36.0]])
    assert torch.allclose(boxes_to_pixels(boxes, (60, 80)), expected)


# -- eq. (2) ------------------------------------------------------------------------------------------------------
def test_fusion_gradients_skip_box_mask_and_objectness_parts():
    encoder = micro_encoder(mask_pooling="image", region_appearance_size=0).eval()     # v2 eq. (2) as written
    norms = fusion_gradient_norms(encoder, torch.randn(1, 3, 64, 64))
    # Only through q^sem: the box, mask and objectness heads produce detached or top-k-selected values.
    for part in ("box_head", "mask_head", "objectness_head", "enc_output", "enc_output_norm"):
        assert norms[f"region_proposals.{part}"] == 0.0, part
    # With the appearance term on the mask head's per-pixel embedding, the tokens read that embedding, so the mask
    # head gets a gradient; the other heads still get none. On F_0 (the tiny preset) the mask head gets none.
    appearance = fusion_gradient_norms(
        micro_encoder(region_appearance_size=2, region_appearance_source="pixel_embedding").eval(),
        torch.randn(1, 3, 64, 64))
    assert appearance["region_proposals.mask_head"] > 0.0
    for part in ("box_head", "objectness_head", "enc_output", "enc_output_norm"):
        assert appearance[f"region_proposals.{part}"] == 0.0, part
    on_f0 = fusion_gradient_norms(micro_encoder(region_appearance_size=2, region_appearance_source="backbone").eval(),
                                  torch.randn(1, 3, 64, 64))
    assert on_f0["region_proposals.mask_head"] == 0.0 and on_f0["backbone"] > 0.0
    assert norms["global_representations"] == 0.0                 # the global tokens are not in the loss
    for part in ("region_proposals.fusion", "region_proposals.decoder", "region_proposals.encoder",
                 "region_proposals.query_embed", "backbone"):
        assert norms[part] > 0.0, part
    assert all(p.grad is None for p in encoder.parameters())
    # The fusion's own norm, independently: autograd.grad of the same loss.
    out = encoder(torch.zeros(1, 3, 64, 64))
    fusion = list(encoder.region_proposals.fusion.parameters())
    grads = torch.autograd.grad(out.tokens[:, out.num_global:].square().mean(), fusion)
    expected = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    assert fusion_gradient_norms(encoder, torch.zeros(1, 3, 64, 64))["region_proposals.fusion"] == \
        pytest.approx(expected, rel=1e-6)


def test_a_loss_on_the_global_tokens_reaches_only_the_backbone_and_the_pools():
    """v2 eq. (1): the global tokens pool the backbone's features; no part of the proposal network is on their path."""
    encoder = micro_encoder().eval()
    norms = fusion_gradient_norms(encoder, torch.randn(1, 3, 64, 64), tokens="global")
    assert norms["backbone"] > 0.0 and norms["global_representations"] > 0.0
    assert {name for name, norm in norms.items() if norm == 0.0} == \
        {name for name in norms if name.startswith("region_proposals.")}
    assert all(p.grad is None for p in encoder.parameters())
    with pytest.raises(ValueError, match="tokens='all'"):
        fusion_gradient_norms(encoder, torch.randn(1, 3, 64, 64), tokens="all")


def test_matching_cost_terms_add_up_and_the_assignment_is_optimal():
    encoder = micro_encoder().eval()
    raw = [rectangles(64, 64, [[4, 4, 30, 30], [34, 10, 60, 40], [8, 40, 24, 60]])]
    trace = trace_forward(encoder, torch.randn(1, 3, 64, 64), targets=raw)
    target = normalize_targets(raw, trace.output.padded_size)[0]
    last = trace.proposals.predictions["dec1"]
    matcher = encoder.criterion.matcher
    costs, (pred_index, gt_index) = matching_costs(matcher, last.objectness[0], last.boxes[0], last.masks[0],
                                                   target, seed=4)
    assert list(costs) == ["total", "objectness", "L1", "GIoU", "mask BCE", "dice"]
    num_queries = last.boxes.shape[1]
    assert all(c.shape == (num_queries, 3) for c in costs.values())
    assert torch.allclose(sum(c for name, c in costs.items() if name != "total"), costs["total"], atol=1e-5)
    # The L1 term alone, by hand.
    by_hand = matcher.cost_bbox * (last.boxes[0][:, None] - target["boxes"][None]).abs().sum(-1)
    assert torch.allclose(costs["L1"], by_hand)
    # Optimal: no other one-to-one assignment of the 3 objects among the queries costs less (brute force).
    total = costs["total"].double().numpy()
    best = min(total[choice[0], 0] + total[choice[1], 1] + total[choice[2], 2]
               for choice in itertools.permutations(range(num_queries), 3))
    chosen = costs["total"][pred_index, gt_index].sum().item()
    assert chosen == pytest.approx(best, abs=1e-4)
    assert sorted(gt_index.tolist()) == [0, 1, 2]


def test_objectness_inside_boxes_splits_each_level_at_the_boxes():
    from uniperceiver_v2.walkthrough.rpn import objectness_inside_boxes

    # a 64 x 64 image, one box over its top-left 32 x 32 quarter; two levels of 4 x 4 and 2 x 2 cells
    fine = torch.zeros(4, 4)
    fine[:2, :2] = 1.0                                  # the four cells whose centres lie in the box
    fine[3, 3] = 0.6
    coarse = torch.tensor([[0.8, 0.2], [0.2, 0.2]])
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    (fine_in, fine_out), (coarse_in, coarse_out) = objectness_inside_boxes([fine, coarse], box, (64, 64))
    assert fine_in == pytest.approx(1.0) and fine_out == pytest.approx(0.6 / 12)
    assert coarse_in == pytest.approx(0.8) and coarse_out == pytest.approx(0.2)
    # a box over the whole image leaves nothing outside; no box leaves nothing inside
    whole = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    assert objectness_inside_boxes([coarse], whole, (64, 64)) == [(pytest.approx(0.35), None)]
    assert objectness_inside_boxes([coarse], torch.zeros(0, 4), (64, 64)) == [(None, pytest.approx(0.35))]
