"""Classification: eq. (6)-(7) from the parts, overfitting one batch, zero-shot class lists, the class-name cache."""

import pytest
import torch
import torch.nn.functional as F
from helpers import CLASS_NAMES, classification_samples, overfit, single_thread, tiny_config, tiny_model  # noqa: F401

from uniperceiver_v2.tasks import TASKS
from uniperceiver_v2.tasks.classification import ClassificationTask


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
    cfg = tiny_config(classification={"label_smoothing": 0.0})
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
