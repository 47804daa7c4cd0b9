"""The readers on tiny hand-written fixtures (tests/fixtures/data, see make_fixtures.py there) and on
every kind of bad input: each is either handled correctly or raises a DataError naming file and record."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from uniperceiver_v2.data import (
    CocoCaptions,
    CocoInstances,
    DataError,
    ImageFolderClassification,
    KarpathyCaptions,
    TextCorpus,
    read_image,
)
from uniperceiver_v2.data.coco import rle_string_to_counts

FIXTURES = Path(__file__).parent / "fixtures" / "data"
IMAGES = FIXTURES / "images"
INSTANCES = FIXTURES / "instances.json"



def _rectangle(top: int, left: int, bottom: int, right: int, shape=(12, 16)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def _edited_instances(tmp_path: Path, edit) -> Path:
    """A copy of the fixture instances file after ``edit(data)``; images stay in IMAGES."""
    data = json.loads(INSTANCES.read_text())
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------------
# image modes
# ---------------------------------------------------------------------------------------------------


def _rgb_reference() -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(IMAGES / "rgb.png"))).permute(2, 0, 1).float() / 255


def test_rgb_image_is_float_chw_in_unit_range():
    image = read_image(IMAGES / "rgb.png")
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert torch.equal(image, _rgb_reference())


def test_grayscale_becomes_three_equal_channels():
    image = read_image(IMAGES / "gray.png")
    assert image.shape == (3, 12, 16)
    assert (
        torch.equal(image[0], _rgb_reference()[0])
        and torch.equal(image[0], image[1])
        and torch.equal(image[1], image[2])
    )


def test_palette_image_matches_its_rgb_conversion():
    expected = (
        torch.from_numpy(np.array(Image.open(IMAGES / "palette.png").convert("RGB"))).permute(2, 0, 1).float() / 255
    )
    assert torch.equal(read_image(IMAGES / "palette.png"), expected)


def test_rgba_is_composited_over_white():
    image = read_image(IMAGES / "rgba.png")
    assert torch.allclose(image[:, 0, 0], torch.ones(3))  # fully transparent -> white
    alpha = 128 / 255
    expected = torch.tensor([200, 100, 0]) / 255 * alpha + (1 - alpha)
    assert torch.allclose(image[:, 0, 1], expected, atol=1e-6)
    assert torch.equal(image[:, 5:, 5:], _rgb_reference()[:, 5:, 5:])  # opaque pixels unchanged


def test_sixteen_bit_uses_the_full_range():
    image = read_image(IMAGES / "gray16.png")
    assert image[0, 0, 0].item() == pytest.approx(32768 / 65535)
    assert torch.all(image[:, :, 8:] == 1.0) and torch.all(image[:, 1:, :8] == 0.0)


def test_cmyk_jpeg_converts_to_rgb():
    image = read_image(IMAGES / "cmyk.jpg")
    assert image.shape == (3, 12, 16)
    assert (image - _rgb_reference()).abs().mean() < 0.05  # lossy JPEG, same picture


def test_float_image_is_rejected_with_the_file_name(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
    with pytest.raises(DataError, match=r"float\.tif"):
        read_image(path)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None], ids=["empty", "garbage", "truncated"])
def test_corrupt_image_raises_data_error_naming_file_and_record(tmp_path, content):
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    target = folder / "rgb.png"
    target.write_bytes(content if content is not None else (IMAGES / "rgb.png").read_bytes()[:40])
    dataset = CocoInstances(folder, INSTANCES)
    with pytest.raises(DataError, match=r"rgb\.png.*image id=10"):
        dataset[0]


def test_missing_image_raises_data_error_naming_file_and_record(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    (folder / "gray.png").unlink()
    dataset = CocoInstances(folder, INSTANCES)
    with pytest.raises(DataError, match=r"not found: .*gray\.png.*image id=11"):
        dataset[1]


def test_image_size_differing_from_the_record_is_an_error(tmp_path):
    path = _edited_instances(tmp_path, lambda d: d["images"][0].update(width=20))
    with pytest.raises(DataError, match=r"rgb\.png.*image id=10"):
        CocoInstances(IMAGES, path, with_masks=False)[0]


# ---------------------------------------------------------------------------------------------------
# CocoInstances on the fixture
# ---------------------------------------------------------------------------------------------------


def test_coco_instances_targets():
    dataset = CocoInstances(IMAGES, INSTANCES)
    # Categories are sorted by id (3, 7, 90) and labels are contiguous indices into that list.
    assert dataset.class_names == ["car", "train", "toothbrush"]
    assert dataset.label_to_category_id == [3, 7, 90]
    assert dataset.image_ids == [10, 11, 12, 13, 14]
    sample = dataset[0]
    assert sample.image_id == 10 and sample.orig_size == (12, 16) and sample.file_name == "rgb.png"
    assert sample.labels.tolist() == [0, 1, 2]  # the crowd annotation (id 4) is not a target
    assert sample.boxes.tolist() == [[2, 2, 8, 6], [9, 1, 14, 5], [1, 8, 5, 11]]
    assert sample.masks.shape == (3, 12, 16) and sample.masks.dtype == torch.bool
    assert torch.equal(sample.masks[0], _rectangle(2, 2, 6, 8))  # polygon
    assert torch.equal(sample.masks[1], _rectangle(1, 9, 5, 14))  # compressed RLE
    assert torch.equal(sample.masks[2], _rectangle(8, 1, 11, 5))  # uncompressed RLE


def test_coco_instances_masks_agree_with_pycocotools():
    dataset = CocoInstances(IMAGES, INSTANCES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(INSTANCES))
    for index, image_id in enumerate(dataset.image_ids):
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        sample = dataset[index]
        assert len(annotations) == len(sample.labels)
        for k, annotation in enumerate(annotations):
            assert np.array_equal(sample.masks[k].numpy(), coco.annToMask(annotation).astype(bool))
            assert dataset.label_to_category_id[int(sample.labels[k])] == annotation["category_id"]


def test_crowd_and_empty_images_are_counted(caplog):
    with caplog.at_level(logging.INFO, logger="uniperceiver_v2.data.coco"):
        dataset = CocoInstances(IMAGES, INSTANCES)
    summary = dataset.summary()
    assert summary.skipped == {"crowd annotation (iscrowd=1, not a training target)": 1}
    assert summary.notes["images without objects (kept)"] == 1
    assert summary.kept == {"images": 5, "annotations": 6, "categories": 3}
    empty = dataset[2]
    assert (
        empty.image_id == 12
        and empty.boxes.shape == (0, 4)
        and empty.labels.shape == (0,)
        and empty.masks.shape == (0, 12, 16)
    )
    assert "crowd annotation" in caplog.text


def test_empty_image_policies():
    skipped = CocoInstances(IMAGES, INSTANCES, empty_images="skip")
    assert 12 not in skipped.image_ids and skipped.summary().skipped["image without objects"] == 1
    with pytest.raises(DataError, match=r"image id=12 \(palette.png\) has no usable object"):
        CocoInstances(IMAGES, INSTANCES, empty_images="error")


def test_without_masks_segmentation_is_not_needed(tmp_path):
    path = _edited_instances(tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]])
    sample = CocoInstances(IMAGES, path, with_masks=False)[0]
    assert sample.masks is None and sample.boxes.shape == (3, 4)
    with pytest.raises(DataError, match=r"annotations\[0\]: missing key\(s\) \['segmentation'\]"):
        CocoInstances(IMAGES, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("categories"), r"top level: missing key\(s\) \['categories'\]"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\]: missing key\(s\) \['file_name'\]"),
        (lambda d: d["annotations"][2].pop("bbox"), r"annotations\[2\]: missing key\(s\) \['bbox'\]"),
        (lambda d: d["categories"][0].pop("name"), r"categories\[0\]: missing key\(s\) \['name'\]"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"duplicate image id 10"),
        (
            lambda d: d["annotations"][1].update(bbox=[1, 2, 3]),
            r"annotation id=2 \(image_id=10\): bbox must be 4 numbers",
        ),
    ],
    ids=[
        "no-categories",
        "image-without-file-name",
        "annotation-without-bbox",
        "category-without-name",
        "duplicate-image",
        "short-bbox",
    ],
)
def test_malformed_json_names_file_and_record(tmp_path, edit, message):
    path = _edited_instances(tmp_path, edit)
    with pytest.raises(DataError, match=message) as error:
        CocoInstances(IMAGES, path, on_invalid="skip")
    assert str(path) in str(error.value)


def test_unreadable_json_is_a_data_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        CocoInstances(IMAGES, path)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoInstances(IMAGES, tmp_path / "absent.json")


def _rle(counts) -> dict:
    return {"segmentation": {"size": [12, 16], "counts": counts}}


# (index of the edited annotation in the fixture, fields to change, reason expected in the error / summary)
INVALID_ANNOTATIONS = {
    "zero-width": (1, {"bbox": [9.0, 1.0, 0.0, 4.0]}, "degenerate box"),
    "negative-height": (1, {"bbox": [9.0, 1.0, 5.0, -2.0]}, "degenerate box"),
    "outside": (1, {"bbox": [40.0, 1.0, 5.0, 4.0]}, "lies outside"),
    "unknown-image": (1, {"image_id": 999}, "unknown image_id"),
    "unknown-category": (1, {"category_id": 55}, "unknown category_id 55"),
    "short-polygon": (1, {"segmentation": [[1.0, 2.0, 3.0, 4.0]]}, "bad segmentation: segmentation has no polygon"),
    "rle-size": (1, {"segmentation": {"size": [5, 5], "counts": "abc"}}, "bad segmentation: RLE size"),
    # pycocotools would decode these into garbage masks without an error.
    "rle-empty-string": (1, _rle(""), "RLE runs cover 0 pixels"),
    "rle-truncated-string": (1, _rle("P"), "ends in the middle of a run"),  # "P": continuation bit set
    "rle-short-list": (2, _rle([100, 3]), "RLE runs cover 103 pixels"),
}


@pytest.mark.parametrize("case", list(INVALID_ANNOTATIONS))
def test_invalid_annotation_policy(tmp_path, caplog, case):
    index, change, reason = INVALID_ANNOTATIONS[case]
    path = _edited_instances(tmp_path, lambda d: d["annotations"][index].update(change))
    bad_id = index + 1  # fixture annotation ids are 1, 2, 3, ...
    with pytest.raises(DataError, match=rf"annotation id={bad_id} .*{reason}"):
        CocoInstances(IMAGES, path)
    with caplog.at_level(logging.WARNING, logger="uniperceiver_v2.data.coco"):
        dataset = CocoInstances(IMAGES, path, on_invalid="skip")
    summary = dataset.summary()
    matching = {key: count for key, count in summary.skipped.items() if reason in key}
    assert sum(matching.values()) == 1, summary
    assert summary.kept["annotations"] == 5
    assert any(f"annotation id={bad_id}" in example for key in matching for example in summary.examples[key])
    assert reason in caplog.text  # logged at WARNING, not dropped silently
    # The image's other annotations are intact (labels of annotations 1, 2, 3 are 0, 1, 2).
    assert dataset[0].labels.tolist() == [label for label in (0, 1, 2) if label != index]


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) > rng.uniform(0.1, 0.9)
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        # Independent run lengths: column-major, starting with a (possibly empty) run of zeros.
        flat = mask.flatten(order="F").astype(int)
        boundaries = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
        expected = [0, *runs] if flat[0] == 1 else runs
        assert rle_string_to_counts(encoded["counts"]) == expected


def test_boxes_are_clipped_to_the_image_and_counted(tmp_path):
    path = _edited_instances(tmp_path, lambda d: d["annotations"][1].update(bbox=[9.0, -1.0, 10.0, 6.0]))
    dataset = CocoInstances(IMAGES, path)
    assert dataset[0].boxes[1].tolist() == [9, 0, 16, 5]
    assert dataset.summary().notes["boxes clipped to the image"] == 1


def test_short_polygon_parts_are_dropped_and_counted(tmp_path):
    def edit(d):
        d["annotations"][0]["segmentation"].append([0.0, 0.0, 1.0, 1.0])

    dataset = CocoInstances(IMAGES, _edited_instances(tmp_path, edit))
    assert dataset.summary().notes["polygon parts with < 3 points dropped"] == 1
    assert torch.equal(dataset[0].masks[0], _rectangle(2, 2, 6, 8))


def test_invalid_policy_value_is_rejected():
    with pytest.raises(ValueError, match="on_invalid"):
        CocoInstances(IMAGES, INSTANCES, on_invalid="ignore")
    with pytest.raises(ValueError, match="empty_images"):
        CocoInstances(IMAGES, INSTANCES, empty_images="drop")


# ---------------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------------


def test_coco_captions_per_caption_and_per_image():
    pairs = CocoCaptions(IMAGES, FIXTURES / "captions.json", iterate="caption")
    assert len(pairs) == 5 and pairs.num_images == 2
    assert [pairs[i].caption for i in range(3)] == ["A gradient with a box.", "Two spaces here.", "Third caption."]
    assert pairs[3].image_id == 11 and pairs[3].image.shape == (3, 12, 16)
    images = CocoCaptions(IMAGES, FIXTURES / "captions.json", iterate="image", transform=lambda x: x * 0)
    assert len(images) == 2 and images[1].captions == ["A gray picture.", "Another gray one."]
    assert images[0].image.abs().sum() == 0  # the transform was applied


def test_coco_captions_bad_records(tmp_path):
    data = json.loads((FIXTURES / "captions.json").read_text())
    data["annotations"].append({"id": 6, "image_id": 77, "caption": "orphan"})
    data["annotations"].append({"id": 7, "image_id": 11, "caption": "   "})
    data["images"].append({"id": 12, "file_name": "palette.png"})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"annotations\[5\] \(id=6, image_id=77\): caption refers to an unknown image_id"
    ):
        CocoCaptions(IMAGES, path)
    dataset = CocoCaptions(IMAGES, path, on_invalid="skip")
    assert dataset.summary().skipped == {
        "caption refers to an unknown image_id": 1,
        "empty caption": 1,
        "image without captions": 1,
    }
    assert len(dataset) == 5
    data["annotations"][0].pop("caption")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[0\]: missing key\(s\) \['caption'\]"):
        CocoCaptions(IMAGES, path, on_invalid="skip")


def test_karpathy_splits_and_paths():
    train = KarpathyCaptions(FIXTURES, FIXTURES / "karpathy.json", splits=("train", "restval"))
    assert train.image_ids == [10, 11] and len(train) == 3
    assert train[2].caption == "only tokens here"  # sentence without raw text
    assert train[0].file_name == "images/rgb.png" and torch.equal(train[0].image, _rgb_reference())
    test = KarpathyCaptions(FIXTURES, FIXTURES / "karpathy.json", splits="test", iterate="image")
    assert test[0].captions == ["A palette image."] and test[0].image_id == 12
    with pytest.raises(DataError, match=r"no captioned images in split\(s\) \['val'\].*\['restval', 'test', 'train'\]"):
        KarpathyCaptions(FIXTURES, FIXTURES / "karpathy.json", splits="val")


# ---------------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------------


def test_image_folder_with_synset_mapping():
    dataset = ImageFolderClassification(FIXTURES / "imagefolder", class_names=FIXTURES / "LOC_synset_mapping.txt")
    assert dataset.class_folders == ["n01440764", "n01443537"]
    assert dataset.class_names == ["tench", "goldfish"]
    assert dataset.labels == [0, 0, 1]
    assert dataset.summary().notes == {"non-image files ignored": 1}
    sample = dataset[2]
    assert sample.label == 1 and sample.path.endswith("c.png") and torch.equal(sample.image, _rgb_reference())


def test_image_folder_names_from_folders_json_or_mapping(tmp_path):
    assert ImageFolderClassification(FIXTURES / "imagefolder_named").class_names == ["sea lion", "tree frog"]
    mapping = tmp_path / "class_names.json"
    mapping.write_text(json.dumps({"n01440764": "a tench", "n01443537": "a goldfish"}))
    assert ImageFolderClassification(FIXTURES / "imagefolder", class_names=mapping).class_names == [
        "a tench",
        "a goldfish",
    ]
    with pytest.raises(DataError, match=r"\['n01443537'\] have no display name"):
        ImageFolderClassification(FIXTURES / "imagefolder", class_names={"n01440764": "tench"})


def test_image_folder_bad_roots(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderClassification(tmp_path / "absent")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageFolderClassification(tmp_path)


# ---------------------------------------------------------------------------------------------------
# text corpus
# ---------------------------------------------------------------------------------------------------


def test_text_corpus_skips_and_counts_blank_lines():
    corpus = TextCorpus(FIXTURES / "corpus.txt")
    assert [corpus[i] for i in range(len(corpus))] == ["First sentence.", "Second one, padded.", "Café au lait."]
    assert corpus.summary().notes == {"blank lines skipped": 3}
    restored = pickle.loads(pickle.dumps(corpus))  # as a DataLoader worker receives it
    assert restored[2] == "Café au lait."


def test_text_corpus_bad_input(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        TextCorpus(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no non-blank line"):
        TextCorpus(path)
