"""Pre-train the image backbone as a plain classifier, the stand-in for the paper's ImageNet-pretrained backbones.

``pretrain_backbone(cfg, ...)`` trains backbone + global average pooling + one linear layer
(``BackboneClassifier``) with cross-entropy (label smoothing 0.1), AdamW, linear warm-up and cosine decay on the
classification training split of the config (``data.classification_root``: the synthetic suite's shape classes,
or any ImageFolder tree). It writes the backbone's state dict as safetensors (the linear layer is dropped), which
``image_encoder.backbone_weights`` loads, and the validation accuracy of the classifier next to it
(``<out>.json``). The command line is ``python -m uniperceiver_v2.pretrain_backbone``.

Why the generalist needs it (a random backbone makes the contrastive tasks collapse) and how it compares with the
packaged ImageNet EfficientNet-Lite0 (``image_encoder.backbone_weights=imagenet``): docs/design.md,
"Backbone weights".
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config
from ..data.summary import DataError

__all__ = ["BackboneClassifier", "pretrain_backbone"]

logger = logging.getLogger(__name__)


class BackboneClassifier(nn.Module):
    """backbone -> global average pooling of the stride-32 map -> Linear(channels, num_classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self.head(self.backbone(images)[-1].mean(dim=(2, 3)))


def _cosine_lr(iteration: int, iterations: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warm-up to 1, then cosine decay to 0."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    progress = (iteration - warmup) / max(1, iterations - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(batch.images.to(device))
        correct += int((logits.argmax(1).cpu() == batch.labels).sum())
        total += len(batch.labels)
    model.train()
    return correct / max(1, total)


def pretrain_backbone(
    cfg: Config,
    out: str | Path,
    iterations: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    warmup: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``build_backbone(cfg.image_encoder...)`` + a linear head on the classification training split, save
    the backbone's weights to ``out`` (safetensors, written atomically) and a summary to ``out`` + ``.json``.

    Args:
        cfg: the run's config: ``image_encoder.backbone`` / ``backbone_channels`` say which backbone,
            ``data`` where the classification split is (the synthetic suite is generated if configured), ``run.seed``
            the initialisation and data order, ``run.device`` the device.
        out: path of the safetensors file to write.
        iterations, batch_size, lr, weight_decay, warmup: the AdamW schedule (linear warm-up, cosine decay).
        progress: show a tqdm bar.

    Returns:
        The summary written next to the weights: training / validation top-1, the last losses, the time taken.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..data.collate import collate_classification
    from ..modeling.backbone import build_backbone
    from .data_setup import build_task_dataset, ensure_data
    from .runtime import resolve_device

    if iterations <= 0 or batch_size <= 0:
        raise ValueError(f"pretrain_backbone: iterations and batch_size must be > 0, got {iterations}, {batch_size}")
    out = Path(out)
    ensure_data(cfg)
    train_set = build_task_dataset(cfg, "classification", cfg.data.train_split, train=True)
    val_set = build_task_dataset(cfg, "classification", cfg.data.val_split, train=False)
    device = resolve_device(cfg.run.device, torch.device("cpu"))

    torch.manual_seed(cfg.run.seed)
    ie = cfg.image_encoder
    model = BackboneClassifier(build_backbone(ie.backbone, ie.backbone_channels, ie.backbone_weights),
                               len(train_set.class_names)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                        collate_fn=collate_classification, num_workers=cfg.data.num_workers)
    val_loader = DataLoader(val_set, batch_size=batch_size, collate_fn=collate_classification,
                            num_workers=cfg.data.num_workers)
    if len(loader) == 0:
        raise DataError(f"pretrain_backbone: the classification split has {len(train_set)} images, fewer than one "
                        f"batch of {batch_size}")

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(total=iterations, desc="backbone pre-training", disable=not progress)
    iteration = 0
    while iteration < iterations:
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * _cosine_lr(iteration, iterations, warmup)
            logits = model(batch.images.to(device))
            labels = batch.labels.to(device)
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            accuracy = (logits.argmax(1) == labels).float().mean().item()
            history.append({"iteration": iteration + 1, "loss": loss.item(), "accuracy": accuracy})
            iteration += 1
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{accuracy:.2f}")
            if iteration >= iterations:
                break
    bar.close()

    last = history[-min(50, len(history)):]
    summary = {
        "backbone": ie.backbone,
        "backbone_channels": list(ie.backbone_channels),
        "classes": list(train_set.class_names),
        "iterations": iterations,
        "batch_size": batch_size,
        "lr": lr,
        "train_loss_last50": sum(h["loss"] for h in last) / len(last),
        "train_top1_last50": sum(h["accuracy"] for h in last) / len(last),
        "val_top1": _accuracy(model, val_loader, device),
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.backbone.state_dict().items()}
    partial = out.with_name(out.name + ".partial")
    save_file(state, str(partial), metadata={"backbone": ie.backbone, "val_top1": f"{summary['val_top1']:.4f}"})
    partial.replace(out)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=1))
    return summary
