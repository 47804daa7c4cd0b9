"""The unified loss (eq. (7)) and the retrieval losses against hand-written float64 computations."""

import math

import pytest
import torch

from uniperceiver_v2.tasks.losses import (
    IGNORE_INDEX,
    contrastive_loss,
    unified_loss,
    uniformity_loss,
    uniformity_lower_bound,
    vocabulary_uniformity_term,
)
from uniperceiver_v2.tasks.retrieval import symmetric_retrieval_loss


def reference_cross_entropy(logits, target_distributions):
    """Mean over rows of -sum_z q(z) log softmax(logits)_z, written out with python floats."""
    total = 0.0
    for row, q in zip(logits.tolist(), target_distributions):
        top = max(row)
        log_norm = top + math.log(sum(math.exp(v - top) for v in row))
        total += -sum(qz * (v - log_norm) for qz, v in zip(q, row))
    return total / len(target_distributions)


def smoothed(num_classes, positives, eps):
    """(1 - eps) * uniform over the positives + eps / |Y|."""
    return [(1 - eps) * (1.0 / len(positives) if z in positives else 0.0) + eps / num_classes
            for z in range(num_classes)]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_unified_loss_matches_eq7_with_label_smoothing(eps):
    torch.manual_seed(0)
    logits = 5 * torch.randn(6, 7, dtype=torch.float64)
    targets = torch.tensor([0, 3, IGNORE_INDEX, 6, 2, IGNORE_INDEX])
    weight = 0.5
    kept = [i for i, t in enumerate(targets.tolist()) if t != IGNORE_INDEX]
    expected = weight * reference_cross_entropy(logits[kept], [smoothed(7, {targets[i].item()}, eps) for i in kept])
    assert unified_loss(logits, targets, label_smoothing=eps, loss_weight=weight).item() == pytest.approx(expected,
                                                                                                          rel=1e-12)


def test_unified_loss_with_every_target_ignored_is_zero_and_differentiable():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = unified_loss(logits, torch.full((3,), IGNORE_INDEX), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 4))


def test_unified_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        unified_loss(torch.randn(3, 4), torch.zeros(4, dtype=torch.long))


def test_contrastive_loss_spreads_the_target_over_several_positives():
    torch.manual_seed(1)
    logits = 3 * torch.randn(3, 5, dtype=torch.float64)
    positives = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    eps = 0.1
    expected = reference_cross_entropy(
        logits, [smoothed(5, {z for z in range(5) if positives[n, z]}, eps) for n in range(3)])
    assert contrastive_loss(logits, positives, eps).item() == pytest.approx(expected, rel=1e-12)


def test_contrastive_loss_rejects_a_query_without_positive():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        contrastive_loss(torch.randn(2, 2), torch.tensor([[True, False], [False, False]]))


def test_symmetric_retrieval_loss_on_a_fixed_similarity_matrix():
    """Image i matches text i: loss = (CE over rows of S + CE over rows of S^T) / 2."""
    similarity = torch.tensor([[9.0, 1.0, -2.0], [0.5, 4.0, 3.5], [-1.0, 2.0, 2.5]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.bool)
    out = symmetric_retrieval_loss(similarity, similarity.t(), eye, eye, label_smoothing=0.0)

    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(rows)) / len(rows)

    rows = similarity.tolist()
    columns = similarity.t().tolist()
    assert out["loss_i2t"].item() == pytest.approx(ce(rows), rel=1e-12)
    assert out["loss_t2i"].item() == pytest.approx(ce(columns), rel=1e-12)
    assert out["loss_retrieval"].item() == pytest.approx(0.5 * (ce(rows) + ce(columns)), rel=1e-12)


def test_uniformity_loss_closed_forms_and_a_slow_reference():
    """0 when all targets coincide, -2 t for mutually orthogonal ones, and the pairwise formula written out."""
    assert uniformity_loss(torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.0, abs=1e-6)
    for t in (1.0, 2.0):
        assert uniformity_loss(torch.eye(4) * 3.0, t=t).item() == pytest.approx(-2 * t, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    unit = [row / row.norm() for row in z]
    terms = [math.exp(-2.0 * float(((unit[i] - unit[j]) ** 2).sum())) for i in range(6) for j in range(6) if i != j]
    assert uniformity_loss(z).item() == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-12)
    # two clusters are less uniform than the same points spread out
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert uniformity_loss(spread) < uniformity_loss(clustered)


def test_uniformity_lower_bound_holds_and_a_centred_simplex_attains_it():
    """-t 2M/(M-1) bounds the uniformity from below (Jensen); the M vertices of a regular simplex centred on the
    origin (e_i - 1/M, in M dimensions) meet it to rounding. The vocabulary's term is the loss above that bound."""
    generator = torch.Generator().manual_seed(1)
    for count, dim in ((2, 3), (5, 4), (40, 8), (40, 64)):
        for t in (1.0, 2.0):
            z = torch.randn(count, dim, generator=generator, dtype=torch.float64)
            assert uniformity_loss(z, t).item() >= uniformity_lower_bound(count, t) - 1e-12
            assert vocabulary_uniformity_term(z, 0.5, t).item() >= 0
    for count in (2, 3, 7):
        simplex = torch.eye(count, dtype=torch.float64) - 1.0 / count
        assert uniformity_loss(simplex).item() == pytest.approx(uniformity_lower_bound(count), rel=1e-12)
        assert vocabulary_uniformity_term(simplex, 3.0).item() == pytest.approx(0.0, abs=1e-10)
    coinciding = torch.ones(4, 3, dtype=torch.float64)
    assert vocabulary_uniformity_term(coinciding, 0.5).item() == pytest.approx(0.5 * 2.0 * 2 * 4 / 3, rel=1e-12)
    with pytest.raises(ValueError, match="uniformity_lower_bound"):
        uniformity_lower_bound(1)


def test_uniformity_loss_gradient_and_bad_shapes():
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(uniformity_loss, (z,))
    for bad in (torch.zeros(1, 3), torch.zeros(4)):
        with pytest.raises(ValueError, match="uniformity_loss"):
            uniformity_loss(bad)
