"""Token attributes (MoE paper Tab. 2) for every task, written out from the table bit by bit."""

import pytest
import torch

from uniperceiver_v2.modeling.attention_masks import autoregressive_causal_flags
from uniperceiver_v2.modeling.attributes import (
    ATTRIBUTE_NAMES,
    MODALITY_IDS,
    TASK_IDS,
    TASK_MODALITIES,
    attribute_codes,
    segment_ids,
    task_token_attributes,
    token_attributes,
)


def bits(*names):
    """The attribute vector with exactly the named bits set (names from ATTRIBUTE_NAMES)."""
    assert set(names) <= set(ATTRIBUTE_NAMES)
    return [1.0 if name in names else 0.0 for name in ATTRIBUTE_NAMES]


def rows(attributes):
    return [list(map(float, r)) for r in attributes]


IMG_IN, TXT_IN, IMG_TGT, TXT_TGT = "image_in_inputs", "text_in_inputs", "image_in_targets", "text_in_targets"
VISUAL, TEXT, CAUSAL, INPUT = "token_is_visual", "token_is_text", "token_is_causal", "token_from_inputs"


def test_ids_are_fixed():
    assert MODALITY_IDS == {"spe": 0, "image": 1, "text": 2}
    assert sorted(TASK_IDS.values()) == list(range(len(TASK_IDS)))
    assert set(TASK_IDS) == set(TASK_MODALITIES)


def test_classification():
    x = task_token_attributes("classification", segment_ids([("spe", 1), ("image", 3)]))
    assert rows(x) == [bits(IMG_IN, TXT_TGT, INPUT)] + [bits(IMG_IN, TXT_TGT, VISUAL, INPUT)] * 3
    y = task_token_attributes("classification", segment_ids([("spe", 1), ("text", 2)]), is_input=False)
    assert rows(y) == [bits(IMG_IN, TXT_TGT)] + [bits(IMG_IN, TXT_TGT, TEXT)] * 2


def test_detection_per_proposal():
    """Detection compares each proposal's output with the class names: every image token (global or regional)
    carries the same attributes as a classification image token."""
    x = task_token_attributes("detection", segment_ids([("image", 2 + 5)]))
    assert rows(x) == [bits(IMG_IN, TXT_TGT, VISUAL, INPUT)] * 7


def test_captioning():
    num_prefix, num_words = 1 + 4, 3
    modality = segment_ids([("spe", 1), ("image", 4), ("text", num_words), ("spe", num_words)])
    causal = autoregressive_causal_flags(num_prefix, num_words, num_words)
    x = task_token_attributes("captioning", modality, causal=causal)
    task = (IMG_IN, TXT_IN, TXT_TGT)
    expected = ([bits(*task, INPUT)] + [bits(*task, VISUAL, INPUT)] * 4
                + [bits(*task, TEXT, CAUSAL, INPUT)] * num_words + [bits(*task, CAUSAL, INPUT)] * num_words)
    assert rows(x) == expected
    # a vocabulary word as a candidate target: [<SPE>, word], bidirectional
    y = task_token_attributes("captioning", segment_ids([("spe", 1), ("text", 1)]), is_input=False)
    assert rows(y) == [bits(*task), bits(*task, TEXT)]


def test_mlm():
    # "a [SPE] sat": the masked word is replaced by <SPE> in place
    modality = segment_ids([("spe", 1), ("text", 1), ("spe", 1), ("text", 1)])
    x = task_token_attributes("mlm", modality)
    task = (TXT_IN, TXT_TGT)
    assert rows(x) == [bits(*task, INPUT), bits(*task, TEXT, INPUT), bits(*task, INPUT), bits(*task, TEXT, INPUT)]


def test_retrieval_both_directions():
    image_seq = segment_ids([("spe", 1), ("image", 2)])
    text_seq = segment_ids([("spe", 1), ("text", 2)])
    i2t = (IMG_IN, TXT_TGT)
    assert rows(task_token_attributes("retrieval_i2t", image_seq)) == \
        [bits(*i2t, INPUT)] + [bits(*i2t, VISUAL, INPUT)] * 2
    assert rows(task_token_attributes("retrieval_i2t", text_seq, is_input=False)) == \
        [bits(*i2t)] + [bits(*i2t, TEXT)] * 2
    t2i = (TXT_IN, IMG_TGT)
    assert rows(task_token_attributes("retrieval_t2i", text_seq)) == \
        [bits(*t2i, INPUT)] + [bits(*t2i, TEXT, INPUT)] * 2
    assert rows(task_token_attributes("retrieval_t2i", image_seq, is_input=False)) == \
        [bits(*t2i)] + [bits(*t2i, VISUAL)] * 2


def test_batched_and_per_token_flags():
    modality = torch.tensor([[0, 1, 2], [0, 2, 2]])
    is_input = torch.tensor([[True, True, True], [False, False, False]])
    a = token_attributes({"image", "text"}, {"text"}, modality, causal=False, is_input=is_input)
    assert a.shape == (2, 3, 8) and a.dtype == torch.float32
    assert a[0, :, 7].tolist() == [1, 1, 1] and a[1, :, 7].tolist() == [0, 0, 0]
    assert a[:, :, 4].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert a[:, :, 5].tolist() == [[0, 0, 1], [0, 1, 1]]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="task_inputs"):
        token_attributes({"audio"}, {"text"}, torch.zeros(2, dtype=torch.long), False, True)
    with pytest.raises(ValueError, match="causal"):
        token_attributes({"text"}, {"text"}, torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool), True)
    with pytest.raises(ValueError, match="token_modality"):
        token_attributes({"text"}, {"text"}, torch.tensor([3]), False, True)
    with pytest.raises(ValueError, match="unknown"):
        task_token_attributes("vqa", torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="segment"):
        segment_ids([("video", 2)])


def test_attribute_codes_are_the_binary_number():
    a = torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = [sum(int(v) << i for i, v in enumerate(row.tolist())) for row in a]
    assert attribute_codes(a).tolist() == expected
    with pytest.raises(ValueError, match="0 or 1"):
        attribute_codes(torch.full((1, 8), 0.5))
    with pytest.raises(ValueError, match="last dimension"):
        attribute_codes(torch.zeros(1, 7))
