"""Run the numbered notebook series with papermill and collect every notebook's results into one summary.

    python -m uniperceiver_v2.reproduce --profile small --only 06-08
    python -m uniperceiver_v2.reproduce --only 09 -p tables '["tab2"]' -p keep_checkpoints True
    python -m uniperceiver_v2.reproduce --profile quick --jobs 2      # two notebooks at once, e.g. on two cores

``-p NAME VALUE`` (repeatable, as in papermill's command line) sets the notebook parameter ``NAME`` for every
selected notebook whose cell tagged ``parameters`` assigns it, in place of the profile's value. ``VALUE`` is read
as papermill reads it: ``True`` / ``False`` / ``None`` (or YAML's ``true`` / ``false`` / ``null``), a number or any
Python literal such as ``[1, 2]``; anything else is text (quote it, ``"'06'"``, to pass a number as text). A given
name twice keeps the last value.

Before any notebook runs, the parameters each would receive are checked against its parameters cell: a ``-p`` name
that no selected notebook declares, or a value of another type than the notebook's default, is refused with an
error naming the parameter and the notebook. Exit codes: 0 every selected notebook completed, 1 one failed,
2 the run was refused before it started (the one-line error says why), 130 interrupted (Ctrl-C).

The profiles, the layout of the run folder and the rules for skipping notebooks are described in
``uniperceiver_v2.walkthrough.pipeline``.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .walkthrough.pipeline import PROFILES, RunSetupError, reproduce

__all__ = ["build_parser", "main", "parse_parameter_value"]

# YAML's spellings of the constants papermill's -y accepts; -p takes them too.
YAML_CONSTANTS = {"true": True, "false": False, "null": None, "~": None}


def parse_parameter_value(text: str) -> Any:
    """A ``-p`` value as papermill's ``-p`` reads it (``True``/``False``/``None``, an int, a float), or else a YAML
    constant or a Python literal (``[1, 2]``, ``'06'``); anything else is the text itself."""
    if text in YAML_CONSTANTS:
        return YAML_CONSTANTS[text]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def _at_least_one(what: str):
    """An argparse type: an integer >= 1, the error naming ``what`` it counts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {what}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1 ({what}), got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uniperceiver_v2.reproduce",
        description="Run the numbered notebooks with papermill for one profile and summarise their results.",
        epilog="Every selected notebook's parameters are checked before anything runs. Exit codes: 0 all "
               "completed, 1 a notebook failed, 2 refused before starting, 130 interrupted.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="parameter set for the whole series (default: quick)")
    parser.add_argument("--only", nargs="+", metavar="NN",
                        help="run only these notebook numbers: --only 06 07, --only 06-08 or --only 6,7")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set parameter NAME in every selected notebook that declares it, over the profile's "
                             "value (repeatable). VALUE is read as papermill -p reads it: True/False/None, numbers, "
                             "Python literals such as [1, 2]; anything else is text. A NAME no selected notebook "
                             "declares, or a VALUE of another type than the notebook's default, is an error")
    parser.add_argument("--gpus", type=_at_least_one("GPUs"), help="processes = GPUs to use (sets nproc, device=cuda)")
    parser.add_argument("--out", default="runs", help="output root; results go to OUT/PROFILE (default: runs)")
    parser.add_argument("--notebooks", default="notebooks", help="folder with the NN_name.ipynb series")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when unchanged")
    parser.add_argument("--jobs", type=_at_least_one("notebooks at once"), default=1,
                        help="notebooks run at once, each in its own process, a notebook after those it reads from "
                             "(07 and 08 after 06, ...; default 1: one after another). On a CPU each takes a core: "
                             "`make reproduce` uses 2 for the quick profile")
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)   # the --jobs workers
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m uniperceiver_v2.reproduce " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    overrides = {name: parse_parameter_value(value) for name, value in args.parameter}
    try:
        return reproduce(args.profile, args.notebooks, args.out, args.only, args.gpus, args.force, command.strip(),
                         overrides, jobs=args.jobs, summary=not args.no_summary)
    except RunSetupError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # outside a notebook (the runner records an interrupted notebook itself)
        print(f"{parser.prog}: interrupted; the notebooks completed so far are kept and the same command skips "
              "them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
