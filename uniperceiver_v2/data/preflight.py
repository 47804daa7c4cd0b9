"""The pre-flight check: every image file a dataset will read, looked at once before training starts.

A reader only opens an image when a sample is drawn, so a missing or broken file would otherwise surface hours
into a run, or never (a file that is never sampled). ``check_dataset`` opens every file the dataset lists
(``image_files()``), each once however many records share it:

* the file exists;
* its header decodes (``PIL.Image.open``, which reads the header only), or, with ``decode=True``, the whole
  image decodes as training would read it (``read_image``);
* its size is the one its record states (COCO ``width`` / ``height``), where the record states one.

Files that fail follow the dataset's ``on_invalid`` policy: "error" raises one ``DataError`` listing them,
"skip" leaves their records out (``drop_images``) and counts them in the dataset's ``summary()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .images import ImageFile, read_image
from .summary import DataError

__all__ = ["FILE_NOT_FOUND", "FILE_UNREADABLE", "SIZE_MISMATCH", "check_dataset", "check_image", "check_images"]

# The reasons a file fails, as counted in a dataset's summary.
FILE_NOT_FOUND = "image file not found"
FILE_UNREADABLE = "image file cannot be decoded"
SIZE_MISMATCH = "image size differs from its record"
MAX_LISTED = 10


def check_image(file: ImageFile, decode: bool = False) -> tuple[str, str] | None:
    """None when ``file`` is usable, else (reason, detail): one of the reasons above and a sentence naming the file
    and its record (the example a dataset's summary shows)."""
    where = f"{file.path} ({file.record})"
    if not file.path.is_file():
        return FILE_NOT_FOUND, where
    # Pillow reports unreadable files as OSError (UnidentifiedImageError, truncation), SyntaxError (broken PNG
    # chunks) or ValueError (bad headers), depending on the decoder.
    try:
        if decode:
            height, width = read_image(file.path, file.record).shape[-2:]
        else:
            with Image.open(file.path) as image:
                width, height = image.size
    except DataError as error:
        return FILE_UNREADABLE, str(error)
    except (OSError, SyntaxError, ValueError) as error:
        return FILE_UNREADABLE, f"{where}: {error}"
    if file.width is not None and file.height is not None and (width, height) != (file.width, file.height):
        return SIZE_MISMATCH, f"{where}: the file is {width}x{height} (WxH), the record says {file.width}x{file.height}"
    return None


def check_images(files: Sequence[ImageFile], decode: bool = False) -> dict[Path, tuple[str, str]]:
    """path -> (reason, detail) for every file of ``files`` that fails ``check_image`` (each path checked once)."""
    problems: dict[Path, tuple[str, str]] = {}
    seen: set[Path] = set()
    for file in files:
        if file.path in seen:
            continue
        seen.add(file.path)
        problem = check_image(file, decode)
        if problem is not None:
            problems[file.path] = problem
    return problems


def check_dataset(dataset: Any, decode: bool = False) -> dict[Path, tuple[str, str]]:
    """Check every image file of ``dataset`` and apply its ``on_invalid`` policy to the ones that fail.

    Args:
        dataset: a reader with ``image_files()``, ``drop_images(problems)`` and ``on_invalid`` (every image
            reader of this package); a dataset without ``image_files`` (a text corpus) has nothing to check.
        decode: decode every image fully instead of reading its header only (slower; what
            ``python -m uniperceiver_v2.data.check`` does).

    Returns:
        The problems found (path -> (reason, detail)); with "skip" their records are gone from ``dataset`` (which
        may be left empty: the caller decides whether that is an error).

    Raises:
        DataError: with "error", listing the failing files and their records.
    """
    if not hasattr(dataset, "image_files"):
        return {}
    files = dataset.image_files()
    problems = check_images(files, decode)
    if not problems:
        return problems
    source = getattr(dataset, "ann_file", None) or getattr(dataset, "root", None) or type(dataset).__name__
    if dataset.on_invalid == "error":
        listed = "\n".join(f"  {reason}: {detail}" for reason, detail in list(problems.values())[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(
            f"{source}: {len(problems)} of {len({file.path for file in files})} image files cannot be used:\n"
            f"{listed}{more}\n"
            "(set data.on_invalid=skip to leave their records out and count them; data.preflight=false turns "
            "this check off)"
        )
    dataset.drop_images(problems)
    return problems
