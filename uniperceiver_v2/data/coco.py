"""COCO instances reader (detection and instance segmentation targets).

Reads any file in the COCO "instances" format: real COCO 2017 (polygons, crowd RLE), LVIS-like files
without ``iscrowd``, and the synthetic suite (compressed RLE, an extra ``novel`` flag on categories).
Labels are contiguous indices into ``class_names`` (categories sorted by id), because the model scores
proposals against the list of class-name embeddings, not against sparse COCO ids.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch.utils.data import Dataset

from .images import ImageFile, read_image
from .samples import DetectionSample
from .summary import DataError, DatasetSummary, RecordLog, log_summary

logger = logging.getLogger(__name__)

EMPTY_IMAGE_POLICIES = ("keep", "skip", "error")
_INTEGER_TEXT = re.compile(r"-?[0-9]+")
EMPTY_MASK = "empty mask: the segmentation covers no pixel of the image"


@dataclass(frozen=True)
class Category:
    """A category record; ``novel`` marks categories never annotated in the detection training split."""

    id: int
    name: str
    supercategory: str = ""
    novel: bool = False


def load_json(path: str | Path) -> Any:
    """Load a JSON file, turning a missing or malformed file into a ``DataError`` that names it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise DataError(f"annotation file not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc


def require_keys(record: Any, keys: tuple[str, ...], source: str | Path, where: str) -> None:
    """Raise ``DataError`` naming the file and the record when ``record`` is not a dict with ``keys``."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: {where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DataError(f"{source}: {where}: missing key(s) {missing}; has {sorted(record)}")


def int_field(record: dict, key: str, source: str | Path, where: str, minimum: int | None = None) -> int:
    """``record[key]`` as an integer (a JSON integer, an integral number or a text of digits).

    Raises:
        DataError: naming the file, the record and the key, for text such as "abc", null, 1.5 or true, or a
            value below ``minimum``.
    """
    value = record[key]
    integral = (
        isinstance(value, int)
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()) is not None)
    )
    if isinstance(value, bool) or not integral:
        raise DataError(f"{source}: {where}: {key} must be an integer, got {json.dumps(value)}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise DataError(f"{source}: {where}: {key} must be >= {minimum}, got {number}")
    return number


def str_field(record: dict, key: str, source: str | Path, where: str) -> str:
    """``record[key]``, which must be a non-empty string; else a DataError naming file, record and key."""
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: {where}: {key} must be a non-empty string, got {json.dumps(value)}")
    return value


def list_field(record: dict, key: str, source: str | Path, where: str) -> list:
    """``record[key]``, which must be a JSON array; else a DataError naming file, record and key."""
    value = record[key]
    if not isinstance(value, list):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{source}: {where}: {key!r} must be a list, got {kind}")
    return value


def parse_categories(data: dict, source: str | Path) -> list[Category]:
    """The file's categories sorted by id; duplicate ids are an error."""
    categories = []
    for index, record in enumerate(list_field(data, "categories", source, "top level")):
        where = f"categories[{index}]"
        require_keys(record, ("id", "name"), source, where)
        categories.append(
            Category(
                id=int_field(record, "id", source, where),
                name=str_field(record, "name", source, where),
                supercategory=str(record.get("supercategory", "")),
                novel=bool(record.get("novel", False)),
            )
        )
    ids = [category.id for category in categories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{source}: duplicate category id(s) {duplicates}")
    return sorted(categories, key=lambda category: category.id)


def rle_string_to_counts(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths (the inverse of pycocotools' rleToString).

    Each run is a variable-length number in 6-bit characters offset by 48: five value bits and a
    continuation bit, sign-extended on the last character; from the third run on the value is stored
    as a difference to the run two before. pycocotools decodes malformed strings without complaint
    (into garbage masks), so strings are checked with this before use.

    Raises:
        ValueError: when the string ends in the middle of a number.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("compressed RLE string ends in the middle of a run")
            char = data[position] - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_segmentation(segmentation: Any, height: int, width: int) -> tuple[Any, int, str]:
    """Validate one annotation's ``segmentation`` without decoding it.

    Returns:
        (cleaned segmentation or None if unusable, number of dropped polygon parts, reason if unusable).
        Polygon parts with fewer than 3 points are dropped (pycocotools would misread a 4-number part as
        a box); the caller counts them. A segmentation that covers no pixel of the image (a polygon outside
        it, or flat) is unusable: its instance would train with an empty mask.
    """
    if isinstance(segmentation, list):
        parts = [part for part in segmentation if isinstance(part, list)]
        valid = [
            part
            for part in parts
            if len(part) >= 6
            and len(part) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part)
        ]
        dropped = len(segmentation) - len(valid)
        if not valid:
            return None, dropped, "segmentation has no polygon with at least 3 points"
        if not all(math.isfinite(v) for part in valid for v in part):
            return None, dropped, "polygon has a non-finite coordinate (NaN or infinity)"
        # pycocotools rasterises a polygon at 5x resolution along its outline: vertices far outside the image
        # would cost memory for nothing, and no annotation tool puts them there.
        xs = [v for part in valid for v in part[0::2]]
        ys = [v for part in valid for v in part[1::2]]
        if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
            return None, dropped, "polygon has a vertex more than an image size outside the image"
        if int(mask_utils.area(mask_utils.frPyObjects(valid, height, width)).sum()) == 0:
            return None, dropped, EMPTY_MASK
        return valid, dropped, ""
    if isinstance(segmentation, dict):
        if "size" not in segmentation or "counts" not in segmentation:
            return None, 0, f"RLE segmentation needs 'size' and 'counts', has {sorted(segmentation)}"
        if list(segmentation["size"]) != [height, width]:
            return None, 0, f"RLE size {segmentation['size']} differs from the image size {[height, width]}"
        counts = segmentation["counts"]
        if isinstance(counts, list):
            runs = counts
            if not all(isinstance(run, int) for run in runs):
                return None, 0, "uncompressed RLE counts must be integers"
        elif isinstance(counts, (str, bytes)):
            try:
                runs = rle_string_to_counts(counts)
            except (ValueError, UnicodeEncodeError) as exc:
                return None, 0, f"compressed RLE counts are malformed: {exc}"
        else:
            return None, 0, f"RLE counts must be a string or a list, got {type(counts).__name__}"
        if any(run < 0 for run in runs) or sum(runs) != height * width:
            return None, 0, f"RLE runs cover {sum(runs)} pixels (or are negative), the image has {height * width}"
        if sum(runs[1::2]) == 0:   # runs alternate background / object, starting with background
            return None, 0, EMPTY_MASK
        return segmentation, 0, ""
    return None, 0, f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a polygon list, an uncompressed RLE (list counts) or a compressed RLE to a bool (H, W) mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {
            "size": list(segmentation["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    return mask_utils.decode(rle).astype(bool)


@dataclass
class _Instance:
    box: tuple[float, float, float, float]
    label: int
    segmentation: Any


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    instances: list[_Instance]


class CocoInstances(Dataset):
    """Images with boxes, contiguous labels and instance masks from a COCO instances file.

    Args:
        image_dir: folder holding the images named by each image record's ``file_name``.
        ann_file: the instances JSON file.
        transform: optional callable ``DetectionSample -> DetectionSample`` (see ``transforms.py``).
        with_masks: decode instance masks (set False for box-only detection; ``masks`` is then None).
        on_invalid: "error" or "skip" for annotations that are well-formed but unusable: a box of zero
            or negative size (also after clipping to the image), an unknown ``image_id`` or
            ``category_id``, an unusable segmentation (including one that covers no pixel of the image);
            and for images that the pre-flight check (``preflight.py``) finds missing or unreadable.
        empty_images: "keep" (default: images without objects are valid negatives), "skip" or "error".

    Crowd annotations (``iscrowd=1``) are never training targets; they are counted in ``summary()``.
    Boxes are clipped to the image (counted as a note). Malformed records (missing keys, values of the wrong
    type, duplicate ids) always raise ``DataError``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Callable[[DetectionSample], DetectionSample] | None = None,
        with_masks: bool = True,
        on_invalid: str = "error",
        empty_images: str = "keep",
    ):
        if empty_images not in EMPTY_IMAGE_POLICIES:
            raise ValueError(f"empty_images must be one of {EMPTY_IMAGE_POLICIES}, got {empty_images!r}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.with_masks = with_masks
        self.on_invalid = on_invalid

        data = load_json(self.ann_file)
        require_keys(data, ("images", "annotations", "categories"), self.ann_file, "top level")
        self.categories = parse_categories(data, self.ann_file)
        self.class_names = [category.name for category in self.categories]
        self.label_to_category_id = [category.id for category in self.categories]
        self.category_id_to_label = {category_id: label for label, category_id in enumerate(self.label_to_category_id)}

        self._log = RecordLog(str(self.ann_file), on_invalid)
        records = self._parse_images(list_field(data, "images", self.ann_file, "top level"))
        self._parse_annotations(list_field(data, "annotations", self.ann_file, "top level"), records, self._log)

        self._records: list[_ImageRecord] = []
        for record in records.values():
            if record.instances:
                self._records.append(record)
            elif empty_images == "keep":
                self._log.note("images without objects (kept)")
                self._records.append(record)
            elif empty_images == "skip":
                self._log.skip("image without objects", f"image id={record.image_id} ({record.file_name})")
            else:
                raise DataError(
                    f"{self.ann_file}: image id={record.image_id} ({record.file_name}) has no usable object "
                    "(pass empty_images='keep' or 'skip')"
                )
        log_summary(logger, self.summary())

    def _parse_images(self, images: list) -> dict[int, _ImageRecord]:
        records: dict[int, _ImageRecord] = {}
        for index, image in enumerate(images):
            where = f"images[{index}]"
            require_keys(image, ("id", "file_name", "height", "width"), self.ann_file, where)
            image_id = int_field(image, "id", self.ann_file, where)
            if image_id in records:
                raise DataError(f"{self.ann_file}: {where}: duplicate image id {image_id}")
            where = f"{where} (id={image_id})"
            records[image_id] = _ImageRecord(
                image_id,
                str_field(image, "file_name", self.ann_file, where),
                int_field(image, "height", self.ann_file, where, minimum=1),
                int_field(image, "width", self.ann_file, where, minimum=1),
                [],
            )
        return records

    def _parse_annotations(self, annotations: list, records: dict[int, _ImageRecord], log: RecordLog) -> None:
        required = ("id", "image_id", "category_id", "bbox") + (("segmentation",) if self.with_masks else ())
        log.note("annotations in file", len(annotations))
        seen_ids: set[int] = set()
        for index, annotation in enumerate(annotations):
            require_keys(annotation, required, self.ann_file, f"annotations[{index}]")
            annotation_id = int_field(annotation, "id", self.ann_file, f"annotations[{index}]")
            where = f"annotation id={annotation_id} (image_id={json.dumps(annotation['image_id'])})"
            image_id = int_field(annotation, "image_id", self.ann_file, where)
            category_id = int_field(annotation, "category_id", self.ann_file, where)
            crowd = annotation.get("iscrowd", 0)
            if crowd not in (0, 1):   # also true / false
                raise DataError(f"{self.ann_file}: {where}: iscrowd must be 0 or 1, got {json.dumps(crowd)}")
            if annotation_id in seen_ids:
                raise DataError(f"{self.ann_file}: annotations[{index}]: duplicate annotation id {annotation_id}")
            seen_ids.add(annotation_id)
            bbox = annotation["bbox"]
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            ):
                raise DataError(f"{self.ann_file}: {where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
            if not all(math.isfinite(v) for v in bbox):
                raise DataError(f"{self.ann_file}: {where}: bbox has a non-finite value: {bbox!r}")

            record = records.get(image_id)
            if record is None:
                log.invalid("annotation refers to an unknown image_id", where)
                continue
            if crowd == 1:
                log.skip("crowd annotation (iscrowd=1, not a training target)", where)
                continue
            label = self.category_id_to_label.get(category_id)
            if label is None:
                log.invalid(f"unknown category_id {category_id}", where)
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                log.invalid(f"degenerate box (width {w}, height {h})", where)
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(record.width)), min(y + h, float(record.height))
            if x1 <= x0 or y1 <= y0:
                log.invalid(f"box {bbox} lies outside the {record.width}x{record.height} image", where)
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                log.note("boxes clipped to the image")

            segmentation = None
            if self.with_masks:
                segmentation, dropped_parts, problem = check_segmentation(
                    annotation["segmentation"], record.height, record.width
                )
                if dropped_parts:
                    log.note("polygon parts with < 3 points dropped", dropped_parts)
                if segmentation is None:
                    log.invalid(f"bad segmentation: {problem}", where)
                    continue
            record.instances.append(_Instance((x0, y0, x1, y1), label, segmentation))

    def summary(self) -> DatasetSummary:
        """Counts of what was kept, skipped (and why) and noted while reading the annotation file (and while
        checking its images, see ``drop_images``)."""
        return self._log.summary(
            {
                "images": len(self._records),
                "annotations": sum(len(record.instances) for record in self._records),
                "categories": len(self.categories),
            }
        )

    def image_files(self) -> list[ImageFile]:
        """Every image file this dataset reads, with the size its record states (for ``preflight.py``)."""
        return [
            ImageFile(self.image_dir / record.file_name, f"image id={record.image_id} in {self.ann_file}",
                      record.width, record.height)
            for record in self._records
        ]

    def drop_images(self, problems: Mapping[Path, tuple[str, str]]) -> None:
        """Leave out the images whose path is in ``problems`` (path -> (reason, detail)), with their objects,
        through the ``on_invalid`` policy: counted under the reason with "skip", a ``DataError`` with "error"."""
        kept = []
        for record in self._records:
            problem = problems.get(self.image_dir / record.file_name)
            if problem is None:
                kept.append(record)
            else:
                self._log.invalid(*problem)
        self._records = kept
        log_summary(logger, self.summary())

    @property
    def image_ids(self) -> list[int]:
        return [record.image_id for record in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> DetectionSample:
        record = self._records[index]
        path = self.image_dir / record.file_name
        image = read_image(path, f"image id={record.image_id} in {self.ann_file}")
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise DataError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) but {self.ann_file} "
                f"image id={record.image_id} says {record.width}x{record.height}"
            )
        num = len(record.instances)
        boxes = torch.tensor([instance.box for instance in record.instances], dtype=torch.float32).reshape(num, 4)
        labels = torch.tensor([instance.label for instance in record.instances], dtype=torch.int64)
        masks = None
        if self.with_masks:
            masks = torch.zeros((num, record.height, record.width), dtype=torch.bool)
            for k, instance in enumerate(record.instances):
                masks[k] = torch.from_numpy(decode_segmentation(instance.segmentation, record.height, record.width))
        sample = DetectionSample(
            image=image,
            boxes=boxes,
            labels=labels,
            masks=masks,
            image_id=record.image_id,
            orig_size=(record.height, record.width),
            file_name=record.file_name,
        )
        return self.transform(sample) if self.transform is not None else sample
