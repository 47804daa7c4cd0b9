"""MT-AdamW against torch.optim.AdamW, a float64 slow path of the paper's formulas, and its invariances."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from uniperceiver_v2.engine.optim import MTAdamW, build_param_groups, global_grad_norm


def _mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _groups(model: nn.Module) -> list[dict]:
    # Three groups with different lrs and weight decays, like encoder (x0.1) / decoder / no-decay gate.
    return [
        {"params": list(model[0].parameters()), "lr": 1e-3, "weight_decay": 0.05},
        {"params": list(model[2].parameters()), "lr": 1e-2, "weight_decay": 1e-2},
        {"params": list(model[4].parameters()), "lr": 3e-3, "weight_decay": 0.0},
    ]


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=generator, dtype=next(model.parameters()).dtype)
    y = torch.randn(16, 3, generator=generator, dtype=x.dtype)
    return ((model(x) - y) ** 2).mean() * (1 + step % 4)


def test_without_normalize_and_compensate_equals_torch_adamw():
    ours_model = _mlp()
    ref_model = copy.deepcopy(ours_model)
    ours = MTAdamW(_groups(ours_model), betas=(0.85, 0.995), eps=1e-7, normalize=False, compensate=False)
    ref = torch.optim.AdamW(_groups(ref_model), betas=(0.85, 0.995), eps=1e-7, foreach=False)
    for step in range(60):
        for model, optimizer in ((ours_model, ours), (ref_model, ref)):
            optimizer.zero_grad()
            _loss(model, step).backward()
        # sampling_ratio must be ignored when compensate=False.
        ours.step(sampling_ratio=[0.2, 0.5, 1.0][step % 3])
        ref.step()
    for p_ours, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.allclose(p_ours, p_ref, rtol=0, atol=1e-6), (p_ours - p_ref).abs().max()
    # and the trajectory actually moved away from the initialisation
    assert not torch.allclose(next(ours_model.parameters()), next(_mlp().parameters()), atol=1e-3)


def _reference_mt_adamw(params, groups, grads_per_step, ratios, weights, betas, eps):
    """Slow float64 MT-AdamW as engine/optim.py states it (per-parameter step counts; None = no grad)."""
    beta1, beta2 = betas
    params = [p.clone().double() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0) for p in params]
    for grads, s_k, w_k in zip(grads_per_step, ratios, weights):
        present = [i for i, g in enumerate(grads) if g is not None]
        norm = math.sqrt(sum(float((grads[i].double() ** 2).sum()) for i in present))
        for i in present:
            lr, wd = groups[i]
            g = w_k * grads[i].double() / norm
            st = state[i]
            st["t"] += 1
            st["m"] = beta1 * st["m"] + (1 - beta1) / s_k * g
            st["v"] = beta2 * st["v"] + (1 - beta2) / s_k * g * g
            m_hat = st["m"] / (1 - beta1 ** st["t"])
            v_hat = st["v"] / (1 - beta2 ** st["t"])
            params[i] = params[i] - lr * (m_hat / (v_hat.sqrt() + eps) + wd * params[i])
    return params


def test_full_update_matches_float64_reference():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 2), (5,)]
    group_hparams = [(1e-3, 0.1), (1e-3, 0.1), (2e-2, 1e-4), (5e-3, 0.0)]  # (lr, weight_decay) per param
    params = [nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes]
    initial = [p.detach().clone() for p in params]
    optimizer = MTAdamW(
        [
            {"params": params[:2], "lr": 1e-3, "weight_decay": 0.1},
            {"params": [params[2]], "lr": 2e-2, "weight_decay": 1e-4},
            {"params": [params[3]], "lr": 5e-3, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    grads_per_step, ratios, weights = [], [], []
    for step in range(60):
        grads = []
        for index, shape in enumerate(shapes):
            # Each parameter misses its gradient in some steps (never all at once), like task-specific heads.
            skip = (step + index) % 4 == 0 and index != 1
            scale = 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=generator))
            grads.append(None if skip else scale * torch.randn(shape, generator=generator, dtype=torch.float64))
        s_k = float(torch.empty(1).uniform_(0.05, 1.0, generator=generator))
        w_k = float(torch.empty(1).uniform_(0.1, 2.0, generator=generator))
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        optimizer.step(sampling_ratio=s_k, task_weight=w_k)
        grads_per_step.append(grads)
        ratios.append(s_k)
        weights.append(w_k)

    expected = _reference_mt_adamw(initial, group_hparams, grads_per_step, ratios, weights, (0.9, 0.999), 1e-8)
    for index, (p, e) in enumerate(zip(params, expected)):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12), f"param {index}: {(p - e).abs().max()}"
        assert optimizer.state[p]["step"] == sum(g[index] is not None for g in grads_per_step)


def test_zero_gradient_gives_no_nan():
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))]
    before = [p.detach().clone() for p in params]
    optimizer = MTAdamW(params, lr=1e-2, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step(sampling_ratio=0.3, task_weight=1.0)
    assert optimizer.last_grad_norm == 0
    for p, b in zip(params, before):
        # g = 0: the Adam direction is 0 / (0 + eps) = 0 and only the decoupled decay acts.
        assert torch.isfinite(p).all()
        assert torch.allclose(p.detach(), b * (1 - 1e-2 * 0.1), rtol=0, atol=1e-7)
        assert torch.count_nonzero(optimizer.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(optimizer.state[p]["exp_avg_sq"]) == 0
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step(sampling_ratio=0.3)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(optimizer.state[p]["step"] == 2 for p in params)


def test_no_gradient_at_all_is_a_no_op():
    p = nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    optimizer = MTAdamW([p], lr=1e-2, weight_decay=0.1)
    optimizer.step()
    assert torch.equal(p.detach(), before)
    assert len(optimizer.state) == 0


def test_state_dict_round_trip_continues_identically():
    model_a = _mlp(seed=3)
    optimizer_a = MTAdamW(_groups(model_a))
    for step in range(5):
        optimizer_a.zero_grad()
        _loss(model_a, step).backward()
        optimizer_a.step(sampling_ratio=0.25 + 0.1 * step, task_weight=0.5 + step)

    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = _mlp(seed=99)
    model_b.load_state_dict(saved["model"])
    optimizer_b = MTAdamW(_groups(model_b))
    optimizer_b.load_state_dict(saved["optimizer"])

    for step in range(5, 10):
        for model, optimizer in ((model_a, optimizer_a), (model_b, optimizer_b)):
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step(sampling_ratio=0.4, task_weight=2.0)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p_a, p_b)


@pytest.mark.parametrize("loss_scale", [1e-3, 7.0, 1e4])
def test_normalized_update_is_invariant_to_loss_scale(loss_scale):
    models = [_mlp(seed=5), _mlp(seed=5)]
    optimizers = [MTAdamW(_groups(m)) for m in models]
    for step in range(10):
        for model, optimizer, scale in zip(models, optimizers, (1.0, loss_scale)):
            optimizer.zero_grad()
            (scale * _loss(model, step)).backward()
            optimizer.step(sampling_ratio=0.5, task_weight=1.5)
    for p_1, p_2 in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p_1, p_2, rtol=1e-5, atol=1e-6)


def test_global_grad_norm_is_norm_of_concatenation():
    tensors = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2).double()]
    expected = torch.cat([t.double().reshape(-1) for t in tensors]).norm()
    assert global_grad_norm(tensors).dtype == torch.float64
    assert torch.allclose(global_grad_norm(tensors), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sampling_ratio": 0.0}, "sampling_ratio"), ({"sampling_ratio": 1.5}, "sampling_ratio"),
     ({"task_weight": -1.0}, "task_weight"), ({"task_weight": math.inf}, "task_weight")],
)
def test_step_rejects_bad_task_arguments(kwargs, message):
    p = nn.Parameter(torch.randn(2))
    p.grad = torch.randn(2)
    with pytest.raises(ValueError, match=message):
        MTAdamW([p]).step(**kwargs)


def test_constructor_rejects_bad_hyperparameters():
    p = nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="lr"):
        MTAdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        MTAdamW([p], betas=(1.0, 0.999))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = nn.ModuleDict({"backbone": nn.Linear(2, 2), "neck": nn.Linear(2, 2)})
        self.text_encoder = nn.Linear(2, 2)
        self.decoder = nn.ModuleDict({"ffn": nn.Linear(2, 2), "gate": nn.Linear(2, 2)})
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_build_param_groups_multipliers_and_no_decay():
    model = _Toy()
    groups = build_param_groups(
        model,
        lr=1e-4,
        weight_decay=1e-4,
        lr_multipliers={"image_encoder": 0.5, "image_encoder.backbone": 0.1, "text_encoder": 0.1},
        no_weight_decay=lambda name, p: ".gate." in name,
    )
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["image_encoder.backbone.weight"])]["lr"] == pytest.approx(1e-5)  # longest prefix
    assert by_param[id(named["image_encoder.neck.bias"])]["lr"] == pytest.approx(5e-5)
    assert by_param[id(named["text_encoder.weight"])]["lr"] == pytest.approx(1e-5)
    assert by_param[id(named["decoder.ffn.weight"])]["lr"] == pytest.approx(1e-4)
    assert by_param[id(named["decoder.ffn.weight"])]["weight_decay"] == 1e-4
    assert by_param[id(named["decoder.gate.weight"])]["weight_decay"] == 0.0
    assert id(named["frozen.weight"]) not in by_param
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    MTAdamW(groups)  # accepted as is


def test_build_param_groups_rejects_unmatched_prefix():
    with pytest.raises(ValueError, match="image_encodr"):
        build_param_groups(_Toy(), lr=1e-4, weight_decay=0.0, lr_multipliers={"image_encodr": 0.1})


def test_task_moments_equal_one_torch_adamw_per_task_on_shared_parameters():
    """task_moments=True: each task keeps its own Adam moments and step count. Reference: one torch.optim.AdamW per
    task over the same parameter tensors, each stepped only on its task's iterations (compensation must be off:
    the sampling ratios passed below must change nothing)."""
    ours_model = _mlp(seed=7)
    ref_model = copy.deepcopy(ours_model)
    ours = MTAdamW(_groups(ours_model), betas=(0.85, 0.995), eps=1e-7, normalize=False, compensate=True,
                   task_moments=True)
    refs = {task: torch.optim.AdamW(_groups(ref_model), betas=(0.85, 0.995), eps=1e-7, foreach=False)
            for task in ("a", "b")}
    tasks = ["a", "a", "b", "a", "b", "b", "b", "a"] * 6
    for step, task in enumerate(tasks):
        for model in (ours_model, ref_model):
            model.zero_grad()
            _loss(model, step + (0 if task == "a" else 500)).backward()
        ours.step(sampling_ratio=0.3 if task == "a" else 0.7, task=task)
        refs[task].step()
    for p_ours, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.allclose(p_ours, p_ref, rtol=0, atol=1e-6), (p_ours - p_ref).abs().max()
    state = ours.state[next(ours_model.parameters())]
    assert state["step/a"] == tasks.count("a") and state["step/b"] == tasks.count("b")


def test_task_moments_need_the_task():
    p = nn.Parameter(torch.randn(2))
    p.grad = torch.randn(2)
    with pytest.raises(ValueError, match="task_moments"):
        MTAdamW([p], task_moments=True).step(sampling_ratio=0.5)
