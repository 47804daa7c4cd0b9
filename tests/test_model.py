"""UniPerceiverV2: temperatures, causal text features, the vocabulary buffer, saving and loading."""

import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from helpers import CAPTIONS, CLASS_NAMES, classification_samples, single_thread, tiny_model, tokenizer  # noqa: F401

from uniperceiver_v2.model import LOGIT_SCALE_GROUPS
from uniperceiver_v2.tasks.classification import ClassificationTask
from uniperceiver_v2.tasks.vocabulary import build_vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def test_one_logit_scale_per_task_group_initialised_to_1_over_007_and_clipped_at_100():
    model = tiny_model()
    assert set(model.logit_scales) == set(LOGIT_SCALE_GROUPS)
    for task in ("classification", "detection", "captioning", "mlm", "retrieval_i2t", "retrieval_t2i"):
        assert model.logit_scale(task).item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scales["retrieval"].log_scale.fill_(math.log(1000.0))
    assert model.logit_scale("retrieval_t2i").item() == pytest.approx(100.0)      # both directions share it
    assert model.logit_scale("mlm").item() == pytest.approx(1 / 0.07, rel=1e-6)   # the others do not move
    a, b = torch.randn(3, model.width), torch.randn(4, model.width)
    expected = 100.0 * F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    torch.testing.assert_close(model.similarity(a, b, "retrieval_i2t"), expected)
    with pytest.raises(ValueError, match="no logit scale"):
        model.logit_scale("segmentation")


def test_each_task_trains_its_own_temperature():
    model = tiny_model()
    a, b = torch.randn(3, model.width), torch.randn(4, model.width)
    model.similarity(a, b, "captioning").logsumexp(1).sum().backward()
    grads = {group: scale.log_scale.grad for group, scale in model.logit_scales.items()}
    assert grads["captioning"] is not None and grads["captioning"].abs() > 0
    assert all(grads[group] is None for group in LOGIT_SCALE_GROUPS if group != "captioning")


def test_causal_text_features_equal_features_of_the_prefix_alone(model):
    tokens = model.tokenize(CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        full = model.encode_text_tokens(ids, mask, causal=True)
        for length in (1, 3, 5):
            prefix = model.encode_text_tokens(ids[:, :length], mask[:, :length], causal=True)
            torch.testing.assert_close(full[:, :length], prefix, atol=1e-5, rtol=0)
        bidirectional = model.encode_text_tokens(ids[:, :3], mask[:, :3])
    assert (bidirectional - full[:, :3]).abs().max() > 1e-3


def test_set_vocabulary_validates_and_clears_the_cache(model):
    before = model.vocabulary.clone()
    model.vocabulary_embeddings("mlm")
    assert model._target_cache
    model.set_vocabulary(torch.tensor([1037, 2417, 102]))
    assert not model._target_cache and model.vocabulary.tolist() == [1037, 2417, 102]
    for bad, message in ((torch.tensor([5, 5]), "unique"), (torch.tensor([10**6]), "token ids"),
                         (torch.tensor([], dtype=torch.long), "empty")):
        with pytest.raises(ValueError, match=message):
            model.set_vocabulary(bad)
    model.set_vocabulary(before)


def test_state_dict_round_trip_through_safetensors_restores_the_vocabulary(tmp_path):
    trained = tiny_model(seed=1, texts=CAPTIONS[:2])
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(trained, str(path))
    fresh = tiny_model(seed=2)                                    # another init and a longer vocabulary
    assert fresh.vocabulary.numel() != trained.vocabulary.numel()
    safetensors.torch.load_model(fresh, str(path), strict=True)   # what engine.checkpoint.load_checkpoint calls
    assert torch.equal(fresh.vocabulary, build_vocabulary(tokenizer(), CAPTIONS[:2]))
    for (name, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_caches_candidates_until_the_mode_changes(model):
    model.eval()
    first = model.vocabulary_embeddings("captioning")
    assert model.vocabulary_embeddings("captioning") is first
    model.eval()                                                  # no mode change: the cache stays
    assert model.vocabulary_embeddings("captioning") is first
    assert model.vocabulary_embeddings("mlm") is not first        # per task: the attributes differ
    model.train()
    assert not model._target_cache
    model.eval()


def test_forward_is_the_task_loss(model):
    task = ClassificationTask(model.config.tasks.classification, CLASS_NAMES)
    batch = task.collate(classification_samples(2))
    with torch.no_grad():
        assert model(task, batch)["loss"].item() == task.loss(model, batch)["loss"].item()
