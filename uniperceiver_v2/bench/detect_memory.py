"""Memory of ``api.detect`` on one large image, per mask format: ``python -m uniperceiver_v2.bench detect_memory``.

Each format runs in a fresh process (peak RSS only grows within a process): the process builds the model, warms
``detect`` up on a 64x64 image, then measures the rise of its peak resident set size (``ru_maxrss``) over one
``detect`` call on a random ``--size`` x ``--size`` image, and the bytes of the masks it returns. The model is
untrained unless ``--checkpoint`` is given; an untrained model's masks cover much of the image, so "crop" saves
less there than on a trained model's compact masks.

    python -m uniperceiver_v2.bench detect_memory --size 3000 --names circle,square
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

__all__ = ["main", "measure_one", "returned_bytes"]


def returned_bytes(value) -> int:
    """Bytes held by tensors, arrays, bytes and strings in a nested result (dicts, lists, tuples)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(returned_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(returned_bytes(item) for item in value)
    if isinstance(value, (bytes, str)):
        return len(value)
    return 0


def measure_one(masks: str, size: int, names: list[str], checkpoint: str | None, seed: int) -> dict:
    """One measurement in this process: {masks, detections, peak_rss_extra_mb, returned_mb}."""
    import torch

    from uniperceiver_v2 import api

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = api.build_model(None if checkpoint else "tiny", checkpoint)
    api.detect(model, torch.rand(3, 64, 64), names, masks=masks)          # warm-up: caches, allocator pools
    image = torch.rand(3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux
    result = api.detect(model, image, names, masks=masks)[0]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"masks": masks, "detections": len(result["scores"]), "peak_rss_extra_mb": after - before,
            "returned_mb": returned_bytes(result.get("masks")) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench detect_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3000, help="side of the square test image (pixels)")
    parser.add_argument("--names", default="circle,square", help="comma-separated class names")
    parser.add_argument("--formats", default="full,crop,rle,none", help="mask formats to measure")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint to load (default: untrained tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # child process: one format
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.names.split(",") if name.strip()]
    formats = [item.strip() for item in args.formats.split(",") if item.strip()]
    if args.size < 16:
        parser.error(f"--size: expected at least 16 pixels, got {args.size}")
    if args.one:
        print(json.dumps(measure_one(formats[0], args.size, names, args.checkpoint, args.seed)))
        return 0

    print(f"api.detect on one {args.size}x{args.size} image, classes {names}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'untrained tiny model'}; "
          "one fresh process per format")
    print(f"{'masks':<6} {'detections':>10} {'peak RSS extra MB':>18} {'returned MB':>12}")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for masks in formats:
        command = [sys.executable, "-m", "uniperceiver_v2.bench", "detect_memory", "--one", "--formats", masks,
                   "--size", str(args.size), "--names", ",".join(names), "--seed", str(args.seed)]
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"error: masks={masks} failed:\n{done.stderr.strip()}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row['masks']:<6} {row['detections']:>10} {row['peak_rss_extra_mb']:>18.0f} "
              f"{row['returned_mb']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
