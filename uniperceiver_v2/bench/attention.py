"""Attention on the CPU: PyTorch's fused kernel against the written-out form, float32 and bfloat16.

    python -m uniperceiver_v2.bench attention [--repeats 20]

Forward + backward of one masked attention per shape, one torch thread, median milliseconds of ``--repeats`` calls
after 3 warm-up calls: ``F.scaled_dot_product_attention`` (fused) and ``modeling.unified_decoder
.written_out_attention`` in float32 and bfloat16, and ``nn.MultiheadAttention`` under bf16 autocast with
``need_weights=False`` (fused) and ``True`` (written out). Why the decoder and the proposal decoder write attention
out in half precision on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = ((32, 4, 75, 32), (32, 8, 40, 32))     # (B, heads, T, d_head): the tiny decoder, a query set


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1e3 * statistics.median(times)


def run(repeats: int = 20, shapes=SHAPES, out=sys.stdout) -> dict[str, float]:
    """Print and return {label: median ms of forward + backward}."""
    from uniperceiver_v2.modeling.unified_decoder import written_out_attention

    torch.manual_seed(0)
    rows: dict[str, float] = {}
    print(f"{torch.get_num_threads()} thread(s), median of {repeats} forward + backward calls", file=out)
    print(f"{'shape (B, heads, T, d)':<26}{'fp32 fused':>12}{'bf16 fused':>12}{'bf16 written out':>18}", file=out)
    for shape in shapes:
        mask = torch.rand(shape[0], 1, shape[2], shape[2]) > 0.2
        mask[..., 0] = True
        cells = []
        for dtype, attend in ((torch.float32, F.scaled_dot_product_attention),
                              (torch.bfloat16, F.scaled_dot_product_attention),
                              (torch.bfloat16, written_out_attention)):
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

            def step(q=q, k=k, v=v, attend=attend, mask=mask):
                attend(q, k, v, mask).float().sum().backward()

            cells.append(_median_ms(step, repeats))
        for label, value in zip(("fp32 fused", "bf16 fused", "bf16 written out"), cells):
            rows[f"{shape} {label}"] = value
        print(f"{str(shape):<26}{cells[0]:>12.2f}{cells[1]:>12.2f}{cells[2]:>18.2f}", file=out)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(32, 40, 64, requires_grad=True)
    query_mask = torch.zeros(40, 40, dtype=torch.bool)
    query_mask[:20, 20:] = True
    for need_weights in (False, True):
        def step(need_weights=need_weights):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = mha(x, x, x, attn_mask=query_mask, need_weights=need_weights, average_attn_weights=False)[0]
            y.float().sum().backward()

        label = f"MultiheadAttention bf16 need_weights={need_weights}"
        rows[label] = _median_ms(step, repeats)
        print(f"{label:<56}{rows[label]:>8.2f}", file=out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
