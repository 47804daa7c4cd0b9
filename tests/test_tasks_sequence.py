"""The sequence builder (segments -> decoder inputs) and the vocabulary helpers."""

import pytest
import torch
from helpers import CAPTIONS, tiny_config, tokenizer

from uniperceiver_v2.modeling.attributes import MODALITY_IDS, TASK_IDS, task_token_attributes
from uniperceiver_v2.modeling.decoder_inputs import (
    Segment,
    build_sequence,
    image_segment,
    image_token_types,
    spe_segment,
    text_segment,
)
from uniperceiver_v2.modeling.unified_decoder import TOKEN_TYPES, UnifiedDecoder
from uniperceiver_v2.tasks.losses import IGNORE_INDEX
from uniperceiver_v2.tasks.vocabulary import (
    build_vocabulary,
    encode_sharded,
    end_token_id,
    full_vocabulary,
    start_token_id,
    vocabulary_lookup,
)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return UnifiedDecoder(tiny_config().decoder, image_dim=16, text_dim=8)


def test_build_sequence_concatenates_segments_with_their_conditions(decoder):
    B = 2
    image_tokens = torch.randn(B, 5, 16)
    encoder_types = torch.tensor([0, 0, 1, 2, 2]).expand(B, 5)
    image_padding = torch.zeros(B, 5, dtype=torch.bool)
    image_padding[1, 2] = True
    words = torch.randn(B, 3, 8)
    word_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    segments = [spe_segment(decoder, B), image_segment(decoder, image_tokens, encoder_types, image_padding),
                text_segment(decoder, words, word_mask, causal=True)]
    inputs = build_sequence(segments, "captioning", is_input=True)

    assert inputs.x.shape == (B, 9, decoder.width) and inputs.offsets == [0, 1, 6]
    torch.testing.assert_close(inputs.x[:, 1:6], decoder.embed_image(image_tokens, image_token_types(encoder_types)))
    torch.testing.assert_close(inputs.x[:, 6:], decoder.embed_text(words))
    assert inputs.key_padding_mask.tolist() == [[False] * 9, [False, False, False, True] + [False] * 4 + [True]]
    expected_modality = torch.tensor([0] + [MODALITY_IDS["image"]] * 5 + [MODALITY_IDS["text"]] * 3)
    assert torch.equal(inputs.modality_ids, expected_modality.expand(B, 9))
    causal = torch.tensor([False] * 6 + [True] * 3)
    torch.testing.assert_close(inputs.attributes,
                               task_token_attributes("captioning", inputs.modality_ids, causal, True))
    assert inputs.task_id.tolist() == [TASK_IDS["captioning"]] * B and inputs.attn_mask is None


def test_target_sequences_have_the_target_attribute_bit(decoder):
    segments = [spe_segment(decoder, 3), text_segment(decoder, torch.randn(3, 4, 8), torch.ones(3, 4))]
    inputs = build_sequence(segments, "classification", is_input=False)
    assert (inputs.attributes[..., 7] == 0).all()                     # bit 7: from the inputs
    assert (inputs.attributes[..., 3] == 1).all()                     # bit 3: text in the targets


def test_image_token_types_map_global_and_regional():
    mapped = image_token_types(torch.tensor([0, 1, 2, 2]))
    assert mapped.tolist() == [TOKEN_TYPES["image_global"]] * 2 + [TOKEN_TYPES["image_regional"]] * 2


def test_segment_and_sequence_errors_name_the_problem(decoder):
    with pytest.raises(ValueError, match="modality"):
        Segment(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.bool), "audio")
    with pytest.raises(ValueError, match="padding"):
        Segment(torch.zeros(1, 2, 4), torch.zeros(1, 3, dtype=torch.bool), "text")
    with pytest.raises(ValueError, match="task"):
        build_sequence([spe_segment(decoder, 1)], "segmentation", is_input=True)
    with pytest.raises(ValueError, match="batch sizes"):
        build_sequence([spe_segment(decoder, 1), spe_segment(decoder, 2)], "mlm", is_input=True)


def test_build_vocabulary_keeps_the_tokens_of_the_texts_and_the_end_token():
    tok = tokenizer()
    vocabulary = build_vocabulary(tok, CAPTIONS)
    expected = {i for text in CAPTIONS for i in tok(text, add_special_tokens=False)["input_ids"]}
    assert vocabulary.tolist() == sorted(expected | {end_token_id(tok)})
    assert start_token_id(tok) not in vocabulary.tolist()
    rare = build_vocabulary(tok, CAPTIONS, min_count=2)
    assert set(rare.tolist()) < set(vocabulary.tolist()) and tok.convert_tokens_to_ids("a") in rare.tolist()
    with pytest.raises(ValueError, match="no"):
        build_vocabulary(tok, ["", "   "])


def test_full_vocabulary_leaves_out_special_and_reserved_tokens():
    tok = tokenizer()
    vocabulary = full_vocabulary(tok).tolist()
    tokens = tok.convert_ids_to_tokens(vocabulary)
    assert not any(t.startswith("[unused") for t in tokens)
    assert set(vocabulary) & set(tok.all_special_ids) == {end_token_id(tok)}
    assert len(vocabulary) > 25_000


def test_vocabulary_lookup_maps_token_ids_to_rows():
    lookup = vocabulary_lookup(torch.tensor([5, 2, 9]), 12)
    assert lookup.tolist() == [IGNORE_INDEX] * 2 + [1] + [IGNORE_INDEX] * 2 + [0] + [IGNORE_INDEX] * 3 + [2] + \
        [IGNORE_INDEX] * 2
    with pytest.raises(ValueError, match="another tokenizer"):
        vocabulary_lookup(torch.tensor([12]), 12)


def test_encode_sharded_without_a_process_group_encodes_everything_in_order():
    table = torch.randn(7, 3)
    out = encode_sharded(lambda index: table[index], 7, shard=True, width=3, reference=table)
    assert torch.equal(out, table)
