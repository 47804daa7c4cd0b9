"""Checks of the inference API's arguments (``uniperceiver_v2.api``), in one place for every function there.

Without them a bad input gives a plausible-looking wrong answer instead of an error: a NaN pixel turns every score
into NaN (and argsort still returns a "ranking"), a float image in 0-255 saturates after normalisation, the string
``"circle"`` iterates into five one-letter classes, and two equal class names split one probability in two. Every
check raises ``ValueError`` naming the argument (``images[2]``, ``class_names[1]``, ``top_k``), what was expected
and what was given.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from uniperceiver_v2.data.images import pil_to_rgb_array, read_image

__all__ = ["image_list", "image_tensor", "one_of", "optional_positive_int", "positive_int", "probability",
           "text_list"]

# How a single image may be given: a PIL image, a (3, H, W) tensor, or the path of an image file.
SINGLE_IMAGE = (Image.Image, torch.Tensor, str, os.PathLike)


def image_list(images, argument: str = "images") -> list:
    """One image or a sequence of images -> a non-empty list (the items are checked by ``image_tensor``)."""
    if isinstance(images, SINGLE_IMAGE):
        return [images]
    if isinstance(images, np.ndarray):
        raise ValueError(f"{argument}: got a numpy array of shape {images.shape}; pass Image.fromarray(array) or "
                         f"torch.from_numpy(array).permute(2, 0, 1) for an (H, W, 3) array")
    if not isinstance(images, Sequence):
        raise ValueError(f"{argument}: expected an image or a list of images, got {type(images).__name__}")
    images = list(images)
    if not images:
        raise ValueError(f"{argument}: no images given (an empty list)")
    return images


def image_tensor(image, argument: str) -> torch.Tensor:
    """A PIL image (any mode), an image file, or a tensor (3, H, W) float in [0, 1] or uint8 -> float32 (3, H, W)
    in [0, 1].

    PIL images are converted by ``data.images.pil_to_rgb_array`` (grayscale and palette to RGB, alpha composited
    over white, 16-bit scaled by 1/65535), files are read by ``data.images.read_image``.

    Raises:
        ValueError: naming ``argument``, for another type, another shape than (3, H, W) with H, W >= 1, an integer
            dtype other than uint8, NaN or infinite values, or float values outside [0, 1] (0-255 pixels,
            ImageNet-normalised pixels: this API normalises itself); for an unreadable file or PIL image.
    """
    if isinstance(image, (str, os.PathLike)):
        pixels = read_image(image, record=argument)
    elif isinstance(image, Image.Image):
        try:
            array = pil_to_rgb_array(image, argument)
        except OSError as exc:                 # a truncated or corrupt file behind a lazily loaded PIL image
            raise ValueError(f"{argument}: cannot read the PIL image ({exc})") from exc
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    elif isinstance(image, torch.Tensor):
        pixels = _tensor_pixels(image, argument)
    else:
        raise ValueError(f"{argument}: expected a PIL image, an image file path or a (3, H, W) tensor, got "
                         f"{type(image).__name__}")
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise ValueError(f"{argument}: empty image of shape {tuple(pixels.shape)} (height and width must be >= 1)")
    return pixels


def _tensor_pixels(image: torch.Tensor, argument: str) -> torch.Tensor:
    shape = tuple(image.shape)
    if image.dim() != 3 or shape[0] != 3:
        hint = ""
        if image.dim() == 3 and shape[-1] == 3:
            hint = "; for a channels-last (H, W, 3) image pass image.permute(2, 0, 1)"
        elif image.dim() == 3 and shape[0] == 1:
            hint = "; for a grayscale (1, H, W) image pass image.expand(3, -1, -1)"
        elif image.dim() == 2:
            hint = "; for a grayscale (H, W) image pass image.expand(3, -1, -1)"
        elif image.dim() == 4:
            hint = "; for a batch (B, 3, H, W) pass list(batch)"
        raise ValueError(f"{argument}: expected a (3, H, W) tensor, got shape {shape}{hint}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ValueError(f"{argument}: expected a float tensor with values in [0, 1] or a uint8 tensor, got "
                         f"{image.dtype}")
    pixels = image.float()
    finite = torch.isfinite(pixels)
    if not finite.all():
        raise ValueError(f"{argument}: {int((~finite).sum())} of {pixels.numel()} values are NaN or infinite")
    if pixels.numel() == 0:
        return pixels
    low, high = round(float(pixels.min()), 4), round(float(pixels.max()), 4)
    if low < 0.0:
        raise ValueError(f"{argument}: expected values in [0, 1]; got min {low}; pass unnormalised pixels (the "
                         f"API resizes and normalises itself), or clamp with image.clamp(0, 1)")
    if high > 1.0:
        hint = "divide by 255 or pass a uint8 tensor / PIL image" if high > 2.0 else "clamp with image.clamp(0, 1)"
        raise ValueError(f"{argument}: expected values in [0, 1]; got max {high}; {hint}")
    return pixels


def text_list(texts, argument: str, tokenize: Callable[[list[str]], dict] | None = None) -> list[str]:
    """A non-empty list of non-blank strings (class names, candidate texts) -> list[str].

    Args:
        texts: any sequence of str, but not a single str (which would iterate into one text per character).
        argument: its name in the error messages.
        tokenize: when given (``model.tokenize``), texts must also be distinct once tokenised: two names with the
            same tokens ("cat" and "Cat " for an uncased tokenizer) get the same embedding, and a softmax over them
            gives each half of the probability.
    """
    if isinstance(texts, str):
        raise ValueError(f"{argument} must be a list of texts, got the string {texts!r}; pass [{texts!r}]")
    if isinstance(texts, (set, frozenset)):
        raise ValueError(f"{argument} must be an ordered list (results refer to positions in it), got a set")
    if not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
        raise ValueError(f"{argument} must be a list of texts, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{argument} is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{argument}[{i}] must be a string, got {type(text).__name__} {text!r}")
        if not text.strip():
            raise ValueError(f"{argument}[{i}] is empty or whitespace only: {text!r}")
    texts = [str(text) for text in texts]            # numpy.str_ -> str
    if tokenize is not None:
        _require_distinct(texts, argument, tokenize)
    return texts


def _require_distinct(texts: list[str], argument: str, tokenize: Callable[[list[str]], dict]) -> None:
    tokens = tokenize(texts)
    ids = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -1).tolist()
    positions: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(ids):
        positions.setdefault(tuple(row), []).append(i)
    groups = [group for group in positions.values() if len(group) > 1]
    if groups:
        described = "; ".join(" = ".join(f"{argument}[{i}]={texts[i]!r}" for i in group) for group in groups)
        raise ValueError(f"{argument} has duplicates (the same tokens, so the same embedding, would share one "
                         f"probability): {described}")


def positive_int(value, argument: str) -> int:
    """An int >= 1 (bool and float are refused: ``top_k=2.5`` is a mistake, not 2)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{argument} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{argument} must be >= 1, got {value}")
    return int(value)


def optional_positive_int(value, argument: str) -> int | None:
    return None if value is None else positive_int(value, argument)


def probability(value, argument: str) -> float:
    """A real number in [0, 1] (NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{argument} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:                # also False for NaN
        raise ValueError(f"{argument} must be in [0, 1], got {value}")
    return float(value)


def one_of(value, argument: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value
