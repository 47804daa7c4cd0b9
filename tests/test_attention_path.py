"""The unified decoder's attention: the written-out path used on the CPU in half precision computes what
``F.scaled_dot_product_attention`` computes (float64 reference), including queries that may attend to nothing."""

import torch
import torch.nn.functional as F

from uniperceiver_v2.modeling.unified_decoder import attention, written_out_attention


def reference(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v in float64, masked keys excluded, all-masked rows zero."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return weights @ v


def test_written_out_attention_matches_the_fused_kernel_and_a_float64_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    mask = torch.rand(3, 1, 7, 7) > 0.3
    mask[0, 0, 4] = False                                                # a query that may attend to nothing
    expected = reference(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, mask).double(), expected, rtol=1e-5, atol=1e-5)   # fused, fp32
    half = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)                       # written out, bf16
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=3e-2, atol=3e-2)
    fused_half = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
    torch.testing.assert_close(half.float(), fused_half.float(), rtol=3e-2, atol=3e-2)
    assert torch.equal(half[0, :, 4], torch.zeros_like(half[0, :, 4]))


def test_written_out_attention_gradients_pass_gradcheck():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.2
    mask[0, 0, 3] = False                                                # a row without keys: zero, zero gradient
    torch.testing.assert_close(written_out_attention(q, k, v, mask), reference(q, k, v, mask))
    assert torch.autograd.gradcheck(lambda *qkv: written_out_attention(*qkv, mask), (q, k, v))


def test_attention_benchmark_times_every_variant():
    import io

    from uniperceiver_v2.bench import attention as bench_attention

    out = io.StringIO()
    rows = bench_attention.run(repeats=1, shapes=((2, 2, 5, 4),), out=out)
    assert len(rows) == 5 and all(value > 0 for value in rows.values())
    assert "MultiheadAttention bf16 need_weights=True" in rows and "(2, 2, 5, 4)" in out.getvalue()
