"""The unified decoder g: masking (padding, auto-regressive), stochastic depth, the captioning alignment of v1
appendix B, similarity (eq. (6)), re-parameterisation, and attention against torch's own implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_v2.config import DecoderConfig, MoEConfig
from uniperceiver_v2.modeling.attention_masks import autoregressive_causal_flags, autoregressive_mask
from uniperceiver_v2.modeling.attributes import TASK_IDS, segment_ids, task_token_attributes
from uniperceiver_v2.modeling.moe import TokenConditions
from uniperceiver_v2.modeling.unified_decoder import TOKEN_TYPES, DropPath, LogitScale, UnifiedDecoder

WIDTH, IMAGE_DIM, TEXT_DIM = 32, 12, 20
ALL_ROUTINGS = ["none", "token", "context", "modality", "task", "attribute"]


def make_decoder(routing="attribute", placement=("ffn",), drop_path=0.0, **moe):
    moe.setdefault("capacity_factor_eval", 4.0)        # = E: no assignment is ever dropped at evaluation
    cfg = DecoderConfig(width=WIDTH, depth=2, heads=4, ffn_dim=64, drop_path=drop_path, max_positions=64,
                        moe=MoEConfig(routing=routing, num_experts=4, top_k=2, placement=list(placement), **moe))
    return UnifiedDecoder(cfg, IMAGE_DIM, TEXT_DIM)


def conditions_for(modality, task, causal=False, is_input=True):
    """Keyword arguments of the decoder for sequences with these (B, T) modality ids."""
    B = modality.shape[0]
    return dict(attributes=task_token_attributes(task, modality, causal=causal, is_input=is_input),
                modality_ids=modality, task_id=torch.full((B,), TASK_IDS[task]))


@pytest.mark.parametrize("routing", ALL_ROUTINGS)
@pytest.mark.parametrize("placement", [("ffn",), ("ffn", "attn")])
def test_padding_does_not_change_real_tokens(routing, placement):
    torch.manual_seed(0)
    dec = make_decoder(routing, placement).eval()
    B, T = 3, 9
    x = torch.randn(B, T, WIDTH)
    modality = segment_ids([("spe", 1), ("image", 4), ("text", 4)]).expand(B, T)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 6:] = True
    kpm[2, 3:] = True
    kwargs = conditions_for(modality, "captioning")
    out = dec(x, key_padding_mask=kpm, **kwargs)
    x2 = x.clone()
    x2[kpm] = 50.0 * torch.randn(int(kpm.sum()), WIDTH)
    out2 = dec(x2, key_padding_mask=kpm, **kwargs)
    assert torch.isfinite(out2.hidden).all()
    torch.testing.assert_close(out.hidden[~kpm], out2.hidden[~kpm])


def _captioning_batch(dec, B, num_image, num_words, generator):
    """Embedded [<SPE>_0, image, x_1..x_T, <SPE>_1..<SPE>_T] with random encoder features."""
    image = dec.embed_image(torch.randn(B, num_image, IMAGE_DIM, generator=generator),
                            torch.full((num_image,), TOKEN_TYPES["image_regional"]))
    words = dec.embed_text(torch.randn(B, num_words, TEXT_DIM, generator=generator))
    spe_pred = dec.spe(B, num_words, positions=torch.arange(num_words))
    return image, words, spe_pred


def _captioning_inputs(num_prefix, num_words, num_spe, B):
    modality = segment_ids([("spe", 1), ("image", num_prefix - 1), ("text", num_words),
                            ("spe", num_spe)]).expand(B, -1)
    causal = autoregressive_causal_flags(num_prefix, num_words, num_spe)
    return conditions_for(modality, "captioning", causal=causal)


@pytest.mark.parametrize("routing", ["none", "token", "modality", "task", "attribute"])
def test_autoregressive_mask_is_causal(routing):
    """With the v1 appendix B mask, changing word x_j changes nothing that may not see it: the prefix, the words
    before it and the <SPE> tokens predicting x_1..x_j. (Context routing pools every token of the sample for its
    gate, so it is not causal by design and is left out.)"""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    dec = make_decoder(routing, ("ffn", "attn")).eval()
    B, num_image, num_words, j = 2, 3, 5, 3
    num_prefix = 1 + num_image
    image, words, spe_pred = _captioning_batch(dec, B, num_image, num_words, g)
    mask = autoregressive_mask(num_prefix, num_words)
    kwargs = _captioning_inputs(num_prefix, num_words, num_words, B)
    seq = torch.cat([dec.spe(B), image, words, spe_pred], dim=1)
    out = dec(seq, attn_mask=mask, **kwargs).hidden
    seq2 = seq.clone()
    seq2[:, num_prefix + j - 1] += torch.randn(B, WIDTH)               # change x_j
    out2 = dec(seq2, attn_mask=mask, **kwargs).hidden
    unaffected = list(range(num_prefix + j - 1)) + [num_prefix + num_words + i - 1 for i in range(1, j + 1)]
    affected = [t for t in range(seq.shape[1]) if t not in unaffected]
    torch.testing.assert_close(out[:, unaffected], out2[:, unaffected])
    assert all((out[:, t] - out2[:, t]).abs().max() > 1e-4 for t in affected)


@pytest.mark.parametrize("routing", ["none", "attribute", "task"])
def test_teacher_forcing_matches_generation(routing):
    """v1 appendix B: the output at the i-th <SPE> of the teacher-forced sequence equals the output of the <SPE>
    appended to [<SPE>_0, image, x_<i] alone, which is what generation computes."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    dec = make_decoder(routing, ("ffn", "attn")).eval()
    B, num_image, num_words = 2, 4, 5
    num_prefix = 1 + num_image
    image, words, spe_pred = _captioning_batch(dec, B, num_image, num_words, g)
    spe0 = dec.spe(B)
    full = dec(torch.cat([spe0, image, words, spe_pred], dim=1), attn_mask=autoregressive_mask(num_prefix, num_words),
               **_captioning_inputs(num_prefix, num_words, num_words, B)).hidden
    for i in range(1, num_words + 1):
        prefix = torch.cat([spe0, image, words[:, :i - 1], spe_pred[:, i - 1:i]], dim=1)
        step = dec(prefix, attn_mask=autoregressive_mask(num_prefix, i - 1, spe_targets=[i]),
                   **_captioning_inputs(num_prefix, i - 1, 1, B)).hidden
        torch.testing.assert_close(step[:, -1], full[:, num_prefix + num_words + i - 1], rtol=1e-5, atol=1e-5)


def test_drop_path_per_sample_in_training_only():
    torch.manual_seed(3)
    drop = DropPath(0.5).train()
    x = torch.ones(2000, 3, 4)
    y = drop(x)
    per_sample = y.reshape(2000, -1)
    # each sample is either dropped entirely or scaled by 1 / (1 - p)
    assert ((per_sample == 0).all(1) | (per_sample == 2.0).all(1)).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(drop.eval()(x), x)


def test_decoder_deterministic_in_eval_and_stochastic_in_training():
    torch.manual_seed(4)
    dec = make_decoder("attribute", drop_path=0.5)
    B, T = 4, 6
    x = torch.randn(B, T, WIDTH)
    kwargs = conditions_for(segment_ids([("spe", 1), ("image", 5)]).expand(B, T), "classification")
    dec.eval()
    torch.testing.assert_close(dec(x, **kwargs).hidden, dec(x, **kwargs).hidden, rtol=0, atol=0)
    dec.train()
    outs = [dec(x, **kwargs).hidden for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])


def test_attention_matches_torch_multihead_attention():
    """Our attention (qkv Linear, SDPA with a bool mask True = may attend) against nn.MultiheadAttention, whose bool
    mask means the opposite (True = may NOT attend)."""
    torch.manual_seed(5)
    dec = make_decoder("none").eval()
    attn = dec.blocks[0].attn
    mha = torch.nn.MultiheadAttention(WIDTH, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 7, WIDTH)
    mask = autoregressive_mask(2, 2, spe_targets=[1, 2, 3])
    ours, _ = attn(x, mask[None, None], conditions=None)
    theirs, _ = mha(x, x, x, attn_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_no_nan_when_a_row_would_be_empty():
    torch.manual_seed(6)
    dec = make_decoder("none").eval()
    x = torch.randn(2, 5, WIDTH)
    mask = torch.zeros(5, 5, dtype=torch.bool)                    # nobody may attend to anybody ...
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True                                                 # ... and a sequence made only of padding
    assert torch.isfinite(dec(x, attn_mask=mask, key_padding_mask=kpm).hidden).all()


@pytest.mark.parametrize("routing", ["modality", "task", "attribute"])
def test_merged_decoder_equals_unmerged(routing):
    torch.manual_seed(7)
    dec = make_decoder(routing, ("ffn", "attn")).eval()
    for block in dec.blocks:                                     # non-zero biases, so the merged bias matters too
        for layer in (block.attn.qkv, block.attn.proj, block.ffn.fc1, block.ffn.fc2):
            torch.nn.init.normal_(layer.bias, std=0.1)
    B, T = 3, 8
    modality = torch.stack([segment_ids([("spe", 1), ("image", 7)]), segment_ids([("spe", 1), ("text", 7)]),
                            segment_ids([("spe", 1), ("image", 3), ("text", 4)])])
    attributes = torch.cat([
        task_token_attributes("retrieval_i2t", modality[:1]),
        task_token_attributes("retrieval_i2t", modality[1:2], is_input=False),
        task_token_attributes("captioning", modality[2:], causal=torch.arange(T) >= 4),
    ])
    kwargs = dict(attributes=attributes, modality_ids=modality, task_id=torch.tensor([4, 4, 2]))
    x = torch.randn(B, T, WIDTH)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 6:] = True
    reference = dec(x, key_padding_mask=kpm, record_gates=True, **kwargs)
    assert dec.merge_experts() == 4 * 2
    merged = dec(x, key_padding_mask=kpm, record_gates=True, **kwargs)
    torch.testing.assert_close(merged.hidden, reference.hidden, rtol=1e-5, atol=1e-5)
    for layer_ref, layer_merged in zip(reference.gates, merged.gates):
        assert torch.equal(layer_ref["ffn"].indices, layer_merged["ffn"].indices)
    # a batch with one condition only (detection: image tokens, no <SPE>) runs plain dense layers
    image_only = torch.full((B, T), 1)
    single = conditions_for(image_only, "detection")
    merged_single = dec(x, **single).hidden
    dec.unmerge_experts()
    torch.testing.assert_close(dec(x, key_padding_mask=kpm, **kwargs).hidden, reference.hidden)
    torch.testing.assert_close(merged_single, dec(x, **single).hidden, rtol=1e-5, atol=1e-5)


def test_merging_token_routing_is_an_error():
    with pytest.raises(ValueError, match="cannot be merged"):
        make_decoder("token").merge_experts()


def test_record_gates_and_aux_loss():
    torch.manual_seed(8)
    dec = make_decoder("token", ("ffn", "attn"), balance_loss_weight=0.5).train()
    B, T = 2, 6
    x = torch.randn(B, T, WIDTH)
    out = dec(x, record_gates=True)
    assert len(out.gates) == 2 and set(out.gates[0]) == {"attn", "ffn"}
    rec = out.gates[0]["ffn"]
    assert rec.indices.shape == rec.weights.shape == rec.keep.shape == (B, T, 2)
    assert not rec.weights.requires_grad
    out.aux_loss.backward()
    assert dec.blocks[0].ffn.gate.proj.weight.grad.abs().sum() > 0
    # aux_loss = balance_loss_weight * the sum over the four gates of E * sum_e f_e P_e, recomputed block by block
    dec.eval()
    conditions = TokenConditions()
    h, total = x, 0.0
    for block in dec.blocks:
        total = total + block.attn.gate(block.ln1(h), conditions).aux_loss
        mid = h + block.attn(block.ln1(h), None, conditions)[0]
        total = total + block.ffn.gate(block.ln2(mid), conditions).aux_loss
        h = block(h, None, conditions)[0]
    torch.testing.assert_close(dec(x).aux_loss, 0.5 * total)
    no_moe = make_decoder("attribute")(torch.randn(B, T, WIDTH), attributes=torch.zeros(B, T, 8))
    assert no_moe.aux_loss.item() == 0.0 and no_moe.gates is None


def test_embeddings_and_similarity():
    torch.manual_seed(9)
    dec = make_decoder("none")
    B = 2
    img = dec.embed_image(torch.randn(B, 5, IMAGE_DIM), torch.tensor([TOKEN_TYPES["image_global"]] * 2
                                                                    + [TOKEN_TYPES["image_regional"]] * 3))
    txt = dec.embed_text(torch.randn(B, 4, TEXT_DIM), positions=torch.tensor([0, 1, 2, 3]))
    spe = dec.spe(B, 3, positions=torch.tensor([0, 1, 2]))
    assert img.shape == (B, 5, WIDTH) and txt.shape == (B, 4, WIDTH) and spe.shape == (B, 3, WIDTH)
    # the <SPE> embedding is shared: without positions all <SPE> tokens are equal
    s = dec.spe(B, 3)
    assert torch.equal(s[:, 0], s[:, 2])
    with pytest.raises(ValueError, match="max_positions"):
        dec.embed_text(torch.randn(1, 2, TEXT_DIM), positions=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="image_global"):
        dec.embed_image(torch.randn(1, 1, IMAGE_DIM), torch.tensor([TOKEN_TYPES["text"]]))
    with pytest.raises(ValueError, match="decoder.width"):
        dec(torch.randn(1, 3, WIDTH + 1))
    # eq. (6): logits = cos(a, b) / tau, with 1 / tau initialised to 1 / 0.07 and clipped at 100
    a, b = torch.randn(3, WIDTH), torch.randn(4, WIDTH)
    scale = LogitScale(0.07, 100.0)
    logits = dec.similarity(a, b, scale)
    expected = torch.tensor([[F.cosine_similarity(a[i], b[j], dim=0).item() / 0.07 for j in range(4)]
                             for i in range(3)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1000.0))
    assert scale().item() == pytest.approx(100.0)


def test_layer_scale_option():
    cfg = DecoderConfig(width=WIDTH, depth=1, heads=4, ffn_dim=64, layer_scale=True,
                        moe=MoEConfig(routing="none"))
    dec = UnifiedDecoder(cfg, IMAGE_DIM, TEXT_DIM)
    assert torch.allclose(dec.blocks[0].ls1.gamma, torch.full((WIDTH,), 0.1))
    assert dec(torch.randn(1, 3, WIDTH)).hidden.shape == (1, 3, WIDTH)
    assert not any("ls1" in n for n, _ in make_decoder("none").named_parameters())

