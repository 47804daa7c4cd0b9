"""Benchmark of multi-scale deformable attention on the CPU: compiled ("cpp") vs pure PyTorch.

    python -m uniperceiver_v2.bench ops [--threads 1] [--cases tiny-encoder,r50-decoder,...]

Forward + backward (gradients to value, locations and weights) at the shapes the region proposal
network meets: a 128x128 image (levels at strides 8..64) and one 800x1333 image with the R50 setting of
Tab. 7 (8 heads, 256 channels, 4 levels, 4 points, 300 decoder queries), each as the encoder's
self-attention (one query per feature position, Lq = S) and as the decoder's cross-attention.

Every (case, implementation) runs in fresh subprocesses, one per measurement, after a warm-up on a
tiny problem that pages in the code.
Time: median over the repeats (after one more warm-up call) of the wall-clock forward and backward
time, with the default allocator.
Peak memory: one forward + backward call; right before it the process's peak resident set size
(VmHWM) is reset through /proc/self/clear_refs, and the number reported is how far the peak rose
above the resident size at that moment. It counts everything the call allocates (output, gradients,
autograd's saved tensors, temporaries) and nothing else; see MEMORY_PASS_ENV for the allocator setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from uniperceiver_v2.ops import ms_deform_attn, unavailable_reason

IMPLEMENTATIONS = ("pytorch", "cpp")
SPEED_GOAL = 3.0  # the compiled op should be at least this many times faster than the reference


@dataclass(frozen=True)
class Case:
    """One benchmark shape: a feature pyramid and a set of queries attending to it."""

    name: str
    spatial_shapes: tuple[tuple[int, int], ...]  # (H, W) per level
    heads: int
    channels: int  # per head
    points: int
    num_queries: int | None  # None: encoder self-attention, one query per position (Lq = S)
    repeats: int
    batch: int = 1

    @property
    def num_value(self) -> int:
        return sum(height * width for height, width in self.spatial_shapes)

    @property
    def queries(self) -> int:
        return self.num_value if self.num_queries is None else self.num_queries


TINY_LEVELS = ((16, 16), (8, 8), (4, 4), (2, 2))  # 128x128 image, strides 8, 16, 32, 64
R50_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))  # 800x1333 image, strides 8, 16, 32, 64

CASES = {
    case.name: case
    for case in (
        Case("tiny-encoder", TINY_LEVELS, heads=4, channels=16, points=4, num_queries=None, repeats=20),
        Case("tiny-decoder", TINY_LEVELS, heads=4, channels=16, points=4, num_queries=100, repeats=20),
        Case("r50-encoder", R50_LEVELS, heads=8, channels=32, points=4, num_queries=None, repeats=3),
        Case("r50-decoder", R50_LEVELS, heads=8, channels=32, points=4, num_queries=300, repeats=10),
    )
}


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs with the locality of a trained model.

    Every query has a reference point (the centre of its own feature position for the encoder, a
    uniform random point for the decoder) and samples each level a few pixels around it, as
    Deformable-DETR's offsets do; attention weights are a softmax over the L * P points.

    Returns value (N, S, M, C), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P).
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.spatial_shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(case.spatial_shapes)
    n, m, c, p, q = case.batch, case.heads, case.channels, case.points, case.queries

    if case.num_queries is None:
        centres = []
        for height, width in case.spatial_shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            centres.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
        reference = torch.cat(centres).expand(n, q, 2)
    else:
        reference = torch.rand(n, q, 2, generator=generator)
    # (L, 2) as (W, H): offsets are drawn in pixels of each level, then normalised.
    level_size = shapes.flip(-1).to(torch.float32)
    offsets_in_pixels = 2.0 * torch.randn(n, q, m, levels, p, 2, generator=generator)
    sampling_locations = reference[:, :, None, None, None, :] + offsets_in_pixels / level_size[:, None, :]
    attention_weights = torch.randn(n, q, m, levels * p, generator=generator).softmax(-1).view(n, q, m, levels, p)
    value = torch.randn(n, case.num_value, m, c, generator=generator)
    return value, shapes, level_start_index, sampling_locations, attention_weights


def _memory_status_kb() -> dict[str, int]:
    with open("/proc/self/status") as status_file:
        status = status_file.read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1)) for key in ("VmRSS", "VmHWM")}


def _forward_backward(
    inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor, impl: str
) -> tuple[float, float, float]:
    """One forward and one backward call; returns their wall-clock times and the CPU time of both
    (summed over threads), in seconds."""
    for tensor in (inputs[0], inputs[3], inputs[4]):  # value, sampling_locations, attention_weights
        tensor.grad = None
    cpu_start = time.process_time()
    start = time.perf_counter()
    output = ms_deform_attn(*inputs, impl=impl)
    middle = time.perf_counter()
    output.backward(grad_output)
    end = time.perf_counter()
    return middle - start, end - middle, time.process_time() - cpu_start


def _prepare(case: Case, impl: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Inputs (value, locations and weights requiring grad) and an output gradient for `case`, after
    loading `impl` and running it once on a tiny problem: the first call into a code path pages in
    tens of MB of library code, which must not count as the memory of the measured problem."""
    reason = unavailable_reason(impl)  # loads (and if needed builds) a compiled extension up front
    if reason is not None:
        raise RuntimeError(f"implementation {impl!r} is unavailable: {reason}")
    prepared = []
    for problem in (replace(case, spatial_shapes=((2, 3), (1, 2)), num_queries=4), case):
        inputs = make_inputs(problem)
        for tensor in (inputs[0], inputs[3], inputs[4]):
            tensor.requires_grad_()
        grad_output = torch.randn(problem.batch, problem.queries, problem.heads * problem.channels)
        prepared.append((inputs, grad_output))
    _forward_backward(*prepared[0], impl)
    return prepared[1]


def measure_time(case: Case, impl: str) -> dict[str, float]:
    """Median forward, backward and CPU milliseconds over `case.repeats` calls after a warm-up call."""
    inputs, grad_output = _prepare(case, impl)
    _forward_backward(inputs, grad_output, impl)
    times = [_forward_backward(inputs, grad_output, impl) for _ in range(case.repeats)]
    return {
        "forward_ms": 1e3 * statistics.median(forward for forward, _, _ in times),
        "backward_ms": 1e3 * statistics.median(backward for _, backward, _ in times),
        "cpu_ms": 1e3 * statistics.median(cpu for _, _, cpu in times),
    }


def measure_memory(case: Case, impl: str) -> dict[str, float]:
    """Peak MB that one forward + backward call adds to the process's resident set."""
    inputs, grad_output = _prepare(case, impl)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident set size VmHWM (Linux >= 4.0)
    resident_before_kb = _memory_status_kb()["VmRSS"]
    _forward_backward(inputs, grad_output, impl)
    return {"peak_mb": (_memory_status_kb()["VmHWM"] - resident_before_kb) / 1024}


MEASUREMENTS = {"time": measure_time, "memory": measure_memory}
# glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so the
# resident size would depend on how earlier allocations fragmented it; with a fixed 1 MiB threshold
# every large tensor is mapped on allocation and unmapped on free, and the peak resident size tracks
# the memory that is actually alive. Only the memory pass uses it; the timing pass keeps the default.
MEMORY_PASS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _run_worker(case: Case, impl: str, measurement: str, threads: int) -> dict[str, float]:
    command = [sys.executable, "-m", "uniperceiver_v2.bench", "ops", "--threads", str(threads)]
    command += ["--worker", case.name, impl, measurement]
    env = {**os.environ, **(MEMORY_PASS_ENV if measurement == "memory" else {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker {case.name}/{impl}/{measurement} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _describe(case: Case) -> str:
    levels = ",".join(f"{height}x{width}" for height, width in case.spatial_shapes)
    kind = "encoder, Lq = S" if case.num_queries is None else "decoder"
    return (
        f"{case.name}: {kind}; N={case.batch} Lq={case.queries} S={case.num_value} levels {levels}; "
        f"M={case.heads} C={case.channels} P={case.points}; {case.repeats} repeats"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uniperceiver_v2.bench ops", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per implementation (default 1)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)} (default: all)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "IMPL", "MEASUREMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        case_name, impl, measurement = args.worker
        print(json.dumps(MEASUREMENTS[measurement](CASES[case_name], impl)))
        return 0

    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    # Build the extension here, once, so that no worker compiles and no timing includes it.
    reason = unavailable_reason("cpp")
    if reason is not None:
        print(f"the compiled CPU implementation is unavailable, nothing to compare: {reason}")
        return 1

    print("Multi-scale deformable attention on the CPU, forward + backward, float32")
    print(f"torch {torch.__version__}, {args.threads} thread(s), fresh subprocesses per measurement.")
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start "
        "(wall-clock times grow when other processes compete for the cores)."
    )
    print("time: median wall-clock ms over the repeats, after warm-up calls; CPU ms: process CPU time of")
    print("forward + backward summed over threads (less sensitive to competing processes);")
    print("peak MB: rise of the peak resident set size (VmHWM, reset via /proc/self/clear_refs) over the")
    print("resident size just before one forward + backward call, glibc mmap threshold fixed at 1 MiB.")
    goals_met = True
    for name in names:
        case = CASES[name]
        print()
        print(_describe(case))
        header = f"{'impl':<8} {'forward ms':>11} {'backward ms':>12} {'total ms':>10} {'CPU ms':>10} {'peak MB':>9}"
        print(f"  {header}")
        results: dict[str, dict[str, float]] = {impl: {} for impl in IMPLEMENTATIONS}
        for impl in IMPLEMENTATIONS:
            for measurement in MEASUREMENTS:
                results[impl].update(_run_worker(case, impl, measurement, args.threads))
        for impl, result in results.items():
            total = result["forward_ms"] + result["backward_ms"]
            print(
                f"  {impl:<8} {result['forward_ms']:>11.2f} {result['backward_ms']:>12.2f} "
                f"{total:>10.2f} {result['cpu_ms']:>10.2f} {result['peak_mb']:>9.1f}"
            )
        reference, compiled = results["pytorch"], results["cpp"]

        def ratio(key: str, reference=reference, compiled=compiled) -> float:
            return reference[key] / compiled[key] if compiled[key] > 0 else math.inf

        wall_speedup = (reference["forward_ms"] + reference["backward_ms"]) / (
            compiled["forward_ms"] + compiled["backward_ms"]
        )
        # Both ratios must reach the goal: on a busy machine the wall-clock time of long calls is
        # inflated by waiting for a core, while CPU time is not, so the two can disagree.
        met = min(wall_speedup, ratio("cpu_ms")) >= SPEED_GOAL and compiled["peak_mb"] < reference["peak_mb"]
        goals_met &= met
        print(
            f"  cpp vs pytorch: {wall_speedup:.1f}x faster in wall-clock time (forward {ratio('forward_ms'):.1f}x, "
            f"backward {ratio('backward_ms'):.1f}x), {ratio('cpu_ms'):.1f}x in CPU time, "
            f"{ratio('peak_mb'):.1f}x lower peak memory"
        )
        print(f"  goal (>= {SPEED_GOAL:.0f}x faster in both times, lower peak memory): {'met' if met else 'NOT met'}")
    print()
    print(f"all goals met: {'yes' if goals_met else 'no'}")
    return 0
