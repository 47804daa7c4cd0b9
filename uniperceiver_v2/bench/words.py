"""Which attributes the captioner names right: ``python -m uniperceiver_v2.bench words --checkpoint RUN``.

BLEU and CIDEr say how far generated captions are from the references, not which words are wrong. This
benchmark asks, word class by word class, whether the captioning task has grounded a word in the image. For every
reference caption of the first ``--images`` images of a split, teacher forcing (the training layout,
``CaptioningTask.teacher_forced_logits``) gives the model's distribution over the vocabulary at every position. At
a position whose reference token names the value of an attribute of the synthetic grammar (``data.grammar``), the
probability of each value of that attribute is summed over the tokens that name it, e.g. for colour:

    P(purple) = P("purple") + P("violet"),   P(cyan) = P("cyan") + P("turquoise"), ...

and the position is *right* when the reference's value has the largest sum. The grammar already fixes where an
attribute word goes ("a big <colour> digit two"), so this is the choice *among* the values of one attribute: the
part of the caption only the image can decide. Next to it, the *class mass* (the probability of any word of the
attribute at that position: whether the model knows that a colour comes here) and two chance levels: 1 / values
and the *majority* rate (always naming the value most frequent at these positions).

Attributes and their words: ``colour`` (10 values, ``grammar.COLOUR_WORDS``), ``size`` (small / medium / large,
``grammar.SIZE_WORDS``; "medium-sized" by its first token) and ``shape`` (the eight shape categories by the nouns of
``grammar.SHAPE_NOUNS``: "disc" and "circle" are both circle). Only words that are one token of the model's tokenizer
(or whose first token is theirs alone) are used; a token shared by two values is dropped and listed.

    python -m uniperceiver_v2.bench words --checkpoint runs/small/train --split test --images 500 \\
        data.root=data/synthetic_small
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["ATTRIBUTES", "AttributeWords", "attribute_choices", "attribute_words", "main", "word_grounding"]


def _grammar_words() -> dict[str, dict[str, list[str]]]:
    from uniperceiver_v2.data import grammar

    shape_words = {category: [word for singular, plural in nouns for word in (singular, plural)]
                   for category, nouns in grammar.SHAPE_NOUNS.items()}
    return {"colour": {value: list(words) for value, words in grammar.COLOUR_WORDS.items()},
            "size": {value: list(words) for value, words in grammar.SIZE_WORDS.items()},
            "shape": shape_words}


ATTRIBUTES = ("colour", "size", "shape")


@dataclass
class AttributeWords:
    """The tokens that name each value of one attribute.

    Attributes:
        values: the attribute's values, in order.
        token_value: {vocabulary index: value index} for every token used.
        dropped: words left out, with the reason (a first token shared with another value, or not in the vocabulary).
    """

    values: list[str]
    token_value: dict[int, int]
    dropped: list[str] = field(default_factory=list)


def attribute_words(tokenizer, vocabulary: torch.Tensor, words: Mapping[str, Sequence[str]] | None = None,
                    attribute: str = "colour") -> AttributeWords:
    """Map each value's words to vocabulary indices by their first token.

    Args:
        tokenizer: the text encoder's tokenizer (a Hugging Face tokenizer).
        vocabulary: (V,) the model's vocabulary as tokenizer ids (``model.vocabulary``).
        words: {value: [words]}; default the grammar's words of ``attribute``.
        attribute: one of ``ATTRIBUTES`` (used when ``words`` is None).
    """
    words = _grammar_words()[attribute] if words is None else words
    index_of = {int(token): i for i, token in enumerate(vocabulary.tolist())}
    first: dict[int, set[int]] = {}
    names: dict[int, list[str]] = {}
    dropped = []
    values = list(words)
    for value_index, value in enumerate(values):
        for word in words[value]:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not ids or ids[0] not in index_of:
                dropped.append(f"{word!r} (not in the vocabulary)")
                continue
            first.setdefault(index_of[ids[0]], set()).add(value_index)
            names.setdefault(index_of[ids[0]], []).append(word)
    token_value = {}
    for token, owners in first.items():
        if len(owners) == 1:
            token_value[token] = next(iter(owners))
        else:
            dropped.extend(f"{word!r} (first token shared by {len(owners)} values)" for word in names[token])
    return AttributeWords(values, token_value, dropped)


def attribute_choices(probabilities: torch.Tensor, targets: torch.Tensor, words: AttributeWords) -> dict:
    """Score the choice among an attribute's values at the positions whose target names one.

    Args:
        probabilities: (P, V) the model's distribution over the vocabulary at P positions.
        targets: (P,) the reference's vocabulary index at each position (any value; positions whose target names
            no value of this attribute are ignored).
        words: from :func:`attribute_words`.

    Returns:
        ``{"positions", "right", "mass" (sum over the positions of P(any word of the attribute)), "share" (sum of
        the reference value's share of that mass), "counts" (positions per reference value), "confusions"
        ((reference value, chosen value) -> positions, wrong choices only)}``.
    """
    num_values = len(words.values)
    tokens = torch.tensor(sorted(words.token_value), dtype=torch.long)
    owner = torch.tensor([words.token_value[t] for t in tokens.tolist()], dtype=torch.long)
    lookup = torch.full((probabilities.shape[1],), -1, dtype=torch.long)
    lookup[tokens] = owner
    valid = (targets >= 0) & (targets < probabilities.shape[1])
    reference = torch.full_like(targets, -1)
    reference[valid] = lookup[targets[valid]]
    keep = reference >= 0
    reference = reference[keep]
    per_value = torch.zeros(int(keep.sum()), num_values, dtype=torch.float64)
    per_value.index_add_(1, owner, probabilities[keep][:, tokens].double())
    chosen = per_value.argmax(dim=1)
    mass = per_value.sum(dim=1)
    share = per_value.gather(1, reference[:, None])[:, 0] / mass.clamp_min(1e-30)
    confusions: dict[tuple[str, str], int] = {}
    for true, picked in zip(reference.tolist(), chosen.tolist()):
        if true != picked:
            key = (words.values[true], words.values[picked])
            confusions[key] = confusions.get(key, 0) + 1
    return {"positions": int(keep.sum()), "right": int((chosen == reference).sum()), "mass": float(mass.sum()),
            "share": float(share.sum()),
            "counts": torch.bincount(reference, minlength=num_values).tolist(), "confusions": confusions}


@torch.no_grad()
def word_grounding(model, cfg, split: str = "test", images: int = 500, batch_size: int = 8) -> dict:
    """:func:`attribute_choices` of every attribute over the reference captions of the first ``images`` images.

    Returns:
        {attribute: {"values", "positions", "right", "accuracy", "mass", "share", "chance" (1 / values),
        "majority", "counts", "confusions", "dropped"}, "images", "captions"}.
    """
    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.engine.runtime import evaluation_mode
    from uniperceiver_v2.tasks import TASKS

    dataset = build_task_dataset(cfg, "captioning", split, train=False)
    task = TASKS["captioning"].from_dataset(cfg.tasks.captioning, dataset)
    tokenizer = model.text_encoder.tokenizer
    vocabulary = model.vocabulary.cpu()
    words = {name: attribute_words(tokenizer, vocabulary, attribute=name) for name in ATTRIBUTES}
    totals = {name: {"positions": 0, "right": 0, "mass": 0.0, "share": 0.0, "counts": [0] * len(w.values),
                     "confusions": {}} for name, w in words.items()}
    count = min(images, len(dataset))
    captions = 0
    with evaluation_mode(model):
        for start in range(0, count, batch_size):
            batch = task.collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            batch = batch.to(model.device)
            image = model.encode_images(batch.images, batch.padding_mask)
            tokens = model.tokenize(batch.captions)
            logits, targets, _ = task.teacher_forced_logits(model, image, batch.caption_image_index,
                                                            tokens["input_ids"], tokens["attention_mask"])
            probabilities = logits.float().softmax(dim=-1).flatten(0, 1).cpu()
            targets = targets.flatten().cpu()
            captions += len(batch.captions)
            for name, w in words.items():
                part = attribute_choices(probabilities, targets, w)
                total = totals[name]
                for key in ("positions", "right", "mass", "share"):
                    total[key] += part[key]
                total["counts"] = [a + b for a, b in zip(total["counts"], part["counts"])]
                for key, n in part["confusions"].items():
                    total["confusions"][key] = total["confusions"].get(key, 0) + n
    result: dict = {"images": count, "captions": captions}
    for name, total in totals.items():
        positions = max(total["positions"], 1)
        result[name] = {"values": words[name].values, **total, "accuracy": total["right"] / positions,
                        "mass": total["mass"] / positions, "share": total["share"] / positions,
                        "chance": 1 / len(words[name].values), "majority": max(total["counts"]) / positions,
                        "dropped": words[name].dropped}
    return result


def _table(result: dict) -> list[str]:
    lines = ["| attribute | positions | right (arg max among its values) | majority | 1 / values | mean share of the "
             "reference's value | mean mass of the attribute's words |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ATTRIBUTES:
        r = result[name]
        lines.append(f"| {name} ({len(r['values'])} values) | {r['positions']} | {r['accuracy']:.3f} | "
                     f"{r['majority']:.3f} | {r['chance']:.3f} | {r['share']:.3f} | {r['mass']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from uniperceiver_v2.bench import checkpoint_parser, model_of_checkpoint, parse_checkpoint_args

    parser = checkpoint_parser("words", __doc__, split="test", images=500, what="images whose references are read")
    parser.add_argument("--top", type=int, default=5, help="confusions to list per attribute (default 5)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parse_checkpoint_args(parser, argv)

    model, cfg = model_of_checkpoint(args.checkpoint, args.overrides)
    result = word_grounding(model, cfg, args.split, args.images)
    print(f"{args.checkpoint}, split {args.split}: {result['captions']} reference captions of {result['images']} "
          "images, teacher-forced")
    print("\n".join(_table(result)))
    for name in ATTRIBUTES:
        r = result[name]
        confusions = sorted(r["confusions"].items(), key=lambda item: -item[1])[:args.top]
        if confusions:
            print(f"{name}, most frequent confusions (reference -> chosen): "
                  + ", ".join(f"{true} -> {picked} ({n})" for (true, picked), n in confusions))
        if r["dropped"]:
            print(f"{name}, words left out: {', '.join(r['dropped'])}")
    if args.json:
        serialisable = {key: ({**value, "confusions": {f"{a} -> {b}": n for (a, b), n in value["confusions"].items()}}
                              if isinstance(value, dict) else value) for key, value in result.items()}
        with open(args.json, "w") as handle:
            json.dump(serialisable, handle, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
