"""Masked language modelling: the masking draw, no leak of the masked word, loss and accuracy."""

import pytest
import torch
from helpers import CAPTIONS, overfit, single_thread, tiny_model  # noqa: F401

from uniperceiver_v2.modeling.attributes import MODALITY_IDS
from uniperceiver_v2.modeling.unified_decoder import TOKEN_TYPES
from uniperceiver_v2.tasks.mlm import MaskedLanguageModelingTask, choose_masked_positions, sentence_draws


def test_masking_draw_rate_special_tokens_and_at_least_one_word():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (400, 30), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102                     # [CLS] ... [SEP]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:200, 20:] = 0                                    # padding
    masked = choose_masked_positions(input_ids, attention_mask, [101, 102], 0.15, generator)
    assert not masked[:, 0].any() and not masked[:, -1].any() and not masked[:200, 20:].any()
    assert masked.any(dim=1).all()
    rate = masked.sum().item() / (attention_mask[:, 1:-1].sum().item() - 200)
    assert 0.13 < rate < 0.17
    # a single-word sentence is still masked, once
    one = choose_masked_positions(torch.tensor([[101, 1500, 102]]), torch.ones(1, 3, dtype=torch.long),
                                  [101, 102], 0.15, torch.Generator().manual_seed(1))
    assert one.tolist() == [[False, True, False]]


@pytest.mark.parametrize("masked_input", ["spe", "encoder"])
def test_masked_positions_see_spe_and_not_the_hidden_word(masked_input):
    model = tiny_model().eval()
    model.config.tasks.mlm.masked_input = masked_input
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    tokens = model.tokenize(CAPTIONS[:2])
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    masked = torch.zeros_like(input_ids, dtype=torch.bool)
    masked[0, 2], masked[1, 3] = True, True
    swapped = input_ids.clone()
    swapped[masked] = model.vocabulary[:2]                           # different hidden words ...
    with torch.no_grad():
        a, _ = task.masked_representations(model, input_ids, attention_mask, masked)
        b, _ = task.masked_representations(model, swapped, attention_mask, masked)
    torch.testing.assert_close(a, b, atol=0, rtol=0)                 # ... give identical outputs


def test_mlm_uses_spe_modality_at_masked_positions(monkeypatch):
    model = tiny_model().eval()
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    seen = {}
    original = model.decoder.forward

    def spy(x, **kwargs):
        seen.update(kwargs)
        return original(x, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", spy)
    tokens = model.tokenize(CAPTIONS[:1])
    masked = torch.zeros_like(tokens["input_ids"], dtype=torch.bool)
    masked[0, 2] = True
    with torch.no_grad():
        task.masked_representations(model, tokens["input_ids"], tokens["attention_mask"], masked)
    modality = seen["modality_ids"][0]
    assert modality[0] == MODALITY_IDS["spe"] and modality[3] == MODALITY_IDS["spe"]     # leading and masked
    assert (modality[1:3] == MODALITY_IDS["text"]).all() and (modality[4:] == MODALITY_IDS["text"]).all()


@pytest.mark.parametrize("masked_input", ["spe", "encoder"])
def test_decoder_input_at_a_masked_word(monkeypatch, masked_input):
    """What the decoder reads at a masked word, rebuilt from the embeddings' parts: <SPE> + type + the word's position,
    plus, with ``masked_input="encoder"``, the projected text-encoder feature of the mask token in its sentence."""
    model = tiny_model().eval()
    model.config.tasks.mlm.masked_input = masked_input
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    seen = {}
    original = model.decoder.forward

    def spy(x, **kwargs):
        seen["x"] = x
        return original(x, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", spy)
    tokens = model.tokenize(CAPTIONS[:1])
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    masked = torch.zeros_like(input_ids, dtype=torch.bool)
    masked[0, 2] = True
    with torch.no_grad():
        task.masked_representations(model, input_ids, attention_mask, masked)
        decoder = model.decoder
        expected = (decoder.spe_token + decoder.type_embed.weight[TOKEN_TYPES["spe"]]
                    + decoder.pos_embed.weight[2])
        features = model.encode_text_tokens(input_ids.masked_fill(masked, model.text_encoder.mask_token_id),
                                            attention_mask)
        if masked_input == "encoder":
            expected = expected + decoder.text_norm(decoder.text_proj(features[0, 2]))
        unmasked = decoder.embed_text(features)[0, 3]
    x = seen["x"][0, 1:]                                             # after the leading <SPE>
    torch.testing.assert_close(x[2], expected)
    torch.testing.assert_close(x[3], unmasked)                       # the other words: f_text as usual


def test_loss_is_finite_and_decreases_with_a_fixed_mask():
    model = tiny_model()
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    batch = task.collate(CAPTIONS)
    out = task.loss(model, batch)
    assert set(out) == {"loss", "loss_mlm", "loss_moe_aux", "loss_uniformity", "accuracy"}   # the tiny preset's
    assert torch.isfinite(out["loss"])
    model.config.decoder.vocabulary_uniformity = 0.0    # below: the MLM term alone (the targets move with the weights)

    class FixedMask:                       # the same masked positions at every step: a truly fixed batch
        def loss(self, model, batch):
            torch.manual_seed(0)
            return task.loss(model, batch)

    losses = overfit(model, FixedMask(), batch, steps=30, lr=3e-4)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_predict_masks_reproducibly_and_reports_accuracy():
    model = tiny_model().eval()
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    batch = task.collate(CAPTIONS)
    first, second = task.predict(model, batch), task.predict(model, batch)
    assert torch.equal(first["target"], second["target"]) and torch.equal(first["predicted"], second["predicted"])
    assert first["accuracy"].item() == (first["predicted"] == first["target"]).float().mean().item()


def test_predict_masks_a_sentence_the_same_way_in_any_batch():
    model = tiny_model().eval()
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    alone = task.predict(model, task.collate([CAPTIONS[1]]))
    # another sentence before it and a much longer one padding the batch
    longer = CAPTIONS[0] + " and " + CAPTIONS[2] + " next to " + CAPTIONS[3]
    mixed = task.predict(model, task.collate([CAPTIONS[0], CAPTIONS[1], longer]))
    tokens = model.tokenize([CAPTIONS[0], CAPTIONS[1], longer])
    draws = sentence_draws([CAPTIONS[0], CAPTIONS[1], longer], tokens["input_ids"].shape[1], 0)
    masked = choose_masked_positions(tokens["input_ids"], tokens["attention_mask"],
                                     model.text_encoder.special_token_ids, task.config.mask_prob, draws=draws)
    first = int(masked[0].sum())
    second = int(masked[1].sum())
    # the second sentence's masked tokens are the same as when it is evaluated alone
    assert torch.equal(mixed["target"][first:first + second], alone["target"])
    # and its row of draws is the prefix of its own stream, whatever the padded length
    short = sentence_draws([CAPTIONS[1]], 8, 0)
    torch.testing.assert_close(draws[1, :8], short[0], rtol=0, atol=0)
