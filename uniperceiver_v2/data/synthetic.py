"""Deterministic generator of the embedded synthetic multi-task suite (real file formats).

    python -m uniperceiver_v2.data.synthetic --out data/synthetic --profile quick|small [--seed 0]

Writes, under ``--out``:

    annotations/instances_{train,val,test}.json   COCO instances (compressed RLE masks, xywh boxes)
    annotations/instances_novel.json               scenes with novel categories, evaluation only
    annotations/captions_{train,val,test}.json     COCO captions, same image ids as the scenes
    annotations/karpathy_split.json                Karpathy-style split file (like dataset_coco.json)
    scenes/{train,val,test,novel}/<id>.png         scene images
    classification/{train,val,test}/<class>/*.png  one dominant object per image, all categories
    text/corpus_{train,val}.txt                    MLM corpus, no sentence equal to a val/test caption
    manifest.json                                  profile, seed, categories, counts, stats, sha256 per file

``--out`` must be a new or empty folder, or one the generator wrote before (its ``manifest.json`` names the
generator): a folder holding anything else is never written into (``suite.may_generate_into``).

Every image, annotation and sentence comes from its own numpy generator seeded by
(seed, kind, split, index), so the output does not depend on the order of generation or on the
number of worker processes: the same seed gives the same bytes (for fixed numpy / Pillow / zlib
versions, which the manifest records).

Categories are shapes and handwritten digits; four of them are "novel": they appear in the
classification set, in the text corpus and in ``instances_novel.json``, never in detection training.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from . import grammar
from .images import write_png
from .render import (
    BACKGROUNDS,
    COLOURS,
    DIGIT_MAX_ROTATION,
    DIGIT_WORDS,
    SHAPES,
    ObjectSpec,
    Patch,
    digit_glyphs,
    finish,
    paint,
    rasterize,
    render_background,
)
from .suite import GENERATOR_NAME, IN_PROGRESS_NAME, MANIFEST_NAME, SPLITS, may_generate_into, read_manifest
from .summary import DataError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"

SHAPE_CATEGORIES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
DIGIT_CATEGORIES = (0, 1, 2, 3, 4, 7)
NOVEL_CATEGORIES = ("ring", "hexagon", "digit four", "digit seven")


@dataclass(frozen=True)
class CategoryInfo:
    id: int
    name: str
    supercategory: str
    novel: bool
    digit: int = -1  # the digit drawn, -1 for shapes

    @property
    def folder(self) -> str:
        """Classification folder name (spaces become underscores; the reader maps them back)."""
        return self.name.replace(" ", "_")

    def as_coco(self) -> dict:
        return {"id": self.id, "name": self.name, "supercategory": self.supercategory, "novel": self.novel}


def _build_categories() -> tuple[CategoryInfo, ...]:
    names = [(name, "shape", -1) for name in SHAPE_CATEGORIES] + [
        (f"digit {DIGIT_WORDS[d]}", "digit", d) for d in DIGIT_CATEGORIES
    ]
    return tuple(
        CategoryInfo(id=i + 1, name=name, supercategory=kind, novel=name in NOVEL_CATEGORIES, digit=digit)
        for i, (name, kind, digit) in enumerate(names)
    )


CATEGORIES = _build_categories()
SEEN = tuple(c for c in CATEGORIES if not c.novel)
NOVEL = tuple(c for c in CATEGORIES if c.novel)


@dataclass(frozen=True)
class Profile:
    """Sizes of one generation profile.

    Attributes:
        scene_size: side of the (square) scene images in pixels.
        classification_size: side of the classification images.
        scenes: number of scenes for (train, val, test).
        novel_scenes: number of scenes in the novel-category evaluation set.
        class_images: images per class for (train, val, test).
        corpus_sentences: sentences in (corpus_train, corpus_val).
        captions_per_image: captions written for each scene.
        max_objects: objects per scene are drawn uniformly from 1..max_objects.
        min_visible_pixels, min_visible_fraction: an object whose visible part (after occlusion by later
            objects and the image border) has fewer pixels, or a smaller fraction of its full area,
            is left out of the annotations and captions (and counted in the manifest's stats).
    """

    name: str
    scene_size: int
    classification_size: int
    scenes: tuple[int, int, int]
    novel_scenes: int
    class_images: tuple[int, int, int]
    corpus_sentences: tuple[int, int]
    captions_per_image: int = 5
    max_objects: int = 6
    min_visible_pixels: int = 16
    min_visible_fraction: float = 0.3


PROFILES = {
    "quick": Profile(
        "quick", 128, 64, scenes=(60, 20, 20), novel_scenes=30, class_images=(10, 5, 5), corpus_sentences=(2000, 200)
    ),
    "small": Profile(
        "small",
        128,
        64,
        scenes=(4000, 500, 500),
        novel_scenes=500,
        class_images=(300, 50, 50),
        corpus_sentences=(20000, 2000),
    ),
}

# Object sizes relative to the image side (log-uniform, so small objects are as common as large ones).
SCENE_SCALE = (0.12, 0.45)
DOMINANT_SCALE = (0.5, 0.8)
DISTRACTOR_SCALE = (0.15, 0.25)
PLACEMENT_ATTEMPTS = 4
SCENE_ATTEMPTS = 20

# Stable integer codes: each item's generator is seeded by (seed, kind, split, index...).
_KIND = {"digits": 0, "scene": 1, "classification": 2, "corpus": 3}
_SPLIT = {"train": 0, "val": 1, "test": 2, "novel": 3}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def resolve_profile(profile: str, scene_size: int | None = None, classification_size: int | None = None) -> Profile:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    resolved = PROFILES[profile]
    if scene_size is not None:
        resolved = replace(resolved, scene_size=scene_size)
    if classification_size is not None:
        resolved = replace(resolved, classification_size=classification_size)
    if resolved.scene_size < 32 or resolved.classification_size < 32:
        raise ValueError(
            f"image sizes must be at least 32 pixels, got {resolved.scene_size}, {resolved.classification_size}"
        )
    return resolved


def digit_pools(seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint glyph pools per split: for each digit, 60 % / 20 % / 20 % of scikit-learn's samples
    for train / val / test, so test digits are handwriting never seen in training. Novel scenes use
    the test pool."""
    _, labels = digit_glyphs()
    rng = _rng(seed, _KIND["digits"])
    pools: dict[str, dict[int, np.ndarray]] = {split: {} for split in SPLITS}
    for digit in DIGIT_CATEGORIES:
        indices = rng.permutation(np.flatnonzero(labels == digit))
        cut_a, cut_b = int(0.6 * len(indices)), int(0.8 * len(indices))
        pools["train"][digit], pools["val"][digit], pools["test"][digit] = (
            indices[:cut_a],
            indices[cut_a:cut_b],
            indices[cut_b:],
        )
    pools["novel"] = pools["test"]
    return pools


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Placed:
    spec: ObjectSpec
    category: CategoryInfo
    patch: Patch
    mask: np.ndarray  # (H, W) bool, the whole object inside the image
    full_area: int  # pixels of the whole object, including any part outside the image
    visible: np.ndarray  # (H, W) bool, the part no later object covers


def _sample_spec(
    rng: np.random.Generator,
    category: CategoryInfo,
    scale_range: tuple[float, float],
    size: int,
    pool: dict[int, np.ndarray],
) -> ObjectSpec:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    scale = size * math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    max_rotation = DIGIT_MAX_ROTATION if category.digit >= 0 else SHAPES[category.name][2]
    angle = float(rng.uniform(-max_rotation, max_rotation))
    glyph = int(rng.choice(pool[category.digit])) if category.digit >= 0 else -1
    return ObjectSpec(category.name, colour, float(scale), 0.0, 0.0, angle, glyph)


def _visible_enough(pixels: int, full_area: int, profile: Profile) -> bool:
    return pixels >= profile.min_visible_pixels and pixels >= profile.min_visible_fraction * max(full_area, 1)


def _place_objects(
    rng: np.random.Generator, categories: list[CategoryInfo], size: int, pool, profile: Profile
) -> list[_Placed]:
    """Place objects one after another (later ones on top). Each new object gets a few tries at a
    position that leaves itself and every earlier object visible enough; if none works, the last try
    is kept and the objects it hides too much are dropped later (and counted)."""
    placed: list[_Placed] = []
    for category in categories:
        spec = _sample_spec(rng, category, SCENE_SCALE, size, pool)
        margin = spec.scale * 0.25  # up to about a quarter of an object may fall outside the image
        for _ in range(PLACEMENT_ATTEMPTS):
            spec = replace(
                spec, cx=float(rng.uniform(margin, size - margin)), cy=float(rng.uniform(margin, size - margin))
            )
            patch = rasterize(spec)
            mask = patch.paste(size, size)
            full_area = int(patch.mask.sum())
            fits = _visible_enough(int(mask.sum()), full_area, profile) and all(
                _visible_enough(int((p.visible & ~mask).sum()), p.full_area, profile) for p in placed
            )
            if fits:
                break
        for p in placed:
            p.visible = p.visible & ~mask
        placed.append(_Placed(spec, category, patch, mask, full_area, mask.copy()))
    return placed


def _describe(kept: list[_Placed], size: int, background: str) -> grammar.SceneDescription:
    objects = []
    for p in kept:
        ys, xs = np.nonzero(p.visible)
        objects.append(
            grammar.ObjectDescription(
                category=p.category.name,
                colour=p.spec.colour,
                size=grammar.size_word(p.spec.scale / size),
                x=float((xs.mean() + 0.5) / size),
                y=float((ys.mean() + 0.5) / size),
                area=float(p.visible.sum() / size**2),
            )
        )
    occlusions = set()
    for back in range(len(kept)):
        for front in range(back + 1, len(kept)):
            hidden = int((kept[front].mask & kept[back].mask).sum())
            if hidden > max(4, 0.03 * kept[back].full_area):
                occlusions.add((front, back))
    return grammar.SceneDescription(objects, background, occlusions)


@dataclass
class _SceneJob:
    out_dir: str
    seed: int
    profile: Profile
    split: str
    index: int
    image_id: int
    pool: dict[int, np.ndarray]


def _scene_job(job: _SceneJob) -> dict:
    """Draw one scene, write its PNG, return its annotations (RLE strings), captions and stats."""
    profile, size = job.profile, job.profile.scene_size
    rng = _rng(job.seed, _KIND["scene"], _SPLIT[job.split], job.index)
    novel_split = job.split == "novel"
    allowed = CATEGORIES if novel_split else SEEN
    for attempt in range(SCENE_ATTEMPTS):  # noqa: B007 (reported as "redrawn" after the loop)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        count = int(rng.integers(1, profile.max_objects + 1))
        categories = [allowed[int(rng.integers(len(allowed)))] for _ in range(count)]
        if novel_split and not any(c.novel for c in categories):
            categories[int(rng.integers(count))] = NOVEL[int(rng.integers(len(NOVEL)))]
        placed = _place_objects(rng, categories, size, job.pool, profile)
        kept = [p for p in placed if _visible_enough(int(p.visible.sum()), p.full_area, profile)]
        dropped = len(placed) - len(kept)
        if kept and (not novel_split or any(p.category.novel for p in kept)):
            break
    else:
        raise RuntimeError(f"no usable {job.split} scene {job.index} after {SCENE_ATTEMPTS} attempts")

    image = render_background(rng, size, size, background)
    for p in placed:
        paint(image, p.patch, p.spec.colour, rng)
    file_name = f"{job.image_id:012d}.png"
    write_png(Path(job.out_dir) / "scenes" / job.split / file_name, finish(image, rng))

    annotations = []
    for p in kept:
        rle = mask_utils.encode(np.asfortranarray(p.visible.astype(np.uint8)))
        annotations.append(
            {
                "category_id": p.category.id,
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "attributes": {"colour": p.spec.colour, "size": grammar.size_word(p.spec.scale / size)},
            }
        )
    captions = (
        [] if novel_split else grammar.describe(_describe(kept, size, background), rng, profile.captions_per_image)
    )
    return {
        "image": {"file_name": file_name, "height": size, "width": size, "background": background},
        "annotations": annotations,
        "captions": captions,
        "dropped": dropped,
        "redrawn": attempt,
    }


# ----------------------------------------------------------------------------------------------------
# Classification images
# ----------------------------------------------------------------------------------------------------


@dataclass
class _ClassificationJob:
    out_dir: str
    seed: int
    profile: Profile
    split: str
    category_index: int
    index: int
    pool: dict[int, np.ndarray]


def _classification_job(job: _ClassificationJob) -> str:
    """One dominant object of the class, centred and large, drawn over 0-2 small distractors."""
    size = job.profile.classification_size
    category = CATEGORIES[job.category_index]
    rng = _rng(job.seed, _KIND["classification"], _SPLIT[job.split], job.category_index, job.index)
    image = render_background(rng, size, size, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    num_distractors = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
    others = [c for c in CATEGORIES if c.id != category.id]
    for _ in range(num_distractors):
        spec = _sample_spec(rng, others[int(rng.integers(len(others)))], DISTRACTOR_SCALE, size, job.pool)
        spec = replace(spec, cx=float(rng.uniform(0, size)), cy=float(rng.uniform(0, size)))
        paint(image, rasterize(spec), spec.colour, rng)
    spec = _sample_spec(rng, category, DOMINANT_SCALE, size, job.pool)
    spec = replace(
        spec, cx=float(size / 2 + rng.uniform(-0.1, 0.1) * size), cy=float(size / 2 + rng.uniform(-0.1, 0.1) * size)
    )
    paint(image, rasterize(spec), spec.colour, rng)
    relative = f"classification/{job.split}/{category.folder}/{category.folder}_{job.index:05d}.png"
    write_png(Path(job.out_dir) / relative, finish(image, rng))
    return relative


# ----------------------------------------------------------------------------------------------------
# Text corpus
# ----------------------------------------------------------------------------------------------------


def _layout_description(rng: np.random.Generator) -> grammar.SceneDescription:
    """A scene layout that is never drawn: objects from all categories (novel ones included, so the
    language side learns their names), overlaps approximated by the objects' nominal discs."""
    count = int(rng.integers(1, 7))
    objects, discs = [], []
    for _ in range(count):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        scale = math.exp(rng.uniform(math.log(SCENE_SCALE[0]), math.log(SCENE_SCALE[1])))
        x, y = float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.05, 0.95))
        objects.append(grammar.ObjectDescription(category.name, colour, grammar.size_word(scale), x, y, 0.5 * scale**2))
        discs.append((x, y, scale))
    occlusions = {
        (front, back)
        for back in range(count)
        for front in range(back + 1, count)
        if math.dist(discs[front][:2], discs[back][:2]) < 0.4 * (discs[front][2] + discs[back][2])
    }
    return grammar.SceneDescription(objects, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], occlusions)


def _corpus(seed: int, split: str, count: int, excluded: set[str]) -> tuple[list[str], int]:
    """``count`` sentences for one corpus split, none of whose normalised form is in ``excluded``.

    Returns the sentences and how many were rejected for being in ``excluded``.
    """
    sentences: list[str] = []
    rejected = 0
    index = 0
    while len(sentences) < count:
        rng = _rng(seed, _KIND["corpus"], _SPLIT[split], index)
        index += 1
        for sentence in grammar.describe(_layout_description(rng), rng, count=int(rng.integers(1, 3))):
            if grammar.normalize(sentence) in excluded:
                rejected += 1
            elif len(sentences) < count:
                sentences.append(sentence)
    return sentences, rejected


# ----------------------------------------------------------------------------------------------------
# Writing everything
# ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":"), ensure_ascii=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _process_pool(workers: int) -> contextlib.AbstractContextManager[Executor | None]:
    """A pool of ``workers`` processes, or None (run in this process) for one worker.

    Workers are forked where the platform can: a spawned worker would first re-import the package
    (and torch with it), which costs more than drawing a quick suite.
    """
    if workers <= 1:
        return contextlib.nullcontext(None)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def _run(function, jobs: list, executor: Executor | None) -> list:
    """Map ``function`` over ``jobs`` in order (each job seeds its own generator: results do not depend
    on where it runs)."""
    if executor is None:
        return [function(job) for job in jobs]
    return list(executor.map(function, jobs, chunksize=8))


def generate(
    out_dir: str | Path,
    profile: str = "quick",
    seed: int = 0,
    scene_size: int | None = None,
    classification_size: int | None = None,
    workers: int = 1,
) -> dict:
    """Generate the suite into ``out_dir`` and return its manifest (also written as ``manifest.json``).

    ``scene_size`` / ``classification_size`` override the profile's image sizes. ``workers`` only
    changes the speed. The manifest is written last, so an interrupted run leaves no manifest (only the
    in-progress marker ``manifest.partial.json``) and ``ensure_synthetic`` regenerates. Files listed in a
    previous manifest but not produced now are removed.

    Raises:
        DataError: when ``out_dir`` is neither new, nor empty, nor a folder the generator wrote.
    """
    may_generate_into(out_dir)
    settings = resolve_profile(profile, scene_size, classification_size)
    with _process_pool(workers) as executor:
        return _write_suite(Path(out_dir), settings, seed, executor)


def _write_suite(out: Path, settings: Profile, seed: int, executor: Executor | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out)
    marker = {"generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION, "profile": settings.name,
              "seed": seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / IN_PROGRESS_NAME).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    pools = digit_pools(seed)
    categories = [c.as_coco() for c in CATEGORIES]
    info = {
        "description": "uniperceiver-v2 synthetic suite",
        "version": GENERATOR_VERSION,
        "profile": settings.name,
        "seed": seed,
    }
    written: list[str] = []
    counts: dict[str, dict] = {}
    stats: dict[str, dict] = {
        "objects_dropped_too_little_visible": {},
        "scenes_redrawn": {},
        "distinct_caption_fraction": {},
    }

    # Scenes: image ids are unique over all splits, as in COCO.
    scene_splits = (*SPLITS, "novel")
    sizes = dict(zip(scene_splits, (*settings.scenes, settings.novel_scenes)))
    next_image_id, next_annotation_id, next_caption_id = 1, 1, 1
    karpathy_images: list[dict] = []
    held_out_captions: set[str] = set()
    for split in scene_splits:
        jobs = [
            _SceneJob(str(out), seed, settings, split, i, next_image_id + i, pools[split]) for i in range(sizes[split])
        ]
        results = _run(_scene_job, jobs, executor)
        images, annotations, captions = [], [], []
        for job, result in zip(jobs, results):
            images.append({"id": job.image_id, **result["image"]})
            written.append(f"scenes/{split}/{result['image']['file_name']}")
            for annotation in result["annotations"]:
                annotations.append({"id": next_annotation_id, "image_id": job.image_id, **annotation})
                next_annotation_id += 1
            sentences = []
            for caption in result["captions"]:
                captions.append({"id": next_caption_id, "image_id": job.image_id, "caption": caption})
                sentences.append(
                    {
                        "raw": caption,
                        "tokens": grammar.tokenize(caption),
                        "imgid": len(karpathy_images),
                        "sentid": next_caption_id,
                    }
                )
                next_caption_id += 1
            if split != "novel":
                karpathy_images.append(
                    {
                        "filepath": split,
                        "filename": result["image"]["file_name"],
                        "imgid": len(karpathy_images),
                        "cocoid": job.image_id,
                        "split": split,
                        "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences,
                    }
                )
        next_image_id += sizes[split]
        _write_json(
            out / "annotations" / f"instances_{split}.json",
            {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories},
        )
        written.append(f"annotations/instances_{split}.json")
        per_category = {c.name: 0 for c in CATEGORIES}
        for annotation in annotations:
            per_category[CATEGORIES[annotation["category_id"] - 1].name] += 1
        counts[f"scenes_{split}"] = {
            "images": len(images),
            "annotations": len(annotations),
            "per_category": per_category,
        }
        stats["objects_dropped_too_little_visible"][split] = sum(r["dropped"] for r in results)
        stats["scenes_redrawn"][split] = sum(r["redrawn"] for r in results)
        if split != "novel":
            _write_json(
                out / "annotations" / f"captions_{split}.json",
                {"info": info, "licenses": [], "images": images, "annotations": captions},
            )
            written.append(f"annotations/captions_{split}.json")
            normalized = [grammar.normalize(c["caption"]) for c in captions]
            counts[f"scenes_{split}"]["captions"] = len(captions)
            stats["distinct_caption_fraction"][split] = round(len(set(normalized)) / max(len(normalized), 1), 4)
            if split != "train":
                held_out_captions.update(normalized)
    _write_json(out / "annotations" / "karpathy_split.json", {"dataset": "synthetic", "images": karpathy_images})
    written.append("annotations/karpathy_split.json")

    # Classification: every category, seen and novel.
    counts["classification"] = {}
    for split, per_class in zip(SPLITS, settings.class_images):
        jobs = [
            _ClassificationJob(str(out), seed, settings, split, c, i, pools[split])
            for c in range(len(CATEGORIES))
            for i in range(per_class)
        ]
        written.extend(_run(_classification_job, jobs, executor))
        counts["classification"][split] = len(jobs)

    # Text corpus: nothing equal to a val/test caption; the val corpus also shares nothing with train.
    train_corpus, rejected_train = _corpus(seed, "train", settings.corpus_sentences[0], held_out_captions)
    val_corpus, rejected_val = _corpus(
        seed, "val", settings.corpus_sentences[1], held_out_captions | {grammar.normalize(s) for s in train_corpus}
    )
    for split, sentences in (("train", train_corpus), ("val", val_corpus)):
        path = out / "text" / f"corpus_{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        written.append(f"text/corpus_{split}.txt")
    counts["corpus"] = {"train": len(train_corpus), "val": len(val_corpus)}
    stats["corpus_sentences_rejected"] = {
        "train_equal_to_val_or_test_caption": rejected_train,
        "val_equal_to_caption_or_train_corpus": rejected_val,
    }

    if previous is not None:
        for stale in set(previous.get("files", {})) - set(written):
            (out / stale).unlink(missing_ok=True)

    manifest = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "profile": settings.name,
        "seed": seed,
        "params": asdict(settings),
        "library_versions": {
            name: importlib.metadata.version(name) for name in ("numpy", "Pillow", "pycocotools", "scikit-learn")
        },
        "categories": categories,
        "seen_categories": [c.name for c in SEEN],
        "novel_categories": [c.name for c in NOVEL],
        "counts": counts,
        "stats": stats,
        "files": {relative: _sha256(out / relative) for relative in sorted(written)},
    }
    temporary = out / (MANIFEST_NAME + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    temporary.replace(out / MANIFEST_NAME)
    (out / IN_PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def _params_match(manifest: dict, settings: Profile, seed: int) -> bool:
    return (
        manifest.get("generator_version") == GENERATOR_VERSION
        and manifest.get("seed") == seed
        and manifest.get("params") == json.loads(json.dumps(asdict(settings)))
    )


def find_suite(out_dir: str | Path) -> dict | None:
    """The manifest of a complete suite at ``out_dir`` (written by the generator, every listed file present; the
    contents are not re-hashed, ``verify`` does that), else None. Reads only."""
    if not (Path(out_dir) / MANIFEST_NAME).is_file() or (Path(out_dir) / IN_PROGRESS_NAME).exists():
        return None
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all((Path(out_dir) / relative).is_file() for relative in files):
        return None
    return manifest


def suite_matches(manifest: dict, profile: str, seed: int, scene_size: int | None = None,
                  classification_size: int | None = None) -> bool:
    """True when ``manifest`` was written for these settings (profile, seed, image sizes, generator version)."""
    return _params_match(manifest, resolve_profile(profile, scene_size, classification_size), seed)


def ensure_synthetic(
    out_dir: str | Path,
    profile: str = "quick",
    seed: int = 0,
    scene_size: int | None = None,
    classification_size: int | None = None,
    workers: int = 1,
) -> dict:
    """Return the suite's manifest, generating the suite first when ``out_dir`` is new or empty, or holds a suite
    of the generator that is incomplete (interrupted, a listed file missing) or for other settings (profile,
    seed, sizes, generator version; replaced with a warning). (File contents are not re-hashed here; ``verify``
    does that.)

    Raises:
        DataError: when ``out_dir`` holds files the generator did not write (it is never written into).
    """
    may_generate_into(out_dir)
    settings = resolve_profile(profile, scene_size, classification_size)
    manifest = find_suite(out_dir)
    if manifest is not None:
        if _params_match(manifest, settings, seed):
            return manifest
        logger.warning("%s: replacing the synthetic suite %r (seed %s) with %r (seed %s)", out_dir,
                       manifest.get("profile"), manifest.get("seed"), settings.name, seed)
    return generate(out_dir, profile, seed, scene_size, classification_size, workers)


def verify(out_dir: str | Path) -> list[str]:
    """Re-hash every file listed in the manifest; return the problems found (empty when all match)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return [f"{Path(out_dir) / MANIFEST_NAME} is missing"]
    problems = []
    for relative, expected in manifest["files"].items():
        path = Path(out_dir) / relative
        if not path.is_file():
            problems.append(f"missing: {relative}")
        elif _sha256(path) != expected:
            problems.append(f"changed: {relative}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. data/synthetic")
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene-size", type=int, default=None, help="override the profile's scene image side")
    parser.add_argument("--classification-size", type=int, default=None, help="override the classification image side")
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = generate(args.out, args.profile, args.seed, args.scene_size, args.classification_size, args.workers)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    elapsed = time.perf_counter() - start
    print(f"wrote {len(manifest['files'])} files to {args.out} ({args.profile}, seed {args.seed}) in {elapsed:.1f} s")
    print(json.dumps({"counts": manifest["counts"], "stats": manifest["stats"]}, indent=1))


if __name__ == "__main__":
    main()
