"""Inference cost of the Conditional MoE in the unified decoder: dense vs attribute-MoE (merged and not) vs token-MoE.

    python -m uniperceiver_v2.bench moe [--threads 1] [--repeats 10] [--cases small,paper,paper-b16]

The claim checked (MoE paper Sec. 3.3): with a data-independent routing (attribute, as in v2) the experts of
every condition can be merged into one dense Linear (``moe.merge_experts``), so the MoE decoder costs the same as
a dense decoder at inference. Goal: merged attribute-MoE within ``SPEED_GOAL`` (1.1x) of dense.

Variants, all with the same width / depth / heads / FFN size, in eval mode under ``torch.inference_mode``:
  * dense           -- decoder.moe.routing="none";
  * attr-merged     -- attribute routing, 8 experts top-2 in every FFN, after ``merge_experts``;
  * attr-unmerged   -- the same model dispatching tokens to their 2 experts;
  * token-unmerged  -- token routing, 8 experts top-2, capacity factor 2.0 (cannot be merged).

Input: captioning-shaped sequences [<SPE>, image tokens, words, <SPE> per word] with the auto-regressive mask, so
a batch holds 4 distinct attribute vectors (leading <SPE>, image, causal word, causal <SPE>): the merged model
runs 4 dense Linears per layer on the 4 token groups instead of one on all tokens.
Time: the variants are measured round-robin (so machine load hits them alike); the median of ``repeats``
wall-clock forward passes after 2 warm-up passes is reported, with the ratio to dense.

Merging makes the FLOPs equal to dense exactly; the wall-clock time also matches when every condition has
enough tokens for an efficient matrix product. With few tokens per condition (the ``paper`` case: 256 tokens
in 4 groups, one of them 4 tokens) the 4 smaller products run below the CPU's peak rate and read 4 weight
matrices instead of one, so the ratio rises; ``paper-b16`` shows it fall back as the batch grows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uniperceiver_v2.config import DecoderConfig, MoEConfig
from uniperceiver_v2.modeling.attention_masks import autoregressive_causal_flags, autoregressive_mask
from uniperceiver_v2.modeling.attributes import TASK_IDS, attribute_codes, segment_ids, task_token_attributes
from uniperceiver_v2.modeling.unified_decoder import UnifiedDecoder

SPEED_GOAL = 1.1     # merged attribute-MoE time / dense time at most this


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    depth: int
    heads: int
    ffn_dim: int
    batch: int
    num_image: int       # image tokens after the leading <SPE>
    num_words: int       # words; as many predicting <SPE> tokens follow them

    @property
    def tokens(self) -> int:
        return 1 + self.num_image + 2 * self.num_words


CASES = {
    "small": Case("small", width=256, depth=4, heads=8, ffn_dim=1024, batch=32, num_image=31, num_words=16),
    "paper": Case("paper", width=768, depth=6, heads=12, ffn_dim=3072, batch=4, num_image=31, num_words=16),
    "paper-b16": Case("paper-b16", width=768, depth=6, heads=12, ffn_dim=3072, batch=16, num_image=31,
                      num_words=16),
}


def _decoder(case: Case, routing: str, experts: int, top_k: int) -> UnifiedDecoder:
    cfg = DecoderConfig(width=case.width, depth=case.depth, heads=case.heads, ffn_dim=case.ffn_dim, drop_path=0.0,
                        moe=MoEConfig(routing=routing, num_experts=experts, top_k=top_k))
    return UnifiedDecoder(cfg, image_dim=256, text_dim=384).eval()


def _inputs(case: Case) -> dict:
    """A batch of captioning sequences (random embeddings) with everything the decoder's gates need."""
    num_prefix = 1 + case.num_image
    modality = segment_ids([("spe", 1), ("image", case.num_image), ("text", case.num_words),
                            ("spe", case.num_words)]).expand(case.batch, -1)
    causal = autoregressive_causal_flags(num_prefix, case.num_words, case.num_words)
    return dict(
        x=torch.randn(case.batch, case.tokens, case.width),
        attn_mask=autoregressive_mask(num_prefix, case.num_words),
        attributes=task_token_attributes("captioning", modality, causal=causal),
        modality_ids=modality,
        task_id=torch.full((case.batch,), TASK_IDS["captioning"]),
    )


def _split_cost(case: Case, inputs: dict, dense: UnifiedDecoder, repeats: int) -> dict:
    """The cost of splitting alone: the dense model's first FFN on all tokens vs on each condition group in
    turn (one matrix product per group, as the merged model computes, but with a single set of weights)."""
    ffn = dense.blocks[0].ffn
    x = inputs["x"].reshape(-1, case.width)
    codes = attribute_codes(inputs["attributes"]).reshape(-1)
    groups = [x[codes == code] for code in codes.unique()]

    def whole():
        ffn.fc2(F.gelu(ffn.fc1(x)))

    def per_group():
        for x_u in groups:
            ffn.fc2(F.gelu(ffn.fc1(x_u)))

    times = {whole: [], per_group: []}
    for fn in (whole, per_group):
        fn()
    for _ in range(repeats):
        for fn in times:
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return {"groups": len(groups), "sizes": [g.shape[0] for g in groups],
            "ratio": statistics.median(times[per_group]) / statistics.median(times[whole])}


def run_case(case: Case, experts: int, top_k: int, repeats: int) -> dict[str, float]:
    """Median forward time (s) of every variant on one case; also checks merged == unmerged outputs."""
    torch.manual_seed(0)
    inputs = _inputs(case)
    dense = _decoder(case, "none", experts, top_k)
    attribute = _decoder(case, "attribute", experts, top_k)
    merged = _decoder(case, "attribute", experts, top_k)
    merged.load_state_dict(attribute.state_dict(), assign=True)     # the same tensors: no second copy
    merged.merge_experts()
    token = _decoder(case, "token", experts, top_k)
    variants = {"dense": dense, "attr-merged": merged, "attr-unmerged": attribute, "token-unmerged": token}

    with torch.inference_mode():
        difference = (merged(**inputs).hidden - attribute(**inputs).hidden).abs().max().item()
        for model in variants.values():                     # warm-up (and builds the merged weights)
            model(**inputs)
            model(**inputs)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, model in variants.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
        split = _split_cost(case, inputs, dense, repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in variants.items()}

    print(f"\n### {case.name}: width {case.width}, depth {case.depth}, heads {case.heads}, FFN {case.ffn_dim}, "
          f"{experts} experts top-{top_k}, batch {case.batch} x {case.tokens} tokens")
    print(f"max |merged - unmerged| output difference: {difference:.2e}")
    print(f"the dense FFN of layer 0 run on the {split['groups']} condition groups (sizes {split['sizes']}) "
          f"instead of all tokens at once, same weights: {split['ratio']:.2f}x its time\n")
    print("| variant | parameters | median forward (ms) | time / dense |")
    print("| --- | ---: | ---: | ---: |")
    for name in variants:
        print(f"| {name} | {params[name] / 1e6:.2f} M | {medians[name] * 1e3:.1f} | "
              f"{medians[name] / medians['dense']:.2f}x |")
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="small,paper,paper-b16", help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected names from {sorted(CASES)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.repeats} repeats, median")
    for name in names:
        medians = run_case(CASES[name], args.experts, args.top_k, args.repeats)
        ratio = medians["attr-merged"] / medians["dense"]
        print(f"\nmerged attribute-MoE / dense = {ratio:.2f}x (goal <= {SPEED_GOAL}x): "
              f"{'met' if ratio <= SPEED_GOAL else 'NOT met'}")
    return 0
