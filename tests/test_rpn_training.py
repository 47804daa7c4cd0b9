"""The class-agnostic region proposal network learns: trained alone on a few synthetic scenes for 120 CPU steps, its
loss falls and its top-10 proposals find the objects that an untrained network misses."""

from __future__ import annotations

import dataclasses

import torch

from uniperceiver_v2.config import get_preset
from uniperceiver_v2.modeling import ImageEncoder
from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy, box_iou

torch.set_num_threads(1)

SIZE = 64


def render_scenes(num_images: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Noise images with 1-3 filled rectangles / ellipses (12-32 px) of random colours; later shapes occlude
    earlier ones, boxes are the tight boxes of the visible masks (objects with < 20 visible pixels are dropped)."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    images, targets = [], []
    for _ in range(num_images):
        image = 0.3 * torch.randn(3, SIZE, SIZE, generator=gen)
        masks = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            w, h = torch.randint(12, 33, (2,), generator=gen).tolist()
            x1 = int(torch.randint(0, SIZE - w + 1, (1,), generator=gen))
            y1 = int(torch.randint(0, SIZE - h + 1, (1,), generator=gen))
            if torch.rand(1, generator=gen) < 0.5:
                mask = (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
            else:
                mask = ((xs - x1 - w / 2) / (w / 2)) ** 2 + ((ys - y1 - h / 2) / (h / 2)) ** 2 <= 1
            colour = (torch.rand(3, 1, generator=gen) * 2 - 1) * 2
            image[:, mask] = colour + 0.1 * torch.randn(3, int(mask.sum()), generator=gen)
            masks = [m & ~mask for m in masks] + [mask]
        masks = [m for m in masks if m.sum() >= 20]
        boxes = []
        for m in masks:
            rows, cols = m.nonzero(as_tuple=True)
            boxes.append([cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1])
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "masks": torch.stack(masks),
                        "labels": torch.zeros(len(boxes), dtype=torch.long), "size": torch.tensor([SIZE, SIZE])})
    return torch.stack(images), targets


def recall_at_50(model: ImageEncoder, images: torch.Tensor, targets: list[dict]) -> float:
    """Fraction of GT boxes with IoU >= 0.5 to one of the top-O (10) proposals."""
    model.eval()
    with torch.no_grad():
        out = model(images)
    model.train()
    hits = total = 0
    for b, t in enumerate(targets):
        iou = box_iou(t["boxes"], box_cxcywh_to_xyxy(out.boxes[b]) * SIZE)
        hits += int((iou.max(1).values >= 0.5).sum())
        total += len(t["boxes"])
    return hits / total


def test_region_proposal_network_learns_on_synthetic_scenes():
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        get_preset("tiny").image_encoder, backbone_channels=[16, 32, 64, 64], hidden_dim=32, enc_layers=1,
        dec_layers=2, dim_feedforward=64, nheads=4, num_queries=20, topk_queries=10, dn_num_queries=12,
        mask_points=256, use_global=False,
        # the proposal losses do not see the regional tokens; the paper's fusion keeps the parameter count (and
        # with it the random stream this seeded test was written against) of v2 eq. (2) as written
        mask_pooling="image", region_appearance_size=0)
    images, targets = render_scenes(16, seed=0)
    model = ImageEncoder(cfg).train()
    untrained = recall_at_50(model, images, targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(120):
        index = torch.randperm(len(images))[:4]
        out = model(images[index], None, [targets[i] for i in index])
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    trained = recall_at_50(model, images, targets)
    assert last < 0.6 * first, (first, last)
    assert trained >= 0.5 and trained >= untrained + 0.3, (untrained, trained)
