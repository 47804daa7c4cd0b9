"""Image-caption readers: COCO captions files and Karpathy split files (COCO, Flickr30k, synthetic).

Both readers iterate either per caption (``iterate="caption"``: one ``CaptionSample`` per sentence,
the unit of caption and retrieval training) or per image (``iterate="image"``: one
``ImageCaptionsSample`` with all reference sentences, the unit of evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .coco import load_json, require_keys
from .images import read_image
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
        summary: DatasetSummary,
        source: Path,
    ):
        if iterate not in ITERATE_MODES:
            raise ValueError(f"iterate must be one of {ITERATE_MODES}, got {iterate!r}")
        self.iterate = iterate
        self.transform = transform
        self._images = images
        # (image index, caption index) per caption, so per-caption iteration is a flat index.
        self._pairs = [(i, j) for i, image in enumerate(images) for j in range(len(image.captions))]
        self._summary = summary
        self._source = source
        log_summary(logger, summary)

    def summary(self) -> DatasetSummary:
        return self._summary

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


def _clean_caption(text: object) -> str:
    return " ".join(str(text).split())


class CocoCaptions(_CaptionDataset):
    """Reader for a COCO captions file (``captions_train2017.json`` layout).

    Args:
        image_dir: folder with the images named by each image record's ``file_name``.
        ann_file: JSON with ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
        iterate: "caption" or "image" (see the module docstring).
        transform: optional image transform ``Tensor (3, H, W) -> Tensor``.
        on_invalid: "error" or "skip" for a caption of an unknown image or an empty caption.

    Images without any caption cannot serve either mode; they are left out and counted in ``summary()``.
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
        for index, record in enumerate(data["images"]):
            require_keys(record, ("id", "file_name"), self.ann_file, f"images[{index}]")
            image_id = int(record["id"])
            if image_id in by_id:
                raise DataError(f"{self.ann_file}: images[{index}]: duplicate image id {image_id}")
            by_id[image_id] = _CaptionedImage(
                self.image_dir / record["file_name"], str(record["file_name"]), image_id, []
            )
        for index, annotation in enumerate(data["annotations"]):
            require_keys(annotation, ("image_id", "caption"), self.ann_file, f"annotations[{index}]")
            where = f"annotations[{index}] (id={annotation.get('id')}, image_id={annotation['image_id']})"
            image = by_id.get(int(annotation["image_id"]))
            if image is None:
                log.invalid("caption refers to an unknown image_id", where)
                continue
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
        summary = log.summary({"images": len(images), "captions": sum(len(i.captions) for i in images)})
        super().__init__(images, iterate, transform, summary, self.ann_file)


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
        on_invalid: "error" or "skip" for a sentence with neither ``raw`` nor ``tokens`` text.
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
        for index, record in enumerate(data["images"]):
            require_keys(record, ("filename", "split", "sentences"), self.split_file, f"images[{index}]")
            found_splits.add(record["split"])
            if record["split"] not in self.splits:
                continue
            image_id = int(record.get("cocoid", record.get("imgid", index)))
            if image_id in seen_ids:
                raise DataError(f"{self.split_file}: images[{index}]: duplicate image id {image_id}")
            seen_ids.add(image_id)
            relative = Path(record.get("filepath", "")) / record["filename"]
            captions = []
            for j, sentence in enumerate(record["sentences"]):
                text = sentence.get("raw") if isinstance(sentence, dict) else None
                if text is None and isinstance(sentence, dict) and "tokens" in sentence:
                    text = " ".join(sentence["tokens"])
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
        summary = log.summary({"images": len(images), "captions": sum(len(i.captions) for i in images)})
        super().__init__(images, iterate, transform, summary, self.split_file)
