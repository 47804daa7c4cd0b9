"""``SyntheticSuite``: paths and category lists of a generated synthetic suite, read from its manifest.

The manifest is also the generator's proof of ownership: the generator only ever writes into a folder that is new,
empty, or holds a ``manifest.json`` (or, while it runs, a ``manifest.partial.json``) whose ``"generator"`` field
names it (``may_generate_into``). Every suite it wrote carries that field, so suites generated before this rule are
recognised too; a user's folder, whatever it holds, is never written into.
"""

from __future__ import annotations

import json
from pathlib import Path

from .summary import DataError

MANIFEST_NAME = "manifest.json"
# Written before the first file of a generation and removed after the manifest: an interrupted generation stays
# recognisable as the generator's own (and is regenerated), not mistaken for a user's folder.
IN_PROGRESS_NAME = "manifest.partial.json"
GENERATOR_NAME = "uniperceiver_v2.data.synthetic"
SPLITS = ("train", "val", "test")
SCENE_SPLITS = (*SPLITS, "novel")
CORPUS_SPLITS = ("train", "val")


def read_manifest(root: str | Path) -> dict | None:
    """The suite's parsed ``manifest.json``, or None when there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it to regenerate the suite") from exc


def _names_the_generator(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR_NAME


def written_by_generator(root: str | Path) -> bool:
    """True when ``root`` holds a manifest (complete or in progress) written by the synthetic-suite generator."""
    root = Path(root)
    return _names_the_generator(root / MANIFEST_NAME) or _names_the_generator(root / IN_PROGRESS_NAME)


def is_new_or_empty(root: str | Path) -> bool:
    """True when ``root`` does not exist or is an empty folder."""
    root = Path(root)
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def may_generate_into(root: str | Path) -> None:
    """Raise ``DataError`` unless the generator may write into ``root``: a new or empty folder, or one it wrote."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: not a folder; the synthetic suite is generated into a new or empty folder")
    if not (is_new_or_empty(root) or written_by_generator(root)):
        raise DataError(
            f"{root}: this folder holds files the synthetic-suite generator did not write (it has no "
            f"{MANIFEST_NAME} of the generator), so nothing is generated into it; choose a new or empty folder"
        )


class SyntheticSuite:
    """A generated suite (see ``synthetic.py``); every path the readers need, by split.

    Attributes:
        root: the suite's folder.
        manifest: the parsed ``manifest.json``.
        seen_categories / novel_categories / categories: category names (all = seen + novel, in id order).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise DataError(
                f"{self.root / MANIFEST_NAME} not found; generate the suite with "
                f"`python -m uniperceiver_v2.data.synthetic --out {self.root}` or ensure_synthetic()"
            )
        self.manifest = manifest
        self.seen_categories: list[str] = list(manifest["seen_categories"])
        self.novel_categories: list[str] = list(manifest["novel_categories"])
        self.categories: list[str] = [c["name"] for c in sorted(manifest["categories"], key=lambda c: c["id"])]

    @staticmethod
    def _check(split: str, allowed: tuple[str, ...]) -> str:
        if split not in allowed:
            raise ValueError(f"split must be one of {allowed}, got {split!r}")
        return split

    def scene_dir(self, split: str) -> Path:
        """Folder of the scene images of ``split`` (train / val / test / novel)."""
        return self.root / "scenes" / self._check(split, SCENE_SPLITS)

    def instances_file(self, split: str) -> Path:
        """COCO instances file of ``split`` (train / val / test / novel)."""
        return self.root / "annotations" / f"instances_{self._check(split, SCENE_SPLITS)}.json"

    def captions_file(self, split: str) -> Path:
        """COCO captions file of ``split`` (train / val / test); its images are ``scene_dir(split)``."""
        return self.root / "annotations" / f"captions_{self._check(split, SPLITS)}.json"

    @property
    def karpathy_file(self) -> Path:
        """Karpathy-style split file; image paths in it are relative to ``karpathy_image_root``."""
        return self.root / "annotations" / "karpathy_split.json"

    @property
    def karpathy_image_root(self) -> Path:
        return self.root / "scenes"

    def classification_dir(self, split: str) -> Path:
        """Class-per-folder root of ``split`` (train / val / test)."""
        return self.root / "classification" / self._check(split, SPLITS)

    def corpus_file(self, split: str) -> Path:
        """Text corpus of ``split`` (train / val)."""
        return self.root / "text" / f"corpus_{self._check(split, CORPUS_SPLITS)}.txt"

    def __repr__(self) -> str:
        return (
            f"SyntheticSuite({str(self.root)!r}, profile={self.manifest['profile']!r}, seed={self.manifest['seed']}, "
            f"seen={len(self.seen_categories)}, novel={len(self.novel_categories)})"
        )
