"""Conditional MoE: gate decisions, expert dispatch vs a float64 slow path, balance loss, capacity, merging."""

import math

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_v2.config import MoEConfig
from uniperceiver_v2.modeling.attributes import segment_ids, task_token_attributes
from uniperceiver_v2.modeling.moe import (
    AttentionPool,
    ConditionalGate,
    GateDecision,
    MoELinear,
    TokenConditions,
    capacity_keep,
    is_gate_parameter,
    load_balancing_loss,
    merge_experts,
    unmerge_experts,
)

ROUTED = ["token", "context", "modality", "task", "attribute"]
DATA_INDEPENDENT = ["modality", "task", "attribute"]
B, T, D, E, K = 3, 7, 8, 4, 2


def make_conditions(with_padding=True):
    """A batch mixing captioning-like and retrieval-like sequences: several distinct conditions."""
    modality = torch.stack([
        segment_ids([("spe", 1), ("image", 3), ("text", 3)]),
        segment_ids([("spe", 1), ("text", 6)]),
        segment_ids([("spe", 1), ("image", 6)]),
    ])
    attributes = torch.stack([
        task_token_attributes("captioning", modality[0], causal=torch.arange(T) >= 4),
        task_token_attributes("mlm", modality[1]),
        task_token_attributes("retrieval_t2i", modality[2], is_input=False),
    ])
    kpm = torch.zeros(B, T, dtype=torch.bool)
    if with_padding:
        kpm[1, 5:] = True
    return TokenConditions(key_padding_mask=kpm, modality_ids=modality, task_id=torch.tensor([2, 3, 5]),
                           attributes=attributes)


def moe_cfg(routing, **kw):
    return MoEConfig(routing=routing, num_experts=E, top_k=K, **kw)


@pytest.mark.parametrize("routing", ROUTED)
def test_gate_shapes_sparsity_and_normalisation(routing):
    torch.manual_seed(0)
    # a capacity factor large enough that no assignment is dropped: every token keeps exactly k experts
    gate = ConditionalGate(D, moe_cfg(routing, capacity_factor_eval=float(E))).eval()
    x = torch.randn(B, T, D)
    decision = gate(x, make_conditions(with_padding=False))
    assert decision.indices.shape == (B * T, K) and decision.weights.shape == (B * T, K)
    G = decision.gate_matrix(E)
    assert ((G != 0).sum(-1) == K).all()
    torch.testing.assert_close(G.sum(-1), torch.ones(B * T))
    assert all(len(set(row)) == K for row in decision.indices.tolist())   # k distinct experts per token


@pytest.mark.parametrize("routing", ROUTED)
def test_gradients_reach_the_gate(routing):
    torch.manual_seed(0)
    gate = ConditionalGate(D, moe_cfg(routing))
    layer = MoELinear(E, D, 5)
    x = torch.randn(B, T, D)
    decision = gate(x, make_conditions())
    layer(x.reshape(B * T, D), decision).pow(2).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _slow_moe(x, weight, bias, indices, weights, keep):
    """sum_e G_e(x) (W_e x + b_e), token by token and expert by expert, in float64."""
    x, weight, bias, weights = x.double(), weight.double(), bias.double(), weights.double()
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(indices.shape[1]):
            if keep is None or keep[n, j]:
                e = int(indices[n, j])
                y[n] += weights[n, j] * (weight[e] @ x[n] + bias[e])
    return y


@pytest.mark.parametrize("routing", ROUTED)
def test_moe_linear_matches_slow_path(routing):
    torch.manual_seed(1)
    gate = ConditionalGate(D, moe_cfg(routing)).double().train()
    layer = MoELinear(E, D, 6).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(B, T, D, dtype=torch.float64)
    decision = gate(x, make_conditions())
    y = layer(x.reshape(B * T, D), decision)
    ref = _slow_moe(x.reshape(B * T, D), layer.weight, layer.bias, decision.indices, decision.weights, decision.keep)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_attribute_gate_matches_equation_9():
    """h = W_g LayerNorm(W_a a), G = softmax over the top-k of h, recomputed token by token."""
    torch.manual_seed(2)
    gate = ConditionalGate(D, moe_cfg("attribute")).double().eval()
    conditions = make_conditions()
    decision = gate(torch.zeros(B, T, D, dtype=torch.float64), conditions)
    a = conditions.attributes.reshape(B * T, 8).double()
    for n in range(B * T):
        c = F.layer_norm(gate.attribute_proj.weight @ a[n] + gate.attribute_proj.bias, (D,),
                         gate.attribute_norm.weight, gate.attribute_norm.bias)
        h = gate.proj.weight @ c
        top = torch.topk(h, K)
        assert decision.indices[n].tolist() == top.indices.tolist()
        torch.testing.assert_close(decision.weights[n], top.values.softmax(-1))


@pytest.mark.parametrize("routing", DATA_INDEPENDENT)
def test_data_independent_routing_shares_decisions_even_with_noise(routing):
    torch.manual_seed(3)
    gate = ConditionalGate(D, moe_cfg(routing, noise_std=1.0)).train()
    conditions = make_conditions()
    decision = gate(torch.randn(B, T, D), conditions)
    ids = conditions.condition_ids(routing, B, T)
    for code in ids.unique():
        same = ids == code
        assert (decision.indices[same] == decision.indices[same][0]).all()
        assert torch.equal(decision.weights[same], decision.weights[same][:1].expand(int(same.sum()), K))
    # the noise is on in training and off at evaluation
    w1, w2 = gate(torch.randn(B, T, D), conditions).weights, gate(torch.randn(B, T, D), conditions).weights
    assert not torch.equal(w1, w2)
    gate.eval()
    e1, e2 = gate(torch.randn(B, T, D), conditions).weights, gate(torch.randn(B, T, D), conditions).weights
    assert torch.equal(e1, e2)


def test_default_noise_is_one_over_experts():
    assert ConditionalGate(D, moe_cfg("attribute")).noise_std == pytest.approx(1 / E)
    assert ConditionalGate(D, moe_cfg("attribute", noise_std=0.3)).noise_std == pytest.approx(0.3)


def test_balance_loss_hand_computed():
    """E = 2, k = 1, four tokens, one of them padding. f = (2/3, 1/3); P = mean softmax over the 3 valid tokens."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [9.0, -9.0], [0.5, 0.0]])
    valid = torch.tensor([True, True, False, True])
    indices = logits.argmax(-1, keepdim=True)                      # experts 0, 1, (0), 0
    p = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]
         for a, b in [(2.0, 0.0), (0.0, 1.0), (0.5, 0.0)]]
    P = [sum(row[e] for row in p) / 3 for e in range(2)]
    f = [2 / 3, 1 / 3]
    expected = 2 * (f[0] * P[0] + f[1] * P[1])
    assert load_balancing_loss(logits, indices, valid).item() == pytest.approx(expected, rel=1e-6)
    # uniform router -> 1
    uniform = torch.zeros(8, 4)
    idx = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(uniform, idx, torch.ones(8, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_capacity_drops_the_right_assignments():
    """Six tokens all choosing expert 0 first and expert 1 second; E = 2, k = 2, capacity factor 0.5 ->
    C = ceil(0.5 * 2 * 6 / 2) = 3: tokens 0-2 keep expert 0; expert 1 takes the first three second choices."""
    indices = torch.tensor([[0, 1]] * 6)
    valid = torch.ones(6, dtype=torch.bool)
    keep = capacity_keep(indices, valid, num_experts=2, capacity_factor=0.5)
    assert keep[:, 0].tolist() == [True] * 3 + [False] * 3
    assert keep[:, 1].tolist() == [True] * 3 + [False] * 3
    # first choices queue before any second choice: expert 0 gets tokens 0,1 (first) and then none of the seconds
    indices = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])
    keep = capacity_keep(indices, torch.ones(4, dtype=torch.bool), num_experts=2, capacity_factor=0.5)   # C = 2
    assert keep.tolist() == [[True, False], [True, False], [True, False], [True, False]]
    # padding is never kept and takes no capacity: C = ceil(0.5 * 2 * 4 / 2) = 2 counted on the 4 valid tokens
    indices = torch.tensor([[0, 1]] * 6)
    valid = torch.tensor([False, False, True, True, True, True])
    keep = capacity_keep(indices, valid, num_experts=2, capacity_factor=0.5)
    assert keep[:, 0].tolist() == [False, False, True, True, False, False]


def test_dropped_tokens_get_zero_from_the_layer():
    """Token routing where every token prefers expert 0 (top-1); at capacity factor 1.0 only the first
    ceil(N / E) tokens are computed and the rest get exactly 0 (their residual passes them through)."""
    cfg = MoEConfig(routing="token", num_experts=2, top_k=1, capacity_factor_train=1.0, noise_std=0.0)
    gate = ConditionalGate(D, cfg).train()
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0, 0] = 1.0                   # logit of expert 0 = x[0] > 0 = logit of expert 1
    x = torch.randn(1, 6, D)
    x[..., 0] = x[..., 0].abs() + 1.0
    decision = gate(x, TokenConditions())
    layer = MoELinear(2, D, 3)
    y = layer(x.reshape(6, D), decision)
    assert decision.keep[:, 0].tolist() == [True] * 3 + [False] * 3
    assert (y[3:] == 0).all() and (y[:3] != 0).any()


def test_token_routing_ignores_padding():
    torch.manual_seed(4)
    for routing in ("token", "context"):
        gate = ConditionalGate(D, moe_cfg(routing)).eval()
        layer = MoELinear(E, D, 5)
        conditions = make_conditions()
        x = torch.randn(B, T, D)
        y1 = layer(x.reshape(B * T, D), gate(x, conditions))
        x2 = x.clone()
        x2[conditions.key_padding_mask] = 100.0 * torch.randn(int(conditions.key_padding_mask.sum()), D)
        y2 = layer(x2.reshape(B * T, D), gate(x2, conditions))
        valid = ~conditions.key_padding_mask.reshape(-1)
        torch.testing.assert_close(y1[valid], y2[valid])
        assert (y2[~valid] == 0).all()


def test_attention_pool_masks_padding():
    torch.manual_seed(5)
    pool = AttentionPool(D)
    x = torch.randn(2, 5, D)
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = pool(x, kpm)
    torch.testing.assert_close(out[1], pool(x[1:, :2]).squeeze(0))
    assert torch.isfinite(pool(x, torch.ones(2, 5, dtype=torch.bool))).all()


def test_moe_linear_gradcheck():
    """Gradients of y = sum_e G_e (W_e x + b_e) w.r.t. x, the expert weights and the gate values."""
    torch.manual_seed(6)
    N, k = 5, 2
    indices = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    keep = torch.tensor([[True, True], [True, False], [True, True], [False, True], [True, True]])
    layer = MoELinear(3, 4, 3).double()

    def f(x, weight, bias, gate_weights):
        decision = GateDecision(indices=indices, weights=gate_weights, keep=keep, aux_loss=x.new_zeros(()))
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x, decision))

    inputs = (torch.randn(N, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
              torch.rand(N, k, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("routing", DATA_INDEPENDENT)
def test_merged_equals_unmerged(routing):
    torch.manual_seed(7)
    gate = ConditionalGate(D, moe_cfg(routing)).eval()
    fc1, fc2 = MoELinear(E, D, 16), MoELinear(E, 16, D)
    torch.nn.init.normal_(fc1.bias)
    torch.nn.init.normal_(fc2.bias)
    modules = torch.nn.ModuleDict({"gate": gate, "fc1": fc1, "fc2": fc2}).eval()
    x = torch.randn(B, T, D).reshape(B * T, D)

    def ffn():
        decision = gate(x.reshape(B, T, D), make_conditions())
        return fc2(F.gelu(fc1(x, decision)), decision)

    reference = ffn()
    assert merge_experts(modules) == 2 and fc1.merged
    merged = ffn()
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    # one cached dense weight per distinct condition
    num_conditions = make_conditions().condition_ids(routing, B, T).unique().numel()
    assert len(fc1._merged) == num_conditions
    assert all(w.shape == (16, D) for w, _ in fc1._merged.values())
    # a batch with a single condition runs one dense Linear
    single = TokenConditions(modality_ids=torch.full((1, T), 2), task_id=torch.tensor([3]),
                             attributes=task_token_attributes("mlm", torch.full((1, T), 2)))
    d1 = gate(x[:T].reshape(1, T, D), single)
    assert len(d1.groups.rows) == 1
    merged_single = fc1(x[:T], d1)
    unmerge_experts(modules)
    torch.testing.assert_close(merged_single, fc1(x[:T], d1), rtol=1e-5, atol=1e-5)
    # merged experts refuse to train
    merge_experts(modules)
    modules.train()
    with pytest.raises(RuntimeError, match="inference"):
        fc1(x, gate(x.reshape(B, T, D), make_conditions()))


@pytest.mark.parametrize("routing", ["token", "context"])
def test_merging_data_dependent_routing_is_an_error(routing):
    modules = torch.nn.ModuleDict({"gate": ConditionalGate(D, moe_cfg(routing)), "fc": MoELinear(E, D, D)})
    with pytest.raises(ValueError, match=f"routing='{routing}'.*cannot be merged"):
        merge_experts(modules)
    with pytest.raises(ValueError, match="no Conditional-MoE layer"):
        merge_experts(torch.nn.Linear(2, 2))


def test_missing_condition_is_named():
    gate = ConditionalGate(D, moe_cfg("attribute"))
    with pytest.raises(ValueError, match="needs attributes"):
        gate(torch.randn(B, T, D), TokenConditions())
    with pytest.raises(ValueError, match="attributes: expected shape"):
        gate(torch.randn(B, T, D), TokenConditions(attributes=torch.zeros(B, T + 1, 8)))


def test_context_routing_reads_the_other_tokens_and_token_routing_does_not():
    """MoE eq. (6): c = concat(x, AttnPool(sample)). Changing one token of a sample moves the other tokens' context
    logits but leaves their token-routing logits alone (notebook 04 compares the two routings' L_bal)."""
    torch.manual_seed(0)
    x = torch.randn(B, T, D)
    changed = x.clone()
    changed[0, -1] += 3.0                                     # one token of sample 0
    gates = {routing: ConditionalGate(D, moe_cfg(routing, noise_std=0.0)).eval() for routing in ("token", "context")}
    logits = {}
    for routing, gate in gates.items():
        captured: list[torch.Tensor] = []
        handle = gate.proj.register_forward_hook(
            lambda module, inputs, output, captured=captured: captured.append(output.detach()))
        decisions = [gate(inputs, TokenConditions()) for inputs in (x, changed)]
        handle.remove()
        logits[routing] = [c.reshape(B, T, E) for c in captured]
        assert torch.isfinite(decisions[0].aux_loss)
    token_before, token_after = logits["token"]
    context_before, context_after = logits["context"]
    assert torch.equal(token_before[0, :-1], token_after[0, :-1])            # a token's own features only
    assert not torch.allclose(context_before[0, :-1], context_after[0, :-1])  # the pooled sample moved
    assert torch.equal(context_before[1:], context_after[1:])                 # other samples: untouched
    assert gates["context"].proj.weight.shape == (E, 2 * D)


def test_gate_parameters_are_named_gate():
    modules = torch.nn.ModuleDict({"gate": ConditionalGate(D, moe_cfg("context")), "fc": MoELinear(E, D, D)})
    names = [n for n, _ in modules.named_parameters()]
    gate_names = [n for n in names if is_gate_parameter(n)]
    assert set(gate_names) == {f"gate.{n}" for n, _ in modules["gate"].named_parameters()}
    assert not any(is_gate_parameter(n) for n in ("fc.weight", "fc.bias", "blocks.0.ffn.fc1.weight"))


@pytest.mark.parametrize("routing", DATA_INDEPENDENT)
def test_per_condition_mixing_equals_dispatch_with_gradients(routing):
    """Data-independent routings mix each condition's experts into one weight, in training too; outputs and every
    gradient equal the dispatch computation (MoE eq. (4)) in float64."""
    torch.manual_seed(0)
    layer = MoELinear(E, D, 5).double()
    torch.nn.init.normal_(layer.bias)
    gate = ConditionalGate(D, moe_cfg(routing, noise_std=0.0)).double().train()
    x = torch.randn(B, T, D, dtype=torch.float64)
    conditions = make_conditions()
    assert len(gate(x, conditions).groups.rows) > 1
    results = []
    for forward in (layer._forward_per_condition, layer._forward_dispatch):
        layer.zero_grad()
        gate.zero_grad()
        y = forward(x.reshape(-1, D), gate(x, conditions))
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in (*layer.parameters(), *gate.parameters())
                                     if p.grad is not None]))
    (y_mixed, g_mixed), (y_dispatch, g_dispatch) = results
    torch.testing.assert_close(y_mixed, y_dispatch, rtol=1e-12, atol=1e-12)
    assert len(g_mixed) == len(g_dispatch) > 2
    for a, b in zip(g_mixed, g_dispatch):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
