"""Task interference I(i -> j) on toy problems whose answer is known in closed form."""

import math

import pytest
import torch
from torch import nn

from uniperceiver_v2.walkthrough.interference import task_interference


class LinearTasks(nn.Module):
    """theta in R^d; task k's loss on a batch is (a_k + noise) . theta, so its gradient is a_k + noise."""

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim))
        self.unused = nn.Parameter(torch.randn(3))


def _closures(model, directions, noise_norms=None, noise_basis=None, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(k):
        def loss():
            gradient = directions[k]
            if noise_norms is not None:
                # Noise of fixed norm r_k, random direction inside a subspace orthogonal to every a_k.
                coefficients = torch.randn(noise_basis.shape[0], generator=generator)
                gradient = gradient + noise_norms[k] * (coefficients / coefficients.norm()) @ noise_basis
            return gradient @ model.theta

        return loss

    return {f"task{k}": make(k) for k in range(len(directions))}


def test_identical_opposing_and_orthogonal_tasks():
    model = LinearTasks(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    directions = [a, 3.0 * a, -0.5 * a, torch.tensor([-2.0, 1.0, 0.0, 0.0])]  # same, same, opposite, orthogonal
    result = task_interference(model, _closures(model, directions), parameters="theta", num_batches=3)
    expected = torch.tensor(
        [
            [1.0, 1.0, -1.0, 0.0],
            [1.0, 1.0, -1.0, 0.0],
            [-1.0, -1.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(result.matrix, expected, atol=1e-12)
    assert result.parameter_names == ["theta"]
    assert result["task0", "task2"] == pytest.approx(-1.0)


def test_noiseless_interference_is_the_cosine_of_task_gradients():
    # Without noise: I(i -> j) = (a_j . a_i / |a_i|) / (a_j . a_j / |a_j|) = cos(a_i, a_j) |a_j| / |a_j|.
    generator = torch.Generator().manual_seed(1)
    model = LinearTasks(6)
    directions = [torch.randn(6, generator=generator) for _ in range(4)]
    result = task_interference(model, _closures(model, directions), parameters=["theta"], num_batches=2)
    stacked = torch.stack(directions).double()
    unit = stacked / stacked.norm(dim=1, keepdim=True)
    assert torch.allclose(result.matrix, unit @ unit.T, atol=1e-10)


def test_noisy_gradients_match_closed_form():
    # Gradient of task k on a batch: a_k + e, |e| = r_k, e uniform on the sphere of a subspace orthogonal
    # to all a's. Then |g_k| = sqrt(|a_k|^2 + r_k^2) on every batch and E[e] = 0, so
    #   E[g_j . d_i]  = a_j . a_i / sqrt(|a_i|^2 + r_i^2)
    #   E[g_j . d_j'] = |a_j|^2 / sqrt(|a_j|^2 + r_j^2)
    #   I(i -> j)     = (a_i . a_j) sqrt(|a_j|^2 + r_j^2) / (|a_j|^2 sqrt(|a_i|^2 + r_i^2)).
    # The naive same-batch denominator would give sqrt(|a_j|^2 + r_j^2) instead and be off by far more than
    # the tolerance, so this also checks that the diagonal pairs are excluded.
    dim = 12
    model = LinearTasks(dim)
    directions = [torch.zeros(dim) for _ in range(3)]
    directions[0][:3] = torch.tensor([1.0, 0.5, 0.0])
    directions[1][:3] = torch.tensor([0.2, 1.0, -0.4])
    directions[2][:3] = torch.tensor([-1.0, 0.3, 0.8])
    noise_norms = [1.5, 0.5, 2.0]
    noise_basis = torch.eye(dim)[3:]  # orthogonal to the first three coordinates
    closures = _closures(model, directions, noise_norms, noise_basis, seed=3)
    result = task_interference(model, closures, parameters="theta", num_batches=400)

    a = torch.stack(directions).double()
    r = torch.tensor(noise_norms, dtype=torch.float64)
    grad_norm = (a.pow(2).sum(1) + r**2).sqrt()
    expected = (a @ a.T) * grad_norm.unsqueeze(0) / (a.pow(2).sum(1).unsqueeze(0) * grad_norm.unsqueeze(1))
    assert torch.allclose(result.matrix, expected, atol=0.02), (result.matrix, expected)


def test_model_is_left_untouched():
    model = LinearTasks(4)
    before = model.theta.detach().clone()
    directions = [torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])]
    task_interference(model, _closures(model, directions), num_batches=2)
    assert torch.equal(model.theta.detach(), before)
    assert model.theta.grad is None


def test_prefix_selects_a_layer_of_a_real_network():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    closures = {
        "up": lambda: network(x)[:, 0].mean(),
        "down": lambda: -network(x)[:, 0].mean(),  # exactly the opposite objective
    }
    result = task_interference(network, closures, parameters="0", num_batches=2)
    assert result.parameter_names == ["0.weight", "0.bias"]
    expected = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(result.matrix, expected, atol=1e-12)


def test_task_that_does_not_use_the_parameters_is_an_error():
    model = LinearTasks(4)
    closures = {
        "uses": lambda: model.theta.sum(),
        "ignores": lambda: model.unused.sum(),
    }
    with pytest.raises(ValueError, match="task 'ignores': zero gradient"):
        task_interference(model, closures, parameters="theta", num_batches=2)


def test_a_batch_with_zero_gradient_is_redrawn():
    """One batch of a task that gives no gradient (nothing in it for the loss) is replaced by a fresh batch: the
    matrix equals the one measured on the same non-zero batches alone, and the redraw is counted."""
    model = LinearTasks(3)
    draws = {"a": [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, 0.0, 1.0])],
             "b": [torch.tensor([0.0, 1.0, 1.0]), torch.zeros(3), torch.tensor([1.0, 2.0, 0.0]),
                   torch.tensor([0.0, 1.0, 2.0])]}

    def closures(sequences):
        iterators = {task: iter(values) for task, values in sequences.items()}
        return {task: (lambda task=task: (next(iterators[task]) * model.theta).sum()) for task in sequences}

    result = task_interference(model, closures(draws), parameters="theta", num_batches=3)
    assert result.redrawn == {"a": 0, "b": 1}
    clean = {"a": draws["a"], "b": [draws["b"][0], draws["b"][2], draws["b"][3]]}
    expected = task_interference(model, closures(clean), parameters="theta", num_batches=3)
    assert expected.redrawn == {"a": 0, "b": 0}
    assert torch.allclose(result.matrix, expected.matrix, atol=1e-12)


def test_bad_arguments():
    model = LinearTasks(2)
    closures = {"t": lambda: model.theta.sum()}
    with pytest.raises(ValueError, match="num_batches"):
        task_interference(model, closures, num_batches=1)
    with pytest.raises(ValueError, match="no trainable parameter"):
        task_interference(model, closures, parameters="decoder.layers.3")

    def no_grad_loss():
        with torch.no_grad():
            return model.theta.sum()

    with pytest.raises(ValueError, match="does not require grad"):
        task_interference(model, {"t": no_grad_loss}, num_batches=2)
    assert math.isfinite(task_interference(model, closures, num_batches=2).matrix.item())


def test_a_task_whose_gradients_disagree_leaves_only_its_column_undefined():
    """Task "noisy" has no mean gradient (pure noise of norm 1 along +-e_2), so its normaliser E[g . d'] is <= 0;
    with undefined="nan" its column is NaN and the other entries keep their closed form."""
    model = LinearTasks(3)
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2.0)
    signs = iter([1.0, -1.0] * 4)
    closures = {"a": lambda: a @ model.theta, "b": lambda: b @ model.theta,
                "noisy": lambda: next(signs) * model.theta[2]}
    with pytest.raises(ValueError, match="task 'noisy'"):
        task_interference(model, closures, parameters="theta", num_batches=2)
    signs = iter([1.0, -1.0] * 4)
    result = task_interference(model, closures, parameters="theta", num_batches=2, undefined="nan")
    assert torch.isnan(result.matrix[:, 2]).all()
    # I(a -> b) = b . a / (b . b) = cos = 1 / sqrt(2); I(b -> a) = a . b / |b| / (a . a) = 1 / sqrt(2)
    assert result["a", "b"] == pytest.approx(1 / math.sqrt(2)) and result["b", "a"] == pytest.approx(1 / math.sqrt(2))
    assert result["noisy", "a"] == pytest.approx(0.0, abs=1e-12)       # its row stays defined: orthogonal to a
    with pytest.raises(ValueError, match="undefined"):
        task_interference(model, closures, parameters="theta", num_batches=2, undefined="skip")
