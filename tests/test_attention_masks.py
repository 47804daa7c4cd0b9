"""Attention masks against their definitions, written as explicit loops over (query, key) pairs."""

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_v2.modeling.attention_masks import (
    autoregressive_causal_flags,
    autoregressive_mask,
    bidirectional_mask,
    combine_masks,
    mlm_mask,
    to_additive_mask,
)


def _roles(num_prefix, num_words, spe_targets):
    """Role of each position: ("prefix", None), ("word", j) or ("spe", i) with 1-based word indices."""
    return ([("prefix", None)] * num_prefix + [("word", j) for j in range(1, num_words + 1)]
            + [("spe", i) for i in spe_targets])


def _may_attend(query, key, q_pos, k_pos):
    """v1 appendix B, as prose: prefix <-> prefix; word x_j sees the prefix and x_<=j; the <SPE> predicting x_i sees
    the prefix, x_<i and itself; words never see <SPE> tokens; the prefix sees no word and no <SPE>."""
    (q_role, q_idx), (k_role, k_idx) = query, key
    if k_role == "prefix":
        return True
    if q_role == "prefix":
        return False
    if q_role == "word":
        return k_role == "word" and k_idx <= q_idx
    # q_role == "spe"
    if k_role == "word":
        return k_idx < q_idx
    return q_pos == k_pos


def _reference_autoregressive(num_prefix, num_words, spe_targets):
    roles = _roles(num_prefix, num_words, spe_targets)
    T = len(roles)
    ref = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            ref[q, k] = _may_attend(roles[q], roles[k], q, k)
    return ref


@pytest.mark.parametrize("num_prefix,num_words", [(1, 0), (1, 3), (4, 5), (7, 1)])
def test_autoregressive_mask_teacher_forcing(num_prefix, num_words):
    mask = autoregressive_mask(num_prefix, num_words)
    ref = _reference_autoregressive(num_prefix, num_words, list(range(1, num_words + 1)))
    assert mask.dtype == torch.bool
    assert torch.equal(mask, ref)


@pytest.mark.parametrize("num_words", [0, 2, 5])
def test_autoregressive_mask_generation_step(num_words):
    """Generating word i = num_words + 1 from [prefix, x_1..x_{i-1}, <SPE>]: the <SPE> sees every word."""
    mask = autoregressive_mask(3, num_words, spe_targets=[num_words + 1])
    assert torch.equal(mask, _reference_autoregressive(3, num_words, [num_words + 1]))
    assert mask[-1, 3:3 + num_words].all()


def test_autoregressive_rows_match_between_training_and_generation():
    """The i-th <SPE> row of the teacher-forcing mask, restricted to [prefix, x_<i, itself], is all True, and it sees
    nothing else: exactly the row of the generation-step mask."""
    num_prefix, num_words = 2, 4
    train = autoregressive_mask(num_prefix, num_words)
    for i in range(1, num_words + 1):
        row = train[num_prefix + num_words + i - 1]
        visible = torch.nonzero(row).flatten().tolist()
        expected = (list(range(num_prefix)) + list(range(num_prefix, num_prefix + i - 1))
                    + [num_prefix + num_words + i - 1])
        assert visible == expected


def test_autoregressive_mask_rejects_bad_targets():
    with pytest.raises(ValueError, match="spe_targets"):
        autoregressive_mask(2, 3, spe_targets=[5])
    with pytest.raises(ValueError, match="num_prefix"):
        autoregressive_mask(0, 3)


def test_causal_flags():
    flags = autoregressive_causal_flags(3, 4, 4)
    assert flags.tolist() == [False] * 3 + [True] * 8


def test_bidirectional_and_mlm_masks():
    kpm = torch.tensor([[False, False, False, True], [False, True, True, True]])
    for build in (bidirectional_mask, mlm_mask):
        mask = build(kpm)
        assert mask.shape == (2, 4, 4)
        for b in range(2):
            for q in range(4):
                for k in range(4):
                    assert bool(mask[b, q, k]) == (not bool(kpm[b, k]))


def test_combine_masks_every_row_sees_itself():
    T = 5
    attn = autoregressive_mask(1, 2)                     # T = 1 + 2 + 2
    attn[0] = False                                      # a row that would be empty
    kpm = torch.tensor([[False, False, False, False, True]])
    mask = combine_masks(attn, kpm)
    assert mask.shape == (1, T, T)
    for q in range(T):
        for k in range(T):
            expected = (bool(attn[q, k]) and not bool(kpm[0, k])) or q == k
            assert bool(mask[0, q, k]) == expected
    assert combine_masks(None, None) is None
    with pytest.raises(ValueError, match="attn_mask"):
        combine_masks(attn.float(), None)
    with pytest.raises(ValueError, match="key_padding_mask"):
        combine_masks(attn, torch.zeros(1, T + 1, dtype=torch.bool))


def test_additive_mask_matches_bool_mask_in_torch_attention():
    """torch's attention with the bool mask and with our additive float mask give the same result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    mask = combine_masks(autoregressive_mask(2, 2, spe_targets=[1, 2, 3]), None)   # (1, 7, 7)
    with_bool = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    additive = to_additive_mask(mask, torch.float64)
    assert set(additive.unique().tolist()) == {0.0, float("-inf")}
    with_float = F.scaled_dot_product_attention(q, k, v, attn_mask=additive[:, None])
    scores = q @ k.transpose(-1, -2) / 2.0 + additive[:, None]                       # explicit softmax attention
    explicit = scores.softmax(-1) @ v
    torch.testing.assert_close(with_bool, with_float)
    torch.testing.assert_close(with_bool, explicit)
