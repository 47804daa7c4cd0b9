"""Image-text retrieval: both directions, positives by image id, overfitting one batch."""

import torch
from helpers import CAPTIONS, caption_samples, images, overfit, single_thread, tiny_model  # noqa: F401

from uniperceiver_v2.data.samples import CaptionSample, ImageCaptionsSample
from uniperceiver_v2.tasks.retrieval import RetrievalTask, symmetric_retrieval_loss


def test_loss_equals_the_symmetric_cross_entropy_of_both_directions_with_duplicate_images():
    """Rows 0 and 2 are the same image (same id): each of its captions is a positive for both rows."""
    model = tiny_model().eval()
    task = RetrievalTask(model.config.tasks.retrieval)
    pictures = images(3)
    samples = [CaptionSample(pictures[0], CAPTIONS[0], 7, "a.png"), CaptionSample(pictures[1], CAPTIONS[1], 8, "b.png"),
               CaptionSample(pictures[0], CAPTIONS[2], 7, "a.png")]
    batch = task.collate(samples)
    with torch.no_grad():
        out = task.loss(model, batch)
        embeddings, _ = task.embed(model, batch)
        i2t, t2i = task.logits(model, embeddings)
    positives = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)      # symmetric here
    expected = symmetric_retrieval_loss(i2t, t2i, positives, positives, model.config.tasks.retrieval.label_smoothing)
    torch.testing.assert_close(out["loss_retrieval"], expected["loss_retrieval"])
    assert out["loss"].item() == model.config.tasks.retrieval.loss_weight * (
        out["loss_retrieval"] + out["loss_moe_aux"]).item()


def test_directions_use_their_own_attributes():
    """The image as an i2t query and as a t2i candidate is encoded with different attribute bits (input vs target,
    inputs / targets modalities), so the two representations differ."""
    model = tiny_model().eval()
    task = RetrievalTask(model.config.tasks.retrieval)
    batch = task.collate(caption_samples(2))
    with torch.no_grad():
        queries, candidates, _ = task.embed_images(model, batch.images, batch.padding_mask)
    assert queries.shape == candidates.shape == (2, model.width)
    assert (queries - candidates).abs().max() > 1e-4


def test_loss_is_finite_and_decreases_when_overfitting_one_batch():
    model = tiny_model()
    task = RetrievalTask(model.config.tasks.retrieval)
    batch = task.collate(caption_samples(4))
    out = task.loss(model, batch)
    assert set(out) == {"loss", "loss_retrieval", "loss_i2t", "loss_t2i", "loss_moe_aux"}
    assert torch.isfinite(out["loss"])
    losses = overfit(model, task, batch, steps=25, lr=3e-4)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_predict_returns_both_similarity_matrices_for_images_with_several_captions():
    model = tiny_model().eval()
    task = RetrievalTask(model.config.tasks.retrieval)
    pictures = images(2)
    batch = task.collate([ImageCaptionsSample(pictures[0], CAPTIONS[:2], 1, "a.png"),
                          ImageCaptionsSample(pictures[1], CAPTIONS[2:], 2, "b.png")])
    assert batch.text_image_index.tolist() == [0, 0, 1, 1]
    prediction = task.predict(model, batch)
    assert prediction["i2t"].shape == (2, 4) and prediction["t2i"].shape == (4, 2)
