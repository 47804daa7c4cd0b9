"""The inference API refuses inputs that would give a plausible wrong answer (NaN rankings, saturated 0-255 images,
one class per character, split probabilities) with a ValueError naming the argument; it converts what has one
sensible meaning (PIL modes, uint8 tensors, image files); and ``detect`` returns masks in compact forms, pasting
only the kept detections, one at a time."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from helpers import single_thread, tiny_model  # noqa: F401
from PIL import Image

import uniperceiver_v2.tasks.detection as detection_module
from uniperceiver_v2 import api
from uniperceiver_v2.modeling.image_encoder import postprocess
from uniperceiver_v2.tasks.detection import DetectionTask

NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def image(height=40, width=56, seed=0):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- images
CALLS = {
    "classify": lambda model, images: api.classify(model, images, NAMES),
    "detect": lambda model, images: api.detect(model, images, NAMES),
    "caption": lambda model, images: api.caption(model, images, max_length=2),
    "retrieve": lambda model, images: api.retrieve(model, images, ["a red circle"]),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused_by_every_task(model, call, bad):
    broken = image()
    broken[1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"images\[1\]: 1 of 6720 values are NaN or infinite"):
        CALLS[call](model, [image(), broken])


def test_float_pixels_outside_0_1_are_refused_with_a_hint(model):
    with pytest.raises(ValueError, match=r"images\[0\]: expected values in \[0, 1\]; got max 255.0; divide by 255 "
                                         r"or pass a uint8 tensor"):
        api.classify(model, (image() * 255).round().index_fill(1, torch.tensor([0]), 255.0), NAMES)
    with pytest.raises(ValueError, match=r"images\[0\]: expected values in \[0, 1\]; got min -1.99\d*; "
                                         r"pass unnormalised"):
        api.detect(model, image() * 4.0 - 2.0, NAMES)                             # an ImageNet-normalised image
    with pytest.raises(ValueError, match=r"got max 1.05.*clamp"):                  # a resampling overshoot
        api.prepare_whole_images(model, image().clamp(max=0.9) + 0.15)


def test_uint8_tensors_are_divided_by_255_and_other_integer_dtypes_refused(model):
    pixels = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    as_uint8, _ = api.prepare_whole_images(model, pixels)
    as_float, _ = api.prepare_whole_images(model, pixels.float() / 255)
    torch.testing.assert_close(as_uint8, as_float)
    with pytest.raises(ValueError, match=r"images\[0\]: expected a float tensor .* or a uint8 tensor, got torch.int64"):
        api.prepare_whole_images(model, pixels.long())


@pytest.mark.parametrize("shape, hint", [
    ((3, 0, 64), "empty image of shape \\(3, 0, 64\\)"),
    ((3, 64, 0), "empty image of shape \\(3, 64, 0\\)"),
    ((4, 8, 8), "got shape \\(4, 8, 8\\)$"),
    ((8, 8, 3), "got shape \\(8, 8, 3\\); for a channels-last .* image.permute\\(2, 0, 1\\)"),
    ((1, 8, 8), "got shape \\(1, 8, 8\\); for a grayscale .*image.expand\\(3, -1, -1\\)"),
    ((8, 8), "got shape \\(8, 8\\); for a grayscale"),
    ((2, 3, 8, 8), "got shape \\(2, 3, 8, 8\\); for a batch .* list\\(batch\\)"),
])
def test_wrong_tensor_shapes_name_the_image_and_its_shape(model, shape, hint):
    with pytest.raises(ValueError, match=r"images\[1\]: .*" + hint):
        api.detect(model, [image(), torch.zeros(shape)], NAMES)


def test_containers_and_types_that_are_not_images(model):
    with pytest.raises(ValueError, match=r"images: no images given"):
        api.classify(model, [], NAMES)
    with pytest.raises(ValueError, match=r"images: got a numpy array of shape \(8, 8, 3\); pass Image.fromarray"):
        api.classify(model, np.zeros((8, 8, 3), np.uint8), NAMES)
    with pytest.raises(ValueError, match=r"images\[0\]: expected a PIL image, an image file path or a \(3, H, W\) "
                                         r"tensor, got int"):
        api.classify(model, [3], NAMES)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "I;16", "I", "CMYK", "1"])
def test_pil_images_of_every_common_mode_become_rgb_in_0_1(model, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    if mode == "I;16":
        converted = Image.fromarray(np.full((30, 20), 40000, dtype=np.uint16))
    else:
        converted = rgb.convert(mode)
    pixels = api.to_image_tensor(converted)
    assert pixels.shape == (3, 30, 20) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 1
    if mode == "I;16":                                                      # 16-bit keeps its range
        torch.testing.assert_close(pixels, torch.full((3, 30, 20), 40000 / 65535))
    prepared, _ = api.prepare_whole_images(model, converted)
    assert torch.isfinite(prepared).all()


def test_floating_point_pil_images_and_non_image_files_are_refused_by_name(model, tmp_path):
    with pytest.raises(ValueError, match=r"images\[0\]: floating-point image \(mode 'F'\)"):
        api.classify(model, Image.new("F", (8, 8)), NAMES)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.txt \(images\[1\]\)"):
        api.classify(model, [image(), text], NAMES)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read the PIL image"):
        api.classify(model, Image.open(truncated), NAMES)


def test_an_image_file_path_gives_the_same_input_as_the_pil_image(model, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
    from_path, _ = api.prepare_whole_images(model, str(path))
    from_pil, _ = api.prepare_whole_images(model, Image.open(path))
    torch.testing.assert_close(from_path, from_pil)


# ---------------------------------------------------------------------------------------------- names, texts
@pytest.mark.parametrize("call", ["classify", "detect"])
def test_class_names_must_be_a_list_of_distinct_non_blank_names(model, call):
    function = getattr(api, call)
    cases = [
        ("circle", r"class_names must be a list of texts, got the string 'circle'; pass \['circle'\]"),
        ([], r"class_names is empty"),
        (["circle", " \t"], r"class_names\[1\] is empty or whitespace only: ' \\t'"),
        (["circle", ""], r"class_names\[1\] is empty"),
        (["circle", None], r"class_names\[1\] must be a string, got NoneType"),
        ({"circle", "square"}, r"class_names must be an ordered list"),
        (["circle", "square", "circle"], r"duplicates .*class_names\[0\]='circle' = class_names\[2\]='circle'"),
        (["Square", "circle", "square "], r"duplicates .*class_names\[0\]='Square' = class_names\[2\]='square '"),
    ]
    for names, message in cases:
        with pytest.raises(ValueError, match=message):
            function(model, image(), names)


def test_texts_of_retrieve_and_fill_mask(model):
    with pytest.raises(ValueError, match=r"texts must be a list of texts, got the string 'a cat'; pass \['a cat'\]"):
        api.retrieve(model, image(), "a cat")
    with pytest.raises(ValueError, match=r"texts is empty"):
        api.retrieve(model, image(), [])
    assert api.retrieve(model, image(), ["a cat", "a cat"])["i2t"].shape == (1, 2)     # repeats are allowed
    with pytest.raises(ValueError, match=r"texts is empty"):
        api.fill_mask(model, [])
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        api.fill_mask(model, ["a <mask>", "  "])
    with pytest.raises(ValueError, match=r"texts\[1\] = 'a square' has no <mask>"):
        api.fill_mask(model, ["a <mask>", "a square"])
    assert len(api.fill_mask(model, "a red <mask>", top_k=2)[0]["candidates"][0]) == 2   # one string = one text


# ------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value", [-1, 0, 2.5, True, "3", None])
def test_top_k_must_be_a_positive_int(model, value):
    with pytest.raises(ValueError, match=r"top_k must be"):
        api.classify(model, image(), NAMES, top_k=value)
    with pytest.raises(ValueError, match=r"top_k must be"):
        api.fill_mask(model, ["a <mask>"], top_k=value)


def test_top_k_above_the_number_of_candidates_returns_them_all(model):
    ranking = api.classify(model, image(), NAMES, top_k=np.int64(10))[0]
    assert sorted(entry["label"] for entry in ranking) == sorted(NAMES)
    assert sum(entry["score"] for entry in ranking) == pytest.approx(1.0, abs=1e-5)


def test_other_numbers_are_checked_by_name(model):
    with pytest.raises(ValueError, match=r"beam_size must be >= 1, got 0"):
        api.caption(model, image(), beam_size=0)
    with pytest.raises(ValueError, match=r"max_length must be a positive int, got float 2.0"):
        api.caption(model, image(), max_length=2.0)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\]"):
            api.detect(model, image(), NAMES, score_threshold=threshold)
    with pytest.raises(ValueError, match=r"max_detections must be >= 1, got 0"):
        api.detect(model, image(), NAMES, max_detections=0)
    with pytest.raises(ValueError, match=r"masks must be one of 'full', 'crop', 'rle', 'none'; got 'box'"):
        api.detect(model, image(), NAMES, masks="box")


# --------------------------------------------------------------------------------------------------- masks
def test_the_mask_formats_hold_the_same_masks(model):
    images = [image(40, 56, seed=0), image(48, 30, seed=1)]
    full = api.detect(model, images, NAMES, max_detections=12)
    crop = api.detect(model, images, NAMES, max_detections=12, masks="crop")
    rle = api.detect(model, images, NAMES, max_detections=12, masks="rle")
    none = api.detect(model, images, NAMES, max_detections=12, masks="none")
    for pixels, f, c, r, n in zip(images, full, crop, rle, none):
        assert f["masks"].shape == (12, *pixels.shape[1:]) and "masks" not in n
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(f[key], c[key]) and torch.equal(f[key], r[key]) and torch.equal(f[key], n[key])
        for k, mask in enumerate(f["masks"]):
            (x, y), cropped = c["masks"][k]["offset"], c["masks"][k]["mask"]
            restored = torch.zeros_like(mask)
            restored[y:y + cropped.shape[0], x:x + cropped.shape[1]] = cropped
            assert torch.equal(restored, mask)
            assert cropped.untyped_storage().nbytes() == cropped.numel()         # not a view of the full mask
            if mask.any():
                assert cropped[0].any() and cropped[-1].any() and cropped[:, 0].any() and cropped[:, -1].any()
            assert r["masks"][k]["size"] == list(mask.shape) and isinstance(r["masks"][k]["counts"], str)
            decoded = mask_utils.decode({"size": r["masks"][k]["size"], "counts": r["masks"][k]["counts"]})
            assert np.array_equal(decoded.astype(bool), mask.numpy())


def test_detect_pastes_only_kept_detections_one_mask_at_a_time_as_pasting_all_at_once_did(model, monkeypatch):
    """The masks equal the former one-call paste of all K masks; postprocess sees one mask per call, once per kept
    proposal (a proposal kept with several classes is pasted once)."""
    pixels, padding_mask, orig_sizes = api.prepare_detection_images(model, [image(40, 56), image(48, 30, seed=1)])
    task = DetectionTask(model.config.tasks.detection, NAMES)
    reference = []
    with torch.no_grad():                                 # the former detect: gather the top K, paste all at once
        encoded = model.encode_images(pixels, padding_mask)
        logits, _ = task.region_logits(model, encoded, NAMES)
        scores = encoded.objectness.sigmoid()[..., None] * logits.softmax(dim=-1)
        count = min(model.config.tasks.detection.max_detections, scores[0].numel())
        top, flat = scores.flatten(1).topk(count, dim=1)
        proposal = flat // len(NAMES)
        index = proposal[..., None, None].expand(-1, -1, *encoded.masks.shape[-2:])
        boxes = torch.gather(encoded.boxes, 1, proposal[..., None].expand(-1, -1, 4))
        reference = postprocess(boxes, torch.gather(encoded.masks, 1, index), encoded.image_sizes, orig_sizes)

    pasted = []

    def recording_postprocess(boxes, masks, *args, **kwargs):
        if masks is not None:
            pasted.append(masks.shape[1])
        return postprocess(boxes, masks, *args, **kwargs)

    monkeypatch.setattr(detection_module, "postprocess", recording_postprocess)
    threshold = float(top[0].median())
    results = task.detect(model, pixels, padding_mask, orig_sizes, NAMES, score_threshold=threshold)
    kept = [int((top[b] >= threshold).sum()) for b in range(2)]
    assert [result["masks"].shape[0] for result in results] == kept and 0 < kept[0] < top.shape[1]
    for b, result in enumerate(results):
        assert torch.equal(result["masks"], reference[b]["masks"][:kept[b]])
        assert torch.equal(result["boxes"], reference[b]["boxes"][:kept[b]])
    distinct = sum(proposal[b][:kept[b]].unique().numel() for b in range(2))
    assert pasted == [1] * distinct and distinct < sum(kept)                   # some proposals have two classes
