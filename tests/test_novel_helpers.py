"""The helpers notebook 08 reads its figures with: which scenes put a novel name among their best boxes, what a
figure of detections shows of novel names, and the per-category table next to an untrained model."""

from types import SimpleNamespace

import torch

from uniperceiver_v2 import walkthrough
from uniperceiver_v2.engine.evaluation import NovelDetectionResult


def result(per_category):
    return NovelDetectionResult(["circle", "hexagon", "ring"], ["hexagon", "ring"], [], {}, per_category)


def test_per_category_table_puts_the_reference_next_to_each_category():
    trained = result({"hexagon": {"AP": 0.05, "AP50": 0.1, "instances": 3}, "ring": {"AP": 0.0, "AP50": 0.0,
                                                                                   "instances": 2}})
    untrained = result({"hexagon": {"AP": 0.01, "AP50": 0.02, "instances": 3},
                        "ring": {"AP": float("nan"), "AP50": 0.0, "instances": 2}})
    table = walkthrough.per_category_table(trained, untrained)
    assert table["columns"][-2:] == ["untrained AP", "untrained AP50"]
    assert table["rows"] == [["hexagon", 3, 5.0, 10.0, 1.0, 2.0], ["ring", 2, 0.0, 0.0, None, 0.0]]
    assert walkthrough.per_category_table(trained)["rows"][0] == ["hexagon", 3, 5.0, 10.0]
    assert walkthrough.above_reference(trained, untrained) == {"hexagon": True, "ring": False}


def test_images_with_novel_names_count_each_box_once_with_its_best_name():
    box_a, box_b, box_c = [0, 0, 4, 4], [5, 5, 4, 4], [9, 9, 4, 4]
    records = [{"image_id": 1, "bbox": box_a, "category_id": 1, "score": 0.9},
               {"image_id": 1, "bbox": box_a, "category_id": 7, "score": 0.8},    # same box: not its best name
               {"image_id": 1, "bbox": box_b, "category_id": 2, "score": 0.7},
               {"image_id": 1, "bbox": box_c, "category_id": 7, "score": 0.1},    # third box
               {"image_id": 2, "bbox": box_a, "category_id": 7, "score": 0.2}]
    assert walkthrough.images_with_novel_names(records, {7}, count=2) == [2]
    assert walkthrough.images_with_novel_names(records, {7}, count=3) == [1, 2]
    assert walkthrough.images_with_novel_names([], {7}, count=3) == []
    suppressed = records + [{"image_id": 3, "bbox": box_a, "category_id": 7, "score": 0.0}]   # nms_threshold
    assert walkthrough.images_with_novel_names(suppressed, {7}, count=3) == [1, 2]


def test_novel_naming_counts_novel_names_and_those_on_an_object_of_that_name():
    names = ["circle", "hexagon", "ring"]
    sample = SimpleNamespace(boxes=torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), labels=torch.tensor([1, 0]))
    shown = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11], [50, 50, 60, 60]]),
             "labels": torch.tensor([1, 0, 2, 1])}     # right hexagon, circle, ring on the hexagon, stray hexagon
    assert walkthrough.novel_naming([shown], [sample], names, ["hexagon", "ring"]) == {
        "shown": 4, "novel": 3, "correct": 1}
    assert walkthrough.novel_naming([], [], names, ["ring"]) == {"shown": 0, "novel": 0, "correct": 0}


def test_novel_objects_named_takes_the_best_detection_on_each_novel_object(tmp_path):
    """Three novel objects: one found and named right, one found under a seen name (its best detection wins over a
    lower-scored right name), one with no detection of IoU >= 0.5; seen and crowd objects are not counted."""
    import json

    categories = [{"id": 1, "name": "circle"}, {"id": 7, "name": "hexagon", "novel": True}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 20, 10, 10], "iscrowd": 0},
                   {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                   {"id": 4, "image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 0},
                   {"id": 5, "image_id": 2, "category_id": 7, "bbox": [40, 40, 10, 10], "iscrowd": 1}]
    (tmp_path / "novel.json").write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "categories": categories,
                                                     "annotations": annotations}))
    records = [{"image_id": 1, "bbox": [1, 1, 10, 10], "category_id": 7, "score": 0.6},   # IoU 0.68, right
               {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.5},   # lower score
               {"image_id": 1, "bbox": [20, 20, 10, 10], "category_id": 1, "score": 0.9},  # wrong name wins
               {"image_id": 1, "bbox": [21, 21, 10, 10], "category_id": 7, "score": 0.3},
               {"image_id": 2, "bbox": [5, 5, 10, 10], "category_id": 7, "score": 0.9},    # IoU 0.14: misses
               {"image_id": 2, "bbox": [20, 20, 10, 10], "category_id": 1, "score": 0.9},  # a seen object
               {"image_id": 2, "bbox": [40, 40, 10, 10], "category_id": 7, "score": 0.9}]  # on the crowd box
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(tmp_path), novel_annotations="novel.json"))
    assert walkthrough.novel_objects_named(records, cfg) == {"objects": 3, "found": 2, "named": 1}
    assert walkthrough.novel_objects_named(records, cfg, min_iou=0.1) == {"objects": 3, "found": 3, "named": 2}
    assert walkthrough.novel_objects_named([], cfg) == {"objects": 3, "found": 0, "named": 0}
