"""Where each task's gradient goes: ``python -m uniperceiver_v2.bench gradients --checkpoint RUN [--batches 2]``.

For every enabled task of the checkpoint's config, the norm |g| of the gradient of the task's training loss
(``task.loss(model, batch)["loss"]``, which already holds the task weight w_k) over all trainable parameters, and
how its square divides between parameter groups:

* ``backbone``: ``image_encoder.backbone``;
* ``proposal network``: ``image_encoder.region_proposals``;
* ``image encoder rest``: the rest of the image encoder (global attention pools, projections);
* ``unified decoder``: ``decoder``;
* ``logit scales``: the per-task temperatures (``logit_scales``);
* ``text encoder``: ``text_encoder`` (zero when it is frozen, as in the tiny preset);
* ``other``: anything else.

The model is in training mode and the batches are the first ``--batches`` batches of the task's training stream
(the trainer's own ``TaskStream``: shuffled, the training transforms, batch size ``tasks.<task>.batch_size``, seeded
from ``run.seed``), so they are what a run from scratch would see first. |g| is the root-mean-square over the
batches, a share is the group's summed squared norm over the summed total (the shares of a task add up to 1).

|g| is what MT-AdamW's per-task normalisation divides: each step's gradient is scaled to norm w_k (``g = w_k *
grad / ||grad||``, ``engine/optim.py``), so |g| itself does not change the size of the task's normalised
gradient; the shares say how that fixed norm w_k is divided between the groups. A group with a large share in one
task and a small one in another gets its normalised gradient mainly from the first.

    python -m uniperceiver_v2.bench gradients --checkpoint runs/small/train --split train --batches 2 \\
        data.root=data/synthetic_small

prints one row per task: the task, w_k, |g|, and the share of each parameter group.
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["GRADIENT_GROUPS", "main", "parameter_group", "task_gradients", "training_batches", "training_stream"]

# The groups in the order the table prints them; the first, second and fourth are also ``bench naming``'s.
GRADIENT_GROUPS = ("backbone", "proposal network", "image encoder rest", "unified decoder", "logit scales",
                   "text encoder", "other")


def parameter_group(name: str) -> str:
    """The group (one of ``GRADIENT_GROUPS``) of the parameter called ``name`` in ``model.named_parameters()``."""
    if "logit_scale" in name:
        return "logit scales"
    if name.startswith("image_encoder.backbone."):
        return "backbone"
    if name.startswith("image_encoder.region_proposals."):
        return "proposal network"
    if name.startswith("image_encoder."):
        return "image encoder rest"
    if name.startswith("decoder."):
        return "unified decoder"
    if name.startswith("text_encoder."):
        return "text encoder"
    return "other"


def training_stream(cfg, task_name: str, split: str):
    """(task, the task's training stream on ``split``): the trainer's ``TaskStream`` (shuffled, the training
    transforms, batch size ``tasks.<task>.batch_size``, seeded from ``run.seed``), as a run from scratch draws it."""
    from uniperceiver_v2.engine.data_setup import TaskStream, build_task_dataset
    from uniperceiver_v2.tasks import TASKS

    task_cfg = cfg.tasks.get(task_name)
    dataset = build_task_dataset(cfg, task_name, split, train=True)
    task = TASKS[task_name].from_dataset(task_cfg, dataset)
    return task, TaskStream(task_name, dataset, task.collate, task_cfg.batch_size, seed=cfg.run.seed)


def training_batches(cfg, task_name: str, split: str, count: int):
    """(task, [the first ``count`` batches of the task's training stream on ``split``])."""
    task, stream = training_stream(cfg, task_name, split)
    return task, [next(stream) for _ in range(count)]


def task_gradients(model, cfg, split: str = "train", batches: int = 2, tasks: list[str] | None = None
                   ) -> dict[str, dict]:
    """Gradient norm and shares per parameter group of each task's loss.

    Args:
        model: the model (put in training mode for the measurement, restored afterwards).
        cfg: the config whose enabled tasks, data and batch sizes are used.
        split: the data split to draw training batches from.
        batches: batches per task.
        tasks: the tasks to measure (default: the enabled ones).

    Returns:
        ``{task: {"norm": |g| (root-mean-square over the batches), "weight": w_k, "shares": {group: share}}}``;
        before batch b (0-based) of every task the global generator is seeded with ``run.seed + b`` (dropout,
        denoising noise), so one batch can be recomputed exactly.
    """
    from uniperceiver_v2.engine.runtime import move_to_device

    names = list(cfg.tasks.names()) if tasks is None else list(tasks)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    results: dict[str, dict] = {}
    try:
        for task_name in names:
            task, task_batches = training_batches(cfg, task_name, split, batches)
            squares = dict.fromkeys(GRADIENT_GROUPS, 0.0)
            for b, batch in enumerate(task_batches):
                torch.manual_seed(cfg.run.seed + b)
                loss = task.loss(model, move_to_device(batch, model.device))["loss"]
                grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                for (name, _), grad in zip(params, grads):
                    if grad is not None:
                        squares[parameter_group(name)] += grad.double().square().sum().item()
            total = sum(squares.values())
            results[task_name] = {
                "norm": (total / batches) ** 0.5,
                "weight": cfg.tasks.get(task_name).loss_weight,
                "shares": {g: (v / total if total > 0 else 0.0) for g, v in squares.items()},
            }
    finally:
        model.train(was_training)
    return results


def format_table(results: dict[str, dict]) -> str:
    """The table ``main`` prints: task, w_k, |g|, then the share of every group."""
    widths = [max(len(g), 6) for g in GRADIENT_GROUPS]
    header = f"{'task':<15} {'w_k':>5} {'|g|':>9}  " + "  ".join(f"{g:>{w}}" for g, w in zip(GRADIENT_GROUPS, widths))
    lines = [header]
    for task_name, row in results.items():
        shares = "  ".join(f"{row['shares'][g]:>{w}.3f}" for g, w in zip(GRADIENT_GROUPS, widths))
        lines.append(f"{task_name:<15} {row['weight']:>5g} {row['norm']:>#9.4g}  {shares}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench gradients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder or checkpoint")
    parser.add_argument("--split", default="train", help="data split of the training batches (default train)")
    parser.add_argument("--batches", type=int, default=2, help="batches per task (default 2)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=...")
    args = parser.parse_intermixed_args(argv)
    if args.batches < 1:
        parser.error(f"--batches: expected at least 1, got {args.batches}")

    from uniperceiver_v2.bench import model_of_checkpoint

    model, cfg = model_of_checkpoint(args.checkpoint, args.overrides)
    results = task_gradients(model, cfg, args.split, args.batches)
    print(f"{args.checkpoint}, split {args.split}: gradient of each task's loss over {args.batches} training batches "
          f"(|g| root-mean-square over the batches; shares of |g|^2 per parameter group)")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
