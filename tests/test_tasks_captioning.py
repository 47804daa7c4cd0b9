"""Captioning: loss, leak-free teacher forcing, teacher forcing == step-by-step decoding, greedy and beam search."""

import itertools
import math

import pytest
import torch
from helpers import CAPTIONS, caption_samples, overfit, single_thread, tiny_model  # noqa: F401

from uniperceiver_v2.tasks.captioning import CaptioningTask
from uniperceiver_v2.tasks.vocabulary import build_vocabulary, end_token_id


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def task(model):
    return CaptioningTask(model.config.tasks.captioning)


@pytest.fixture(scope="module")
def encoded(model, task):
    """Images and tokenised captions of one batch."""
    batch = task.collate(caption_samples(4))
    with torch.no_grad():
        image = model.encode_images(batch.images, batch.padding_mask)
    tokens = model.tokenize(batch.captions)
    return batch, image, tokens["input_ids"], tokens["attention_mask"]


def test_loss_is_finite_and_decreases_when_overfitting_one_batch():
    model = tiny_model()
    task = CaptioningTask(model.config.tasks.captioning)
    batch = task.collate(caption_samples(4))
    out = task.loss(model, batch)
    assert set(out) >= {"loss", "loss_caption", "loss_moe_aux", "loss_uniformity", "accuracy"}   # the tiny preset's
    assert torch.isfinite(out["loss"])
    # eq. (7) weighting: loss = w_k * (caption term + MoE aux + the vocabulary's uniformity term)
    assert out["loss"].item() == pytest.approx(model.config.tasks.captioning.loss_weight * (
        out["loss_caption"] + out["loss_moe_aux"] + out["loss_uniformity"]).item(), rel=1e-6)
    losses = overfit(model, task, batch, steps=30, lr=3e-4)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses


def test_vocabulary_uniformity_adds_its_weighted_term_to_the_captioning_and_mlm_losses():
    """decoder.vocabulary_uniformity = w adds w * (uniformity_loss(the vocabulary's targets) minus its lower bound)
    to both language losses (inside the task's loss weight), so the term is >= 0; 0 adds nothing."""
    from uniperceiver_v2.tasks.losses import uniformity_loss
    from uniperceiver_v2.tasks.mlm import MaskedLanguageModelingTask

    model = tiny_model()
    model.config.decoder.vocabulary_uniformity = 0.5
    model.eval()                          # no gate noise: the targets are the same in the loss and here
    captioning = CaptioningTask(model.config.tasks.captioning)
    mlm = MaskedLanguageModelingTask(model.config.tasks.mlm)
    for task, batch in ((captioning, captioning.collate(caption_samples(2))), (mlm, mlm.collate(CAPTIONS[:4]))):
        torch.manual_seed(0)
        out = task.loss(model, batch)
        vocabulary = model.vocabulary_embeddings(task.name)
        count = vocabulary.shape[0]
        expected = 0.5 * (uniformity_loss(vocabulary) + 2.0 * 2 * count / (count - 1))   # bound: -t 2M/(M-1)
        assert out["loss_uniformity"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out["loss_uniformity"].item() > 0
        terms = sum(value for key, value in out.items() if key.startswith("loss_"))
        assert out["loss"].item() == pytest.approx(task.config.loss_weight * terms.item(), rel=1e-6)
    model.config.decoder.vocabulary_uniformity = 0.0
    assert "loss_uniformity" not in captioning.loss(model, captioning.collate(caption_samples(2)))


def test_teacher_forced_logits_equal_step_by_step_decoding(model, task, encoded):
    batch, image, input_ids, attention_mask = encoded
    with torch.no_grad():
        teacher, targets, _ = task.teacher_forced_logits(model, image, None, input_ids, attention_mask)
        compared = 0
        for t in range(teacher.shape[1]):
            # step t sees the ground-truth prefix x_1..x_t and predicts x_{t+1}
            step = task.next_word_logits(model, image, None, input_ids[:, 1:1 + t])
            valid = attention_mask[:, t + 1].bool()
            torch.testing.assert_close(step[valid], teacher[valid, t], atol=1e-5, rtol=0)
            compared += int(valid.sum())
    assert compared == int(attention_mask[:, 1:].sum())
    # the targets are the next tokens, looked up in the vocabulary
    assert torch.equal(model.vocabulary[targets[attention_mask[:, 1:].bool()]],
                       input_ids[:, 1:][attention_mask[:, 1:].bool()])


def test_predictions_at_position_i_do_not_see_later_words(model, task, encoded):
    batch, image, input_ids, attention_mask = encoded
    cut = 3                                           # logits[:, t] for t < cut depend on x_1..x_t only
    changed = input_ids.clone()
    later = attention_mask.bool() & (torch.arange(input_ids.shape[1]) >= cut)
    changed[later] = model.vocabulary[torch.randint(0, model.vocabulary.numel(), (int(later.sum()),),
                                                    generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(changed, input_ids)
    with torch.no_grad():
        original, _, _ = task.teacher_forced_logits(model, image, None, input_ids, attention_mask)
        modified, _, _ = task.teacher_forced_logits(model, image, None, changed, attention_mask)
        torch.testing.assert_close(modified[:, :cut], original[:, :cut], atol=1e-6, rtol=0)
        assert (modified[:, cut:] - original[:, cut:]).abs().max() > 1e-3   # the later positions did change
        # the control: the bidirectional text encoder would have leaked the later words into x_1
        leaky = model.encode_text_tokens(changed, attention_mask) - model.encode_text_tokens(input_ids, attention_mask)
        causal = (model.encode_text_tokens(changed, attention_mask, causal=True)
                  - model.encode_text_tokens(input_ids, attention_mask, causal=True))
    assert leaky[:, 1].abs().max() > 1e-3
    assert causal[:, :cut].abs().max() < 1e-6


def test_beam_search_with_one_beam_is_greedy(model, task, encoded):
    _, image, _, _ = encoded
    with torch.no_grad():
        greedy = task.greedy(model, image, max_length=6)
        beam = task.beam_search(model, image, beam_size=1, max_length=6)
    for (greedy_tokens, greedy_score), (beam_tokens, beam_score) in zip(greedy, beam):
        assert greedy_tokens == beam_tokens
        assert beam_score == pytest.approx(greedy_score, abs=1e-4)


def test_beam_search_is_exact_when_the_beam_holds_every_prefix():
    """With beam size = |V| and 2 steps the search is exhaustive: compare with brute force over all sequences."""
    texts = ["red circle", "blue square"]
    model = tiny_model(texts=texts).eval()
    task = CaptioningTask(model.config.tasks.captioning)
    vocabulary = model.vocabulary.tolist()
    end = vocabulary.index(end_token_id(model.text_encoder.tokenizer))
    batch = task.collate(caption_samples(2))
    with torch.no_grad():
        image = model.encode_images(batch.images, batch.padding_mask)
        beam = task.beam_search(model, image, beam_size=len(vocabulary), max_length=2)
        for b, (tokens, score) in enumerate(beam):
            first = task.next_word_logits(model, image, torch.tensor([b]), torch.zeros(1, 0, dtype=torch.long))
            first = first.log_softmax(1)[0]
            best_tokens, best_score = None, -math.inf
            for w1, w2 in itertools.product(range(len(vocabulary)), repeat=2):
                if w1 == end:
                    candidate, value = [], first[end].item()
                else:
                    prefix = torch.tensor([[vocabulary[w1]]])
                    second = task.next_word_logits(model, image, torch.tensor([b]), prefix).log_softmax(1)[0]
                    value = first[w1].item() + second[w2].item()
                    candidate = [vocabulary[w1]] + ([] if w2 == end else [vocabulary[w2]])
                if value > best_score:
                    best_tokens, best_score = candidate, value
            assert tokens == best_tokens
            assert score == pytest.approx(best_score, abs=1e-4)


def test_all_beams_of_one_step_are_every_first_word_by_its_log_probability():
    """beam_size = |V|, one step: the beams are all |V| one-word captions, ranked by log p(w | image)."""
    model = tiny_model(texts=["red circle", "blue square"]).eval()
    task = CaptioningTask(model.config.tasks.captioning)
    vocabulary = model.vocabulary.tolist()
    end = end_token_id(model.text_encoder.tokenizer)
    batch = task.collate(caption_samples(2))
    with torch.no_grad():
        image = model.encode_images(batch.images, batch.padding_mask)
        beams = task.beam_search(model, image, beam_size=len(vocabulary), max_length=1, all_beams=True)
        results = task.generate(model, batch.images, batch.padding_mask, beam_size=len(vocabulary), max_length=1,
                                all_beams=True)
        for b, per_image in enumerate(beams):
            first = task.next_word_logits(model, image, torch.tensor([b]), torch.zeros(1, 0, dtype=torch.long))
            expected = sorted(((([] if w == end else [w]), value) for w, value in
                               zip(vocabulary, first.log_softmax(1)[0].tolist())), key=lambda item: -item[1])
            assert [tokens for tokens, _ in per_image] == [tokens for tokens, _ in expected]
            assert [score for _, score in per_image] == pytest.approx([score for _, score in expected], abs=1e-4)
            assert [beam["token_ids"] for beam in results[b]["beams"]] == [tokens for tokens, _ in per_image]
            assert results[b]["beams"][0]["score"] == results[b]["score"]


def test_generate_stops_at_the_end_token_and_respects_max_length(model, task, encoded):
    batch, _, _, _ = encoded
    end = end_token_id(model.text_encoder.tokenizer)
    images, padding_mask = batch.images[:2], batch.padding_mask[:2]
    for beam_size in (1, 2):
        results = task.generate(model, images, padding_mask, beam_size=beam_size, max_length=4)
        assert len(results) == 2
        for result in results:
            assert set(result) == {"caption", "token_ids", "score"}
            assert len(result["token_ids"]) <= 4 and end not in result["token_ids"]
            assert set(result["token_ids"]) <= set(model.vocabulary.tolist())
            assert isinstance(result["caption"], str) and math.isfinite(result["score"])


def test_decoding_stops_at_the_end_token(model, task, encoded, monkeypatch):
    """With next-word logits that spell "circle square <end>", both decoders return exactly that and stop."""
    _, image, _, _ = encoded
    tokenizer = model.text_encoder.tokenizer
    vocabulary = model.vocabulary.tolist()
    script = [vocabulary.index(tokenizer.convert_tokens_to_ids(word)) for word in ("circle", "square")]
    script.append(vocabulary.index(end_token_id(tokenizer)))
    calls = []

    def scripted(model, image, rows, generated):
        calls.append(generated.shape[1])
        logits = torch.zeros(generated.shape[0], len(vocabulary))
        logits[:, script[min(generated.shape[1], len(script) - 1)]] = 10.0
        return logits

    monkeypatch.setattr(task, "next_word_logits", scripted)
    for decode in (lambda: task.greedy(model, image, max_length=10),
                   lambda: task.beam_search(model, image, beam_size=2, max_length=10)):
        calls.clear()
        for tokens, _ in decode():
            assert tokens == [vocabulary[script[0]], vocabulary[script[1]]]
        assert calls == [0, 1, 2]                   # three steps, then every hypothesis had ended


def test_vocabulary_is_saved_with_the_weights(model):
    state = model.state_dict()
    assert torch.equal(state["vocabulary"], build_vocabulary(model.text_encoder.tokenizer, CAPTIONS))
