"""Nothing lost, nothing silent: the synthetic-suite generator never writes into a folder it did not create, and the
readers name the file, record and key of a value of the wrong type, and count (or refuse) instances whose mask
would be empty."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from uniperceiver_v2.config import load_config
from uniperceiver_v2.data import CocoCaptions, CocoInstances, DataError, KarpathyCaptions, TextCorpus, synthetic
from uniperceiver_v2.data.suite import IN_PROGRESS_NAME, MANIFEST_NAME, may_generate_into, written_by_generator
from uniperceiver_v2.engine.data_setup import ensure_data

FIXTURES = Path(__file__).parent / "fixtures" / "data"
IMAGES = FIXTURES / "images"



def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def generator_calls(monkeypatch):
    """Replace the generator behind ``ensure_data`` by a recorder (generating takes seconds, and it is tested in
    test_data_synthetic.py); the list holds the folders it was asked to generate into."""
    calls = []
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda root, profile, seed=0: calls.append(Path(root)))
    return calls


# ---------------------------------------------------------------------------------------------------
# data.root: the generator writes only into a new or empty folder, or one it wrote
# ---------------------------------------------------------------------------------------------------


def test_a_users_folder_is_never_overwritten_and_the_error_names_what_is_missing(tmp_path, generator_calls):
    root = tmp_path / "d"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text('{"x":1}')
    before = _snapshot(root)
    cfg = load_config("tiny", [f"data.root={root}"])   # data.synthetic_profile keeps its default, "quick"
    with pytest.raises(DataError) as error:
        ensure_data(cfg)
    message = str(error.value)
    assert f"data.root={root}" in message and "no manifest.json written by the generator" in message
    assert "scenes/train (data.detection_images)" in message and "text/corpus_train.txt (data.corpus)" in message
    assert "annotations/instances_train.json" not in message            # present, so not listed as missing
    assert generator_calls == [] and _snapshot(root) == before


def test_the_generator_itself_refuses_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("my data")
    (root / MANIFEST_NAME).write_text("not json, and not the generator's")
    with pytest.raises(DataError, match=r"mine: this folder holds files the synthetic-suite generator did not write"):
        synthetic.generate(root, "quick")
    with pytest.raises(DataError, match="did not write"):
        synthetic.ensure_synthetic(root, "quick")
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "notes.txt"]
    assert (root / "notes.txt").read_text() == "my data"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        may_generate_into(tmp_path / "file")


def test_a_complete_data_set_without_manifest_is_read_as_real_data_without_a_second_key(
        tmp_path, generator_calls, caplog):
    root = tmp_path / "corpus_only"
    (root / "text").mkdir(parents=True)
    (root / "text" / "corpus_train.txt").write_text("a red square\n")
    disabled = [f"tasks.{name}.enabled=false" for name in ("classification", "detection", "captioning", "retrieval")]
    cfg = load_config("tiny", [f"data.root={root}", *disabled])
    before = _snapshot(root)
    with caplog.at_level(logging.INFO, logger="uniperceiver_v2.engine.data_setup"):
        ensure_data(cfg)
    assert generator_calls == [] and _snapshot(root) == before
    assert "reading it as real data" in caplog.text


@pytest.mark.parametrize("state", ["missing", "empty", "interrupted", "file deleted"])
def test_new_empty_or_the_generators_own_incomplete_folders_are_generated(tmp_path, generator_calls, synthetic_root,
                                                                          state):
    root = tmp_path / "suite"
    if state == "empty":
        root.mkdir()
    elif state == "interrupted":   # a generation stopped half-way leaves its in-progress marker and some files
        (root / "scenes" / "train").mkdir(parents=True)
        (root / "scenes" / "train" / "000000000001.png").write_bytes(b"png")
        (root / IN_PROGRESS_NAME).write_text(json.dumps({"generator": "uniperceiver_v2.data.synthetic"}))
    elif state == "file deleted":
        root.mkdir()
        shutil.copy(synthetic_root / MANIFEST_NAME, root / MANIFEST_NAME)   # every listed file is missing
    ensure_data(load_config("tiny", [f"data.root={root}"]))
    assert generator_calls == [root]


def test_a_complete_suite_of_other_settings_is_read_as_it_is_with_a_warning(synthetic_root, generator_calls, caplog):
    """data/synthetic_small used with the default data.synthetic_profile=quick must not be regenerated."""
    before = {p: p.stat().st_mtime_ns for p in (synthetic_root / "annotations").iterdir()}
    with caplog.at_level(logging.WARNING, logger="uniperceiver_v2.engine.data_setup"):
        ensure_data(load_config("tiny", [f"data.root={synthetic_root}", "data.seed=7"]))
    assert generator_calls == []
    assert "holds the synthetic suite 'quick' (seed 0), not 'quick' (seed 7)" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (synthetic_root / "annotations").iterdir()} == before


def test_suites_generated_before_the_rule_are_recognised_by_their_manifest(synthetic_root, tmp_path):
    # Every manifest the generator ever wrote carries "generator"; that is the proof of ownership.
    assert json.loads((synthetic_root / MANIFEST_NAME).read_text())["generator"] == "uniperceiver_v2.data.synthetic"
    assert written_by_generator(synthetic_root) and synthetic.find_suite(synthetic_root) is not None
    may_generate_into(synthetic_root)
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_NAME).write_text(json.dumps({"generator": "someone else", "files": {}}))
    assert not written_by_generator(other) and synthetic.find_suite(other) is None


def test_real_data_configs_never_reach_the_generator(tmp_path, generator_calls):
    ensure_data(load_config("tiny", [f"data.root={tmp_path / 'absent'}", "data.synthetic_profile=null"]))
    assert generator_calls == [] and not (tmp_path / "absent").exists()


# ---------------------------------------------------------------------------------------------------
# readers: values of the wrong type name file, record and key
# ---------------------------------------------------------------------------------------------------


def _edited(tmp_path: Path, name: str, edit) -> Path:
    data = json.loads((FIXTURES / name).read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


WRONG_TYPES = {
    "annotation image_id": (lambda d: d["annotations"][1].update(image_id="abc"),
                            r'annotation id=2 \(image_id="abc"\): image_id must be an integer, got "abc"'),
    "image width": (lambda d: d["images"][0].update(width="sixty"),
                    r'images\[0\] \(id=10\): width must be an integer, got "sixty"'),
    "image height zero": (lambda d: d["images"][0].update(height=0), r"images\[0\] \(id=10\): height must be >= 1"),
    "image id float": (lambda d: d["images"][0].update(id=1.5), r"images\[0\]: id must be an integer, got 1.5"),
    "file name null": (lambda d: d["images"][1].update(file_name=None),
                       r"images\[1\] \(id=11\): file_name must be a non-empty string, got null"),
    "annotations null": (lambda d: d.update(annotations=None), r"top level: 'annotations' must be a list, got null"),
    "images object": (lambda d: d.update(images={}), r"top level: 'images' must be a list, got dict"),
    "category id": (lambda d: d["categories"][0].update(id="three"), r"categories\[0\]: id must be an integer"),
    "category name": (lambda d: d["categories"][0].update(name=None), r"categories\[0\]: name must be a non-empty"),
    "iscrowd": (lambda d: d["annotations"][0].update(iscrowd="no"), r"annotation id=1 .*iscrowd must be 0 or 1"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_instances_with_a_value_of_the_wrong_type_name_file_record_and_key(tmp_path, case):
    edit, message = WRONG_TYPES[case]
    path = _edited(tmp_path, "instances.json", edit)
    for on_invalid in ("error", "skip"):   # malformed, not merely unusable: always an error
        with pytest.raises(DataError, match=message) as error:
            CocoInstances(IMAGES, path, on_invalid=on_invalid)
        assert str(error.value).startswith(str(path))


def test_integral_numbers_and_digit_texts_are_still_accepted(tmp_path):
    path = _edited(tmp_path, "instances.json", lambda d: d["images"][0].update(id="10", width=16.0))
    assert CocoInstances(IMAGES, path).image_ids[0] == 10


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(image_id="abc"),
     r'annotations\[0\] .*image_id must be an integer, got "abc"'),
    (lambda d: d["annotations"][0].update(caption=None), r"annotations\[0\] .*caption must be a string, got null"),
    (lambda d: d.update(annotations=None), r"top level: 'annotations' must be a list, got null"),
    (lambda d: d["images"][0].update(id=[1]), r"images\[0\]: id must be an integer, got \[1\]"),
], ids=["image_id", "caption", "annotations", "image id"])
def test_captions_with_a_value_of_the_wrong_type_name_file_record_and_key(tmp_path, edit, message):
    path = _edited(tmp_path, "captions.json", edit)
    with pytest.raises(DataError, match=message) as error:
        CocoCaptions(IMAGES, path, on_invalid="skip")
    assert str(path) in str(error.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][0].update(sentences=None), r"images\[0\]: 'sentences' must be a list, got null"),
    (lambda d: d["images"][0].update(cocoid="x"), r'images\[0\]: cocoid must be an integer, got "x"'),
    (lambda d: d["images"][0]["sentences"][0].update(raw=5), r"images\[0\]\.sentences\[0\] .*raw must be a string"),
], ids=["sentences", "cocoid", "raw"])
def test_karpathy_with_a_value_of_the_wrong_type_names_file_record_and_key(tmp_path, edit, message):
    path = _edited(tmp_path, "karpathy.json", edit)
    splits = sorted({record["split"] for record in json.loads(path.read_text())["images"]})
    with pytest.raises(DataError, match=message):
        KarpathyCaptions(IMAGES, path, splits)


# ---------------------------------------------------------------------------------------------------
# instances whose mask would be empty follow on_invalid
# ---------------------------------------------------------------------------------------------------


EMPTY_MASKS = {
    # the box (annotation 1: [2, 2, 6, 4]) stays inside the 16x12 image, so only the mask reveals the problem
    "polygon outside": ([[20.0, 2.0, 28.0, 2.0, 28.0, 6.0, 20.0, 6.0]], "empty mask"),
    "flat polygon": ([[2.0, 2.0, 5.0, 5.0, 8.0, 8.0]], "empty mask"),
    "nan coordinate": ([[2.0, math.nan, 8.0, 2.0, 8.0, 6.0]], "non-finite coordinate"),
    "far outside": ([[2.0, 2.0, 1e9, 2.0, 8.0, 6.0]], "more than an image size outside"),
    "rle of zeros": ({"size": [12, 16], "counts": [192]}, "empty mask"),
}


@pytest.mark.parametrize("case", list(EMPTY_MASKS))
def test_an_instance_with_an_empty_or_broken_mask_is_refused_or_skipped_and_counted(tmp_path, case):
    segmentation, reason = EMPTY_MASKS[case]
    path = _edited(tmp_path, "instances.json", lambda d: d["annotations"][0].update(segmentation=segmentation))
    with pytest.raises(DataError, match=rf"{path}: annotation id=1 \(image_id=10\): bad segmentation: .*{reason}"
                                        r".*data\.on_invalid=skip"):
        CocoInstances(IMAGES, path)
    dataset = CocoInstances(IMAGES, path, on_invalid="skip")
    summary = dataset.summary()
    key = next(key for key in summary.skipped if reason in key)
    assert summary.skipped[key] == 1 and summary.invalid[key] == 1
    assert "annotation id=1" in summary.examples[key][0]
    assert dataset[0].labels.tolist() == [1, 2]   # the other annotations of the image are kept
    assert all(mask.any() for mask in dataset[0].masks)
    assert CocoInstances(IMAGES, path, with_masks=False).summary().num_invalid == 0   # boxes only: the box is fine


def test_a_corpus_line_that_is_not_utf8_follows_on_invalid(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a red square\n\xff\xfe broken\nthe blue circle\n")
    with pytest.raises(DataError, match=r"corpus\.txt:2: not valid UTF-8.*data\.on_invalid=skip"):
        TextCorpus(path)
    corpus = TextCorpus(path, on_invalid="skip")
    assert [corpus[i] for i in range(len(corpus))] == ["a red square", "the blue circle"]
    assert corpus.summary().invalid == {"line is not valid UTF-8": 1}
