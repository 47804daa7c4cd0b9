"""Can the backbone's float32 step be made cheaper without changing the model? Memory layout and compilation, side
by side.

    python -m uniperceiver_v2.bench backbone_layout [--config tiny] [--batch 32] [--size 128] [--steps 6]
        [--variants plain,channels_last,compiled] [key.sub=value ...]

Builds the config's backbone (``image_encoder.backbone``, randomly initialised: the time of a convolution does not
depend on its weights) and times one forward and backward pass of a batch of ``--batch`` images of ``--size`` pixels
(the classification batch of the ``tiny`` preset by default) in float32, in each variant of the same weights:

* ``plain``: the module as the trainer runs it;
* ``channels_last``: weights and input in ``torch.channels_last`` memory format;
* ``compiled``: ``torch.compile`` of the module (inductor; its compilation happens in the untimed warm-up steps).

Each variant's features are checked against ``plain``'s first (largest difference at most 1e-4). The variants run
alternately, one step each in turn, so that a change in the machine's load hits all of them alike.
Printed: the median seconds of each and its ratio to ``plain``, then the share of the plain step's CPU time that
``torch.profiler`` attributes to the convolutions (forward and backward), normalisation and the rest.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

VARIANTS = ("plain", "channels_last", "compiled")


def _step(module: torch.nn.Module, images: torch.Tensor) -> None:
    features = module(images)
    sum(feature.float().square().mean() for feature in features).backward()


def _profile_shares(module: torch.nn.Module, images: torch.Tensor, steps: int = 2) -> dict[str, float]:
    """Share of the self CPU time of ``steps`` plain steps per kind of operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _step(module, images)
    kinds = {"convolution forward": 0.0, "convolution backward": 0.0, "normalisation": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        if name.startswith("aten::") and "convolution_backward" in name:
            kind = "convolution backward"
        elif name.startswith("aten::") and ("convolution" in name or name == "aten::conv2d"):
            kind = "convolution forward"
        elif "norm" in name:
            kind = "normalisation"
        else:
            kind = "other"
        kinds[kind] += event.self_cpu_time_total
    total = sum(kinds.values()) or 1.0
    return {kind: value / total for kind, value in kinds.items()}


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, dict[str, float]]:
    """Time the variants; print and return {variant: {"seconds", "ratio"}} and {"shares": {...}}."""
    from uniperceiver_v2.config import load_config
    from uniperceiver_v2.modeling.backbone import build_backbone_from_config

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    plain = build_backbone_from_config(cfg.image_encoder)
    images = torch.randn(args.batch, 3, args.size, args.size)
    modules: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for variant in args.variants:
        if variant == "plain":
            modules[variant] = (plain, images)
        elif variant == "channels_last":
            modules[variant] = (copy.deepcopy(plain).to(memory_format=torch.channels_last),
                                images.contiguous(memory_format=torch.channels_last))
        else:
            modules[variant] = (torch.compile(copy.deepcopy(plain)), images)
    with torch.no_grad():                       # the variants compute the same function: same features
        reference = plain(images)
        for variant, (module, inputs) in modules.items():
            difference = max(float((a - b).abs().max()) for a, b in zip(module(inputs), reference))
            if difference > 1e-4:
                raise RuntimeError(f"variant {variant}: features differ from plain's by {difference:.2e}")
    for module, inputs in modules.values():
        for _ in range(args.warmup):
            _step(module, inputs)
    times: dict[str, list[float]] = {variant: [] for variant in modules}
    for _ in range(args.steps):
        for variant, (module, inputs) in modules.items():
            tick = time.perf_counter()
            _step(module, inputs)
            times[variant].append(time.perf_counter() - tick)
    base = statistics.median(times["plain"]) if "plain" in times else None
    print(f"backbone {cfg.image_encoder.backbone} ({args.config}), batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"float32, {torch.get_num_threads()} thread(s), {args.steps} steps after {args.warmup} warm-up, "
          "alternating", file=out)
    print(f"{'variant':<16}{'median s':>10}{'/ plain':>9}", file=out)
    rows: dict[str, dict[str, float]] = {}
    for variant, values in times.items():
        seconds = statistics.median(values)
        rows[variant] = {"seconds": seconds, "ratio": seconds / base if base else float("nan")}
        print(f"{variant:<16}{seconds:>10.3f}{rows[variant]['ratio']:>9.2f}", file=out)
    shares = _profile_shares(plain, images)
    print("plain step under torch.profiler (self CPU time): "
          + ", ".join(f"{kind} {100 * share:.0f} %" for kind, share in shares.items()), file=out, flush=True)
    return {**rows, "shares": shares}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench backbone_layout",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or YAML (default tiny)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}, expected some of {list(VARIANTS)}")
    if min(args.batch, args.size, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --size and --steps must be >= 1 and --warmup >= 0")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
