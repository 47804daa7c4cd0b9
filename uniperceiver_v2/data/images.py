"""Reading images of any common mode as RGB float tensors, and writing byte-reproducible PNGs.

Real data sets are less tidy than their documentation: ImageNet has CMYK and grayscale JPEGs, COCO a
few grayscale ones, scraped web data has palette and RGBA PNGs and the odd 16-bit scan. Everything is
turned into a float RGB tensor in [0, 1] here, in one place, so that no reader has its own variant.
EXIF orientation is deliberately not applied: COCO annotations refer to the stored pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .summary import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# PNG settings fixed once so that the same pixels always give the same bytes (no time or text chunks
# are written by Pillow unless asked for).
PNG_COMPRESS_LEVEL = 6

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageFile:
    """An image file a reader will read: its path, where it is referenced, and the size its record states.

    Attributes:
        path: the file.
        record: where it is referenced, e.g. "image id=12 in annotations/instances_val.json".
        width, height: the size the record gives, or None where the record has none (class folders, captions).
    """

    path: Path
    record: str
    width: int | None = None
    height: int | None = None


def pil_to_rgb_array(image: Image.Image, path: str | Path = "<in memory>") -> np.ndarray:
    """Convert a PIL image of any supported mode to a float32 array (H, W, 3) in [0, 1].

    - 16-bit grayscale ("I;16*", and "I" as Pillow reports 16-bit PNGs on some versions) is scaled by
      1/65535, so it keeps its full range instead of being clipped at 255.
    - Images with transparency (RGBA, LA, palette with a transparent colour) are composited over white,
      which is how viewers show them; dropping alpha instead would expose whatever colour happens to
      be stored under fully transparent pixels.
    - Everything else (L, 1, P, CMYK, YCbCr, RGB) goes through Pillow's own conversion to RGB.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        gray = np.asarray(image).astype(np.float64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise DataError(
                f"{path}: 32-bit integer image with values outside [0, 65535]; only 8- and 16-bit images are supported"
            )
        gray = (gray / 65535.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"{path}: floating-point image (mode 'F') has no defined intensity range; convert it first")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0
        alpha = rgba[:, :, 3:4]
        return rgba[:, :, :3] * alpha + (1.0 - alpha)
    try:
        rgb = image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"{path}: cannot convert image mode {mode!r} to RGB: {exc}") from exc
    return np.asarray(rgb).astype(np.float32) / 255.0


def read_image(path: str | Path, record: str = "") -> torch.Tensor:
    """Read an image file as a float32 tensor (3, H, W) in [0, 1].

    Args:
        path: the image file.
        record: where the file was referenced (e.g. "image id=12 in instances_val.json"), added to errors.

    Raises:
        DataError: naming the file (and record), when it is missing, truncated, not an image, or of an
            unsupported mode.
    """
    path = Path(path)
    where = f" ({record})" if record else ""
    try:
        with Image.open(path) as image:
            image.load()
            array = pil_to_rgb_array(image, f"{path}{where}")
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}{where}") from exc
    # Pillow reports unreadable files as OSError (UnidentifiedImageError, truncation), SyntaxError
    # (broken PNG chunks) or ValueError (bad headers), depending on the decoder.
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image file {path}{where}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    """Write a uint8 array (H, W, 3) or (H, W) as PNG with fixed settings (same pixels -> same bytes)."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8 pixels, got {pixels.dtype}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
