"""Hungarian matcher: cost terms against a float64 slow path, assignments against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from uniperceiver_v2.modeling.matcher import HungarianMatcher

torch.set_num_threads(1)

COSTS = dict(cost_objectness=2.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0)
ALPHA, GAMMA = 0.25, 2.0


def _bilinear(grid: list[list[float]], x: float, y: float) -> float:
    """grid_sample(align_corners=False, zero padding) at normalised (x, y), written out by hand."""
    height, width = len(grid), len(grid[0])
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = 0.0
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                value += wx * wy * grid[yi][xi]
    return value


def _giou(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _slow_cost(logits, boxes, masks, gt_boxes, gt_masks, points):
    """The matching cost, one pair at a time, in Python floats."""
    n, k = len(logits), len(gt_boxes)
    cost = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        p = 1 / (1 + math.exp(-logits[i]))
        focal = ALPHA * (1 - p) ** GAMMA * -math.log(p) - (1 - ALPHA) * p ** GAMMA * -math.log(1 - p)
        pred_pts = [_bilinear(masks[i], x, y) for x, y in points]
        for j in range(k):
            l1 = sum(abs(u - v) for u, v in zip(boxes[i], gt_boxes[j]))
            gt_pts = [_bilinear(gt_masks[j], x, y) for x, y in points]
            bce = sum(-(t * math.log(1 / (1 + math.exp(-s))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-s))))
                      for s, t in zip(pred_pts, gt_pts)) / len(points)
            probs = [1 / (1 + math.exp(-s)) for s in pred_pts]
            dice = 1 - (2 * sum(q * t for q, t in zip(probs, gt_pts)) + 1) / (sum(probs) + sum(gt_pts) + 1)
            cost[i, j] = (COSTS["cost_objectness"] * focal + COSTS["cost_bbox"] * l1
                          - COSTS["cost_giou"] * _giou(boxes[i], gt_boxes[j])
                          + COSTS["cost_mask"] * bce + COSTS["cost_dice"] * dice)
    return cost


def _random_case(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    centres = torch.rand(n + k, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    sizes = torch.rand(n + k, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], 1)
    masks = torch.randn(n, 6, 6, generator=gen, dtype=torch.float64) * 3
    gt_masks = (torch.rand(k, 12, 12, generator=gen) > 0.5).to(torch.float64)
    return logits, boxes[:n], masks, boxes[n:], gt_masks


@pytest.mark.parametrize("seed", [0, 1])
def test_cost_matrix_matches_slow_reference(seed):
    logits, boxes, masks, gt_boxes, gt_masks = _random_case(4, 3, seed)
    matcher = HungarianMatcher(**COSTS, num_points=20, focal_alpha=ALPHA, focal_gamma=GAMMA)
    cost = matcher.cost_matrix(logits, boxes, masks, gt_boxes, gt_masks, torch.Generator().manual_seed(seed))
    points = torch.rand(1, 20, 2, generator=torch.Generator().manual_seed(seed))[0].double().tolist()
    expected = _slow_cost(logits.tolist(), boxes.tolist(), masks.tolist(), gt_boxes.tolist(), gt_masks.tolist(),
                          points)
    torch.testing.assert_close(cost.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k,seed", [(5, 3, 0), (5, 5, 1), (4, 1, 2), (3, 5, 3), (6, 4, 4)])
def test_assignment_is_optimal_against_brute_force(n, k, seed):
    logits, boxes, masks, gt_boxes, gt_masks = _random_case(n, k, seed)
    matcher = HungarianMatcher(**COSTS, num_points=50)
    cost = matcher.cost_matrix(logits, boxes, masks, gt_boxes, gt_masks, torch.Generator().manual_seed(seed))
    target = {"boxes": gt_boxes, "masks": gt_masks}
    (rows, cols), = matcher(logits[None], boxes[None], masks[None], [target], torch.Generator().manual_seed(seed))
    assert len(rows) == min(n, k) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    total = cost[rows, cols].sum().item()
    if n >= k:   # every GT gets a distinct prediction
        best = min(sum(cost[perm[j], j].item() for j in range(k)) for perm in itertools.permutations(range(n), k))
    else:        # every prediction gets a distinct GT
        best = min(sum(cost[i, perm[i]].item() for i in range(n)) for perm in itertools.permutations(range(k), n))
    assert total == pytest.approx(best, abs=1e-5)


def test_empty_targets_and_boxes_only_matching():
    logits, boxes, masks, gt_boxes, _ = _random_case(4, 2, 5)
    matcher = HungarianMatcher(**COSTS, num_points=10)
    out = matcher(logits[None].expand(2, -1), boxes[None].expand(2, -1, -1), None,
                  [{"boxes": gt_boxes[:0]}, {"boxes": gt_boxes}])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0
    assert sorted(out[1][1].tolist()) == [0, 1]


def test_perfect_predictions_are_matched_to_their_objects():
    gt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]])
    perm = torch.tensor([2, 0, 1])
    boxes = torch.cat([gt_boxes[perm], torch.tensor([[0.1, 0.9, 0.05, 0.05]])])
    gt_masks = torch.zeros(3, 16, 16)
    for j, (cx, cy, w, h) in enumerate(gt_boxes.tolist()):
        gt_masks[j, int((cy - h / 2) * 16):int((cy + h / 2) * 16), int((cx - w / 2) * 16):int((cx + w / 2) * 16)] = 1
    masks = torch.cat([gt_masks[perm] * 20 - 10, torch.full((1, 16, 16), -10.0)])
    matcher = HungarianMatcher(**COSTS, num_points=200)
    (rows, cols), = matcher(torch.zeros(1, 4), boxes[None], masks[None], [{"boxes": gt_boxes, "masks": gt_masks}])
    assignment = dict(zip(cols.tolist(), rows.tolist()))
    assert assignment == {int(perm[i]): i for i in range(3)}
