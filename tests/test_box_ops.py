"""Box conversions, GIoU, point sampling and position encodings of the image encoder, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver_v2.modeling.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_loss,
    inverse_sigmoid,
    normalize_targets,
)
from uniperceiver_v2.modeling.point_sampling import point_sample, sample_uncertain_points
from uniperceiver_v2.modeling.position_encoding import box_sine_embedding, sine_position_embedding

torch.set_num_threads(1)


def test_box_conversions_round_trip_and_values():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[0.3, 0.55, 0.4, 0.7], [0.5, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_generalized_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    others = torch.tensor([
        [1.0, 1.0, 3.0, 3.0],    # intersection 1, union 7, hull 9: 1/7 - 2/9
        [3.0, 0.0, 4.0, 2.0],    # disjoint: intersection 0, union 6, hull 8: -2/8
        [0.0, 0.0, 2.0, 2.0],    # identical: 1
        [0.5, 0.5, 1.5, 1.5],    # inside: IoU 1/4, hull = a: 1/4
    ])
    expected = torch.tensor([[1 / 7 - 2 / 9, -2 / 8, 1.0, 0.25]])
    torch.testing.assert_close(generalized_box_iou(a, others), expected)
    torch.testing.assert_close(generalized_box_iou_loss(a.expand(4, 4), others), 1 - expected[0])


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite_at_borders():
    x = torch.linspace(-6, 6, 25)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


def test_normalize_targets_boxes_and_padded_masks():
    masks = torch.zeros(1, 20, 40, dtype=torch.bool)
    masks[0, 5:15, 10:30] = True
    targets = [{"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]]), "masks": masks, "labels": torch.tensor([3]),
                "size": torch.tensor([20, 40])}]
    out = normalize_targets(targets, padded_size=(32, 64))[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    assert out["masks"].shape == (1, 32, 64) and out["masks"].dtype == torch.float32
    assert out["masks"][0, :20, :40].bool().equal(masks[0]) and out["masks"][0, 20:].sum() == 0
    bad = [dict(targets[0], masks=torch.zeros(1, 21, 40))]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        normalize_targets(bad, padded_size=(32, 64))
    with pytest.raises(KeyError, match="size"):
        normalize_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])


def test_point_sample_reads_pixel_centres_exactly():
    maps = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    ys, xs = torch.randint(0, 5, (2, 11)), torch.randint(0, 7, (2, 11))
    coords = torch.stack([(xs.double() + 0.5) / 7, (ys.double() + 0.5) / 5], -1)
    values = point_sample(maps, coords)                                          # (2, 3, 11)
    expected = torch.stack([maps[b][:, ys[b], xs[b]] for b in range(2)])
    torch.testing.assert_close(values, expected)


def test_point_sample_bilinear_between_pixel_centres():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=torch.float64)
    centre = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)                  # halfway between all four centres
    torch.testing.assert_close(point_sample(maps, centre), torch.tensor([[[1.5]]], dtype=torch.float64))


def test_importance_sampling_prefers_uncertain_pixels():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., :, :4] = 0.0                                                     # 1/8 of the area is uncertain
    gen = torch.Generator().manual_seed(0)
    points = sample_uncertain_points(logits, 400, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                     generator=gen)
    assert points.shape == (1, 400, 2)
    fraction = (points[0, :, 0] < 4 / 32).float().mean().item()
    # 300 points from the most uncertain of 1200 candidates (~150 of them in the strip) + 100 uniform.
    assert fraction > 0.3, fraction


def test_sine_position_embedding_ignores_padding():
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded = torch.ones(1, 9, 12, dtype=torch.bool)
    padded[:, :6, :8] = False
    a = sine_position_embedding(mask, 16)
    b = sine_position_embedding(padded, 16)
    assert a.shape == (1, 32, 6, 8)
    torch.testing.assert_close(b[:, :, :6, :8], a)
    # channel 0 is sin(2 pi (y + 0.5) / H) for y = row index (first frequency)
    rows = (torch.arange(6) + 0.5) / 6 * 2 * math.pi
    torch.testing.assert_close(a[0, 0, :, 0], rows.sin(), atol=1e-5, rtol=1e-5)


def test_box_sine_embedding_layout():
    boxes = torch.tensor([[0.25, 0.75, 0.5, 0.1]])
    emb = box_sine_embedding(boxes, 8)
    assert emb.shape == (1, 32)
    # blocks are (cy, cx, w, h); the first feature of a block is sin(2 pi v)
    for block, value in enumerate([0.75, 0.25, 0.5, 0.1]):
        torch.testing.assert_close(emb[0, block * 8], torch.tensor(math.sin(2 * math.pi * value)))
        torch.testing.assert_close(emb[0, block * 8 + 1], torch.tensor(math.cos(2 * math.pi * value)))
