"""The synthetic suite generator: determinism, format validity (checked with pycocotools), ground-truth
consistency, the novel-category and corpus hold-outs, caption truthfulness, and the readers on it.

The quick profile is generated once per session (a few seconds) and shared by every test here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from uniperceiver_v2.data import (
    CocoCaptions,
    CocoInstances,
    ImageFolderClassification,
    KarpathyCaptions,
    SyntheticSuite,
    TextCorpus,
    grammar,
    masks_to_boxes,
    synthetic,
)
from uniperceiver_v2.data.suite import read_manifest
from uniperceiver_v2.data.transforms import Compose, RandomCrop, RandomHorizontalFlip, RandomResizeShorterSide

SPLITS = ("train", "val", "test")

# pycocotools 2.0.x calls np.array(..., copy=False) on its own objects under numpy 2 (harmless).



@pytest.fixture(scope="session")
def suite_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_a")
    synthetic.generate(root, profile="quick", seed=0)
    return root


@pytest.fixture(scope="session")
def suite(suite_root) -> SyntheticSuite:
    return SyntheticSuite(suite_root)


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ---------------------------------------------------------------------------------------------------
# determinism and the manifest
# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_manifest_hashes_are_true(suite_root, tmp_path):
    # the second copy with two worker processes (as the reproduction generates it): the workers change the speed only
    other = synthetic.generate(tmp_path / "b", profile="quick", seed=0, workers=2)
    first = read_manifest(suite_root)
    assert first["files"] == other["files"]
    assert len(first["files"]) > 300
    # The hashes in the manifest are those of the files on disk (recomputed independently here).
    assert synthetic.verify(suite_root) == []
    for relative in list(first["files"])[:: max(1, len(first["files"]) // 20)]:
        a, b = (suite_root / relative).read_bytes(), (tmp_path / "b" / relative).read_bytes()
        assert a == b


def test_different_seed_changes_the_data():
    pools_a, pools_b = synthetic.digit_pools(0), synthetic.digit_pools(1)
    assert any(not np.array_equal(pools_a["train"][d], pools_b["train"][d]) for d in synthetic.DIGIT_CATEGORIES)


def test_an_item_does_not_depend_on_generation_order(suite_root, tmp_path):
    """Each scene has its own seeded generator: drawing scene 7 alone reproduces the suite's bytes."""
    manifest = read_manifest(suite_root)
    settings = synthetic.resolve_profile("quick")
    pools = synthetic.digit_pools(0)
    first_val_id = settings.scenes[0] + 1
    job = synthetic._SceneJob(str(tmp_path), 0, settings, "val", 7, first_val_id + 7, pools["val"])
    result = synthetic._scene_job(job)
    relative = f"scenes/val/{result['image']['file_name']}"
    assert synthetic._sha256(tmp_path / relative) == manifest["files"][relative]

    # The same jobs in a pool of two worker processes give the same files and records.
    jobs = [
        synthetic._SceneJob(str(tmp_path / "pool"), 0, settings, "val", i, first_val_id + i, pools["val"])
        for i in range(4)
    ]
    with synthetic._process_pool(2) as executor:
        pooled = synthetic._run(synthetic._scene_job, jobs, executor)
    assert pooled == [synthetic._scene_job(job) for job in jobs]
    for record in pooled:
        relative = f"scenes/val/{record['image']['file_name']}"
        assert synthetic._sha256(tmp_path / "pool" / relative) == manifest["files"][relative]


def test_ensure_synthetic_reuses_and_repairs(suite_root, tmp_path):
    manifest = read_manifest(suite_root)
    stamp = {p: p.stat().st_mtime_ns for p in (suite_root / "annotations").iterdir()}
    again = synthetic.ensure_synthetic(suite_root, "quick", seed=0)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in (suite_root / "annotations").iterdir()} == stamp

    # A copy with one file missing is regenerated to the same bytes.
    copy = tmp_path / "copy"
    for relative in manifest["files"]:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy / relative).write_bytes((suite_root / relative).read_bytes())
    (copy / "manifest.json").write_text((suite_root / "manifest.json").read_text())
    missing = next(iter(manifest["files"]))
    (copy / missing).unlink()
    repaired = synthetic.ensure_synthetic(copy, "quick", seed=0)
    assert repaired["files"] == manifest["files"]
    assert synthetic.verify(copy) == []


def test_the_generator_marks_its_folder_while_it_writes_and_names_itself_in_the_manifest(suite_root, tmp_path):
    from uniperceiver_v2.data.suite import IN_PROGRESS_NAME, written_by_generator

    assert not (suite_root / IN_PROGRESS_NAME).exists()   # removed once the manifest is written
    assert read_manifest(suite_root)["generator"] == "uniperceiver_v2.data.synthetic"
    assert written_by_generator(suite_root) and synthetic.find_suite(suite_root) == read_manifest(suite_root)
    # A generation that stopped half-way (marker, no manifest) is the generator's own: not complete, but writable.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / IN_PROGRESS_NAME).write_text('{"generator": "uniperceiver_v2.data.synthetic"}')
    (interrupted / "scenes").mkdir()
    assert written_by_generator(interrupted) and synthetic.find_suite(interrupted) is None


def test_manifest_content(suite):
    manifest = suite.manifest
    assert manifest["profile"] == "quick" and manifest["seed"] == 0
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert 12 <= len(suite.categories) <= 16
    assert 3 <= len(suite.novel_categories) <= 4
    assert set(suite.seen_categories) | set(suite.novel_categories) == set(suite.categories)
    assert not set(suite.seen_categories) & set(suite.novel_categories)
    assert manifest["counts"]["scenes_train"]["images"] == 60
    for split in SPLITS:
        assert suite.instances_file(split).is_file() and suite.captions_file(split).is_file()
        assert suite.classification_dir(split).is_dir() and suite.scene_dir(split).is_dir()
    assert suite.corpus_file("train").is_file() and suite.karpathy_file.is_file()
    # Nothing was dropped silently: the generator reports its drops (the count may be zero).
    assert set(manifest["stats"]["objects_dropped_too_little_visible"]) == {"train", "val", "test", "novel"}


# ---------------------------------------------------------------------------------------------------
# COCO instances: validity and consistency, checked with pycocotools
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [*SPLITS, "novel"])
def test_instances_load_and_masks_match_boxes_and_areas(suite, split):
    coco = _quiet_coco(suite.instances_file(split))
    annotations = coco.loadAnns(coco.getAnnIds())
    assert annotations, f"{split} has no annotations"
    for annotation in annotations:
        image = coco.imgs[annotation["image_id"]]
        mask = coco.annToMask(annotation).astype(bool)
        assert mask.shape == (image["height"], image["width"])
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert annotation["bbox"] == [float(v) for v in expected]
        assert annotation["area"] == int(mask.sum())
        assert annotation["iscrowd"] == 0
        assert isinstance(annotation["segmentation"]["counts"], str)
    # Visible masks of one image never overlap: later objects hide earlier ones.
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        if masks:
            assert np.sum(masks, axis=0).max() <= 1


def test_image_and_annotation_ids_are_unique_across_splits(suite):
    image_ids, annotation_ids = [], []
    for split in (*SPLITS, "novel"):
        data = json.loads(suite.instances_file(split).read_text())
        image_ids += [i["id"] for i in data["images"]]
        annotation_ids += [a["id"] for a in data["annotations"]]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(annotation_ids)) == len(annotation_ids)


@pytest.mark.parametrize("split", ["val", "novel"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_cocoeval_of_ground_truth_against_itself_is_perfect(suite, split, iou_type):
    coco = _quiet_coco(suite.instances_file(split))
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in coco.loadAnns(coco.getAnnIds())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP@.5


def test_novel_categories_only_in_the_novel_set(suite):
    novel_ids = {c["id"] for c in suite.manifest["categories"] if c["novel"]}
    assert {c["name"] for c in suite.manifest["categories"] if c["novel"]} == set(suite.novel_categories)
    for split in SPLITS:
        data = json.loads(suite.instances_file(split).read_text())
        assert {c["id"] for c in data["categories"] if c["novel"]} == novel_ids  # flag present in every file
        assert not {a["category_id"] for a in data["annotations"]} & novel_ids, f"novel category in {split}"
    novel = json.loads(suite.instances_file("novel").read_text())
    per_image: dict[int, set[int]] = {}
    for annotation in novel["annotations"]:
        per_image.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    assert len(per_image) == len(novel["images"])
    assert all(categories & novel_ids for categories in per_image.values())
    assert {a["category_id"] for a in novel["annotations"]} >= novel_ids


def test_classification_covers_all_categories_including_novel(suite):
    for split in SPLITS:
        dataset = ImageFolderClassification(suite.classification_dir(split))
        assert sorted(dataset.class_names) == sorted(suite.categories)
        counts = np.bincount(dataset.labels, minlength=len(dataset.class_names))
        expected = synthetic.PROFILES["quick"].class_images[SPLITS.index(split)]
        assert (counts == expected).all()
    sample = ImageFolderClassification(suite.classification_dir("test"))[0]
    assert sample.image.shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------------------
# captions and corpus
# ---------------------------------------------------------------------------------------------------


def test_captions_share_image_ids_with_scenes_and_karpathy_file(suite):
    karpathy = json.loads(suite.karpathy_file.read_text())
    for split in SPLITS:
        instances = json.loads(suite.instances_file(split).read_text())
        captions = json.loads(suite.captions_file(split).read_text())
        image_ids = [i["id"] for i in instances["images"]]
        assert [i["id"] for i in captions["images"]] == image_ids
        per_image = {i: [] for i in image_ids}
        for annotation in captions["annotations"]:
            per_image[annotation["image_id"]].append(annotation["caption"])
        assert all(len(texts) == 5 and len(set(texts)) == 5 for texts in per_image.values())
        entries = [e for e in karpathy["images"] if e["split"] == split]
        assert [e["cocoid"] for e in entries] == image_ids
        for entry in entries:
            assert [s["raw"] for s in entry["sentences"]] == per_image[entry["cocoid"]]
            assert all(s["tokens"] == grammar.tokenize(s["raw"]) for s in entry["sentences"])
            assert (suite.karpathy_image_root / entry["filepath"] / entry["filename"]).is_file()


def test_captions_distinguish_images(suite):
    for split in SPLITS:
        assert suite.manifest["stats"]["distinct_caption_fraction"][split] >= 0.95


# Caption words that name an attribute, mapped back to the generator's vocabulary.
_COLOUR_OF_WORD = {w: colour for colour, words in grammar.COLOUR_WORDS.items() for w in words}
_SHAPE_OF_WORD = {
    "circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle",
    "square": "square", "squares": "square", "triangle": "triangle", "triangles": "triangle", "triangular": "triangle",
    "star": "star", "stars": "star", "cross": "cross", "crosses": "cross", "plus": "cross",
    "diamond": "diamond", "diamonds": "diamond", "rhombus": "diamond", "rhombuses": "diamond",
    "ring": "ring", "rings": "ring", "hoop": "ring", "hoops": "ring", "donut": "ring",
    "hexagon": "hexagon", "hexagons": "hexagon", "six-sided": "hexagon",
}  # fmt: skip
_NUMBERS = {word: n for n, word in grammar.NUMBER_WORDS.items()}


def test_captions_are_true_of_their_image(suite):
    """Every colour and category a caption names is in the image's annotations, and a stated total
    object count equals the number of annotated objects."""
    checked = 0
    for split in SPLITS:
        coco = _quiet_coco(suite.instances_file(split))
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        captions = json.loads(suite.captions_file(split).read_text())["annotations"]
        for caption in captions:
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=caption["image_id"]))
            colours = {a["attributes"]["colour"] for a in annotations}
            categories = {names[a["category_id"]] for a in annotations}
            tokens = grammar.tokenize(caption["caption"])
            for i, token in enumerate(tokens):
                if token in _COLOUR_OF_WORD:
                    assert _COLOUR_OF_WORD[token] in colours, caption
                if token in _SHAPE_OF_WORD:
                    assert _SHAPE_OF_WORD[token] in categories, caption
                if token in ("digit", "handwritten", "number") and i + 1 < len(tokens):
                    digit = tokens[i + 1].removesuffix("es").removesuffix("s")
                    if digit in grammar.DIGIT_WORDS.values():
                        assert f"digit {digit}" in categories, caption
            total = re.match(r"^(\w+) (objects|items|figures) on ", caption["caption"].lower())
            if total:
                assert _NUMBERS[total.group(1)] == len(annotations), caption
            checked += 1
    assert checked == 500


def test_corpus_is_disjoint_from_val_and_test_captions(suite):
    held_out = set()
    for split in ("val", "test"):
        held_out |= {
            grammar.normalize(a["caption"]) for a in json.loads(suite.captions_file(split).read_text())["annotations"]
        }
    train = [grammar.normalize(line) for line in suite.corpus_file("train").read_text().splitlines()]
    val = [grammar.normalize(line) for line in suite.corpus_file("val").read_text().splitlines()]
    assert len(train) == 2000 and len(val) == 200
    assert not set(train) & held_out
    assert not set(val) & held_out
    assert not set(val) & set(train)
    # The hold-out actually removed something: the grammar does produce some of these sentences.
    assert sum(suite.manifest["stats"]["corpus_sentences_rejected"].values()) > 0
    # Novel category names reach the language side through the corpus.
    corpus_text = " ".join(train)
    assert all(name.split()[-1] in corpus_text for name in suite.novel_categories)


def test_grammar_relations_follow_the_layout():
    left = grammar.ObjectDescription("circle", "red", "small", 0.2, 0.5, 0.01)
    right = grammar.ObjectDescription("star", "blue", "large", 0.8, 0.5, 0.05)
    top = grammar.ObjectDescription("square", "green", "medium", 0.25, 0.1, 0.02)
    assert grammar.layout_relation(left, right) == "left"
    assert grammar.layout_relation(right, left) == "right"
    assert grammar.layout_relation(top, left) == "above"
    assert grammar.layout_relation(left, top) == "below"
    assert grammar.layout_relation(left, grammar.ObjectDescription("ring", "red", "small", 0.25, 0.55, 0.01)) == "near"
    # The relation template states the relation of whichever object it names first.
    writer = grammar._Writer(grammar.SceneDescription([left, right], "stripes"), np.random.default_rng(0))
    for _ in range(50):
        text = grammar._relation(writer)
        circle_at = min(text.find(w) for w in ("circle", "disc") if w in text)
        expected = "left" if circle_at < text.find("star") else "right"
        assert any(f" {phrase} " in text for phrase in grammar.RELATION_WORDS[expected]), text


# ---------------------------------------------------------------------------------------------------
# the readers on the suite
# ---------------------------------------------------------------------------------------------------


def test_readers_on_the_suite(suite):
    train = CocoInstances(suite.scene_dir("train"), suite.instances_file("train"))
    assert len(train) == 60 and train.summary().num_skipped == 0
    assert train.class_names == suite.categories
    for index in range(0, len(train), 7):
        sample = train[index]
        assert sample.image.shape == (3, 128, 128) and sample.image.dtype == torch.float32
        assert torch.equal(masks_to_boxes(sample.masks), sample.boxes)
        assert all(not train.categories[int(label)].novel for label in sample.labels)

    novel = CocoInstances(suite.scene_dir("novel"), suite.instances_file("novel"))
    assert any(novel.categories[int(label)].novel for i in range(len(novel)) for label in novel[i].labels)

    captions = CocoCaptions(suite.scene_dir("val"), suite.captions_file("val"), iterate="caption")
    assert len(captions) == 100 and captions.num_images == 20
    by_image = CocoCaptions(suite.scene_dir("val"), suite.captions_file("val"), iterate="image")
    assert len(by_image[0].captions) == 5
    karpathy = KarpathyCaptions(suite.karpathy_image_root, suite.karpathy_file, "test", iterate="image")
    coco_test = CocoCaptions(suite.scene_dir("test"), suite.captions_file("test"), iterate="image")
    assert karpathy.image_ids == coco_test.image_ids
    assert torch.equal(karpathy[0].image, coco_test[0].image) and karpathy[0].captions == coco_test[0].captions

    corpus = TextCorpus(suite.corpus_file("val"))
    assert len(corpus) == 200 and corpus[0] == suite.corpus_file("val").read_text().splitlines()[0]

    mask = CocoInstances(suite.scene_dir("val"), suite.instances_file("val"))[0].masks[0].numpy()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert mask_utils.area(rle) == mask.sum()


def test_detection_transforms_keep_suite_masks_and_boxes_consistent(suite):
    """Thin digit strokes and slivers of occluded objects survive down-scaling: every transformed box
    is within one pixel of its transformed mask's box, and no instance keeps an empty mask."""
    transform = Compose([RandomResizeShorterSide(32, 256, 300), RandomCrop(112), RandomHorizontalFlip()])
    dataset = CocoInstances(suite.scene_dir("train"), suite.instances_file("train"), transform=transform)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.masks.flatten(1).any(dim=1).all()
        if len(sample.boxes):
            assert (masks_to_boxes(sample.masks) - sample.boxes).abs().max() <= 1.0
