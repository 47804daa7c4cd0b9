"""Pre-train the image backbone as a plain classifier, the stand-in for the paper's ImageNet-pretrained backbones.

    python -m uniperceiver_v2.pretrain_backbone --config tiny --iterations 800 \\
        --out runs/backbone/tiny_convnet.safetensors data.root=data/synthetic_small data.synthetic_profile=small

The training itself is ``engine.backbone_pretraining.pretrain_backbone``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .data.summary import DataError
from .engine.backbone_pretraining import pretrain_backbone

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.pretrain_backbone",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or YAML file (its image_encoder and data are used)")
    parser.add_argument("--out", required=True, help="safetensors file to write the backbone weights to")
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary = pretrain_backbone(cfg, args.out, args.iterations, args.batch_size, args.lr,
                                    progress=not args.no_progress)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"backbone written to {args.out}: validation top-1 {summary['val_top1']:.3f} after {args.iterations} "
          f"iterations ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
