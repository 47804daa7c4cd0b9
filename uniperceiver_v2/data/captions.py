"""Image-caption readers: COCO captions files and Karpathy split files (COCO, Flickr30k, synthetic).

Both readers iterate either per caption (``iterate="caption"``: one ``CaptionSample`` per sentence,
the unit of caption and retrieval training) or per image (``iterate="image"``: one
``ImageCaptionsSample`` with all reference sentences, the unit of evaluation).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .coco import int_field, list_field, load_json, require_keys, str_field
from .images import ImageFile, read_image
from .samples import CaptionSample, ImageCaptionsSample
from .summary import DataError, DatasetSummary, RecordLog, log_summary

logger = logging.getLogger(__name__)

ITERATE_MODES = ("caption", "image")

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _CaptionedImage:
    path: Path
    file_name: str
    image_id: int
    captions: list[str]


class _CaptionDataset(Dataset):
    """Shared indexing for both caption readers once their images and captions are parsed."""

    def __init__(
        self,
        images: list[_CaptionedImage],
        iterate: str,
        transform: ImageTransform | None,
        log: RecordLog,
        source: Path,
    ):
        if iterate not in ITERATE_MODES:
            raise ValueError(f"iterate must be one of {ITERATE_MODES}, got {iterate!r}")
        self.iterate = iterate
        self.transform = transform
        self.on_invalid = log.on_invalid
        self._log = log
        self._source = source
        self._set_images(images)
        log_summary(logger, self.summary())

    def _set_images(self, images: list[_CaptionedImage]) -> None:
        self._images = images
        # (image index, caption index) per caption, so per-caption iteration is a flat index.
        self._pairs = [(i, j) for i, image in enumerate(images) for j in range(len(image.captions))]

    def summary(self) -> DatasetSummary:
        return self._log.summary(
            {"images": len(self._images), "captions": sum(len(image.captions) for image in self._images)}
        )

    def image_files(self) -> list[ImageFile]:
        """Every image file this dataset reads (for ``preflight.py``; caption records give no image size)."""
        return [ImageFile(image.path, f"image id={image.image_id} in {self._source}") for image in self._images]

    def drop_images(self, problems: Mapping[Path, tuple[str, str]]) -> None:
        """Leave out the images whose path is in ``problems`` (path -> (reason, detail)), with all their captions,
        through the ``on_invalid`` policy: counted under the reason with "skip", a ``DataError`` with "error"."""
        kept = []
        for image in self._images:
            problem = problems.get(image.path)
            if problem is None:
                kept.append(image)
            else:
                self._log.invalid(*problem)
        self._set_images(kept)
        log_summary(logger, self.summary())

    @property
    def image_ids(self) -> list[int]:
        return [image.image_id for image in self._images]

    def captions_of(self, image_index: int) -> list[str]:
        """All reference captions of the image at ``image_index`` (without reading the image)."""
        return list(self._images[image_index].captions)

    @property
    def num_images(self) -> int:
        return len(self._images)

    @property
    def num_captions(self) -> int:
        return len(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs) if self.iterate == "caption" else len(self._images)

    def _load(self, image: _CaptionedImage) -> torch.Tensor:
        pixels = read_image(image.path, f"image id={image.image_id} in {self._source}")
        return self.transform(pixels) if self.transform is not None else pixels

    def __getitem__(self, index: int) -> CaptionSample | ImageCaptionsSample:
        if self.iterate == "caption":
            image_index, caption_index = self._pairs[index]
            image = self._images[image_index]
            return CaptionSample(self._load(image), image.captions[caption_index], image.image_id, image.file_name)
        image = self._images[index]
        return ImageCaptionsSample(self._load(image), list(image.captions), image.image_id, image.file_name)


def _clean_caption(text: str) -> str:
    return " ".join(text.split())


class CocoCaptions(_CaptionDataset):
    """Reader for a COCO captions file (``captions_train2017.json`` layout).

    Args:
        image_dir: folder with the images named by each image record's ``file_name``.
        ann_file: JSON with ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
        iterate: "caption" or "image" (see the module docstring).
        transform: optional image transform ``Tensor (3, H, W) -> Tensor``.
        on_invalid: "error" or "skip" for a caption of an unknown image or an empty caption, and for images
            that the pre-flight check (``preflight.py``) finds missing or unreadable.

    Images without any caption cannot serve either mode; they are left out and counted in ``summary()``.
    Malformed records (missing keys, values of the wrong type, duplicate ids) always raise ``DataError``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        iterate: str = "caption",
        transform: ImageTransform | None = None,
        on_invalid: str = "error",
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        data = load_json(self.ann_file)
        require_keys(data, ("images", "annotations"), self.ann_file, "top level")
        log = RecordLog(str(self.ann_file), on_invalid)

        by_id: dict[int, _CaptionedImage] = {}
        for index, record in enumerate(list_field(data, "images", self.ann_file, "top level")):
            where = f"images[{index}]"
            require_keys(record, ("id", "file_name"), self.ann_file, where)
            image_id = int_field(record, "id", self.ann_file, where)
            if image_id in by_id:
                raise DataError(f"{self.ann_file}: {where}: duplicate image id {image_id}")
            file_name = str_field(record, "file_name", self.ann_file, f"{where} (id={image_id})")
            by_id[image_id] = _CaptionedImage(self.image_dir / file_name, file_name, image_id, [])
        for index, annotation in enumerate(list_field(data, "annotations", self.ann_file, "top level")):
            require_keys(annotation, ("image_id", "caption"), self.ann_file, f"annotations[{index}]")
            where = (f"annotations[{index}] (id={json.dumps(annotation.get('id'))}, "
                     f"image_id={json.dumps(annotation['image_id'])})")
            image = by_id.get(int_field(annotation, "image_id", self.ann_file, where))
            if image is None:
                log.invalid("caption refers to an unknown image_id", where)
                continue
            if not isinstance(annotation["caption"], str):
                raise DataError(
                    f"{self.ann_file}: {where}: caption must be a string, got {json.dumps(annotation['caption'])}"
                )
            caption = _clean_caption(annotation["caption"])
            if not caption:
                log.invalid("empty caption", where)
                continue
            image.captions.append(caption)
        images = []
        for image in by_id.values():
            if image.captions:
                images.append(image)
            else:
                log.skip("image without captions", f"image id={image.image_id} ({image.file_name})")
        super().__init__(images, iterate, transform, log, self.ann_file)


class KarpathyCaptions(_CaptionDataset):
    """Reader for a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json`` layout).

    Each entry of ``images`` has ``filename``, ``split`` and ``sentences`` (each with ``raw`` and/or
    ``tokens``), and optionally ``filepath`` (COCO: "train2014" / "val2014"), ``cocoid`` and ``imgid``.
    The image file is ``image_root / filepath / filename``; the image id is ``cocoid`` when present,
    else ``imgid``, else the entry's position.

    Args:
        image_root: folder that ``filepath``/``filename`` are relative to.
        split_file: the Karpathy JSON file.
        splits: a split name or several, e.g. "test", or ("train", "restval") for the usual COCO training set.
        iterate: "caption" or "image".
        transform: optional image transform.
        on_invalid: "error" or "skip" for a sentence with neither ``raw`` nor ``tokens`` text, and for images
            that the pre-flight check (``preflight.py``) finds missing or unreadable.
    """

    def __init__(
        self,
        image_root: str | Path,
        split_file: str | Path,
        splits: str | Sequence[str],
        iterate: str = "caption",
        transform: ImageTransform | None = None,
        on_invalid: str = "error",
    ):
        self.image_root = Path(image_root)
        self.split_file = Path(split_file)
        self.splits = (splits,) if isinstance(splits, str) else tuple(splits)
        data = load_json(self.split_file)
        require_keys(data, ("images",), self.split_file, "top level")
        log = RecordLog(str(self.split_file), on_invalid)

        images = []
        found_splits: set[str] = set()
        seen_ids: set[int] = set()
        for index, record in enumerate(list_field(data, "images", self.split_file, "top level")):
            where = f"images[{index}]"
            require_keys(record, ("filename", "split", "sentences"), self.split_file, where)
            split = str_field(record, "split", self.split_file, where)
            found_splits.add(split)
            if split not in self.splits:
                continue
            id_key = next((key for key in ("cocoid", "imgid") if key in record), None)
            image_id = int_field(record, id_key, self.split_file, where) if id_key else index
            if image_id in seen_ids:
                raise DataError(f"{self.split_file}: {where}: duplicate image id {image_id}")
            seen_ids.add(image_id)
            filepath = record.get("filepath", "")
            if not isinstance(filepath, str):
                raise DataError(f"{self.split_file}: {where}: filepath must be a string, got {json.dumps(filepath)}")
            relative = Path(filepath) / str_field(record, "filename", self.split_file, where)
            captions = []
            for j, sentence in enumerate(list_field(record, "sentences", self.split_file, where)):
                text = sentence.get("raw") if isinstance(sentence, dict) else None
                if text is None and isinstance(sentence, dict) and "tokens" in sentence:
                    tokens = sentence["tokens"]
                    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
                        raise DataError(f"{self.split_file}: {where}.sentences[{j}] ({relative}): tokens must be "
                                        f"a list of strings, got {json.dumps(tokens)}")
                    text = " ".join(tokens)
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{self.split_file}: {where}.sentences[{j}] ({relative}): raw must be a "
                                    f"string, got {json.dumps(text)}")
                text = _clean_caption(text) if text is not None else ""
                if not text:
                    log.invalid(
                        "sentence without 'raw' or 'tokens' text", f"images[{index}].sentences[{j}] ({relative})"
                    )
                    continue
                captions.append(text)
            if captions:
                images.append(_CaptionedImage(self.image_root / relative, str(relative), image_id, captions))
            else:
                log.skip("image without captions", f"images[{index}] ({relative})")
        if not images:
            raise DataError(
                f"{self.split_file}: no captioned images in split(s) {list(self.splits)}; "
                f"the file has splits {sorted(found_splits)}"
            )
        super().__init__(images, iterate, transform, log, self.split_file)
