"""Run the numbered notebook series with papermill and collect every notebook's results into one summary.

The profiles, the layout of the run folder and the rules for skipping notebooks are described in
``uniperceiver_v2.walkthrough.pipeline``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from .walkthrough.pipeline import PROFILES, prepare_data, reproduce

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uniperceiver_v2.reproduce",
        description="Run the numbered notebooks with papermill for one profile and summarise their results.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="parameter set for the whole series (default: quick)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers, e.g. --only 06 07")
    parser.add_argument("--gpus", type=int, help="processes = GPUs to use (sets nproc, device=cuda)")
    parser.add_argument("--out", default="runs", help="output root; results go to OUT/PROFILE (default: runs)")
    parser.add_argument("--notebooks", default="notebooks", help="folder with the NN_name.ipynb series")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when unchanged")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m uniperceiver_v2.reproduce " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    prepare_data(args.profile)
    return reproduce(args.profile, args.notebooks, args.out, args.only, args.gpus, args.force, command.strip())


if __name__ == "__main__":
    sys.exit(main())
