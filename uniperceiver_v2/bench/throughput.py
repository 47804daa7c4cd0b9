"""Training throughput per task, 1 process vs N processes (DDP, gloo on CPU), on the same cores.

    python -m uniperceiver_v2.bench throughput [--tasks classification,mlm] [--procs 2] [--cores 2]
        [--threads N] [--iterations 5] [--warmup 2] [key.sub=value ...]

For every task, the real trainer (``Trainer.train_step``: data loading, forward, backward, DDP all-reduce,
MT-AdamW step) runs that task alone at the config's per-process batch size (``tiny`` by default), once in
one process with ``--cores`` threads and once under torchrun with ``--procs`` processes of
``cores / procs`` threads each, so both runs use the same cores (``--threads N`` gives every process N threads
instead). After ``--warmup`` iterations, the wall
time of ``--iterations`` iterations is measured on rank 0 between two barriers.

Printed per task: iterations/s of each run, their ratio (N procs / 1 proc), and the ratio of samples/s
(each of the N processes trains its own per-process batch, so an iteration holds N times the samples).
On a machine with as many cores as processes, a samples/s ratio near 1 means DDP costs little beyond
splitting the cores; on GPUs, where each process has its own device, the samples/s ratio is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from uniperceiver_v2.bench import TASK_NAMES, build_trainer

RESULT_TAG = "THROUGHPUT_RESULT "


def _worker(args: argparse.Namespace) -> int:
    """Time ``args.iterations`` training iterations of one task (run by the parent, alone or under torchrun)."""
    import torch

    from uniperceiver_v2.engine.distributed import barrier, destroy_distributed, get_rank, init_distributed

    task = args.worker
    disabled = [f"tasks.{name}.enabled=false" for name in TASK_NAMES if name != task] + [
        f"tasks.{task}.start_iteration=0"]     # the one task trains from the first iteration
    with tempfile.TemporaryDirectory() as output_dir:
        # No warm-up or decay: the lr does not change the time of an iteration, and the tiny preset's 20
        # warm-up iterations would not fit into a short benchmark.
        init_distributed()
        trainer = build_trainer(args.config, ["optim.warmup_iters=0", "optim.decay_at=[1.0]", *args.overrides,
                                              *disabled, f"run.iterations={args.warmup + args.iterations}"],
                                output_dir)
        for iteration in range(args.warmup):
            trainer.train_step(iteration)
        barrier()
        start = time.perf_counter()
        for iteration in range(args.warmup, args.warmup + args.iterations):
            trainer.train_step(iteration)
        barrier()
        seconds = time.perf_counter() - start
        if get_rank() == 0:
            result = {"task": task, "iterations_per_second": args.iterations / seconds,
                      "batch_per_process": trainer.cfg.tasks.get(task).batch_size, "threads": torch.get_num_threads(),
                      "seconds": seconds}
            print(RESULT_TAG + json.dumps(result), flush=True)
    destroy_distributed()
    return 0


def _threads(procs: int, args: argparse.Namespace) -> int:
    """Intra-op threads of each process: ``--threads``, or the ``--cores`` split evenly between the processes."""
    return args.threads if args.threads is not None else max(args.cores // procs, 1)


def _run(task: str, procs: int, args: argparse.Namespace) -> dict:
    threads = _threads(procs, args)
    worker_args = ["--worker", task, "--config", args.config, "--iterations", str(args.iterations),
                   "--warmup", str(args.warmup), *args.overrides]
    if procs == 1:
        command = [sys.executable, "-m", "uniperceiver_v2.bench", "throughput", *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "uniperceiver_v2.bench", "throughput", *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"throughput worker for {task} with {procs} process(es) failed "
                           f"(exit {result.returncode}):\n{result.stdout[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or YAML (default tiny)")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated tasks")
    parser.add_argument("--procs", type=int, default=2, help="processes of the distributed run (default 2)")
    parser.add_argument("--cores", type=int, default=2, help="cores shared by the processes (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of every process in both runs, instead of splitting --cores "
                             "(e.g. 1: one thread per process, which avoids OpenMP threads waiting on each other "
                             "on a busy machine)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {unknown}; expected names from {TASK_NAMES}")
    if args.procs < 2 or args.iterations < 1 or args.warmup < 0:
        parser.error("--procs must be >= 2, --iterations >= 1, --warmup >= 0")

    print(f"config {args.config} {' '.join(args.overrides)}; 1 process x {_threads(1, args)} thread(s) vs "
          f"{args.procs} processes x {_threads(args.procs, args)} thread(s); {args.warmup} warm-up + "
          f"{args.iterations} timed iterations; load average before: {os.getloadavg()[0]:.1f}")
    header = (f"{'task':<15}{'batch/proc':>11}{'it/s 1p':>10}{f'it/s {args.procs}p':>10}{'it/s ratio':>12}"
              f"{'samples/s ratio':>17}")
    print(header)
    rows = []
    for task in tasks:
        single = _run(task, 1, args)
        multi = _run(task, args.procs, args)
        ratio = multi["iterations_per_second"] / single["iterations_per_second"]
        rows.append({"task": task, "single": single, "multi": multi, "ratio": ratio})
        print(f"{task:<15}{single['batch_per_process']:>11}{single['iterations_per_second']:>10.3f}"
              f"{multi['iterations_per_second']:>10.3f}{ratio:>12.2f}{ratio * args.procs:>17.2f}", flush=True)
    print(RESULT_TAG + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
