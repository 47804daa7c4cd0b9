"""Evaluate a checkpoint: ``python -m uniperceiver_v2.evaluate --checkpoint DIR --tasks t1,t2 [--split test]``.

``DIR`` is a run directory (``runs/tiny``), its ``checkpoints`` folder (the newest checkpoint is used) or one
checkpoint (``runs/tiny/checkpoints/iter_0000200``); the model is rebuilt from the config recorded in the
checkpoint and its weights are loaded without unpickling anything. Under torchrun every rank evaluates a
shard of each set. The results go to ``--out`` (default ``<run dir>/eval_<split>_<iteration>.json``).

The metrics of each task are listed in ``engine.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .engine.distributed import get_rank
from .engine.evaluation import EVALUATORS, evaluate
from .engine.logging import json_safe

__all__ = ["main"]


# ------------------------------------------------------------------------------------------------ command line
def _checkpoint_dir(path: Path) -> Path:
    """A run directory stands for its ``checkpoints`` folder."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory, its checkpoints folder or a checkpoint")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: the tasks enabled in the checkpoint's config)")
    parser.add_argument("--split", default=None, help="data split (default: the config's data.val_split)")
    parser.add_argument("--out", default=None, help="results JSON (default: <run dir>/eval_<split>_<iteration>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. data.root=data/real tasks.captioning.beam_size=3")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .api import build_model
    from .config import apply_overrides, config_from_dict
    from .engine.checkpoint import CheckpointError, find_latest, read_checkpoint_meta
    from .engine.distributed import destroy_distributed, init_distributed
    from .engine.runtime import resolve_device
    from .engine.trainer import fail_fast

    try:
        location = _checkpoint_dir(Path(args.checkpoint))
        checkpoint = location if (location / "meta.json").is_file() else find_latest(location)
        if checkpoint is None:
            raise CheckpointError(f"{args.checkpoint}: no checkpoint found")
        meta = read_checkpoint_meta(checkpoint)
        if meta.get("config") is None:
            raise CheckpointError(f"{checkpoint}/meta.json records no config")
        cfg = apply_overrides(config_from_dict(meta["config"]), args.overrides)
        tasks = args.tasks.split(",") if args.tasks else cfg.tasks.names()
        unknown = [t for t in tasks if t not in EVALUATORS]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {unknown}; expected names from {sorted(EVALUATORS)}")
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    split = args.split or cfg.data.val_split

    with fail_fast():
        info = init_distributed()
        model = build_model(cfg, checkpoint).to(resolve_device(cfg.run.device, info.device))
        results = evaluate(model, cfg, tasks, split)
        if get_rank() == 0:
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            out = Path(args.out) if args.out else run_dir / f"eval_{split}_{meta['iteration']:07d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            record = {"iteration": meta["iteration"], "split": split, "checkpoint": str(checkpoint),
                      "results": results}
            out.write_text(json.dumps(json_safe(record), indent=2) + "\n")
            print(json.dumps(json_safe(results), indent=2))
            print(f"wrote {out}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
