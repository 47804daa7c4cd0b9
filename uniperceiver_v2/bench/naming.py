"""Finding objects vs naming them: ``python -m uniperceiver_v2.bench naming --checkpoint RUN [--split val]``.

Class-aware box AP mixes two failures: no proposal on the object, and a proposal on it with the wrong name. This
benchmark separates them on the first ``--images`` scenes of a split. For every ground-truth object it asks

* *found*: does a kept proposal (one of the O regional tokens) overlap it with IoU >= 0.5?
* *named*: if so, does the proposal of highest objectness among those name it right (arg max over the split's
  category names of the v2 eq. (6) logits, the ones detection scores with)?

and prints the two rates with the most frequent confusions (true -> predicted). Chance naming is 1 / C.
``--split novel`` looks at the novel-category scenes (``data.novel_annotations``) against all their category names
and reports seen and novel objects apart, the novel ones also named among the novel names only (chance
1 / number of novel names): a detector that never learnt a novel name can still find the object.
``--gradients N`` adds the norms of the gradients of the class-name loss and of the proposal losses over N
training batches, per parameter group: MT-AdamW normalises the task's gradient as a whole, so their ratio is the
share of a detection step that goes to naming.

    python -m uniperceiver_v2.bench naming --checkpoint runs/small/train --split val --images 120 \\
        data.root=data/synthetic_small
"""

from __future__ import annotations

import collections
import sys

import torch

__all__ = ["NamingResult", "main", "naming_rates"]


class NamingResult(dict):
    """{"objects", "found", "named", "classes", "confusions": Counter((true, predicted)), "groups"}.

    ``groups`` (``--split novel`` only): {"seen" / "novel": {"objects", "found", "named"}}, the novel group also with
    "named_among_novel" and "novel_names" (how many).
    """


@torch.no_grad()
def naming_rates(model, cfg, split: str, images: int, batch_size: int = 4, iou: float = 0.5) -> NamingResult:
    """Found and named rates of the detection task on the first ``images`` scenes of ``split``."""
    from uniperceiver_v2.engine.data_setup import build_task_dataset, novel_detection_dataset
    from uniperceiver_v2.engine.runtime import evaluation_mode
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou
    from uniperceiver_v2.tasks import TASKS

    dataset = (novel_detection_dataset(cfg) if split == "novel"
               else build_task_dataset(cfg, "detection", split, train=False))
    task = TASKS["detection"].from_dataset(cfg.tasks.detection, dataset)
    novel_by_name = {category.name: bool(getattr(category, "novel", False)) for category in dataset.categories}
    is_novel = torch.tensor([novel_by_name.get(name, False) for name in task.class_names])             # (C,)
    groups = {group: dict.fromkeys(("objects", "found", "named"), 0) for group in ("seen", "novel")}
    groups["novel"].update(named_among_novel=0, novel_names=int(is_novel.sum()))
    count = min(images, len(dataset))
    objects = found = named = 0
    confusions: collections.Counter = collections.Counter()
    with evaluation_mode(model):
        for start in range(0, count, batch_size):
            batch = task.collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            batch = batch.to(model.device)
            encoded = model.encode_images(batch.images, batch.padding_mask)
            logits, _ = task.region_logits(model, encoded, batch.class_names)                     # (B, O, C)
            height, width = encoded.image_sizes[:, 0], encoded.image_sizes[:, 1]
            scale = torch.stack([width, height, width, height], dim=1).to(encoded.boxes.dtype)
            proposals = box_cxcywh_to_xyxy(encoded.boxes) * scale[:, None]                       # (B, O, 4)
            for b, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
                if boxes is None or len(boxes) == 0:
                    continue
                overlaps = box_iou(boxes.to(proposals.dtype), proposals[b])                       # (G, O)
                objectness = encoded.objectness[b].float()
                for g, label in enumerate(labels.tolist()):
                    group = groups["novel" if bool(is_novel[label]) else "seen"]
                    objects += 1
                    group["objects"] += 1
                    hits = overlaps[g] >= iou
                    if not bool(hits.any()):
                        continue
                    found += 1
                    group["found"] += 1
                    best = objectness.masked_fill(~hits, float("-inf")).argmax()
                    row = logits[b, best].float()
                    predicted = int(row.argmax())
                    if predicted == label:
                        named += 1
                        group["named"] += 1
                    else:
                        confusions[(batch.class_names[label], batch.class_names[predicted])] += 1
                    if bool(is_novel[label]):
                        among = int(row.masked_fill(~is_novel.to(row.device), float("-inf")).argmax())
                        group["named_among_novel"] += int(among == label)
    return NamingResult(objects=objects, found=found, named=named, classes=len(task.class_names),
                        confusions=confusions, groups=groups if split == "novel" else {})


def _group(name: str) -> str:
    """``bench gradients``' group of the parameter, its finer groups beyond these three folded into "other"."""
    from uniperceiver_v2.bench.gradients import parameter_group

    group = parameter_group(name)
    return group if group in GRADIENT_GROUPS else "other"


GRADIENT_GROUPS = ("backbone", "proposal network", "unified decoder", "other")


def gradient_split(model, cfg, split: str = "train", batches: int = 4, batch_size: int = 4, seed: int = 0
                   ) -> dict[str, dict[str, float]]:
    """Norms of the gradients of the detection task's class-name loss and of its proposal losses, per parameter
    group: what MT-AdamW's normalisation of the whole task gradient divides between the two.

    Returns:
        ``{"loss_cls": {group: norm, ..., "all": norm}, "loss_rpn": {...}, "weighted_rpn_share": s}`` with norms
        root-mean-square over ``batches`` training batches (the model in training mode, augmentation off), and
        ``s`` the proposal losses' share of the norm of the task's gradient as the preset weights them
        (``tasks.detection.proposal_loss_weight``), assuming the two parts orthogonal.
    """
    import torch

    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.tasks import TASKS

    torch.manual_seed(seed)
    dataset = build_task_dataset(cfg, "detection", split, train=False)
    task = TASKS["detection"].from_dataset(cfg.tasks.detection, dataset)
    was_training = model.training
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    squares = {key: dict.fromkeys((*GRADIENT_GROUPS, "all"), 0.0) for key in ("loss_cls", "loss_rpn")}
    for b in range(batches):
        batch = task.collate([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)])
        out = task.loss(model, batch)
        for key in ("loss_cls", "loss_rpn"):
            grads = torch.autograd.grad(out[key], [p for _, p in params], retain_graph=True, allow_unused=True)
            for (name, _), grad in zip(params, grads):
                if grad is not None:
                    value = grad.float().square().sum().item()
                    squares[key][_group(name)] += value
                    squares[key]["all"] += value
    model.train(was_training)
    norms = {key: {g: (v / batches) ** 0.5 for g, v in groups.items()} for key, groups in squares.items()}
    rpn = cfg.tasks.detection.proposal_loss_weight * norms["loss_rpn"]["all"]
    norms["weighted_rpn_share"] = rpn / max((rpn ** 2 + norms["loss_cls"]["all"] ** 2) ** 0.5, 1e-12)
    return norms


def main(argv: list[str] | None = None) -> int:
    from uniperceiver_v2.bench import checkpoint_parser, model_of_checkpoint, parse_checkpoint_args

    parser = checkpoint_parser("naming", __doc__, split="val", images=120, what="scenes to look at")
    parser.add_argument("--top", type=int, default=8, help="confusions to list (default 8)")
    parser.add_argument("--gradients", type=int, default=0, metavar="BATCHES",
                        help="also print the gradient norms of the class-name and proposal losses over this many "
                             "training batches (default 0: no)")
    args = parse_checkpoint_args(parser, argv)

    model, cfg = model_of_checkpoint(args.checkpoint, args.overrides)
    result = naming_rates(model, cfg, args.split, args.images)
    objects, found, named = result["objects"], result["found"], result["named"]
    print(f"{args.checkpoint}, split {args.split}, first {args.images} scenes: {objects} objects, "
          f"{result['classes']} category names (chance naming {1 / result['classes']:.3f})")
    print(f"found (a proposal with IoU >= 0.5): {found} = {found / max(objects, 1):.3f} of the objects")
    print(f"named right (the found proposal of highest objectness): {named} = {named / max(found, 1):.3f} of the "
          "found objects")
    for group, counts in result["groups"].items():
        line = (f"  {group} objects: {counts['objects']}, found {counts['found'] / max(counts['objects'], 1):.3f}, "
                f"named right {counts['named'] / max(counts['found'], 1):.3f} of the found")
        if group == "novel":
            line += (f", among the {counts['novel_names']} novel names only "
                     f"{counts['named_among_novel'] / max(counts['found'], 1):.3f} (chance "
                     f"{1 / max(counts['novel_names'], 1):.3f})")
        print(line)
    if result["confusions"]:
        listed = ", ".join(f"{true} -> {predicted} ({n})" for (true, predicted), n in
                           result["confusions"].most_common(args.top))
        print(f"most frequent confusions: {listed}")
    if args.gradients:
        norms = gradient_split(model, cfg, batches=args.gradients)
        print(f"gradient norms over {args.gradients} training batches (root-mean-square), per parameter group:")
        for key in ("loss_cls", "loss_rpn"):
            print(f"  {key}: " + ", ".join(f"{g} {norms[key][g]:.3f}" for g in (*GRADIENT_GROUPS, "all")))
        print(f"  proposal losses' share of the task gradient at proposal_loss_weight="
              f"{cfg.tasks.detection.proposal_loss_weight:g}: {norms['weighted_rpn_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
