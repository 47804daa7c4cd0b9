"""The text encoder f_text (eq. (4)): the embedded MiniLM offline, a small random BERT, the missing-path error."""

import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from uniperceiver_v2.config import TextEncoderConfig
from uniperceiver_v2.modeling.text_encoder import TextEncoder, default_model_path

assert os.environ.get("HF_HUB_OFFLINE") == "1", "tests/conftest.py must set HF_HUB_OFFLINE=1"


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(TextEncoderConfig()).eval()


@pytest.fixture(scope="module")
def small():
    """A 2-layer random BERT of width 32 with the MiniLM tokenizer."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    hf_config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    return TextEncoder.from_hf_config(hf_config, tokenizer, TextEncoderConfig(max_length=16)).eval()


def test_embedded_minilm_loads_offline(minilm):
    batch = minilm.tokenize(["a photo of a cat", "two dogs playing in the snow near a red car"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    with torch.no_grad():
        features = minilm(**batch)
    assert minilm.hidden_size == 384
    assert features.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(features).all()
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()    # padded to the longest


def test_tokenizer_details(minilm):
    assert minilm.tokenize(["word " * 100])["input_ids"].shape[1] == minilm.cfg.max_length
    assert minilm.tokenize(["word " * 100], max_length=8)["input_ids"].shape[1] == 8
    tok = minilm.tokenizer
    assert {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id} <= set(minilm.special_token_ids)
    assert minilm.mask_token_id == tok.convert_tokens_to_ids("[MASK]")
    assert minilm.word_tokens("A tigershark") == ["a", "tigers", "##har", "##k"]
    with pytest.raises(TypeError, match="list of strings"):
        minilm.tokenize("not a list")


def test_missing_path_explains_how_to_supply_it(tmp_path):
    missing = tmp_path / "roberta-base"
    with pytest.raises(FileNotFoundError) as err:
        TextEncoder(TextEncoderConfig(name="roberta-base", path=str(missing)))
    message = str(err.value)
    assert "text_encoder.path" in message and str(missing) in message
    assert "huggingface-cli download roberta-base" in message


def test_random_init_keeps_the_architecture(minilm):
    random = TextEncoder(TextEncoderConfig(pretrained=False))
    pretrained_params = dict(minilm.named_parameters())
    random_params = dict(random.named_parameters())
    assert {n: p.shape for n, p in random_params.items()} == {n: p.shape for n, p in pretrained_params.items()}
    name = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(random_params[name], pretrained_params[name])


def test_padding_does_not_change_features(small):
    texts = ["a cat", "a large brown dog runs across the field"]
    batch = small.tokenize(texts)
    alone = small.tokenize(texts[:1])
    with torch.no_grad():
        batched, single = small(**batch), small(**alone)
    L = alone["input_ids"].shape[1]
    torch.testing.assert_close(batched[0, :L], single[0], rtol=1e-5, atol=1e-5)


def test_encode_tokens_is_each_token_alone(small):
    ids = torch.tensor([1037, 4937, 3899, 2304])
    with torch.no_grad():
        features = small.encode_tokens(ids)
        cls, sep = small.tokenizer.cls_token_id, small.tokenizer.sep_token_id
        for i, token in enumerate(ids.tolist()):
            seq = torch.tensor([[cls, token, sep]])
            torch.testing.assert_close(features[i], small(seq, torch.ones_like(seq))[0, 1], rtol=1e-5, atol=1e-5)
    assert features.shape == (4, 32)


def test_pooler_is_frozen_and_gradients_reach_the_rest(small):
    batch = small.tokenize(["a cat on a mat"])
    small.train()
    small(**batch).sum().backward()
    for name, p in small.named_parameters():
        if ".pooler." in name:
            assert not p.requires_grad
        else:
            assert p.grad is not None, name
    small.zero_grad(set_to_none=True)
    small.eval()


def test_freeze(small):
    tokenizer = small.tokenizer
    frozen = TextEncoder.from_hf_config(small.model.config, tokenizer, TextEncoderConfig(freeze=True))
    frozen.train()
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_default_path_is_the_embedded_package():
    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_frozen_layers_freeze_the_embeddings_and_bottom_layers_only(small):
    """text_encoder.frozen_layers=1 of 2: the embeddings and layer 0 get no gradient and no dropout, layer 1 trains,
    and the output equals the full model's (the freezing changes training, not the function)."""
    hf_config = small.model.config
    part = TextEncoder.from_hf_config(hf_config, small.tokenizer, TextEncoderConfig(max_length=16, frozen_layers=1))
    part.model.load_state_dict(small.model.state_dict())
    part.train()
    assert not part.model.embeddings.training and not part.model.encoder.layer[0].training
    assert part.model.encoder.layer[1].training
    batch = part.tokenize(["a cat on a mat", "two red squares"])
    part(**batch).sum().backward()
    for name, p in part.named_parameters():
        tuned = name.startswith("model.encoder.layer.1.")
        assert p.requires_grad == tuned, name
        assert (p.grad is not None) == tuned, name
    part.eval()
    with torch.no_grad():
        torch.testing.assert_close(part(**batch), small(**batch))


def test_frozen_layers_beyond_the_depth_name_the_key(small):
    with pytest.raises(ValueError, match=r"text_encoder.frozen_layers=3: .* has 2 layers"):
        TextEncoder.from_hf_config(small.model.config, small.tokenizer, TextEncoderConfig(frozen_layers=3))


def test_output_layer_is_the_hidden_state_of_a_model_cut_after_that_layer(small):
    """text_encoder.output_layer=1 of 2: f_text equals the last hidden state of the same model with its second layer
    removed by hand, and the first layer's hidden state of the whole model; output_layer=2 (the last) equals the
    default."""
    batch = small.tokenize(["a cat on a mat", "two red squares"])
    hf_config = small.model.config
    first = TextEncoder.from_hf_config(hf_config, small.tokenizer, TextEncoderConfig(max_length=16, output_layer=1))
    last = TextEncoder.from_hf_config(hf_config, small.tokenizer, TextEncoderConfig(max_length=16, output_layer=2))
    cut = TextEncoder.from_hf_config(hf_config, small.tokenizer, TextEncoderConfig(max_length=16))
    for encoder in (last, cut):
        encoder.model.load_state_dict(small.model.state_dict())
        encoder.eval()
    result = first.model.load_state_dict(small.model.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("encoder.layer.1.") for k in result.unexpected_keys)
    first.eval()
    cut.model.encoder.layer = cut.model.encoder.layer[:1]
    with torch.no_grad():
        torch.testing.assert_close(first(**batch), cut(**batch), rtol=0, atol=0)
        hidden = small.model(**batch, output_hidden_states=True).hidden_states       # embeddings, layer 1, layer 2
        torch.testing.assert_close(first(**batch), hidden[1], rtol=0, atol=0)
        torch.testing.assert_close(last(**batch), small(**batch), rtol=0, atol=0)
        assert not torch.allclose(first(**batch), small(**batch))
    # the layer above the output layer is not run: it is gone, from the module and its state dict
    assert len(first.model.encoder.layer) == 1 and len(last.model.encoder.layer) == 2
    assert not any(name.startswith("model.encoder.layer.1.") for name in first.state_dict())


def test_output_layer_below_the_frozen_layers_names_both_keys(small):
    with pytest.raises(ValueError, match=r"text_encoder.frozen_layers=2 .* text_encoder.output_layer=1"):
        TextEncoder.from_hf_config(small.model.config, small.tokenizer,
                                   TextEncoderConfig(output_layer=1, frozen_layers=2))


@pytest.mark.parametrize("layer", [0, 3])
def test_output_layer_outside_the_model_names_the_key(small, layer):
    with pytest.raises(ValueError, match=rf"text_encoder.output_layer={layer}: .* has layers 1..2"):
        TextEncoder.from_hf_config(small.model.config, small.tokenizer, TextEncoderConfig(output_layer=layer))
