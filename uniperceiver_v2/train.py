"""Train Uni-Perceiver v2: ``python -m uniperceiver_v2.train --config PRESET_OR_YAML [key.sub=value ...] [--resume]``.

One process::

    python -m uniperceiver_v2.train --config tiny run.iterations=100 run.output_dir=runs/tiny_100

Several processes on one machine (gloo on CPU, NCCL on GPUs), or several machines with torchrun's usual flags::

    torchrun --nproc_per_node=2 -m uniperceiver_v2.train --config tiny
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        -m uniperceiver_v2.train --config swin_base

``--resume`` continues from the newest checkpoint in ``<run.output_dir>/checkpoints`` (it starts from scratch,
saying so, when there is none yet, so a preempted job can be restarted with the same command). The run
directory receives ``config.yaml``, ``run_info.json``, ``data_check.json`` (what each dataset kept and skipped,
and why; also printed before the first iteration), ``metrics.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/`` and
``eval_<split>_<iteration>.json``. Exit codes: 0 finished, 128 + N stopped by signal N
after saving a checkpoint, 1 failed (in a distributed run the failing rank's error ends the whole job), 2 bad
command line or configuration.

On a small or busy CPU, ``OMP_NUM_THREADS=1`` can be many times faster than torch's default of one thread per
core: with two threads the tiny model's small operators spend most of their time waiting on each other (about
x10 on the 2-vCPU build machine, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data.summary import DataError

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m uniperceiver_v2.train", description="Train Uni-Perceiver v2 (single process or torchrun).",
        epilog="Overrides are key.sub=value, e.g. run.iterations=500 decoder.moe.routing=token optim.lr=5e-4")
    parser.add_argument("--config", default="tiny", help="preset (tiny, r50, swin_base, swin_large) or YAML file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint of run.output_dir (from scratch if there is none)")
    parser.add_argument("--new-schedule", action="store_true",
                        help="with --resume: follow this config's lr schedule (e.g. a larger run.iterations) from the "
                             "checkpoint's iteration on, instead of the schedule saved in the checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the evaluations (at run.eval_every and at the end); run them later with "
                             "python -m uniperceiver_v2.evaluate")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.new_schedule and not args.resume:
        print("error: --new-schedule only applies with --resume", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    earlier = sorted(path.name for path in (Path(cfg.run.output_dir) / "checkpoints").glob("iter_*"))
    if earlier and not args.resume:
        # a fresh run would mix its checkpoints with these and prune them (run.keep_checkpoints)
        print(f"error: run.output_dir={cfg.run.output_dir} holds checkpoints of an earlier run ({', '.join(earlier)}); "
              "pass --resume to continue it, or choose another run.output_dir (or delete the folder) to start over",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .engine.build import build_training
    from .engine.data_setup import data_report, format_data_report, save_data_report
    from .engine.distributed import destroy_distributed, get_rank, init_distributed
    from .engine.evaluation import evaluate
    from .engine.trainer import Trainer, fail_fast

    with fail_fast():
        init_distributed()
        try:
            model, tasks, datasets = build_training(cfg)
            trainer = Trainer(cfg, model, tasks, datasets, evaluate_fn=None if args.no_eval else evaluate,
                              progress=not args.no_progress, argv=argv)
            # the evaluation split is checked now too: a bad file there would otherwise surface after training
            report = data_report(cfg, datasets, eval_split=None if args.no_eval else cfg.data.val_split)
        except (ConfigError, DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            destroy_distributed()
            return 2
        if get_rank() == 0:
            print(format_data_report(report), flush=True)
            save_data_report(report, cfg.run.output_dir)
        if args.resume:
            if trainer.resume(new_schedule=args.new_schedule):
                if get_rank() == 0:
                    print(f"resuming from iteration {trainer.iteration} ({trainer.checkpoint_dir})", file=sys.stderr)
            elif get_rank() == 0:
                print(f"--resume: no checkpoint in {trainer.checkpoint_dir} yet; starting from scratch",
                      file=sys.stderr)
        result = trainer.train()
    if get_rank() == 0 and result.interrupted_by is None:
        losses = ", ".join(f"{task} {loss:.4f}" for task, loss in sorted(result.final_losses.items()))
        print(f"finished {result.iteration} iterations in {trainer.elapsed:.1f} s; "
              f"each task's last logged loss: {losses}")
    destroy_distributed()
    return 128 + result.interrupted_by if result.interrupted_by is not None else 0


if __name__ == "__main__":
    sys.exit(main())
