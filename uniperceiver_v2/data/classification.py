"""Class-per-folder image classification reader (ImageNet layout, and the synthetic suite).

Class indices follow the sorted folder names, as torchvision's ``ImageFolder`` does, so that ImageNet's
usual index order (sorted synset ids) is kept. Display names, which the model encodes as text, come
from the folder names (underscores read as spaces) or from a mapping file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, ImageFile, read_image
from .samples import ClassificationSample
from .summary import DataError, DatasetSummary, RecordLog, log_summary

logger = logging.getLogger(__name__)


def read_class_name_mapping(path: str | Path) -> dict[str, str]:
    """Read a folder-name -> display-name mapping.

    Two formats:
      - ``.json``: an object ``{"n01440764": "tench", ...}``.
      - anything else: ImageNet's ``LOC_synset_mapping.txt`` layout, one ``<folder> <names>`` a line,
        e.g. ``n01440764 tench, Tinca tinca``; the first comma-separated synonym is the display name.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name mapping file not found: {path}")
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                mapping = json.load(handle)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError(f"{path}: expected a JSON object mapping folder names to display names")
        return dict(mapping)
    mapping = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            folder, _, names = line.strip().partition(" ")
            display = names.split(",")[0].strip()
            if not display:
                raise DataError(f"{path}:{line_number}: expected '<folder> <name>[, synonyms]', got {line.strip()!r}")
            mapping[folder] = display
    return mapping


class ImageFolderClassification(Dataset):
    """Images in ``root/<class folder>/<image file>``.

    Args:
        root: the split folder (e.g. ``imagenet/train`` or ``synthetic/classification/val``).
        class_names: None (display names from folder names, underscores -> spaces), a mapping
            folder -> display name, or the path of a mapping file (see ``read_class_name_mapping``).
            Every class folder must have an entry.
        transform: optional image transform ``Tensor (3, H, W) -> Tensor``.
        on_invalid: "error" or "skip" for images that the pre-flight check (``preflight.py``) finds missing or
            unreadable.

    Files without an image extension are ignored and counted; a class folder without images keeps its
    index (so indices agree across splits) and is counted.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: str | Path | Mapping[str, str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_invalid: str = "error",
    ):
        self.root = Path(root)
        self.transform = transform
        self.on_invalid = on_invalid
        if not self.root.is_dir():
            raise DataError(f"classification root is not a folder: {self.root}")
        self.class_folders = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not self.class_folders:
            raise DataError(f"{self.root}: no class folders found")

        if class_names is None:
            mapping = {folder: folder.replace("_", " ") for folder in self.class_folders}
            source = "folder names"
        elif isinstance(class_names, Mapping):
            mapping, source = dict(class_names), "the given mapping"
        else:
            mapping, source = read_class_name_mapping(class_names), str(class_names)
        missing = [folder for folder in self.class_folders if folder not in mapping]
        if missing:
            raise DataError(f"{self.root}: class folder(s) {missing[:5]} have no display name in {source}")
        self.class_names = [mapping[folder] for folder in self.class_folders]

        self._log = RecordLog(str(self.root), on_invalid)
        self._items: list[tuple[Path, int]] = []
        for label, folder in enumerate(self.class_folders):
            files = sorted(entry.name for entry in os.scandir(self.root / folder) if entry.is_file())
            images = [name for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
            if len(images) < len(files):
                self._log.note("non-image files ignored", len(files) - len(images))
            if not images:
                self._log.note("class folders without images")
            self._items.extend((self.root / folder / name, label) for name in images)
        if not self._items:
            raise DataError(f"{self.root}: no image files in any class folder (extensions {IMAGE_EXTENSIONS})")
        log_summary(logger, self.summary())

    def summary(self) -> DatasetSummary:
        return self._log.summary({"images": len(self._items), "classes": len(self.class_folders)})

    def image_files(self) -> list[ImageFile]:
        """Every image file this dataset reads (for ``preflight.py``; a class folder states no image size)."""
        return [ImageFile(path, f"class {self.class_folders[label]!r} in {self.root}") for path, label in self._items]

    def drop_images(self, problems: Mapping[Path, tuple[str, str]]) -> None:
        """Leave out the images whose path is in ``problems`` (path -> (reason, detail)) through the
        ``on_invalid`` policy: counted under the reason with "skip", a ``DataError`` with "error". Class indices
        do not change."""
        kept = []
        for path, label in self._items:
            problem = problems.get(path)
            if problem is None:
                kept.append((path, label))
            else:
                self._log.invalid(*problem)
        self._items = kept
        log_summary(logger, self.summary())

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> ClassificationSample:
        path, label = self._items[index]
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return ClassificationSample(image=image, label=label, path=str(path))
