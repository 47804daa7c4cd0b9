"""Contrastive query denoising: noised boxes, group layout, attention mask against its definition."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy
from uniperceiver_v2.modeling.denoising import (
    MIN_BOX_SIZE,
    NOISE,
    OBJECT,
    build_denoising_queries,
    denoising_attention_mask,
    noise_boxes,
)

torch.set_num_threads(1)


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes of all sizes, some touching the border, some tiny."""
    x1y1 = torch.rand(n, 2, generator=gen)
    x2y2 = x1y1 + torch.rand(n, 2, generator=gen) * (1 - x1y1)
    xyxy = torch.cat([x1y1, x2y2], 1)
    xyxy[: n // 4, :2] = 0.0
    xyxy[n // 4: n // 2, 2:] = 1.0
    xyxy[-5:, 2:] = xyxy[-5:, :2] + 1e-4
    return torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_noised_boxes_are_valid(negative, scale):
    gen = torch.Generator().manual_seed(0)
    noised = noise_boxes(_random_boxes(2000, gen), scale, negative, gen)
    xyxy = box_cxcywh_to_xyxy(noised)
    eps = 1e-6
    assert torch.isfinite(noised).all()
    assert (xyxy >= -eps).all() and (xyxy <= 1 + eps).all()
    assert (xyxy[:, 2:] - xyxy[:, :2] >= MIN_BOX_SIZE - eps).all()


def test_positive_noise_stays_within_lambda_half_sizes_and_negatives_are_farther():
    gen = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(3000, 1)      # far from the border: no clipping
    scale = 0.8
    half = torch.tensor([0.1, 0.15, 0.1, 0.15])
    pos = box_cxcywh_to_xyxy(noise_boxes(boxes, scale, False, gen)) - box_cxcywh_to_xyxy(boxes)
    neg = box_cxcywh_to_xyxy(noise_boxes(boxes, scale, True, gen)) - box_cxcywh_to_xyxy(boxes)
    assert (pos.abs() < scale * half + 1e-6).all()
    # un-crossed negative corners moved by lambda to 2 lambda half-sizes
    outward = (neg[:, 0] < 0) & (neg[:, 2] > 0)
    moved = neg[outward][:, [0, 2]].abs() / (scale * half[0])
    assert outward.any() and (moved >= 1 - 1e-4).all() and (moved < 2 + 1e-4).all()
    assert neg.abs().mean() > 2 * pos.abs().mean()


def _reference_mask(num_groups, group_size, num_matching, valid):
    """The definition, one entry at a time (True = blocked)."""
    batch, num_dn = valid.shape
    total = num_dn + num_matching
    mask = torch.zeros(batch, total, total, dtype=torch.bool)
    for b in range(batch):
        for i in range(total):
            for j in range(total):
                i_dn, j_dn = i < num_dn, j < num_dn
                if not i_dn and j_dn:
                    mask[b, i, j] = True          # matching queries never see denoising queries
                elif i_dn and j_dn and i // group_size != j // group_size:
                    mask[b, i, j] = True          # groups do not see each other
                elif j_dn and not valid[b, j] and i != j:
                    mask[b, i, j] = True          # padded slots are invisible to everybody else
    return mask


def test_attention_mask_matches_definition():
    valid = torch.tensor([[True, True, False, True, True, False, True, True, False, True, True, False],
                          [True, False, False, True, False, False, True, False, False, True, False, False]])
    # 2 groups of 6 = 2 * max_gt(3); the second image has 1 GT
    valid = valid[:, :12]
    got = denoising_attention_mask(2, 6, 5, valid)
    assert got.equal(_reference_mask(2, 6, 5, valid))
    assert not got.all(-1).any(), "every query must see at least itself"


def test_build_denoising_queries_layout_and_targets():
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])},
               {"boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])},
               {"boxes": torch.zeros(0, 4)}]
    embedding = torch.randn(2, 8)
    dn = build_denoising_queries(targets, num_matching=7, content_embedding=embedding, dn_num_queries=20,
                                 box_noise_scale=1.0, label_noise_ratio=0.5,
                                 generator=torch.Generator().manual_seed(0))
    assert dn.group_size == 6 and dn.num_groups == 3 and dn.num_queries == 18      # 20 // (2 * 3)
    assert dn.attn_mask.shape == (3, 25, 25)
    assert dn.attn_mask.equal(_reference_mask(3, 6, 7, dn.valid))
    for g in range(3):
        base = g * 6
        assert dn.gt_index[0, base:base + 6].tolist() == [0, 1, 2, -1, -1, -1]
        assert dn.objectness_target[0, base:base + 6].tolist() == [1, 1, 1, 0, 0, 0]
        assert dn.valid[0, base:base + 6].all()
        assert dn.gt_index[1, base:base + 6].tolist() == [0, -1, -1, -1, -1, -1]
        assert dn.valid[1, base:base + 6].tolist() == [True, False, False, True, False, False]
    assert not dn.valid[2].any()
    # every content row is the "object" or the "noise" embedding
    is_object = (dn.content == embedding[OBJECT]).all(-1)
    is_noise = (dn.content == embedding[NOISE]).all(-1)
    assert (is_object ^ is_noise).all()


def test_label_noise_rate_is_half_the_ratio():
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    dn = build_denoising_queries(targets, 3, torch.eye(2), dn_num_queries=4000, box_noise_scale=1.0,
                                 label_noise_ratio=0.5, generator=torch.Generator().manual_seed(0))
    rate = (dn.content.argmax(-1) == NOISE).float().mean().item()
    assert rate == pytest.approx(0.25, abs=0.03)   # 4 standard deviations


def test_group_count_rules():
    one_box = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    many = [{"boxes": torch.rand(30, 4) * 0.2 + 0.3}]
    emb = torch.zeros(2, 4)
    assert build_denoising_queries(one_box, 5, emb, 100, 1.0, 0.5).num_groups == 50
    assert build_denoising_queries(many, 5, emb, 20, 1.0, 0.5).num_groups == 1         # at least one group
    assert build_denoising_queries([{"boxes": torch.zeros(0, 4)}], 5, emb, 20, 1.0, 0.5) is None
    assert build_denoising_queries(one_box, 5, emb, 0, 1.0, 0.5) is None
