"""Image transforms for the non-localization tasks and joint image/box/mask transforms for detection.

Classification-style transforms map an image tensor (3, H, W) to a tensor; detection transforms map a
``DetectionSample`` to a new one, moving boxes and masks with the pixels. ``RandomHorizontalFlip`` and
``Normalize`` accept either. Randomness comes from torch's global generator, which the DataLoader seeds
differently in every worker; call ``torch.manual_seed`` for a reproducible sequence.

Paper settings (Sec. 5.1, Tab. 7): non-localization tasks use 224 (R50) or 384 (Swin) crops; detection
resizes the shorter side at random within [200, 1800] with the longer side at most 2400, crops
1600 x 1600, and evaluates at shorter side 1400 with the longer at most 1600. The tiny preset uses the
same transforms at, e.g., 64 or 128 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
import torch.nn.functional as F

from .samples import DetectionSample, masks_to_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageOrSample = TypeVar("ImageOrSample", torch.Tensor, DetectionSample)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (both inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, (1,)).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, anti-aliased resize of (C, H, W) to (C, *size); size = (height, width)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _resize_mask_axis(masks: torch.Tensor, axis: int, new: int) -> torch.Tensor:
    """Resize bool masks along one axis (see ``resize_masks``), in exact integer arithmetic."""
    old = masks.shape[axis]
    index = torch.arange(new)
    if new >= old:
        # Upscaling: each output pixel takes the source pixel under its centre ("nearest-exact").
        return masks.index_select(axis, (2 * index + 1) * old // (2 * new))
    # Downscaling: an output pixel is set if any source pixel overlapping its footprint
    # [i * old / new, (i + 1) * old / new) is set; counted with a cumulative sum along the axis.
    start = index * old // new
    end = -((-(index + 1) * old) // new)  # ceil
    shape = list(masks.shape)
    shape[axis] = 1
    cumulative = torch.cat(
        [masks.new_zeros(shape, dtype=torch.int32), masks.int().cumsum(axis, dtype=torch.int32)], dim=axis
    )
    return (cumulative.index_select(axis, end) - cumulative.index_select(axis, start)) > 0


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize bool masks (K, H, W) to (K, *size), one axis at a time.

    Along an axis that grows, nearest sampling at pixel centres reproduces the shape exactly. Along an
    axis that shrinks, nearest sampling would drop any part thinner than the sampling step (a thin
    stroke, the sliver of a partly hidden object, a whole small object), leaving boxes without masks;
    so an output pixel is set when the object touches any part of it (conservative rasterisation),
    which fattens a boundary by less than one output pixel. Either way, the tight box of the resized
    mask is within one output pixel of the exactly scaled box.
    """
    for axis, new in ((1, size[0]), (2, size[1])):
        if masks.shape[axis] != new:
            masks = _resize_mask_axis(masks, axis, new)
    return masks


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose(\n  {inner}\n)"


class Normalize:
    """(x - mean) / std per channel, on an image tensor or on a ``DetectionSample``'s image."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: ImageOrSample) -> ImageOrSample:
        if isinstance(x, DetectionSample):
            return replace(x, image=(x.image - self.mean) / self.std)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def denormalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of ``Normalize`` for (..., 3, H, W) tensors, e.g. to show a batch."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images * std_t + mean_t


class RandomHorizontalFlip:
    """Mirror left-right with probability p; for a ``DetectionSample`` boxes and masks are mirrored too
    (x0, x1) -> (W - x1, W - x0)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: ImageOrSample) -> ImageOrSample:
        if float(torch.rand(()).item()) >= self.p:
            return x
        if not isinstance(x, DetectionSample):
            return x.flip(-1)
        width = x.size[1]
        boxes = torch.stack([width - x.boxes[:, 2], x.boxes[:, 1], width - x.boxes[:, 0], x.boxes[:, 3]], dim=1)
        masks = None if x.masks is None else x.masks.flip(-1)
        return replace(x, image=x.image.flip(-1), boxes=boxes, masks=masks)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# ----------------------------------------------------------------------------------------------------
# Classification-style (whole-image) transforms: Tensor (3, H, W) -> Tensor (3, size, size)
# ----------------------------------------------------------------------------------------------------


class RandomResizedCrop:
    """Crop a random region covering ``scale`` of the image area with aspect ratio in ``ratio``
    (log-uniform), then resize it to size x size (the Inception / ImageNet training crop).

    After 10 failed draws the whole image is center-cropped to the nearest allowed aspect ratio.
    """

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ):
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of one random draw."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                return _randint(0, height - crop_h), _randint(0, width - crop_w), crop_h, crop_w
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_h, crop_w = height, round(height * self.ratio[1])
        else:
            crop_h, crop_w = height, width
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, crop_h, crop_w = self.crop_box(image.shape[-2], image.shape[-1])
        return resize_image(image[:, top : top + crop_h, left : left + crop_w], (self.size, self.size))

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCrop:
    """Resize the shorter side to round(size / crop_fraction), then take the central size x size crop
    (the standard evaluation transform: 256 -> 224 for crop_fraction 0.875)."""

    def __init__(self, size: int, crop_fraction: float = 0.875):
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size = size
        self.crop_fraction = crop_fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        shorter = max(self.size, round(self.size / self.crop_fraction))
        scale = shorter / min(height, width)
        new_h, new_w = max(self.size, round(height * scale)), max(self.size, round(width * scale))
        image = resize_image(image, (new_h, new_w))
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return image[:, top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop_fraction={self.crop_fraction})"


class RandomZoomOut:
    """With probability ``p``, shrink the (C, size, size) image by a factor s ~ U[min_scale, 1] and place it at a
    random position of a size x size canvas whose margins repeat the shrunk image's border pixels.

    Our addition for classification images whose objects fill the frame: the regions of a shrunk image show the
    object at the scale of the objects in detection scenes, so a term that names the proposals of classification
    images (``tasks.classification.region_name_weight``) teaches names at the scale they are detected at.
    """

    def __init__(self, p: float, min_scale: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomZoomOut: p={p} not in [0, 1]")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"RandomZoomOut: min_scale={min_scale} not in (0, 1]")
        self.p, self.min_scale = p, min_scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or float(torch.rand(()).item()) >= self.p:
            return image
        height, width = image.shape[-2:]
        scale = _uniform(self.min_scale, 1.0)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        small = resize_image(image, (new_h, new_w))
        top, left = _randint(0, height - new_h), _randint(0, width - new_w)
        # replicate padding: (left, right, top, bottom) of the last two dimensions
        return F.pad(small[None], (left, width - new_w - left, top, height - new_h - top), mode="replicate")[0]

    def __repr__(self) -> str:
        return f"RandomZoomOut(p={self.p}, min_scale={self.min_scale})"


def classification_train_transform(image_size: int, min_scale: float = 0.08, zoom_out_prob: float = 0.0,
                                   zoom_out_min_scale: float = 0.25) -> Compose:
    """Random resized crop, then (with probability ``zoom_out_prob``) :class:`RandomZoomOut`, horizontal flip,
    ImageNet normalisation; output (3, image_size, image_size)."""
    steps = [RandomResizedCrop(image_size, scale=(min_scale, 1.0))]
    if zoom_out_prob > 0:
        steps.append(RandomZoomOut(zoom_out_prob, zoom_out_min_scale))
    return Compose([*steps, RandomHorizontalFlip(), Normalize()])


def classification_eval_transform(image_size: int, crop_fraction: float = 0.875) -> Compose:
    """Resize + center crop, ImageNet normalisation; output (3, image_size, image_size)."""
    return Compose([ResizeCenterCrop(image_size, crop_fraction), Normalize()])


# The centre crop of each whole-image task: classification evaluates on the central 87.5 % as ImageNet models do;
# a caption or a retrieval text may describe anything in the picture ("at the lower left ..."), so those tasks
# train and evaluate on the whole image.
WHOLE_IMAGE_CROP = {"classification": 0.875, "captioning": 1.0, "retrieval": 1.0}


def whole_image_eval_transform(task: str, image_size: int) -> Compose:
    """The evaluation transform of a whole-image task (:data:`WHOLE_IMAGE_CROP`); the same function serves the
    evaluation datasets and the inference API, so both see an image the same way."""
    if task not in WHOLE_IMAGE_CROP:
        raise ValueError(f"whole_image_eval_transform: unknown task {task!r}; "
                         f"expected one of {sorted(WHOLE_IMAGE_CROP)}")
    return classification_eval_transform(image_size, crop_fraction=WHOLE_IMAGE_CROP[task])


# ----------------------------------------------------------------------------------------------------
# Detection transforms: DetectionSample -> DetectionSample
# ----------------------------------------------------------------------------------------------------


def shorter_side_size(height: int, width: int, shorter: int, max_longer: int) -> tuple[int, int]:
    """(new height, new width) with the shorter side = ``shorter`` unless that makes the longer side
    exceed ``max_longer``, in which case the longer side = ``max_longer``; aspect ratio kept."""
    scale = shorter / min(height, width)
    if max(height, width) * scale > max_longer:
        scale = max_longer / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_detection(sample: DetectionSample, size: tuple[int, int]) -> DetectionSample:
    """Resize image (bilinear), masks (nearest at pixel centres) and boxes (exact per-axis scale).

    The tight box of each resized mask stays within one output pixel of its scaled box (see ``resize_masks``).
    """
    height, width = sample.size
    scale = torch.tensor([size[1] / width, size[0] / height, size[1] / width, size[0] / height])
    masks = None if sample.masks is None else resize_masks(sample.masks, size)
    return replace(sample, image=resize_image(sample.image, size), boxes=sample.boxes * scale, masks=masks)


class RandomResizeShorterSide:
    """Resize so the shorter side is a uniform random integer in [min_size, max_size], the longer side
    capped at ``max_longer`` (paper: 200-1800, longer <= 2400)."""

    def __init__(self, min_size: int, max_size: int, max_longer: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size, self.max_longer = min_size, max_size, max_longer

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        shorter = _randint(self.min_size, self.max_size)
        return resize_detection(sample, shorter_side_size(*sample.size, shorter, self.max_longer))

    def __repr__(self) -> str:
        return f"RandomResizeShorterSide({self.min_size}-{self.max_size}, max_longer={self.max_longer})"


class ResizeShorterSide:
    """Deterministic evaluation resize: shorter side ``size``, longer side at most ``max_longer``
    (paper: 1400 / 1600)."""

    def __init__(self, size: int, max_longer: int):
        self.size, self.max_longer = size, max_longer

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        return resize_detection(sample, shorter_side_size(*sample.size, self.size, self.max_longer))

    def __repr__(self) -> str:
        return f"ResizeShorterSide({self.size}, max_longer={self.max_longer})"


class RandomCrop:
    """Crop a random crop_size x crop_size window (each side at most the image's own, so no padding).

    Boxes are shifted and clipped to the window. A box that the window cut is replaced by the tight box
    of its cropped mask when masks are present, because clipping alone leaves the box larger than the
    visible part of a non-rectangular object. Instances that end up with a degenerate box (zero width or
    height: the object lies outside the window) or an empty mask are removed together with their labels
    and masks -- they are no longer in the image, so keeping them would train the model on nothing.
    """

    def __init__(self, crop_size: int):
        self.crop_size = crop_size

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        height, width = sample.size
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        top, left = _randint(0, height - crop_h), _randint(0, width - crop_w)
        return crop_detection(sample, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomCrop({self.crop_size})"


def crop_detection(sample: DetectionSample, top: int, left: int, height: int, width: int) -> DetectionSample:
    """Crop image, boxes and masks to the window; see ``RandomCrop`` for what happens to cut instances."""
    shifted = sample.boxes - torch.tensor([left, top, left, top], dtype=sample.boxes.dtype)
    limit = torch.tensor([width, height, width, height], dtype=sample.boxes.dtype)
    boxes = torch.minimum(shifted.clamp(min=0), limit)
    cut = (boxes != shifted).any(dim=1)
    masks = None
    if sample.masks is not None:
        masks = sample.masks[:, top : top + height, left : left + width]
        boxes = torch.where(cut[:, None], masks_to_boxes(masks), boxes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if masks is not None:
        keep &= masks.flatten(1).any(dim=1)
    cropped = replace(sample, image=sample.image[:, top : top + height, left : left + width], boxes=boxes, masks=masks)
    return cropped.select(keep)


def detection_train_transform(min_size: int, max_size: int, max_longer: int, crop_size: int) -> Compose:
    """Random shorter-side resize, random crop, horizontal flip, ImageNet normalisation (paper Sec. 5.1)."""
    return Compose(
        [
            RandomResizeShorterSide(min_size, max_size, max_longer),
            RandomCrop(crop_size),
            RandomHorizontalFlip(),
            Normalize(),
        ]
    )


def detection_eval_transform(size: int, max_longer: int) -> Compose:
    """Shorter side ``size``, longer at most ``max_longer``, ImageNet normalisation."""
    return Compose([ResizeShorterSide(size, max_longer), Normalize()])
