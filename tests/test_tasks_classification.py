"""Classification: eq. (6)-(7) from the parts, overfitting one batch, zero-shot class lists, the class-name cache."""

import pytest
import torch
import torch.nn.functional as F
from helpers import CLASS_NAMES, classification_samples, overfit, single_thread, tiny_config, tiny_model  # noqa: F401

from uniperceiver_v2.tasks import TASKS
from uniperceiver_v2.tasks.classification import ClassificationTask, region_label_loss, regional_only
from uniperceiver_v2.tasks.detection import region_logits


def test_registry_builds_from_a_dataset():
    class Dataset:
        class_names = ["cat", "dog"]

    task = TASKS["classification"].from_dataset(tiny_config().tasks.classification, Dataset())
    assert isinstance(task, ClassificationTask) and task.class_names == ("cat", "dog")


def test_logits_are_scaled_cosines_of_the_spe_outputs():
    model = tiny_model().eval()
    task = ClassificationTask(model.config.tasks.classification, CLASS_NAMES)
    batch = task.collate(classification_samples(3))
    with torch.no_grad():
        logits, _ = task.logits(model, batch)
        image = model.encode_images(batch.images, batch.padding_mask)
        x, _ = model.image_representations(image, "classification", is_input=True)
        y, _ = model.text_representations(CLASS_NAMES, "classification", is_input=False)
    expected = (1 / 0.07) * F.normalize(x.double(), dim=1) @ F.normalize(y.double(), dim=1).t()
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-5)


def test_loss_is_finite_and_reaches_near_zero_on_one_batch():
    cfg = tiny_config(classification={"label_smoothing": 0.0, "region_name_weight": 0.0})
    model = tiny_model(cfg)
    task = ClassificationTask(cfg.tasks.classification, CLASS_NAMES)
    batch = task.collate(classification_samples(4))
    first = task.loss(model, batch)
    assert set(first) == {"loss", "loss_cls", "loss_moe_aux", "accuracy"} and torch.isfinite(first["loss"])
    losses = overfit(model, task, batch, steps=60, lr=3e-4)
    final = task.loss(model.train(), batch)
    assert final["loss"].item() < 0.05, losses
    assert final["accuracy"].item() == 1.0


def test_zero_shot_class_names_never_seen_in_training():
    model = tiny_model().eval()
    unseen = ["tiger shark", "hot-air balloon", "espresso", "lighthouse", "kite"]
    task = ClassificationTask(model.config.tasks.classification, unseen)
    batch = task.collate(classification_samples(2))
    prediction = task.predict(model, batch, top_k=3)
    assert prediction["labels"].shape == (2, 3) and prediction["logits"].shape == (2, 5)
    assert int(prediction["labels"].max()) < len(unseen)
    torch.testing.assert_close(prediction["scores"], prediction["logits"].softmax(1).topk(3, dim=1).values)


def test_class_name_embeddings_are_cached_in_eval_and_recomputed_in_training():
    model = tiny_model()
    model.eval()
    first = model.class_name_embeddings(CLASS_NAMES, "classification")
    assert model.class_name_embeddings(CLASS_NAMES, "classification") is first          # cached
    assert not first.requires_grad
    other = model.class_name_embeddings(CLASS_NAMES[:2], "classification")             # a new list, a new entry
    torch.testing.assert_close(other, first[:2], atol=1e-5, rtol=0)
    model.train()
    fresh = model.class_name_embeddings(CLASS_NAMES, "classification")
    assert fresh.requires_grad and fresh is not first
    with torch.no_grad():
        model.decoder.spe_token.add_(1.0)                                               # the weights change ...
    model.eval()                                                                        # ... and eval() clears
    assert not torch.allclose(model.class_name_embeddings(CLASS_NAMES, "classification"), first)


def test_collate_rejects_labels_beyond_the_class_list():
    task = ClassificationTask(tiny_config().tasks.classification, CLASS_NAMES[:2])
    with pytest.raises(ValueError, match="label 3"):
        task.collate(classification_samples(4))


def _region_label_loss_float64(logits, objectness, labels):
    """The multiple-instance naming loss written out image by image and proposal by proposal."""
    total = 0.0
    for b in range(logits.shape[0]):
        weights = torch.softmax(objectness[b].double(), dim=0)
        mixture = sum(weights[j] * torch.softmax(logits[b, j].double(), dim=0)[labels[b]]
                      for j in range(logits.shape[1]))
        total = total - torch.log(mixture)
    return total / logits.shape[0]


def test_region_label_loss_matches_the_mixture_written_out_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64) * 3
    objectness = torch.randn(3, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.tensor([0, 3, 1])
    torch.testing.assert_close(region_label_loss(logits, objectness, labels).double(),
                               _region_label_loss_float64(logits, objectness, labels), atol=1e-6, rtol=1e-6)
    # float64 in, float32 inside: gradcheck on the written-out form, and the two gradients agree
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _region_label_loss_float64(x, objectness, labels), (logits,))
    grad, = torch.autograd.grad(region_label_loss(logits, objectness, labels), logits)
    grad_ref, = torch.autograd.grad(_region_label_loss_float64(logits, objectness, labels), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)
    # one certain proposal: the loss is that proposal's cross-entropy; the objectness gets no gradient
    certain = torch.full((3, 5), -1e4, dtype=torch.float64)
    certain[:, 2] = 0
    torch.testing.assert_close(region_label_loss(logits, certain, labels).double(),
                               F.cross_entropy(logits[:, 2].detach(), labels), atol=1e-6, rtol=1e-6)
    objectness.requires_grad_(True)
    region_label_loss(logits, objectness, labels).backward()
    assert objectness.grad is None


def test_region_label_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="region_label_loss"):
        region_label_loss(torch.zeros(2, 5, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_region_naming_term_names_the_proposals_through_the_detection_path():
    cfg = tiny_config(classification={"label_smoothing": 0.0, "region_name_weight": 0.5})
    model = tiny_model(cfg).eval()
    task = ClassificationTask(cfg.tasks.classification, CLASS_NAMES)
    batch = task.collate(classification_samples(4))
    with torch.no_grad():
        terms = task.loss(model, batch)
        image = model.encode_images(batch.images, batch.padding_mask)
        names, _ = region_logits(model, regional_only(image), CLASS_NAMES)
        with_global, _ = region_logits(model, image, CLASS_NAMES)
    # the global tokens are left out of this term's sequence: its names differ from detection's full sequence's
    assert not torch.allclose(names, with_global, atol=1e-3)
    kept = regional_only(image)
    assert kept.tokens.shape[1] == image.boxes.shape[1] and bool((kept.token_types == 2).all())
    assert set(terms) == {"loss", "loss_cls", "loss_moe_aux", "loss_region_name", "accuracy", "region_accuracy"}
    torch.testing.assert_close(terms["loss_region_name"],
                               _region_label_loss_float64(names, image.objectness, batch.labels).float(),
                               atol=1e-4, rtol=1e-4)
    expected = terms["loss_cls"] + terms["loss_moe_aux"] + 0.5 * terms["loss_region_name"]
    torch.testing.assert_close(terms["loss"], cfg.tasks.classification.loss_weight * expected)


def test_region_naming_term_teaches_the_detector_the_image_labels():
    cfg = tiny_config(classification={"label_smoothing": 0.0, "region_name_weight": 1.0})
    model = tiny_model(cfg)
    task = ClassificationTask(cfg.tasks.classification, CLASS_NAMES)
    batch = task.collate(classification_samples(4))
    first = task.loss(model, batch)["loss_region_name"].item()
    overfit(model, task, batch, steps=60, lr=3e-4)
    final = task.loss(model.train(), batch)
    assert final["loss_region_name"].item() < 0.25 * first, (first, final["loss_region_name"].item())
    assert final["region_accuracy"].item() == 1.0


def test_region_naming_weight_is_checked():
    from uniperceiver_v2.config import ConfigError, validate

    with pytest.raises(ConfigError, match="tasks.classification.region_name_weight"):
        validate(tiny_config(classification={"region_name_weight": -1.0}))
