"""Detection / instance segmentation: proposal labels, loss, COCO results, zero-shot class lists."""

import copy
from dataclasses import replace

import pytest
import torch
from helpers import detection_samples, overfit, single_thread, tiny_config, tiny_model  # noqa: F401
from pycocotools.coco import COCO

from uniperceiver_v2.tasks.detection import DetectionTask, assign_proposal_labels, mask_tight_box, to_coco_results
from uniperceiver_v2.tasks.losses import IGNORE_INDEX

NAMES = ["square", "rectangle"]
CATEGORY_IDS = [3, 11]                       # sparse COCO-style ids


def test_assign_proposal_labels_by_iou_and_best_proposal_per_object():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]])
    gt_labels = torch.tensor([4, 7, 9])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 9.0],       # IoU 0.9 with gt 0                 -> 4
        [0.0, 0.0, 10.0, 4.0],       # IoU 0.4 with gt 0, not its best   -> ignored
        [21.0, 21.0, 40.0, 40.0],    # IoU 81/(100+361-81) = 0.21, the best proposal of gt 1 -> 7 (low-quality match)
        [80.0, 80.0, 90.0, 90.0],    # overlaps nothing                  -> ignored
    ])
    labels = assign_proposal_labels(proposals, gt, gt_labels)
    assert labels.tolist() == [4, IGNORE_INDEX, 7, IGNORE_INDEX]          # gt 2 overlaps no proposal: unclaimed
    assert assign_proposal_labels(proposals, gt[:0], gt_labels[:0]).tolist() == [IGNORE_INDEX] * 4


def test_loss_adds_the_region_proposal_losses_and_decreases_when_overfitting():
    model = tiny_model()
    task = DetectionTask(model.config.tasks.detection, NAMES, CATEGORY_IDS)
    batch = task.collate(detection_samples(2))
    out = task.loss(model, batch)
    rpn = {k: v for k, v in out.items() if k.startswith("rpn_")}
    assert rpn and all(torch.isfinite(v) for v in rpn.values())
    assert out["loss_rpn"].item() == pytest.approx(sum(v.item() for v in rpn.values()), rel=1e-5)
    weight = model.config.tasks.detection.loss_weight
    assert out["loss"].item() == pytest.approx(
        weight * (out["loss_cls"] + model.config.tasks.detection.proposal_loss_weight * out["loss_rpn"]
                  + out["loss_moe_aux"]).item(), rel=1e-6)
    losses = overfit(model, task, batch, steps=12, lr=3e-4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_proposal_loss_weight_scales_only_the_proposal_losses_in_the_total():
    """tasks.detection.proposal_loss_weight: total = w_k (loss_cls + weight * loss_rpn + aux); the logged terms stay
    unweighted, and the class loss' share of the gradient grows as the weight shrinks (what MT-AdamW normalises)."""
    model = tiny_model()
    samples = detection_samples(2)
    shares = {}
    for weight in (1.0, 0.05):
        config = replace(model.config.tasks.detection, proposal_loss_weight=weight)
        task = DetectionTask(config, NAMES)
        torch.manual_seed(0)
        out = task.loss(model, task.collate(samples))
        assert out["loss"].item() == pytest.approx(
            config.loss_weight * (out["loss_cls"] + weight * out["loss_rpn"] + out["loss_moe_aux"]).item(), rel=1e-6)
        params = [p for p in model.parameters() if p.requires_grad]
        total = torch.autograd.grad(out["loss"], params, retain_graph=True, allow_unused=True)
        cls = torch.autograd.grad(config.loss_weight * out["loss_cls"], params, allow_unused=True)
        norm = lambda grads: torch.sqrt(sum(g.square().sum() for g in grads if g is not None))  # noqa: E731
        shares[weight] = (norm(cls) / norm(total)).item()
    assert shares[0.05] > 2 * shares[1.0], shares


def test_loss_requires_instance_masks():
    task = DetectionTask(tiny_config().tasks.detection, NAMES)
    batch = replace(task.collate(detection_samples(1)), masks=None)
    with pytest.raises(ValueError, match="with_masks=True"):
        task.loss(tiny_model(), batch)


@pytest.fixture(scope="module")
def predictions():
    model = tiny_model().eval()
    task = DetectionTask(model.config.tasks.detection, NAMES, CATEGORY_IDS)
    batch = task.collate(detection_samples(2))
    return model, task, batch, task.predict(model, batch)


def test_predictions_are_valid_coco_results(predictions):
    model, task, batch, predicted = predictions
    results = to_coco_results(predicted, batch.image_ids, batch.category_ids)
    assert len(results) == 2 * min(task.config.max_detections, 20 * len(NAMES))
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": i, "height": 64, "width": 64, "file_name": f"{i}.png"} for i in batch.image_ids],
        "annotations": [{"id": 1, "image_id": batch.image_ids[0], "category_id": 3, "bbox": [8, 8, 24, 24],
                         "area": 576, "iscrowd": 0, "segmentation": [[8, 8, 32, 8, 32, 32, 8, 32]]}],
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, NAMES)],
    }
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(copy.deepcopy(results))
    assert len(loaded.getAnnIds()) == len(results)
    for record in results:
        x, y, w, h = record["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= 64 + 1e-4 and y + h <= 64 + 1e-4
        assert 0.0 <= record["score"] <= 1.0
        assert record["segmentation"]["size"] == [64, 64]
    scores = [r["score"] for r in results if r["image_id"] == batch.image_ids[0]]
    assert scores == sorted(scores, reverse=True)


def test_boxes_and_masks_are_returned_in_original_image_pixels(predictions):
    model, task, batch, predicted = predictions
    twice = replace(batch, orig_sizes=batch.orig_sizes * 2)          # the network saw a half-size copy
    scaled = task.predict(model, twice)
    torch.testing.assert_close(scaled[0]["boxes"], predicted[0]["boxes"] * 2, atol=1e-3, rtol=1e-5)
    assert scaled[0]["masks"].shape[-2:] == (128, 128)


def test_zero_shot_class_names_and_no_masks_without_segmentation():
    cfg = tiny_config(detection={"segmentation": False, "max_detections": 7})
    model = tiny_model(cfg).eval()
    unseen = ["zebra", "traffic light", "umbrella"]
    task = DetectionTask(cfg.tasks.detection, unseen)
    batch = task.collate(detection_samples(1))
    predicted = task.predict(model, batch)
    assert set(predicted[0]) == {"boxes", "scores", "labels"}
    assert predicted[0]["boxes"].shape == (7, 4) and int(predicted[0]["labels"].max()) < len(unseen)
    results = to_coco_results(predicted, batch.image_ids, range(len(unseen)))
    assert all("segmentation" not in r for r in results)


def test_mask_tight_box_matches_pycocotools():
    import numpy as np
    import pycocotools.mask as mask_utils

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = torch.zeros(30, 40, dtype=torch.bool)
        y0, x0 = (int(v) for v in torch.randint(0, 25, (2,), generator=generator))
        mask[y0:y0 + int(torch.randint(1, 6, (1,), generator=generator)),
             x0:x0 + int(torch.randint(1, 15, (1,), generator=generator))] = True
        mask &= torch.rand(30, 40, generator=generator) < 0.9          # holes do not change the tight box
        if not mask.any():
            continue
        x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8))))
        assert mask_tight_box(mask).tolist() == [x, y, x + w, y + h]
    assert mask_tight_box(torch.zeros(5, 5, dtype=torch.bool)) is None


@pytest.mark.parametrize("threshold", [0.1, 0.7])
def test_mask_box_iou_replaces_a_box_by_its_masks_tight_box_when_they_overlap(predictions, threshold):
    """Reference: the plain detections (boxes and masks), each box replaced by hand by its mask's tight box where
    the two overlap with IoU >= threshold; with segmentation off the boxes are the same and no mask is returned."""
    from torchvision.ops import box_iou

    model, task, batch, predicted = predictions
    refined = DetectionTask(replace(task.config, mask_box_iou=threshold), NAMES, CATEGORY_IDS).predict(model, batch)
    changed = 0
    for plain, new in zip(predicted, refined):
        expected = plain["boxes"].clone()
        for k, mask in enumerate(plain["masks"]):
            tight = mask_tight_box(mask)
            if tight is not None and box_iou(tight[None], plain["boxes"][k:k + 1].float())[0, 0] >= threshold:
                expected[k] = tight
                changed += int(not torch.allclose(tight, plain["boxes"][k].float()))
        torch.testing.assert_close(new["boxes"], expected)
        torch.testing.assert_close(new["scores"], plain["scores"])
        assert torch.equal(new["masks"], plain["masks"])
    # the untrained masks cover the whole image: at 0.1 some boxes (IoU 0.16 with it) are replaced, at 0.7 none
    assert (changed > 0) == (threshold == 0.1)
    no_masks = DetectionTask(replace(task.config, mask_box_iou=threshold, segmentation=False), NAMES, CATEGORY_IDS)
    boxes_only = no_masks.predict(model, batch)
    assert "masks" not in boxes_only[0]
    torch.testing.assert_close(boxes_only[0]["boxes"], refined[0]["boxes"])


def _greedy_nms_reference(boxes_xyxy, scores, threshold):
    """Plain-Python greedy NMS: visit by descending score, keep a box unless it overlaps a kept one above the
    threshold."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union
    kept = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(iou(boxes_xyxy[i], boxes_xyxy[j]) <= threshold for j in kept):
            kept.append(i)
    return set(kept)


def test_suppress_duplicates_matches_greedy_nms():
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy
    from uniperceiver_v2.tasks.detection import suppress_duplicates

    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(2, 12, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(2, 12, 2, generator=generator) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], -1)
    boxes[:, 6:] = boxes[:, :6] + 0.01 * torch.randn(2, 6, 4, generator=generator)       # near-duplicates
    objectness = torch.rand(2, 12, generator=generator)
    for threshold in (0.3, 0.5, 0.7):
        out = suppress_duplicates(boxes, objectness, threshold)
        for b in range(2):
            clipped = box_cxcywh_to_xyxy(boxes[b]).clamp(0.0, 1.0)                  # the boxes as evaluated
            expected = _greedy_nms_reference(clipped.tolist(), objectness[b].tolist(), threshold)
            kept = set(torch.nonzero(out[b]).flatten().tolist())
            assert kept == expected, (threshold, b)
            assert torch.equal(out[b, sorted(kept)], objectness[b, sorted(kept)])       # kept scores unchanged
            assert len(kept) < 12                                                       # the duplicates went


def test_suppress_duplicates_compares_the_boxes_clipped_to_the_image():
    """Two proposals that reach past the right edge: IoU 0.48 as predicted, 0.87 once clipped to the image (as
    postprocess returns them and COCO scores them), so NMS at 0.5 must drop the lower one."""
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou
    from uniperceiver_v2.tasks.detection import suppress_duplicates

    boxes = torch.tensor([[[0.98, 0.5, 1.0, 0.4],         # x 0.48 .. 1.48: half of it past the edge
                           [0.70, 0.5, 0.6, 0.4],         # x 0.40 .. 1.00
                           [0.20, 0.2, 0.2, 0.2]]])       # elsewhere
    objectness = torch.tensor([[0.9, 0.8, 0.7]])
    xyxy = box_cxcywh_to_xyxy(boxes[0])
    assert box_iou(xyxy[:1], xyxy[1:2]).item() < 0.5 < box_iou(xyxy[:1].clamp(0, 1), xyxy[1:2].clamp(0, 1)).item()
    assert torch.equal(suppress_duplicates(boxes, objectness, 0.5), torch.tensor([[0.9, 0.0, 0.7]]))
    assert torch.equal(suppress_duplicates(boxes, objectness, 0.9), objectness)            # 0.87 < 0.9: both stay


def test_nms_threshold_in_detect_and_config(monkeypatch):
    from uniperceiver_v2.config import ConfigError, load_config
    from uniperceiver_v2.modeling.box_ops import box_iou

    model = tiny_model().eval()
    encode = model.encode_images

    def with_a_duplicate(*args, **kwargs):
        image = encode(*args, **kwargs)
        best = image.objectness.argmax(dim=1)                                 # (B,)
        other = (best + 1) % image.objectness.shape[1]
        for b in range(image.boxes.shape[0]):   # copy the best proposal, score it lower
            image.boxes[b, other[b]] = image.boxes[b, best[b]]
            image.objectness[b, other[b]] = image.objectness[b, best[b]] - 0.1
        return image

    monkeypatch.setattr(model, "encode_images", with_a_duplicate)
    batch = DetectionTask(model.config.tasks.detection, NAMES).collate(detection_samples(1))
    results = {}
    for threshold in (0.0, 0.5):
        task = DetectionTask(replace(model.config.tasks.detection, nms_threshold=threshold, max_detections=400), NAMES)
        torch.manual_seed(0)
        results[threshold] = task.detect(model, batch.images, batch.padding_mask, batch.orig_sizes, NAMES)[0]

    before, after = ((results[t]["scores"] > 0).sum().item() for t in (0.0, 0.5))
    kept = model.config.image_encoder.topk_queries                            # O proposals, each with C names
    assert before == kept * len(NAMES) and after == before - len(NAMES)     # the duplicate's C detections went
    distinct = torch.unique(results[0.5]["boxes"][results[0.5]["scores"] > 0], dim=0)
    assert (box_iou(distinct, distinct) - torch.eye(len(distinct))).max() <= 0.5 + 1e-6
    kept_scores = results[0.5]["scores"][results[0.5]["scores"] > 0]
    assert torch.isin(kept_scores, results[0.0]["scores"]).all()            # survivors keep their scores
    with pytest.raises(ConfigError, match="tasks.detection.nms_threshold"):
        load_config("tiny", ["tasks.detection.nms_threshold=1.5"])
