"""bfloat16 autocast on the CPU (``run.precision=bf16``, the paper presets' default).

* One training step (forward, backward, MT-AdamW step) of every task of the real ``tiny`` model, with the
  Conditional MoE on (its default attribute routing), through ``Trainer.train_step`` with ``run.precision=bf16``:
  the losses are finite and the parameters change. One cheap step per other routing as well.
* Per routing, an MoE sub-layer of the unified decoder (FFN, and the attention projections) under autocast is close
  to the same layer in float32, and the router stays in float32.

The float32 / float64 numerics of the MoE are checked exactly in tests/test_moe.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver_v2.config import DecoderConfig, MoEConfig, load_config
from uniperceiver_v2.engine.build import build_training
from uniperceiver_v2.engine.trainer import Trainer
from uniperceiver_v2.modeling.attributes import segment_ids, task_token_attributes
from uniperceiver_v2.modeling.moe import ConditionalGate, MoELinear, TokenConditions, merge_experts, unmerge_experts
from uniperceiver_v2.modeling.unified_decoder import Attention, MoEFFN

ALL_TASKS = ("classification", "detection", "captioning", "mlm", "retrieval")
ROUTINGS = ("token", "context", "modality", "task", "attribute", "none")
DATA_INDEPENDENT = ("modality", "task", "attribute")


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ the real model
def _bf16_trainer(root, tmp_path, task: str, *overrides: str) -> Trainer:
    """A Trainer of the real tiny model for ``task`` alone, run.precision=bf16, small batches."""
    cfg = load_config("tiny", [
        f"data.root={root}", "data.synthetic_profile=quick", f"run.output_dir={tmp_path / task}",
        "run.precision=bf16", "run.iterations=1", "optim.warmup_iters=0", "data.image_size=64",
        "tasks.classification.batch_size=4", "tasks.detection.batch_size=1", "tasks.captioning.batch_size=2",
        "tasks.mlm.batch_size=4", "tasks.retrieval.batch_size=4",
        *[f"tasks.{other}.enabled=false" for other in ALL_TASKS if other != task], *overrides])
    model, tasks, datasets = build_training(cfg)
    trainer = Trainer(cfg, model, tasks, datasets, progress=False, tensorboard=False)
    assert trainer.autocast_dtype is torch.bfloat16 and trainer.device.type == "cpu"
    return trainer


def _train_one_step(trainer: Trainer, task: str) -> dict[str, float]:
    """One Trainer step; checks that it ran under bf16 autocast through the MoE gates, that every logged term is
    finite and that the decoder's experts, its gates and the rest of the model moved."""
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    gate_dtypes: set[torch.dtype] = set()
    gates = [m for m in model.modules() if isinstance(m, ConditionalGate)]
    handles = [g.proj.register_forward_hook(lambda m, i, o: gate_dtypes.add(o.dtype)) for g in gates]
    try:
        (result,) = trainer.train_step(0)
    finally:
        for handle in handles:
            handle.remove()
    name, terms, count = result
    assert name == task and count == 1
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert terms["loss"] > 0 and terms["grad_norm"] > 0
    if gates:
        assert gate_dtypes == {torch.bfloat16}, "the MoE gates did not run under bf16 autocast"

    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter changed"
    moe = [n for n, m in model.named_modules() if isinstance(m, (MoELinear, ConditionalGate))]
    if moe:
        experts = {n for n in changed if any(n.startswith(m + ".") for m in moe)}
        assert any(".fc1." in n for n in experts) and any(".fc2." in n for n in experts), sorted(changed)[:20]
        assert any(".gate." in n for n in experts), "no gate parameter changed"
    assert all(p.dtype == torch.float32 for p in model.parameters())   # autocast leaves the weights float32
    return terms


@pytest.mark.parametrize("task", ALL_TASKS)
def test_bf16_trainer_step_of_every_task_with_the_default_moe(synthetic_root, tmp_path, task):
    trainer = _bf16_trainer(synthetic_root, tmp_path, task)
    assert trainer.cfg.decoder.moe.routing == "attribute"                 # the tiny preset's default
    assert any(isinstance(m, MoELinear) for m in trainer.model.modules())
    _train_one_step(trainer, task)


@pytest.mark.parametrize("routing", ["token", "context", "modality", "task", "none"])
def test_bf16_trainer_step_with_every_routing(synthetic_root, tmp_path, routing):
    """The other routings on the cheapest image + text task; token / context also have the balance loss, and
    attention experts are on too."""
    trainer = _bf16_trainer(synthetic_root, tmp_path, "retrieval", f"decoder.moe.routing={routing}",
                            "decoder.moe.placement=[ffn,attn]")
    terms = _train_one_step(trainer, "retrieval")
    if routing in ("token", "context"):
        assert terms["loss_moe_aux"] > 0


# ------------------------------------------------------------------------------------------------ MoE sub-layers
B, T, D, FFN, E, K = 4, 12, 32, 64, 4, 2


def _conditions() -> TokenConditions:
    """Four sequences of different tasks (several modalities, tasks and attribute codes), one with padding."""
    modality = torch.stack([
        segment_ids([("spe", 1), ("image", 6), ("text", 5)]),
        segment_ids([("spe", 1), ("text", 11)]),
        segment_ids([("spe", 1), ("image", 11)]),
        segment_ids([("spe", 1), ("image", 4), ("text", 7)]),
    ])
    attributes = torch.stack([
        task_token_attributes("captioning", modality[0], causal=torch.arange(T) >= 7),
        task_token_attributes("mlm", modality[1]),
        task_token_attributes("retrieval_t2i", modality[2], is_input=False),
        task_token_attributes("captioning", modality[3], causal=torch.arange(T) >= 5),
    ])
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 9:] = True
    return TokenConditions(key_padding_mask=padding, modality_ids=modality, task_id=torch.tensor([2, 3, 5, 2]),
                           attributes=attributes)


def _decoder_cfg(routing: str) -> DecoderConfig:
    return DecoderConfig(width=D, depth=1, heads=4, ffn_dim=FFN, drop_path=0.0,
                         moe=MoEConfig(routing=routing, num_experts=E, top_k=K, placement=["ffn", "attn"]))


def _with_biases(module: torch.nn.Module) -> torch.nn.Module:
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    return module


def _compare(y16: torch.Tensor, y32: torch.Tensor, d16, d32) -> None:
    """bf16 output close to float32 output, on the tokens whose routing is the same in both precisions (bf16
    rounding of the gate's input may flip a near-tie of the top-k, which legitimately changes that token)."""
    same = torch.ones(B * T, dtype=torch.bool)
    if d32 is not None:
        assert d16.weights.dtype == torch.float32 and d16.aux_loss.dtype == torch.float32   # the router is fp32
        same = (d16.indices == d32.indices).all(-1)
        if d32.keep is not None:
            same &= (d16.keep == d32.keep).all(-1)
        assert same.float().mean() >= 0.9, f"only {int(same.sum())} / {B * T} tokens routed alike"
        torch.testing.assert_close(d16.weights[same], d32.weights[same], rtol=0, atol=2e-2)
        torch.testing.assert_close(d16.aux_loss, d32.aux_loss, rtol=2e-2, atol=2e-2)
    assert y16.shape == y32.shape and torch.isfinite(y16).all()
    scale = float(y32.detach().abs().max())
    y16, y32 = y16.detach().float().reshape(B * T, -1), y32.detach().reshape(B * T, -1)
    torch.testing.assert_close(y16[same], y32[same], rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_moe_ffn_bf16_close_to_float32(routing):
    torch.manual_seed(0)
    ffn = _with_biases(MoEFFN(_decoder_cfg(routing))).eval()
    x = torch.randn(B, T, D)
    y32, d32 = ffn(x, _conditions())
    with bf16_autocast():
        y16, d16 = ffn(x, _conditions())
    assert (d32 is None) == (routing == "none")
    _compare(y16, y32, d16, d32)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_moe_attention_bf16_close_to_float32(routing):
    torch.manual_seed(1)
    attn = _with_biases(Attention(_decoder_cfg(routing))).eval()
    x = torch.randn(B, T, D)
    mask = ~_conditions().key_padding_mask[:, None, None, :]
    y32, d32 = attn(x, mask, _conditions())
    with bf16_autocast():
        y16, d16 = attn(x, mask, _conditions())
    _compare(y16, y32, d16, d32)


@pytest.mark.parametrize("routing", ROUTINGS[:-1])
def test_moe_ffn_bf16_backward_reaches_experts_and_gate(routing):
    """Training mode (gate noise, capacity, balance loss): float32 gradients, finite, on experts and gate."""
    torch.manual_seed(2)
    ffn = MoEFFN(_decoder_cfg(routing)).train()
    x = torch.randn(B, T, D, requires_grad=True)
    with bf16_autocast():
        y, decision = ffn(x, _conditions())
        loss = y.float().pow(2).mean() + decision.aux_loss
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        if name.startswith(("fc1.weight", "fc2.weight", "gate.proj")):
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("routing", DATA_INDEPENDENT)
def test_merged_experts_under_bf16_then_float32(routing):
    """Merged weights cached during a bf16 call stay float32, so the merged layer also works without autocast.

    The cache mixes the experts with the gate values of the call that built it, here computed from bf16-rounded
    gate logits, hence the float32 comparison at bf16-logit (not float32) tolerance."""
    torch.manual_seed(3)
    ffn = _with_biases(MoEFFN(_decoder_cfg(routing))).eval()
    x = torch.randn(B, T, D)
    y32, _ = ffn(x, _conditions())
    with bf16_autocast():
        y16, d16 = ffn(x, _conditions())
    merge_experts(ffn)
    with bf16_autocast():
        merged16, _ = ffn(x, _conditions())
    assert all(w.dtype == torch.float32 and b.dtype == torch.float32 for w, b in ffn.fc1._merged.values())
    merged32, _ = ffn(x, _conditions())                                    # the cache is reused here
    scale = float(y32.detach().abs().max())
    torch.testing.assert_close(merged32, y32, rtol=1e-3, atol=1e-3 * scale)
    _compare(merged16, y32, None, None)
    _compare(merged16, y16.float(), None, None)
    unmerge_experts(ffn)
