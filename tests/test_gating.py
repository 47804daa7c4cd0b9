"""Recording the unified decoder's gate decisions and reading them: token groups and kinds, expert usage (checked
against the gates' own parameters and a per-token loop), routings compared on the same inputs, load balance and
capacity (against a queue simulated by hand), re-parameterisation and its timing."""

import math
import re
from dataclasses import dataclass

import pytest
import torch

from uniperceiver_v2.bench.moe import Case
from uniperceiver_v2.config import DecoderConfig, MoEConfig
from uniperceiver_v2.modeling.attention_masks import autoregressive_causal_flags, autoregressive_mask
from uniperceiver_v2.modeling.attributes import TASK_IDS, attribute_codes, segment_ids, task_token_attributes
from uniperceiver_v2.modeling.unified_decoder import UnifiedDecoder
from uniperceiver_v2.walkthrough import gating

WIDTH, EXPERTS, TOP_K = 32, 4, 2


def make_decoder(routing="attribute", placement=("ffn",), depth=2, seed=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(width=WIDTH, depth=depth, heads=4, ffn_dim=48, drop_path=0.0, max_positions=64,
                        moe=MoEConfig(routing=routing, num_experts=EXPERTS, top_k=TOP_K, placement=list(placement)))
    return UnifiedDecoder(cfg, image_dim=12, text_dim=20).eval()


def captioning_inputs(batch=2, num_image=5, num_words=4, pad_last=2, seed=0):
    """Decoder keyword arguments of [<SPE>, image, words, <SPE> x words] sequences; the last ``pad_last`` words
    of sequence 1 and their <SPE> are padding."""
    g = torch.Generator().manual_seed(seed)
    num_prefix = 1 + num_image
    modality = segment_ids([("spe", 1), ("image", num_image), ("text", num_words), ("spe", num_words)])
    modality = modality.expand(batch, -1)
    T = modality.shape[1]
    causal = autoregressive_causal_flags(num_prefix, num_words, num_words)
    padding = torch.zeros(batch, T, dtype=torch.bool)
    if pad_last:
        padding[1, num_prefix + num_words - pad_last:num_prefix + num_words] = True
        padding[1, T - pad_last:] = True
    return dict(x=torch.randn(batch, T, WIDTH, generator=g), attn_mask=autoregressive_mask(num_prefix, num_words),
                key_padding_mask=padding, attributes=task_token_attributes("captioning", modality, causal=causal),
                modality_ids=modality, task_id=torch.full((batch,), TASK_IDS["captioning"]))


def classification_target_inputs(batch=3, num_words=3, seed=1):
    """[<SPE>, class-name words] candidate target sequences of classification."""
    g = torch.Generator().manual_seed(seed)
    modality = segment_ids([("spe", 1), ("text", num_words)]).expand(batch, -1)
    return dict(x=torch.randn(batch, 1 + num_words, WIDTH, generator=g), attn_mask=None,
                key_padding_mask=torch.zeros(batch, 1 + num_words, dtype=torch.bool),
                attributes=task_token_attributes("classification", modality, is_input=False),
                modality_ids=modality, task_id=torch.full((batch,), TASK_IDS["classification"]))


def record(decoder, *inputs, keep_inputs=False):
    with torch.no_grad(), gating.record_decoder_calls(decoder, keep_inputs=keep_inputs) as recorder:
        for kwargs in inputs:
            decoder(**kwargs)
    return recorder


def dense_gate_reference(gate, bits):
    """G(x) (E,) of the attribute gate for one 8-bit vector, from the gate's parameters (eq. (9), (3))."""
    logits = gate.proj(gate.attribute_norm(gate.attribute_proj(bits.double().to(gate.proj.weight.dtype))))
    top, index = logits.topk(TOP_K)
    return torch.zeros(EXPERTS, dtype=torch.float64).scatter(0, index, top.softmax(-1).double())


# ---------------------------------------------------------------------------------------------------- recording
def test_recorder_keeps_the_callers_output_and_records_the_gates():
    decoder = make_decoder(placement=("ffn", "attn"))
    kwargs = captioning_inputs()
    with torch.no_grad():
        plain = decoder(**kwargs)
        asked = decoder(**kwargs, record_gates=True)
        with gating.record_decoder_calls(decoder, keep_inputs=True) as recorder:
            with recorder.labelled("captioning"):
                hooked = decoder(**kwargs)
            hooked_asked = decoder(**kwargs, record_gates=True)
            decoder(kwargs["x"], kwargs["attn_mask"], kwargs["key_padding_mask"], kwargs["attributes"])  # positional
    assert hooked.gates is None and plain.gates is None and hooked_asked.gates is not None
    torch.testing.assert_close(hooked.hidden, plain.hidden)
    assert [c.label for c in recorder.calls] == ["captioning", None, None]
    assert recorder.of("captioning") == recorder.calls[:1]
    call = recorder.calls[0]
    assert call.task == "captioning" and call.is_input and (call.batch, call.length) == kwargs["x"].shape[:2]
    torch.testing.assert_close(call.x, kwargs["x"])
    assert torch.equal(call.valid, ~kwargs["key_padding_mask"])
    assert torch.equal(call.attn_mask, kwargs["attn_mask"])
    assert len(call.gates) == 2 and set(call.gates[0]) == {"ffn", "attn"}
    for mine, theirs in zip(call.gates, asked.gates):
        for name in ("ffn", "attn"):
            assert torch.equal(mine[name].indices, theirs[name].indices)
            torch.testing.assert_close(mine[name].weights, theirs[name].weights)
    assert recorder.calls[2].task_id is None and recorder.calls[2].task is None
    # hooks are gone after the block
    assert not decoder._forward_hooks and not decoder._forward_pre_hooks
    with torch.no_grad():
        assert decoder(**kwargs).gates is None


def test_recorder_rejects_other_modules():
    with pytest.raises(TypeError, match="UnifiedDecoder"):
        with gating.record_decoder_calls(torch.nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------------------------------------- sequences
def test_attribute_bits_invert_attribute_codes_and_labels_read_them():
    bits = torch.randint(0, 2, (50, 8), generator=torch.Generator().manual_seed(0)).float()
    codes = attribute_codes(bits)
    assert torch.equal(torch.stack([gating.attribute_bits(int(c)) for c in codes]), bits)
    caption_word = task_token_attributes("captioning", torch.tensor([2]), causal=True, is_input=True)[0]
    assert gating.attribute_label(int(attribute_codes(caption_word))) == "I+T→T · input · text (causal)"
    t2i_target_image = task_token_attributes("retrieval_t2i", torch.tensor([1]), is_input=False)[0]
    assert gating.attribute_label(int(attribute_codes(t2i_target_image))) == "T→I · target · image"
    with pytest.raises(ValueError, match="attribute code 256"):
        gating.attribute_bits(256)


def test_token_groups_count_every_task_side_and_kind():
    recorder = record(make_decoder(), captioning_inputs(), classification_target_inputs())
    groups = gating.token_groups(recorder.calls)
    got = [(g.label, g.tokens) for g in groups]
    # sequence 1 of the captioning batch has 2 padded words and 2 padded <SPE>
    assert got == [("captioning · input · <SPE>", 2), ("captioning · input · image", 10),
                   ("captioning · input · text (causal)", 6), ("captioning · input · <SPE> (causal)", 6),
                   ("classification · target · <SPE>", 3), ("classification · target · text", 9)]
    for g in groups:
        assert g.bits[7] == float(g.is_input)


def test_token_kinds_and_segments_of_a_captioning_sequence():
    recorder = record(make_decoder(), captioning_inputs(num_image=5, num_words=4))
    call = recorder.calls[0]
    kinds = gating.token_kinds(call, row=0)
    names = [gating.TOKEN_KINDS[k] for k in kinds.tolist()]
    assert names == ["<SPE>"] + ["image"] * 5 + ["text (causal)"] * 4 + ["<SPE> (causal)"] * 4
    split = gating.token_kinds(call, row=0, image_token_types=torch.tensor([0, 1, 1, 2, 2]))
    assert [gating.TOKEN_KINDS[k] for k in split[1:6].tolist()] == ["image global"] * 3 + ["image regional"] * 2
    segments = gating.kind_segments(gating.token_kinds(call, row=1), call.key_padding_mask[1])
    assert segments == [("<SPE>", 0, 1), ("image ×5", 1, 6), ("text (causal) ×2", 6, 8), ("padding ×2", 8, 10),
                        ("<SPE> (causal) ×2", 10, 12), ("padding ×2", 12, 14)]
    with pytest.raises(ValueError, match="3 types for the 5 image tokens"):
        gating.token_kinds(call, image_token_types=torch.tensor([0, 1, 2]))


def test_sequence_layouts_name_every_call_and_split_matching_image_tokens():
    recorder = record(make_decoder(), captioning_inputs(num_image=3, num_words=2),
                      classification_target_inputs(batch=3, num_words=4))
    layouts = gating.sequence_layouts(recorder.calls, image_token_types=torch.tensor([1, 2, 2]))
    assert list(layouts) == ["captioning · input (2 × 8)", "classification · target (3 × 5)"]
    kinds, padding = layouts["captioning · input (2 × 8)"]
    assert [gating.TOKEN_KINDS[k] for k in kinds.tolist()] == (
        ["<SPE>", "image global", "image regional", "image regional"] + ["text (causal)"] * 2
        + ["<SPE> (causal)"] * 2)
    assert not padding.any()
    kinds, _ = layouts["classification · target (3 × 5)"]
    assert [gating.TOKEN_KINDS[k] for k in kinds.tolist()] == ["<SPE>"] + ["text"] * 4


# ---------------------------------------------------------------------------------------------------- usage
def test_attribute_usage_equals_each_gates_decision_for_the_combination():
    decoder = make_decoder()
    recorder = record(decoder, captioning_inputs(), classification_target_inputs())
    usage = gating.expert_usage(recorder.calls, by="attribute", num_experts=EXPERTS)
    assert usage.usage.shape == (2, 6, EXPERTS)
    assert usage.labels[0] == "I+T→T · input · <SPE> (cap)"
    assert usage.tokens.tolist() == [2, 10, 6, 6, 3, 9]
    with torch.no_grad():
        for layer, block in enumerate(decoder.blocks):
            for row, code in enumerate(usage.keys):
                expected = dense_gate_reference(block.ffn.gate, gating.attribute_bits(code))
                torch.testing.assert_close(usage.usage[layer, row].double(), expected, atol=1e-6, rtol=0)


def test_attribute_usage_lists_a_task_shapes_inputs_before_its_targets_whichever_was_recorded_first():
    g = torch.Generator().manual_seed(2)
    modality = segment_ids([("spe", 1), ("image", 5)]).expand(2, -1)
    classification_images = dict(x=torch.randn(2, 6, WIDTH, generator=g), attn_mask=None,
                                 key_padding_mask=torch.zeros(2, 6, dtype=torch.bool),
                                 attributes=task_token_attributes("classification", modality, is_input=True),
                                 modality_ids=modality, task_id=torch.full((2,), TASK_IDS["classification"]))
    recorder = record(make_decoder(), classification_target_inputs(), classification_images, captioning_inputs())
    usage = gating.expert_usage(recorder.calls, by="attribute", num_experts=EXPERTS)
    sides = [label.split(" · ")[:2] for label in usage.labels]
    assert sides == [["I→T", "input"], ["I→T", "input"], ["I→T", "target"], ["I→T", "target"]] + [
        ["I+T→T", "input"]] * 4                              # the targets were recorded first; the shapes keep order
    assert usage.tokens.tolist()[:4] == [2, 10, 3, 9]          # <SPE> and image inputs, then <SPE> and words


def test_task_usage_is_the_per_token_mean_of_the_gate_vectors():
    decoder = make_decoder(routing="token")        # every token its own decision, some dropped by capacity
    recorder = record(decoder, captioning_inputs(), classification_target_inputs())
    usage = gating.expert_usage(recorder.calls, by="task", num_experts=EXPERTS)
    assert usage.keys == ["captioning", "classification"]
    for layer in range(2):
        for row, task in enumerate(usage.keys):
            total, count = torch.zeros(EXPERTS, dtype=torch.float64), 0
            for call in recorder.calls:
                record_ = call.gates[layer]["ffn"]
                for b in range(call.batch):
                    for t in range(call.length):
                        if call.task != task or not call.valid[b, t]:
                            continue
                        for j in range(TOP_K):
                            if record_.keep[b, t, j]:
                                total[record_.indices[b, t, j]] += float(record_.weights[b, t, j])
                        count += 1
            torch.testing.assert_close(usage.usage[layer, row].double(), total / count, atol=1e-6, rtol=0)
            assert usage.tokens[row] == count


def test_usage_errors_name_the_problem():
    dense = record(make_decoder(routing="none"), captioning_inputs())
    with pytest.raises(ValueError, match="no Conditional-MoE 'ffn'"):
        gating.expert_usage(dense.calls)
    moe = record(make_decoder(), captioning_inputs())
    with pytest.raises(ValueError, match="by='layer'"):
        gating.expert_usage(moe.calls, by="layer")
    with pytest.raises(ValueError, match="no decoder calls"):
        gating.expert_usage([])


# ---------------------------------------------------------------------------------------------------- routings
def test_with_routing_changes_only_the_gates():
    decoder = make_decoder("attribute")
    copy = gating.with_routing(decoder, "token", seed=3)
    assert copy.cfg.moe.routing == "token" and not copy.training
    theirs = copy.state_dict()
    for name, value in decoder.state_dict().items():
        if ".gate." not in name:
            assert torch.equal(theirs[name], value), name
    gates = [name for name in theirs if ".gate." in name]
    assert gates == ["blocks.0.ffn.gate.proj.weight", "blocks.1.ffn.gate.proj.weight"]   # W_g of eq. (5) only
    for name in gates:                      # freshly initialised, not copied from the attribute gate
        assert not torch.equal(theirs[name], decoder.state_dict()[name])


@pytest.mark.parametrize("routing, expected", [("attribute", "codes"), ("modality", 3), ("task", 1),
                                               ("token", "tokens"), ("context", "tokens")])
def test_distinct_decisions_per_routing(routing, expected):
    kwargs = captioning_inputs()
    recorder = record(make_decoder(), kwargs, keep_inputs=True)
    call = recorder.calls[0]
    with torch.no_grad():
        out = gating.replay(call, gating.with_routing(make_decoder(), routing))
    counts = gating.distinct_decisions(out.gates, call.valid)
    if expected == "codes":
        expected = int(attribute_codes(kwargs["attributes"])[call.valid].unique().numel())
    elif expected == "tokens":
        expected = int(call.valid.sum())           # random token values: no two tokens route alike
    # a collision (two conditions drawing the same experts and weights) would lower the count
    assert counts == [expected, expected]


def test_routing_comparison_over_all_calls():
    decoder = make_decoder(placement=("ffn", "attn"))
    inputs = [captioning_inputs(), classification_target_inputs()]
    recorder = record(decoder, *inputs, keep_inputs=True)
    rows = gating.routing_comparison(decoder, recorder.calls, ["token", "modality", "task", "attribute"])
    tokens = sum(int(c.valid.sum()) for c in recorder.calls)
    codes = torch.cat([attribute_codes(k["attributes"])[~k["key_padding_mask"]] for k in inputs]).unique().numel()
    by_routing = {row["routing"]: row for row in rows}
    assert all(row["tokens"] == tokens for row in rows)
    assert by_routing["token"]["decisions"] == [tokens, tokens]
    assert by_routing["modality"]["decisions"] == [3, 3]            # <SPE>, image, text
    assert by_routing["task"]["decisions"] == [2, 2]
    assert by_routing["attribute"]["decisions"] == [codes, codes]
    assert by_routing["attribute"]["balance_loss"] == 0.0
    # unweighted L_bal, averaged over calls and the 4 MoE sub-layers, recomputed from the outputs
    token = gating.with_routing(decoder, "token")
    with torch.no_grad():
        expected = sum(float(gating.replay(c, token).aux_loss) for c in recorder.calls) / (
            len(recorder.calls) * 4 * token.cfg.moe.balance_loss_weight)
    assert by_routing["token"]["balance_loss"] == pytest.approx(expected)
    assert 0.9 < expected < 2.0         # 1 = perfectly uniform routing


def test_replay_needs_the_recorded_inputs():
    recorder = record(make_decoder(), captioning_inputs())
    with pytest.raises(ValueError, match="keep_inputs=True"):
        gating.replay(recorder.calls[0], make_decoder())


def capacity_reference(indices, valid, experts, factor):
    """Assignments kept by a capacity queue simulated token by token: first choices of all tokens, then second
    choices, each in token order (GShard); padding is never queued."""
    N, k = indices.shape
    capacity = math.ceil(factor * k * int(valid.sum()) / experts)
    load = [0] * experts
    kept = 0
    for j in range(k):
        for n in range(N):
            if valid[n]:
                e = int(indices[n, j])
                if load[e] < capacity:
                    load[e] += 1
                    kept += 1
    return kept


def test_assignments_and_capacity_drops_of_token_routing():
    kwargs = captioning_inputs(batch=4, num_image=9, num_words=6)
    recorder = record(make_decoder(), kwargs, keep_inputs=True)
    call = recorder.calls[0]
    with torch.no_grad():
        out = gating.replay(call, gating.with_routing(make_decoder(), "token"))
    counts = gating.expert_assignments(out.gates, call.valid, EXPERTS)
    valid = call.valid.reshape(-1)
    assert counts.shape == (2, EXPERTS)
    assert (counts.sum(1) == TOP_K * valid.sum()).all()
    factors = [0.5, 1.0, 1.5, EXPERTS / TOP_K]
    drops = gating.capacity_drops(out.gates, call.valid, EXPERTS, factors)
    for layer in range(2):
        indices = out.gates[layer]["ffn"].indices.reshape(-1, TOP_K)
        assert torch.equal(counts[layer], torch.bincount(indices[valid].reshape(-1), minlength=EXPERTS))
        for f, factor in enumerate(factors):
            kept = capacity_reference(indices, valid, EXPERTS, factor)
            assert drops[layer, f] == pytest.approx(1 - kept / (TOP_K * int(valid.sum())))
    assert (drops[:, -1] == 0).all()                   # capacity = every assignment
    tokens = int(valid.sum())           # at factor 0.5 the E capacities hold about half the assignments
    assert (drops[:, 0] >= 1 - EXPERTS * math.ceil(0.5 * TOP_K * tokens / EXPERTS) / (TOP_K * tokens) - 1e-9).all()


# ---------------------------------------------------------------------------------------------------- merging
def test_merged_difference_is_float_rounding_and_leaves_the_decoder_as_it_was():
    decoder = make_decoder(placement=("ffn", "attn"))
    recorder = record(decoder, captioning_inputs(), classification_target_inputs(), keep_inputs=True)
    decoder.train()
    differences = gating.merged_difference(decoder, recorder.calls)
    assert set(differences) == {"captioning", "classification"}
    assert all(0.0 <= d < 1e-5 for d in differences.values())
    assert decoder.training and not decoder.blocks[0].ffn.fc1.merged


def test_merged_difference_refuses_token_routing():
    decoder = make_decoder("token")
    recorder = record(decoder, captioning_inputs(), keep_inputs=True)
    decoder.train()
    with pytest.raises(ValueError, match="cannot be merged"):
        gating.merged_difference(decoder, recorder.calls)
    assert decoder.training


def test_reparameterisation_timings_call_the_benchmark(capsys):
    cfg = DecoderConfig(width=16, depth=1, heads=2, ffn_dim=32)
    case = gating.bench_case(cfg, "test", batch=2, num_image=3, num_words=2)
    assert case == Case("test", width=16, depth=1, heads=2, ffn_dim=32, batch=2, num_image=3, num_words=2)
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    timings = gating.reparameterisation_timings(case, repeats=1, threads=1, num_experts=4)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)
    variants = {"dense", "attr-merged", "attr-unmerged", "token-unmerged"}
    assert set(timings["median_ms"]) == variants == set(timings["ratio_to_dense"])
    assert timings["ratio_to_dense"]["dense"] == 1.0
    assert all(v > 0 for v in timings["median_ms"].values())
    # The printed report: merged and unmerged experts give the same output, and the markdown table holds one row
    # per variant with the medians and ratios that were returned (to the printed precision).
    printed = capsys.readouterr().out.splitlines()
    differences = [float(re.search(r"merged - unmerged\|.*?(\d\.\d+e[+-]\d+)", line).group(1))
                   for line in printed if "merged - unmerged|" in line]
    assert len(differences) == 1 and differences[0] < 1e-5
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in printed if line.startswith("|")]
    header, body = table[0], table[2:]
    ms_column = next(i for i, name in enumerate(header) if "(ms)" in name)
    ratio_column = next(i for i, name in enumerate(header) if "dense" in name)
    assert {row[0] for row in body} == variants and len(body) == len(variants)
    for row in body:
        assert float(row[ms_column]) == pytest.approx(timings["median_ms"][row[0]], abs=0.051), row
        assert float(row[ratio_column].removesuffix("x")) == pytest.approx(timings["ratio_to_dense"][row[0]],
                                                                           abs=0.0051), row


def test_reparameterisation_timings_return_the_report_as_markdown(capsys):
    cfg = DecoderConfig(width=16, depth=1, heads=2, ffn_dim=32)
    case = gating.bench_case(cfg, "test", batch=2, num_image=3, num_words=2)
    timings = gating.reparameterisation_timings(case, repeats=1, threads=1, num_experts=4, report=True)
    assert capsys.readouterr().out == ""
    blocks = timings["report"].split("\n\n")
    assert blocks[0].startswith("**test: width 16") and blocks[0].endswith("**")
    assert any(block.startswith("max |merged - unmerged|") for block in blocks)
    table = blocks[-1].splitlines()
    assert table[0].startswith("| variant |") and len(table) == 2 + 4          # header, rule, one row per variant
    assert set(timings["median_ms"]) == {"dense", "attr-merged", "attr-unmerged", "token-unmerged"}


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass
class FakeConfig:
    batch_size: int


class FakeTask:
    """Collates numbers; its loss runs the decoder on classification targets and draws a random number."""

    def __init__(self, batch_size):
        self.config = FakeConfig(batch_size)

    def collate(self, samples):
        return torch.tensor(samples)

    def loss(self, model, batch):
        model.decoder(**classification_target_inputs(batch=len(batch)))
        return {"loss": torch.rand(()), "first": batch[0].float()}


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = make_decoder()


def test_task_batches_draw_without_replacement_reproducibly():
    tasks = {"a": FakeTask(3), "b": FakeTask(10)}
    datasets = {"a": list(range(100, 120)), "b": list(range(5))}
    batches = gating.task_batches(tasks, datasets, seed=4)
    assert batches["a"].shape == (3,) and batches["a"].unique().numel() == 3
    assert sorted(batches["b"].tolist()) == list(range(5))          # capped at the dataset's size
    assert torch.equal(gating.task_batches(tasks, datasets, seed=4)["a"], batches["a"])
    assert gating.task_batches(tasks, datasets, batch_size=2, seed=4)["a"].shape == (2,)
    with pytest.raises(KeyError, match="no dataset for task 'a'"):
        gating.task_batches(tasks, {"b": datasets["b"]})


def test_run_tasks_labels_the_calls_and_restores_the_mode():
    model = FakeModel().train()
    tasks = {"first": FakeTask(2), "second": FakeTask(4)}
    batches = {"first": torch.tensor([7, 8]), "second": torch.tensor([1, 2, 3, 4])}
    losses, recorder = gating.run_tasks(model, tasks, batches, seed=1, keep_inputs=True)
    again, _ = gating.run_tasks(model, tasks, batches, seed=1)
    assert model.training
    assert losses == again and losses["first"]["first"] == 7.0
    assert [c.label for c in recorder.calls] == ["first", "second"]
    assert recorder.calls[1].batch == 4 and recorder.calls[0].x is not None
    assert all(not layer["ffn"].keep.logical_not().any() for c in recorder.calls for layer in c.gates)
