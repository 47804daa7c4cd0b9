"""Benchmarks, run as `python -m uniperceiver_v2.bench <name> [options]`.

Each benchmark is a module `uniperceiver_v2/bench/<name>.py` exposing `main(argv: list[str]) -> int`;
adding one needs no registration, the dispatcher in `__main__.py` finds it by name.
"""

from __future__ import annotations

import importlib
import pkgutil

# The trainable tasks, in the order the benchmarks print them.
TASK_NAMES = ("classification", "detection", "captioning", "mlm", "retrieval")


def build_trainer(config, overrides: list[str], output_dir: str):
    """A ``Trainer`` for a benchmark: ``config`` (preset or YAML) with ``overrides``, writing to ``output_dir``,
    without checkpoints, progress bar or TensorBoard (what every training benchmark here times)."""
    from uniperceiver_v2.config import load_config
    from uniperceiver_v2.engine.build import build_training
    from uniperceiver_v2.engine.trainer import Trainer

    cfg = load_config(config, [*overrides, f"run.output_dir={output_dir}", "run.ckpt_every=0"])
    model, tasks, datasets = build_training(cfg)
    return Trainer(cfg, model, tasks, datasets, progress=False, tensorboard=False)


def checkpoint_parser(name: str, description: str, split: str, images: int, what: str):
    """The command line of a benchmark that reads a trained checkpoint on the first ``--images`` items of a split:
    ``--checkpoint``, ``--split`` and ``--images`` (config overrides come with :func:`parse_checkpoint_args`); the
    caller adds its own options, then parses."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m uniperceiver_v2.bench {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder or checkpoint")
    parser.add_argument("--split", default=split, help=f"data split (default {split})")
    parser.add_argument("--images", type=int, default=images, help=f"{what} (default {images})")
    return parser


def parse_checkpoint_args(parser, argv: list[str] | None):
    """Parse, with config overrides last; ``--images`` must be at least 1."""
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=...")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images: expected at least 1, got {args.images}")
    return args


def model_of_checkpoint(checkpoint, overrides: list[str] | None = None):
    """The model of a checkpoint (run folder, checkpoints folder or checkpoint) in evaluation mode, and its recorded
    config with ``overrides`` applied (e.g. ``data.root=...`` when the suite has moved)."""
    from uniperceiver_v2.config import apply_overrides
    from uniperceiver_v2.engine.build import build_model

    model = build_model(None, checkpoint)
    return model, apply_overrides(model.config, overrides) if overrides else model.config


def available_benchmarks() -> list[str]:
    """Names of the benchmark modules in this package."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def run(name: str, argv: list[str]) -> int:
    """Run benchmark `name` with command-line arguments `argv`; returns its exit code."""
    if name not in available_benchmarks():
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.main(argv)
