"""The public inference API on the real embedded MiniLM text encoder: structure of every result, checkpoints."""

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import CAPTIONS, single_thread  # noqa: F401
from PIL import Image

from uniperceiver_v2 import api
from uniperceiver_v2.engine.checkpoint import save_checkpoint
from uniperceiver_v2.tasks.vocabulary import build_vocabulary


def pil_images():
    """Three PIL images of different sizes and modes."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)),             # RGB 80 x 50
            Image.fromarray(rng.integers(0, 255, (90, 40), dtype=np.uint8)),                # grayscale 40 x 90
            Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA")]     # with alpha


@pytest.fixture(scope="module")
def model():
    model = api.build_model("tiny")
    # the default vocabulary is every MiniLM token (~30k), too many to encode quickly on a CPU
    model.set_vocabulary(build_vocabulary(model.text_encoder.tokenizer, CAPTIONS))
    return model


def test_build_model_gives_an_eval_model_with_the_embedded_text_encoder(model):
    assert not model.training
    assert model.text_encoder.hidden_size == 384 and model.config.preset == "tiny"


def test_classify_returns_top_k_labels_for_unseen_class_names(model):
    names = ["tiger shark", "hot-air balloon", "espresso"]
    images = pil_images() + [torch.randint(0, 255, (3, 30, 70), dtype=torch.uint8)]
    results = api.classify(model, images, names, top_k=2)
    assert len(results) == 4
    for ranking in results:
        assert [set(entry) for entry in ranking] == [{"label", "index", "score"}] * 2
        assert all(names[entry["index"]] == entry["label"] for entry in ranking)
        assert ranking[0]["score"] >= ranking[1]["score"] and 0 < sum(e["score"] for e in ranking) <= 1 + 1e-6
    assert api.classify(model, pil_images()[0], names, top_k=10)[0][0]["label"] in names       # one image, k > C


def test_detect_returns_boxes_and_masks_on_each_input_image(model):
    images = pil_images()
    results = api.detect(model, images, ["zebra", "umbrella"], score_threshold=0.0)
    for image, result in zip(images, results):
        width, height = image.size
        count = result["boxes"].shape[0]
        assert count > 0 and set(result) == {"boxes", "scores", "labels", "names", "masks"}
        assert result["scores"].shape == (count,) and result["labels"].shape == (count,)
        assert result["masks"].shape == (count, height, width) and result["masks"].dtype == torch.bool
        assert (result["boxes"] >= 0).all()
        assert (result["boxes"][:, [0, 2]] <= width + 1e-3).all()
        assert (result["boxes"][:, [1, 3]] <= height + 1e-3).all()
        assert result["names"] == [["zebra", "umbrella"][c] for c in result["labels"].tolist()]
    threshold = float(results[0]["scores"].median())
    kept = api.detect(model, images[:1], ["zebra", "umbrella"], score_threshold=threshold)[0]
    assert 0 < kept["scores"].shape[0] < results[0]["scores"].shape[0] and (kept["scores"] >= threshold).all()


def test_detect_returns_compact_masks_that_restore_the_full_ones(model):
    """``masks="rle"`` is COCO's JSON-ready encoding, ``"crop"`` the mask's own rectangle; both restore ``"full"``."""
    import json

    import pycocotools.mask as mask_utils

    image = pil_images()[0]
    full, crop, rle = (api.detect(model, image, ["zebra"], max_detections=5, masks=option)[0]
                       for option in ("full", "crop", "rle"))
    records = json.loads(json.dumps([{"bbox": box, "segmentation": mask}
                                     for box, mask in zip(rle["boxes"].tolist(), rle["masks"])]))
    for k, record in enumerate(records):
        decoded = torch.from_numpy(mask_utils.decode(record["segmentation"])).bool()
        (x, y), cropped = crop["masks"][k]["offset"], crop["masks"][k]["mask"]
        restored = torch.zeros_like(full["masks"][k])
        restored[y:y + cropped.shape[0], x:x + cropped.shape[1]] = cropped
        assert torch.equal(decoded, full["masks"][k]) and torch.equal(restored, full["masks"][k])


def test_input_mistakes_that_used_to_give_garbage_raise_value_errors(model):
    with pytest.raises(ValueError, match=r"class_names must be a list of texts, got the string 'cat'; pass \['cat'\]"):
        api.classify(model, pil_images()[0], "cat")
    with pytest.raises(ValueError, match=r"duplicates .*class_names\[0\]='cat' = class_names\[1\]='Cat'"):
        api.classify(model, pil_images()[0], ["cat", "Cat"])
    with pytest.raises(ValueError, match=r"images\[0\]: expected values in \[0, 1\]; got max 255.0"):
        api.classify(model, torch.full((3, 8, 8), 255.0), ["cat", "dog"])
    with pytest.raises(ValueError, match=r"top_k must be >= 1, got -1"):
        api.classify(model, pil_images()[0], ["cat", "dog"], top_k=-1)


def test_caption_retrieve_and_fill_mask(model):
    images = pil_images()[:2]
    captions = api.caption(model, images, beam_size=2, max_length=4)
    assert [set(c) for c in captions] == [{"caption", "token_ids", "score"}] * 2
    assert all(isinstance(c["caption"], str) and len(c["token_ids"]) <= 4 for c in captions)

    texts = ["a red circle", "two green triangles", "a star"]
    scores = api.retrieve(model, images, texts)
    assert scores["i2t"].shape == (2, 3) and scores["t2i"].shape == (3, 2)
    assert torch.equal(scores["i2t_ranking"][:, 0], scores["i2t"].argmax(1))

    filled = api.fill_mask(model, ["a <mask> circle above a <mask> square", "two <mask>"], top_k=3)
    assert [len(f["tokens"]) for f in filled] == [2, 1]
    assert all(len(candidates) == 3 for f in filled for candidates in f["candidates"])
    assert filled[1]["text"].startswith("two ") and "[MASK]" not in filled[0]["text"]
    with pytest.raises(ValueError, match="has no <mask>"):
        api.fill_mask(model, ["no mask here"])


def test_api_calls_restore_the_training_mode(model):
    model.train()
    api.classify(model, pil_images()[:1], ["a", "b"])
    assert model.training
    model.eval()


def test_bad_images_are_reported_by_position(model):
    with pytest.raises(ValueError, match=r"images\[1\]"):
        api.classify(model, [pil_images()[0], torch.zeros(4, 8, 8)], ["a"])


def test_build_model_from_a_safetensors_file_and_from_a_checkpoint_folder(model, tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_model(model, str(path))
    loaded = api.build_model("tiny", checkpoint=path)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name

    folder = save_checkpoint(tmp_path / "run", 5, model, optimizer=None, config=model.config)
    from_folder = api.build_model(None, checkpoint=tmp_path / "run")          # config read from meta.json
    assert from_folder.config.to_dict() == model.config.to_dict()
    for (name, a), (_, b) in zip(from_folder.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert folder.name == "iter_0000005"
    with pytest.raises(ValueError, match="safetensors"):
        api.build_model("tiny", checkpoint=tmp_path / "run" / "iter_0000005" / "training_state.pt")


def test_a_checkpoint_does_not_need_the_backbone_weights_its_run_started_from(model, tmp_path, monkeypatch):
    """A run trained with image_encoder.backbone_weights=RELATIVE/PATH is evaluated from another folder (notebook 07
    runs in notebooks/): the checkpoint holds the backbone's weights, so that file is not needed, and the config
    still records it."""
    config = model.config.to_dict()
    config["image_encoder"]["backbone_weights"] = "runs/elsewhere/backbone.safetensors"     # no such file
    from uniperceiver_v2.config import config_from_dict

    save_checkpoint(tmp_path / "run", 7, model, optimizer=None, config=config_from_dict(config))
    monkeypatch.chdir(tmp_path)
    loaded = api.build_model(None, checkpoint=tmp_path / "run")
    assert loaded.config.image_encoder.backbone_weights == "runs/elsewhere/backbone.safetensors"
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="backbone_weights: file runs/elsewhere"):   # without a checkpoint
        api.build_model(config_from_dict(config))


def test_build_model_from_a_training_run_folder(model, tmp_path):
    """The trainer keeps checkpoints in <output_dir>/checkpoints; the run folder itself is accepted."""
    save_checkpoint(tmp_path / "run" / "checkpoints", 3, model, optimizer=None, config=model.config)
    from_run = api.build_model(None, checkpoint=tmp_path / "run")
    for (name, a), (_, b) in zip(from_run.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_whole_images_are_prepared_as_each_tasks_evaluation_dataset_prepares_them(model, tmp_path):
    """Classification: the central 87.5 %; captioning / retrieval: the whole image (a caption may describe a corner),
    with the function ``build_task_dataset(..., train=False)`` uses for the same task."""
    from uniperceiver_v2.data.images import read_image
    from uniperceiver_v2.data.transforms import WHOLE_IMAGE_CROP, whole_image_eval_transform

    pixels = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path)
    size = model.config.data.image_size
    image = read_image(path)
    for task in ("classification", "captioning", "retrieval"):
        prepared, padding = api.prepare_whole_images(model, [Image.open(path)], task)
        assert prepared.shape == (1, 3, size, size) and not padding.any()
        torch.testing.assert_close(prepared[0], whole_image_eval_transform(task, size)(image))
    assert WHOLE_IMAGE_CROP == {"classification": 0.875, "captioning": 1.0, "retrieval": 1.0}
    cropped, _ = api.prepare_whole_images(model, [Image.open(path)], "classification")
    whole, _ = api.prepare_whole_images(model, [Image.open(path)], "retrieval")
    assert not torch.allclose(cropped, whole)
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        whole_image_eval_transform("detection", size)
