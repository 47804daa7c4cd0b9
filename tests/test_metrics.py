"""Evaluation metrics against hand-derived answers and the reference implementations they wrap."""

import itertools
import math

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocotools import mask as mask_utils

from uniperceiver_v2.metrics.captioning import caption_metrics, ptb_tokenize
from uniperceiver_v2.metrics.classification import topk_accuracy
from uniperceiver_v2.metrics.coco import evaluate_coco, one_record_per_box
from uniperceiver_v2.metrics.retrieval import retrieval_recall

# ------------------------------------------------------------------------------------------------ COCO

SIZE = 200


def _rle(box):
    """Compressed RLE of the axis-aligned rectangle box = [x, y, w, h] in a SIZE x SIZE image."""
    x, y, w, h = box
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _ground_truth(boxes_per_image):
    """boxes_per_image: {image_id: [(category_id, [x, y, w, h]), ...]} -> COCO instances dict with masks."""
    annotations = []
    for image_id, boxes in boxes_per_image.items():
        for category_id, box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "segmentation": _rle(box),
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.jpg"} for i in boxes_per_image],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _detection(image_id, category_id, box, score=0.9):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score, "segmentation": _rle(box)}


def test_perfect_detection_has_ap_one():
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    metrics = evaluate_coco(gt, [_detection(1, 1, [10, 10, 100, 100])])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
        assert metrics[iou_type]["AR100"] == pytest.approx(1.0)
        assert math.isnan(metrics[iou_type]["APs"])  # no small object in the ground truth: pycocotools' -1
    assert "Average Precision" in metrics["summary"]["bbox"]


def test_partial_overlap_counts_at_the_iou_thresholds_it_passes():
    # Prediction covers 72 of the GT box's 100 rows: IoU = 7200 / 10000 = 0.72. It is a true positive at the
    # thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (AP 1 each) and a false positive at 0.75..0.95 (AP 0 each):
    # AP = 5 / 10, AP50 = 1, AP75 = 0. The mask overlap is the same rectangle, so segm agrees.
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    metrics = evaluate_coco(gt, [_detection(1, 1, [10, 10, 100, 72])])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(0.5)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(0.0)


def test_missed_object_halves_recall():
    # Two cats, one found perfectly: recall 0.5. Precision is 1 up to recall 0.5 and 0 beyond, so of the 101
    # recall points 0, 0.01, ..., 1 exactly the 51 points <= 0.5 have precision 1: AP = 51 / 101.
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])], 2: [(1, [30, 40, 60, 50])]})
    metrics = evaluate_coco(gt, [_detection(1, 1, [10, 10, 100, 100])], iou_types=("bbox",))
    assert metrics["bbox"]["AR100"] == pytest.approx(0.5)
    assert metrics["bbox"]["AP"] == pytest.approx(51 / 101)
    assert "segm" not in metrics


def test_category_subset():
    # A cat found, a dog missed: AP(cat) = 1, AP(dog) = 0, AP over both = their mean.
    gt = _ground_truth({1: [(1, [10, 10, 100, 100]), (2, [120, 120, 60, 60])]})
    detections = [_detection(1, 1, [10, 10, 100, 100])]
    assert evaluate_coco(gt, detections, ("bbox",), cat_ids=[1])["bbox"]["AP"] == pytest.approx(1.0)
    assert evaluate_coco(gt, detections, ("bbox",), cat_ids=[2])["bbox"]["AP"] == pytest.approx(0.0)
    assert evaluate_coco(gt, detections, ("bbox",))["bbox"]["AP"] == pytest.approx(0.5)


def test_image_subset_leaves_out_images_a_reader_skipped():
    # Image 2's object is missed: over both images recall is 0.5 (AP 51 / 101); over image 1 alone, the images a
    # reader kept after skipping image 2, the one object is found (AP 1).
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])], 2: [(1, [30, 40, 60, 50])]})
    detections = [_detection(1, 1, [10, 10, 100, 100])]
    assert evaluate_coco(gt, detections, ("bbox",))["bbox"]["AP"] == pytest.approx(51 / 101)
    assert evaluate_coco(gt, detections, ("bbox",), img_ids=[1])["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not images of the ground truth"):
        evaluate_coco(gt, detections, ("bbox",), img_ids=[1, 9])
    with pytest.raises(ValueError, match="outside img_ids"):
        evaluate_coco(gt, detections, ("bbox",), img_ids=[2])


def test_class_agnostic_ap_ignores_the_names():
    # Both boxes are exact but the names are swapped: class-aware AP 0, class-agnostic AP 1 (localisation alone).
    gt = _ground_truth({1: [(1, [10, 10, 100, 100]), (2, [120, 120, 60, 60])]})
    swapped = [_detection(1, 2, [10, 10, 100, 100]), _detection(1, 1, [120, 120, 60, 60], score=0.8)]
    assert evaluate_coco(gt, swapped, ("bbox",))["bbox"]["AP"] == pytest.approx(0.0)
    agnostic = evaluate_coco(gt, swapped, ("bbox", "segm"), class_agnostic=True)
    for iou_type in ("bbox", "segm"):
        assert agnostic[iou_type]["AP"] == pytest.approx(1.0)
    # A duplicate of the first box with another name is a false positive once names are ignored: in score order
    # precision is 1, 1/2, 2/3 at recall 1/2, 1/2, 1; interpolated, 1 at the 51 recall points <= 1/2 and 2/3 at the
    # 50 above: AP = (51 + 50 * 2/3) / 101.
    duplicate = [_detection(1, 2, [10, 10, 100, 100], 0.9), _detection(1, 1, [10, 10, 100, 100], 0.85),
                 _detection(1, 1, [120, 120, 60, 60], 0.8)]
    assert evaluate_coco(gt, duplicate, ("bbox",), class_agnostic=True)["bbox"]["AP"] == \
        pytest.approx((51 + 50 * 2 / 3) / 101)


def test_one_record_per_box_keeps_each_boxs_best_name():
    gt = _ground_truth({1: [(1, [10, 10, 100, 100]), (2, [120, 120, 60, 60])]})
    records = [_detection(1, 2, [10, 10, 100, 100], 0.9), _detection(1, 1, [10, 10, 100, 100], 0.85),
               _detection(1, 1, [120, 120, 60, 60], 0.8), _detection(2, 1, [10, 10, 100, 100], 0.5)]
    kept = one_record_per_box(records)
    assert [(r["image_id"], r["category_id"], r["score"]) for r in kept] == [(1, 2, 0.9), (1, 1, 0.8), (2, 1, 0.5)]
    assert records[1]["score"] == 0.85 and kept[0] is not records[0]          # inputs untouched, copies out
    # The duplicate name no longer costs precision: every box right -> class-agnostic AP 1 on image 1.
    assert evaluate_coco(gt, kept[:2], ("bbox",), class_agnostic=True)["bbox"]["AP"] == pytest.approx(1.0)


def test_segm_uses_mask_area_not_box_area():
    # A result whose box says "large" but whose mask is small must count in the mask's area range (APs),
    # like the ground truth, whose area is the mask's.
    gt = _ground_truth({1: [(1, [10, 10, 20, 20])]})  # 400 px: small
    detection = _detection(1, 1, [10, 10, 20, 20])
    detection["bbox"] = [0, 0, 150, 150]
    metrics = evaluate_coco(gt, [detection], iou_types=("segm",))
    assert metrics["segm"]["APs"] == pytest.approx(1.0)


def test_no_detections_give_zero_ap_and_inputs_are_not_mutated():
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    assert evaluate_coco(gt, [], iou_types=("bbox",))["bbox"]["AP"] == 0.0
    detections = [_detection(1, 1, [10, 10, 100, 100])]
    keys_before = set(detections[0])
    evaluate_coco(gt, detections)
    assert set(detections[0]) == keys_before


def test_ground_truth_from_json_file(tmp_path):
    import json

    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    assert evaluate_coco(path, [_detection(1, 1, [10, 10, 100, 100])], ("bbox",))["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [])


@pytest.mark.parametrize(
    "result, message",
    [
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "image_id 9"),
        ({"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 1.0}, "category_id 7"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}, "'score'"),
    ],
)
def test_bad_results_are_named(result, message):
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    with pytest.raises(ValueError, match=message):
        evaluate_coco(gt, [result], iou_types=("bbox",))


def test_segm_needs_masks():
    gt = _ground_truth({1: [(1, [10, 10, 100, 100])]})
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


# ------------------------------------------------------------------------------------------------ classification


def test_topk_accuracy_hand_case():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.3],  # target 1: top-1
            [0.5, 0.2, 0.4, 0.1],  # target 2: second -> top-2 only
            [0.3, 0.2, 0.1, 0.0],  # target 3: last -> top-4 only
        ]
    )
    targets = torch.tensor([1, 2, 3])
    assert topk_accuracy(scores, targets, ks=(1, 2, 3, 4, 5)) == pytest.approx(
        {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0, 5: 1.0}
    )


def test_topk_accuracy_against_argsort():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 17, generator=generator)
    targets = torch.randint(0, 17, (200,), generator=generator)
    order = np.argsort(-scores.numpy(), axis=1)
    rank = np.argmax(order == targets.numpy()[:, None], axis=1)
    result = topk_accuracy(scores, targets, ks=(1, 5))
    assert result[1] == pytest.approx(np.mean(rank < 1))
    assert result[5] == pytest.approx(np.mean(rank < 5))


def test_topk_accuracy_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets must lie"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))


# ------------------------------------------------------------------------------------------------ captioning


@pytest.mark.parametrize(
    "caption, tokens",
    [
        ("A dog's toy, isn't it?", ["a", "dog", "'s", "toy", "is", "n't", "it"]),
        ("A black-and-white photo (3.5 x 1,000).", ["a", "black-and-white", "photo", "3.5", "x", "1,000"]),
        (
            'They\'re "sitting" -- quietly... I cannot see',
            ["they", "'re", "sitting", "quietly", "i", "can", "not", "see"],
        ),
        ("Fish & chips: $5 each!", ["fish", "&", "chips", "$", "5", "each"]),
        ("Two  DOGS' bowls\n", ["two", "dogs", "bowls"]),
    ],
)
def test_ptb_tokenize(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def test_bleu_hand_computed():
    # candidate "the cat sat on the mat", reference "the cat sat on a mat" (both 6 words: no brevity penalty)
    # matched 1-grams 5/6 (the 2nd "the" is clipped), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3.
    scores = caption_metrics({1: "The cat sat on the mat."}, {1: ["The cat sat on a mat."]})
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        expected = math.prod(precisions[:n]) ** (1 / n)
        assert scores[f"BLEU-{n}"] == pytest.approx(expected, rel=1e-6)


def test_metrics_equal_pycocoevalcap_on_pretokenized_text():
    references = {
        "a": ["A man rides a horse on the beach.", "Someone riding a brown horse near the sea."],
        "b": ["Two dogs play with a red ball.", "A pair of dogs chasing a ball in the grass."],
        "c": ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate."],
    }
    predictions = {
        "a": "A man riding a horse on a beach.",
        "b": "Two dogs playing with a ball.",
        "c": "A plate of rice.",
    }
    ours = caption_metrics(predictions, references)
    gts = {k: [" ".join(ptb_tokenize(c)) for c in v] for k, v in references.items()}
    res = {k: [" ".join(ptb_tokenize(v))] for k, v in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert ours["CIDEr"] == pytest.approx(cider)
    assert 0 < ours["BLEU-4"] < 1 and 0 < ours["CIDEr"] < 10


def test_perfect_captions_reach_the_maximum():
    # Identical prediction and single reference: every n-gram cosine is 1 and the length penalty e^0 = 1,
    # so CIDEr-D = 10 * mean_n(1) = 10; BLEU = 1.
    captions = ["a cat on a red sofa", "two men play chess outside", "a bowl of fresh fruit"]
    references = {i: [c] for i, c in enumerate(captions)}
    scores = caption_metrics({i: refs[0] for i, refs in references.items()}, references)
    assert scores["CIDEr"] == pytest.approx(10.0)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_ids_must_match():
    with pytest.raises(ValueError, match="no predicted caption for image 2"):
        caption_metrics({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]})
    with pytest.raises(ValueError, match="image 1: references"):
        caption_metrics({1: "a cat"}, {1: "a cat"})


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_recall_hand_matrix():
    # 3 images with 2 captions each: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    text_to_image = [0, 0, 1, 1, 2, 2]
    similarity = torch.tensor(
        [
            # t0   t1   t2   t3   t4   t5
            [0.9, 0.1, 0.2, 0.0, 0.3, 0.0],  # image 0: its caption t0 is first                -> rank 0
            [0.8, 0.1, 0.2, 0.5, 0.7, 0.0],  # image 1: best own caption t3 behind t0, t4      -> rank 2
            [0.6, 0.8, 0.9, 0.7, 0.1, 0.2],  # image 2: best own caption t5 behind 4 others    -> rank 4
        ]
    )
    # Text -> image, per caption column, rank of its own image: t0 0 (0.9 best); t1 image 0 has 0.1 vs
    # 0.1, 0.8 -> 2 (tie counts against); t2 image 1 has 0.2 vs 0.2, 0.9 -> 2; t3 0.5 vs 0.0, 0.7 -> 1;
    # t4 image 2 has 0.1 vs 0.3, 0.7 -> 2; t5 0.2 vs 0.0, 0.0 -> 0.
    result = retrieval_recall(similarity, text_to_image, ks=(1, 3, 5))
    assert result == pytest.approx(
        {"i2t_R@1": 1 / 3, "i2t_R@3": 2 / 3, "i2t_R@5": 1.0, "t2i_R@1": 2 / 6, "t2i_R@3": 1.0, "t2i_R@5": 1.0}
    )


def _brute_force_recall(similarity, text_to_image, k):
    """Pure-python reference: pessimistic ranks by explicit comparison."""
    sim = similarity.tolist()
    num_images, num_texts = len(sim), len(sim[0])
    i2t = []
    for i in range(num_images):
        own = [t for t in range(num_texts) if text_to_image[t] == i]
        best = max(sim[i][t] for t in own)
        i2t.append(sum(sim[i][t] >= best for t in range(num_texts) if t not in own) < k)
    t2i = []
    for t in range(num_texts):
        own = sim[text_to_image[t]][t]
        t2i.append(sum(sim[i][t] >= own for i in range(num_images) if i != text_to_image[t]) < k)
    return sum(i2t) / num_images, sum(t2i) / num_texts


def test_retrieval_recall_against_brute_force_with_ties_and_chunks():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randint(0, 6, (7, 21), generator=generator).float()  # many ties
    text_to_image = list(itertools.chain.from_iterable([i] * 3 for i in range(7)))
    result = retrieval_recall(similarity, text_to_image, ks=(1, 5, 10), chunk_size=3)
    for k in (1, 5, 10):
        i2t, t2i = _brute_force_recall(similarity, text_to_image, k)
        assert result[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert result[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_constant_similarity_is_not_rewarded():
    result = retrieval_recall(torch.zeros(4, 8), [0, 0, 1, 1, 2, 2, 3, 3], ks=(1,))
    assert result == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_recall(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="text_to_image must be"):
        retrieval_recall(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(torch.full((1, 1), float("nan")), [0])
