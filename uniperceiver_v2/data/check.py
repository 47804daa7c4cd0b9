"""Check a data root before training on it.

    python -m uniperceiver_v2.data.check ROOT [--config PRESET_OR_YAML] [--split NAME ...] [--header-only]
                                         [--json PATH] [key.sub=value ...]

Reads every dataset a run of this config would read from ROOT (its relative paths ``data.*``): the enabled tasks
on the training and validation splits (``--split`` chooses others), and the novel-category scenes when
``data.novel_annotations`` exists. Records are read with ``data.on_invalid=skip``, so every problem is listed,
not only the first; every image file is opened and fully decoded (``--header-only``: its header only, as the
pre-flight check of ``train`` does) and its size compared with its record. Nothing is generated or written in
ROOT.

Exit codes: 0 nothing to report; 1 problems found (records or files that ``data.on_invalid=error`` refuses, or a
dataset that cannot be read at all); 2 bad command line or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..engine.data_setup import build_task_dataset, format_data_report, novel_detection_dataset
from .preflight import check_dataset
from .summary import DataError

__all__ = ["check_root", "main"]


def check_root(cfg: Config, splits: list[str], decode: bool = True) -> dict[str, Any]:
    """Read and check every dataset of ``cfg``'s enabled tasks on ``splits`` (and the novel-category scenes).

    ``cfg.data.on_invalid`` should be "skip" to collect every problem. Returns a report laid out as
    ``engine.data_setup.data_report``'s ("unreadable": dataset name -> the ``DataError`` that stopped its reading),
    plus "decode" and "problems": the number of records and files left out by the policy plus the unreadable
    datasets.
    """
    unchecked = cfg.copy()
    unchecked.data.preflight = False   # the check runs below, with ``decode``
    datasets: dict[str, Any] = {}
    unreadable: dict[str, str] = {}
    builders = [(f"{split}/{task}", task, split) for split in splits for task in cfg.tasks.names()]
    if cfg.tasks.detection.enabled and (Path(cfg.data.root) / cfg.data.novel_annotations).is_file():
        builders.append(("novel/detection", "novel", ""))
    for name, task, split in builders:
        try:
            if task == "novel":
                dataset = novel_detection_dataset(unchecked)
            else:
                dataset = build_task_dataset(unchecked, task, split, train=split == cfg.data.train_split)
            check_dataset(dataset, decode=decode)
        except DataError as error:
            unreadable[name] = str(error)
            continue
        datasets[name] = dataset.summary().to_dict()
    problems = sum(sum(summary["invalid"].values()) for summary in datasets.values()) + len(unreadable)
    return {"data_root": cfg.data.root, "on_invalid": cfg.data.on_invalid, "preflight": True, "decode": decode,
            "datasets": datasets, "unreadable": unreadable, "problems": problems}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.data.check",
                                     description="Check every record and image file a run would read from a data root.",
                                     epilog="Overrides are key.sub=value, e.g. data.train_split=train2017")
    parser.add_argument("root", help="the data root (data.root)")
    parser.add_argument("--config", default="tiny", help="preset or YAML whose data.* paths and tasks are used")
    parser.add_argument("--split", action="append", default=None, metavar="NAME",
                        help="split to check (repeatable; default: data.train_split and data.val_split)")
    parser.add_argument("--header-only", action="store_true",
                        help="read each image's header only (fast), not the whole image")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, [*args.overrides, f"data.root={args.root}", "data.synthetic_profile=null",
                                        "data.on_invalid=skip"])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not Path(args.root).is_dir():
        print(f"error: {args.root}: not a folder", file=sys.stderr)
        return 2
    splits = args.split or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    report = check_root(cfg, splits, decode=not args.header_only)
    print(format_data_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if report["problems"] == 0:
        verdict = "no problem found"
    else:
        verdict = (f"{report['problems']} problem(s) found (records that data.on_invalid=error refuses, or datasets "
                   "that cannot be read)")
    print(f"{verdict}; {'whole images decoded' if not args.header_only else 'image headers read'}")
    return 0 if report["problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
