"""Transforms (boxes stay consistent with masks; degenerate instances are removed whole) and collate
functions (padding and padding mask), checked against torchvision / pycocotools where they overlap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from uniperceiver_v2.data import (
    CaptionSample,
    ClassificationSample,
    CocoInstances,
    DetectionSample,
    ImageCaptionsSample,
    collate_captions,
    collate_classification,
    collate_detection,
    collate_text,
    masks_to_boxes,
    pad_images,
)
from uniperceiver_v2.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomResizeShorterSide,
    RandomZoomOut,
    ResizeCenterCrop,
    ResizeShorterSide,
    classification_train_transform,
    crop_detection,
    denormalize,
    detection_eval_transform,
    detection_train_transform,
    resize_detection,
    resize_masks,
    shorter_side_size,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"



def _blob_sample(seed: int, height: int = 97, width: int = 131, count: int = 6) -> DetectionSample:
    """Random ellipses and convex polygons (at least 10 px across), some cut by the image border."""
    rng = np.random.default_rng(seed)
    masks = []
    for k in range(count):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        cx, cy = rng.uniform(-5, width + 5), rng.uniform(-5, height + 5)
        rx, ry = rng.uniform(5, 25), rng.uniform(5, 25)
        if k % 2 == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=1)
        mask = torch.from_numpy(np.array(canvas, dtype=bool))
        if mask.sum() >= 20:
            masks.append(mask)
    masks = torch.stack(masks)
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))
    return DetectionSample(
        image=image,
        boxes=masks_to_boxes(masks),
        labels=torch.arange(len(masks)),
        masks=masks,
        image_id=seed,
        orig_size=(height, width),
        file_name=f"blob{seed}.png",
    )


def _assert_consistent(sample: DetectionSample, tolerance: float) -> None:
    assert sample.boxes.shape[0] == sample.labels.shape[0] == sample.masks.shape[0]
    assert tuple(sample.masks.shape[-2:]) == sample.size
    assert sample.masks.flatten(1).any(dim=1).all(), "an instance with an empty mask survived"
    assert ((sample.boxes[:, 2:] - sample.boxes[:, :2]) > 0).all(), "a degenerate box survived"
    difference = (masks_to_boxes(sample.masks) - sample.boxes).abs()
    assert difference.max() <= tolerance, (difference, sample.boxes)


# ---------------------------------------------------------------------------------------------------
# boxes of masks
# ---------------------------------------------------------------------------------------------------


def test_masks_to_boxes_matches_pycocotools_and_torchvision():
    rng = np.random.default_rng(0)
    masks = rng.random((8, 20, 30)) > 0.97
    masks[3] = False  # an empty mask
    boxes = masks_to_boxes(torch.from_numpy(masks))
    for k, mask in enumerate(masks):
        x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
        assert boxes[k].tolist() == [x, y, x + w, y + h]
    nonempty = torch.from_numpy(masks[[k for k in range(8) if k != 3]])
    # torchvision's x1 / y1 are the last pixel's index, one less than the continuous coordinate.
    import torchvision.ops

    expected = torchvision.ops.masks_to_boxes(nonempty) + torch.tensor([0, 0, 1, 1])
    assert torch.equal(masks_to_boxes(nonempty), expected)
    assert masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------------
# detection transforms
# ---------------------------------------------------------------------------------------------------


def _reference_resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Slow per-pixel reference: per axis, nearest pixel centre when growing, any overlap when shrinking."""

    def sources(old: int, new: int, i: int) -> list[int]:
        if new >= old:
            return [min(int(np.floor((i + 0.5) * old / new)), old - 1)]
        lo, hi = i * old / new, (i + 1) * old / new
        return [j for j in range(old) if j + 1 > lo and j < hi]

    out = np.zeros((masks.shape[0], *size), dtype=bool)
    for y in range(size[0]):
        rows = sources(masks.shape[1], size[0], y)
        for x in range(size[1]):
            cols = sources(masks.shape[2], size[1], x)
            out[:, y, x] = masks[:, rows][:, :, cols].reshape(masks.shape[0], -1).any(axis=1)
    return out


@pytest.mark.parametrize("size", [(23, 17), (9, 6), (30, 5), (4, 40), (13, 11)])
def test_resize_masks_matches_the_slow_reference(size):
    masks = np.random.default_rng(1).random((3, 13, 11)) > 0.8
    assert np.array_equal(resize_masks(torch.from_numpy(masks), size).numpy(), _reference_resize_masks(masks, size))


def test_resize_masks_upscaling_equals_torch_nearest_exact():
    masks = torch.rand(2, 9, 7) > 0.5
    expected = torch.nn.functional.interpolate(masks[None].float(), size=(20, 15), mode="nearest-exact")[0] > 0.5
    assert torch.equal(resize_masks(masks, (20, 15)), expected)


def test_downscaling_keeps_thin_and_tiny_objects():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:50, 30] = True  # a one-pixel-wide stroke
    masks[1, 3, 5] = True  # a one-pixel object
    small = resize_masks(masks, (16, 16))
    assert small[0].any() and small[1].sum() == 1
    assert masks_to_boxes(small).tolist() == [[7.0, 2.0, 8.0, 13.0], [1.0, 0.0, 2.0, 1.0]]


def test_shorter_side_size():
    assert shorter_side_size(480, 640, 800, 1333) == (800, 1067)
    assert shorter_side_size(100, 1000, 800, 1333) == (133, 1333)  # longer side capped
    assert shorter_side_size(1600, 1200, 1400, 1600) == (1600, 1200)


@pytest.mark.parametrize(
    "size", [(150, 203), (49, 66), (200, 70), (31, 40)], ids=["up", "down", "anisotropic", "small"]
)
def test_resize_scales_boxes_exactly_and_masks_follow(size):
    sample = _blob_sample(1)
    resized = resize_detection(sample, size)
    scale = torch.tensor([size[1] / 131, size[0] / 97, size[1] / 131, size[0] / 97])
    assert torch.allclose(resized.boxes, sample.boxes * scale)
    assert resized.image.shape == (3, *size) and resized.masks.shape[-2:] == size
    _assert_consistent(resized, tolerance=1.0)


def test_flip_mirrors_boxes_and_masks_exactly():
    sample = _blob_sample(2)
    flip = RandomHorizontalFlip(p=1.0)
    flipped = flip(sample)
    assert torch.equal(masks_to_boxes(flipped.masks), flipped.boxes)
    assert torch.equal(flipped.image, sample.image.flip(-1))
    again = flip(flipped)
    assert torch.equal(again.boxes, sample.boxes) and torch.equal(again.masks, sample.masks)
    assert RandomHorizontalFlip(p=0.0)(sample) is sample
    image = torch.rand(3, 4, 5)
    assert torch.equal(flip(image), image.flip(-1))


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_keeps_boxes_consistent_with_masks(seed):
    torch.manual_seed(seed)
    transform = Compose([RandomResizeShorterSide(64, 160, 200), RandomCrop(80), RandomHorizontalFlip()])
    sample = _blob_sample(seed)
    out = transform(sample)
    assert max(out.size) <= 80
    _assert_consistent(out, tolerance=1.0)
    # Labels travel with their instances: each surviving label's mask is the transform of its own mask.
    assert set(out.labels.tolist()) <= set(sample.labels.tolist())


def test_crop_removes_instances_outside_the_window_whole():
    masks = torch.zeros(3, 40, 90, dtype=torch.bool)
    masks[0, 5:20, 0:20] = True  # left
    masks[1, 5:20, 45:60] = True  # middle
    masks[2, 5:20, 70:90] = True  # right
    sample = DetectionSample(
        torch.rand(3, 40, 90), masks_to_boxes(masks), torch.tensor([7, 8, 9]), masks, 1, (40, 90), "x.png"
    )
    cropped = crop_detection(sample, top=0, left=40, height=40, width=25)
    assert cropped.labels.tolist() == [8]
    assert cropped.boxes.tolist() == [[5.0, 5.0, 20.0, 20.0]]
    assert torch.equal(cropped.masks[0], masks[1, :, 40:65])

    boxes_only = DetectionSample(sample.image, sample.boxes, sample.labels, None, 1, (40, 90), "x.png")
    cropped = crop_detection(boxes_only, top=0, left=40, height=40, width=25)
    assert cropped.labels.tolist() == [8] and cropped.masks is None


def test_crop_tightens_cut_boxes_to_their_masks_and_drops_empty_masks():
    # An L shape: its box reaches into windows that hold none of its pixels.
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 0:31, 0:3] = True
    mask[0, 27:31, 0:31] = True
    sample = DetectionSample(torch.rand(3, 40, 40), masks_to_boxes(mask), torch.tensor([4]), mask, 1, (40, 40), "l.png")
    assert sample.boxes.tolist() == [[0.0, 0.0, 31.0, 31.0]]
    cut = crop_detection(sample, top=0, left=10, height=30, width=30)
    assert cut.boxes.tolist() == [[0.0, 27.0, 21.0, 30.0]]  # clipping alone would give [0, 0, 21, 30]
    empty = crop_detection(sample, top=0, left=10, height=20, width=30)  # box overlaps, mask does not
    assert len(empty.labels) == 0 and empty.masks.shape == (0, 20, 30) and empty.boxes.shape == (0, 4)


def test_eval_resize_and_builders():
    sample = _blob_sample(3)
    resized = ResizeShorterSide(48, 60)(sample)
    assert resized.size == (44, 60)  # longer side capped at 60
    _assert_consistent(resized, tolerance=1.0)
    normalized = detection_eval_transform(48, 60)(sample)
    assert torch.allclose(denormalize(normalized.image), resized.image, atol=1e-6)
    torch.manual_seed(0)
    train = detection_train_transform(64, 128, 160, 96)(sample)
    assert max(train.size) <= 96 and train.orig_size == (97, 131) and train.image_id == 3


def test_dataset_with_transform_and_loader():
    dataset = CocoInstances(FIXTURES / "images", FIXTURES / "instances.json", transform=ResizeShorterSide(24, 40))
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    batch = next(iter(loader))
    assert batch.images.shape == (3, 3, 32, 32)  # 24 x 32 images padded to multiples of 32
    assert batch.image_sizes.tolist() == [[24, 32]] * 3
    assert [b.shape[0] for b in batch.boxes] == [3, 1, 0]
    assert torch.equal(
        batch.boxes[0], torch.tensor([[2, 2, 8, 6], [9, 1, 14, 5], [1, 8, 5, 11]], dtype=torch.float32) * 2
    )
    for boxes, masks in zip(batch.boxes, batch.masks):
        assert torch.equal(masks_to_boxes(masks), boxes)


# ---------------------------------------------------------------------------------------------------
# classification transforms
# ---------------------------------------------------------------------------------------------------


def test_random_resized_crop_respects_scale_and_ratio():
    torch.manual_seed(0)
    crop = RandomResizedCrop(32, scale=(0.2, 0.9), ratio=(3 / 4, 4 / 3))
    for _ in range(200):
        top, left, h, w = crop.crop_box(120, 160)
        assert 0 <= top <= 120 - h and 0 <= left <= 160 - w
        assert 0.2 * 0.95 <= h * w / (120 * 160) <= 0.9 * 1.05
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert crop(torch.rand(3, 120, 160)).shape == (3, 32, 32)
    # Impossible scale: falls back to the central crop with the nearest allowed aspect ratio.
    assert RandomResizedCrop(32, scale=(2.0, 3.0)).crop_box(100, 300) == (0, 83, 100, 133)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_zoom_out_matches_an_edge_padded_reference(seed):
    image = torch.rand(3, 40, 40)
    torch.manual_seed(seed)
    out = RandomZoomOut(p=1.0, min_scale=0.3)(image)
    # Replay the draws (p, scale, top, left) and build the canvas with numpy's edge padding.
    torch.manual_seed(seed)
    torch.rand(())
    scale = 0.3 + 0.7 * float(torch.rand(()).item())
    side = round(40 * scale)
    top, left = int(torch.randint(0, 40 - side + 1, (1,)).item()), int(torch.randint(0, 40 - side + 1, (1,)).item())
    small = TF.resize(image, [side, side], antialias=True).numpy()
    reference = np.pad(small, ((0, 0), (top, 40 - side - top), (left, 40 - side - left)), mode="edge")
    assert out.shape == (3, 40, 40) and side < 40
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-5)


def test_random_zoom_out_probability_and_identity():
    image = torch.rand(3, 24, 24)
    torch.manual_seed(0)
    assert torch.equal(RandomZoomOut(p=1.0, min_scale=1.0)(image), image)     # scale 1: the image itself
    state = torch.get_rng_state()
    assert torch.equal(RandomZoomOut(p=0.0, min_scale=0.25)(image), image)    # p 0: no draw at all
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    changed = sum(not torch.equal(RandomZoomOut(p=0.5, min_scale=0.25)(image), image) for _ in range(400))
    assert 160 <= changed <= 240
    with pytest.raises(ValueError, match="min_scale"):
        RandomZoomOut(p=0.5, min_scale=0.0)
    with pytest.raises(ValueError, match="p="):
        RandomZoomOut(p=2.0, min_scale=0.5)
    assert "RandomZoomOut" in repr(classification_train_transform(32, 0.5, zoom_out_prob=0.5))
    assert "RandomZoomOut" not in repr(classification_train_transform(32, 0.5))


def test_resize_center_crop_matches_torchvision():
    image = torch.rand(3, 100, 200)
    ours = ResizeCenterCrop(64, crop_fraction=0.875)(image)
    reference = TF.center_crop(TF.resize(image, [73], antialias=True), [64, 64])
    assert ours.shape == (3, 64, 64)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_normalize_matches_torchvision_and_inverts():
    image = torch.rand(3, 8, 9)
    ours = Normalize()(image)
    reference = TF.normalize(image, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(denormalize(ours), image, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------------


def test_pad_images_and_padding_mask():
    a, b = torch.rand(3, 40, 50), torch.rand(3, 64, 33)
    batch, padding, sizes = pad_images([a, b], size_divisibility=32)
    assert batch.shape == (2, 3, 64, 64) and padding.shape == (2, 64, 64) and padding.dtype == torch.bool
    assert sizes.tolist() == [[40, 50], [64, 33]]
    assert torch.equal(batch[0, :, :40, :50], a) and torch.equal(batch[1, :, :, :33], b)
    for row, (h, w) in enumerate(sizes.tolist()):
        expected = torch.ones(64, 64, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(padding[row], expected)
        assert (batch[row][:, padding[row]] == 0).all()
    batch, padding, _ = pad_images([a, b], size_divisibility=1)
    assert batch.shape == (2, 3, 64, 50) and padding[0].sum() == 64 * 50 - 40 * 50
    with pytest.raises(ValueError, match="channels"):
        pad_images([a, torch.rand(1, 4, 4)])


def test_collate_detection_keeps_targets_per_image():
    samples = [_blob_sample(4, 50, 60, count=3), _blob_sample(5, 70, 40, count=5)]
    batch = collate_detection(samples)
    assert batch.images.shape == (2, 3, 96, 64)
    assert [len(b) for b in batch.boxes] == [len(s.boxes) for s in samples]
    assert all(torch.equal(m, s.masks) for m, s in zip(batch.masks, samples))
    assert batch.image_ids == [4, 5] and batch.orig_sizes == [(50, 60), (70, 40)]
    samples[1].masks = None
    assert collate_detection(samples).masks is None
    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.boxes[0].device.type == "meta" and moved.image_ids == [4, 5]


def test_collate_classification_and_text():
    samples = [ClassificationSample(torch.rand(3, 64, 64), label, f"{label}.png") for label in (2, 0, 1)]
    batch = collate_classification(samples)
    assert batch.images.shape == (3, 3, 64, 64) and not batch.padding_mask.any()
    assert batch.labels.tolist() == [2, 0, 1] and batch.labels.dtype == torch.int64
    assert collate_text(["a b", "c"]) == ["a b", "c"]
    with pytest.raises(TypeError, match="sample 1"):
        collate_text(["a", 3])


def test_collate_captions_index_maps_captions_to_images():
    pairs = [CaptionSample(torch.rand(3, 8, 8), f"caption {i}", 100 + i, f"{i}.png") for i in range(3)]
    batch = collate_captions(pairs)
    assert batch.captions == ["caption 0", "caption 1", "caption 2"] and batch.caption_image_index.tolist() == [0, 1, 2]
    grouped = [
        ImageCaptionsSample(torch.rand(3, 8, 8), ["a", "b"], 1, "1.png"),
        ImageCaptionsSample(torch.rand(3, 10, 6), ["c"], 2, "2.png"),
    ]
    batch = collate_captions(grouped, size_divisibility=1)
    assert batch.captions == ["a", "b", "c"] and batch.caption_image_index.tolist() == [0, 0, 1]
    assert batch.images.shape == (2, 3, 10, 8) and batch.image_ids == [1, 2]
