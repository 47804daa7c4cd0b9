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

A wrong choice can still be read from the image: the captioner may name the colour of another object than the one
the reference describes (the grammar picks which objects a caption mentions). On a synthetic suite, whose
annotations carry each object's colour, size and category, the *in image* rate counts the choices that are a value
of some object of the image, beside the same rate for always naming the majority value; a captioner that reads
colours but does not bind them to the object the words so far describe has an in-image rate well above that floor
and a right rate near chance.

Last, the *cosine between the values' targets*: the mean cosine between the captioning targets g(f(w)) of two words
that name different values. The logits are cos(input, target) / tau, so values whose targets nearly coincide get
nearly the same probability whatever the input (the gap is at most sqrt(2 - 2 cosine) / tau), however well the
image tokens carry them.

Attributes and their words: ``colour`` (10 values, ``grammar.COLOUR_WORDS``), ``size`` (small / medium / large,
``grammar.SIZE_WORDS``; "medium-sized" by its first token) and ``shape`` (the eight shape categories by the nouns of
``grammar.SHAPE_NOUNS``: "disc" and "circle" are both circle). Only words that are one token of the model's tokenizer
(or whose first token is theirs alone) are used; a token shared by two values is dropped and listed.

    python -m uniperceiver_v2.bench words --checkpoint runs/small/train --split test --images 500 \\
        data.root=data/synthetic_small

``--mlm`` asks the same of masked language modelling (``mlm_by_word_class``): on the masked positions of the MLM
evaluation of ``--split`` (the validation corpus when the split has none), the model's accuracy by the class of the
masked word (the grammar's colour, size and shape words by their first token, its number words and digit names,
everything else "other"), beside the context-count reference of ``bench ceiling`` on the same positions. A sentence
rarely fixes the colour or the shape it names ("a red circle next to a blue square"), so these classes show how much
of the MLM accuracy the corpus leaves to be won:

    python -m uniperceiver_v2.bench words --mlm --checkpoint runs/small/train --split val data.root=data/synthetic_small
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["ATTRIBUTES", "AttributeWords", "WORD_CLASSES", "attribute_choices", "attribute_words", "image_values",
           "main", "mlm_by_word_class", "target_cosine", "word_classes", "word_grounding"]


def _grammar_words() -> dict[str, dict[str, list[str]]]:
    from uniperceiver_v2.data import grammar

    shape_words = {category: [word for singular, plural in nouns for word in (singular, plural)]
                   for category, nouns in grammar.SHAPE_NOUNS.items()}
    return {"colour": {value: list(words) for value, words in grammar.COLOUR_WORDS.items()},
            "size": {value: list(words) for value, words in grammar.SIZE_WORDS.items()},
            "shape": shape_words}


ATTRIBUTES = ("colour", "size", "shape")


def _other_grammar_words() -> set[str]:
    """Whole words the grammar uses with another meaning: the number words ("five objects") and the digits' names."""
    from uniperceiver_v2.data import grammar
    from uniperceiver_v2.data.render import DIGIT_WORDS

    return set(grammar.NUMBER_WORDS.values()) | set(DIGIT_WORDS.values())


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
                    attribute: str = "colour", other_words: set[str] | None = None) -> AttributeWords:
    """Map each value's words to vocabulary indices by their first token.

    A word of several tokens whose first token is a whole word of ``other_words`` is dropped: "five-pointed star"
    begins with the token "five", and a reference "five" is far more often the number ("five objects").

    Args:
        tokenizer: the text encoder's tokenizer (a Hugging Face tokenizer).
        vocabulary: (V,) the model's vocabulary as tokenizer ids (``model.vocabulary``).
        words: {value: [words]}; default the grammar's words of ``attribute``.
        attribute: one of ``ATTRIBUTES`` (used when ``words`` is None).
        other_words: words used with another meaning; default the grammar's number words and digit names.
    """
    words = _grammar_words()[attribute] if words is None else words
    other_words = _other_grammar_words() if other_words is None else other_words
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
            first_word = tokenizer.decode([ids[0]]).strip()
            if len(ids) > 1 and first_word in other_words:
                dropped.append(f"{word!r} (first token {first_word!r} is also a word of its own)")
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


def attribute_choices(probabilities: torch.Tensor, targets: torch.Tensor, words: AttributeWords,
                      present: torch.Tensor | None = None) -> dict:
    """Score the choice among an attribute's values at the positions whose target names one.

    Args:
        probabilities: (P, V) the model's distribution over the vocabulary at P positions.
        targets: (P,) the reference's vocabulary index at each position (any value; positions whose target names
            no value of this attribute are ignored).
        words: from :func:`attribute_words`.
        present: optional (P, values) bool, which values some object of the position's image has.

    Returns:
        ``{"positions", "right", "mass" (sum over the positions of P(any word of the attribute)), "share" (sum of
        the reference value's share of that mass), "counts" (positions per reference value), "confusions"
        ((reference value, chosen value) -> positions, wrong choices only)}``; with ``present`` also "in_image"
        (positions whose chosen value is in the image), "reference_in_image" (the same for the reference's value)
        and "present_counts" (positions per value present in the image).
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
    result = {"positions": int(keep.sum()), "right": int((chosen == reference).sum()), "mass": float(mass.sum()),
              "share": float(share.sum()),
              "counts": torch.bincount(reference, minlength=num_values).tolist(), "confusions": confusions}
    if present is not None:
        if present.shape != (targets.shape[0], num_values):
            raise ValueError(f"present must be (positions, values) = {(targets.shape[0], num_values)}, "
                             f"got {tuple(present.shape)}")
        present = present[keep].bool()
        result["in_image"] = int(present.gather(1, chosen[:, None]).sum())
        result["reference_in_image"] = int(present.gather(1, reference[:, None]).sum())
        result["present_counts"] = present.sum(dim=0).tolist()
    return result


def target_cosine(targets: torch.Tensor, words: AttributeWords) -> float:
    """Mean cosine between the targets of two words that name different values of the attribute.

    Args:
        targets: (V, d) the vocabulary's candidate targets g(f(w)) (``model.vocabulary_embeddings``).
        words: from :func:`attribute_words`.

    Near 1, no input opens a large gap between the values' logits: for any h, |cos(h, a) - cos(h, b)| <=
    sqrt(2 - 2 cos(a, b)), times the logit scale 1 / tau. NaN when the vocabulary holds the words of fewer than two
    values.
    """
    tokens = sorted(words.token_value)
    owner = torch.tensor([words.token_value[t] for t in tokens], dtype=torch.long)
    if len(set(owner.tolist())) < 2:
        return float("nan")
    z = torch.nn.functional.normalize(targets[tokens].double(), dim=1)
    different = owner[:, None] != owner[None, :]
    return float((z @ z.T)[different].mean())


def image_values(ann_file, attributes: Sequence[str] = ATTRIBUTES) -> dict[int, dict[str, set[str]]]:
    """{image id: {attribute: the values its objects have}} from a COCO instances file of the synthetic suite.

    ``colour`` and ``size`` are the annotations' ``attributes``; ``shape`` is the category name when it is one of
    the grammar's shapes (a digit has no shape value).

    Raises:
        DataError: a missing or malformed file, or an annotation without ``attributes.colour`` / ``size`` (named).
    """
    from uniperceiver_v2.data.coco import load_json, require_keys
    from uniperceiver_v2.data.summary import DataError

    data = load_json(ann_file)
    require_keys(data, ("images", "annotations", "categories"), ann_file, "top level")
    names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    shapes = set(_grammar_words()["shape"])
    values: dict[int, dict[str, set[str]]] = {int(r["id"]): {name: set() for name in attributes}
                                              for r in data["images"]}
    for annotation in data["annotations"]:
        image = values.get(int(annotation["image_id"]))
        if image is None:
            raise DataError(f"{ann_file}: annotation id={annotation.get('id')} refers to the unknown image "
                            f"{annotation['image_id']}")
        found = dict(annotation.get("attributes") or {})
        found["shape"] = names.get(int(annotation["category_id"]))
        for name in attributes:
            if name == "shape":
                if found["shape"] in shapes:
                    image[name].add(found["shape"])
            elif name not in found:
                raise DataError(f"{ann_file}: annotation id={annotation.get('id')} has no attributes.{name}; the "
                                f"in-image rate needs the synthetic suite's annotations")
            else:
                image[name].add(str(found[name]))
    return values


@torch.no_grad()
def word_grounding(model, cfg, split: str = "test", images: int = 500, batch_size: int = 8) -> dict:
    """:func:`attribute_choices` of every attribute over the reference captions of the first ``images`` images.

    Returns:
        {attribute: {"values", "positions", "right", "accuracy", "mass", "share", "chance" (1 / values),
        "majority", "counts", "confusions", "dropped"}, "images", "captions"}; on a synthetic suite each attribute
        also has "in_image" (rate of choices that are a value of some object of the image), "in_image_majority"
        (that rate for always naming the majority value) and "reference_in_image" (for the reference's value);
        "target_cosine" is :func:`target_cosine` of the captioning targets.
    """
    from uniperceiver_v2.data.suite import SyntheticSuite, written_by_generator
    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.engine.runtime import evaluation_mode
    from uniperceiver_v2.tasks import TASKS

    dataset = build_task_dataset(cfg, "captioning", split, train=False)
    task = TASKS["captioning"].from_dataset(cfg.tasks.captioning, dataset)
    tokenizer = model.text_encoder.tokenizer
    vocabulary = model.vocabulary.cpu()
    words = {name: attribute_words(tokenizer, vocabulary, attribute=name) for name in ATTRIBUTES}
    values_of = (image_values(SyntheticSuite(cfg.data.root).instances_file(split))
                 if written_by_generator(cfg.data.root) else None)
    totals = {name: {"positions": 0, "right": 0, "mass": 0.0, "share": 0.0, "counts": [0] * len(w.values),
                     "confusions": {}, "in_image": 0, "reference_in_image": 0, "present_counts": [0] * len(w.values)}
              for name, w in words.items()}
    count = min(images, len(dataset))
    captions = 0
    with evaluation_mode(model):
        vocabulary_targets = model.vocabulary_embeddings("captioning").cpu()
        for start in range(0, count, batch_size):
            batch = task.collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            batch = batch.to(model.device)
            image = model.encode_images(batch.images, batch.padding_mask)
            tokens = model.tokenize(batch.captions)
            logits, targets, _ = task.teacher_forced_logits(model, image, batch.caption_image_index,
                                                            tokens["input_ids"], tokens["attention_mask"])
            probabilities = logits.float().softmax(dim=-1).flatten(0, 1).cpu()
            rows = (torch.arange(len(batch.captions)) if batch.caption_image_index is None
                    else batch.caption_image_index.cpu())
            targets = targets.flatten().cpu()
            captions += len(batch.captions)
            for name, w in words.items():
                present = None
                if values_of is not None:
                    per_caption = torch.tensor([[value in values_of[int(batch.image_ids[row])][name]
                                                 for value in w.values] for row in rows.tolist()])
                    present = per_caption.repeat_interleave(logits.shape[1], dim=0)
                part = attribute_choices(probabilities, targets, w, present)
                total = totals[name]
                for key in ("positions", "right", "mass", "share", "in_image", "reference_in_image"):
                    total[key] += part.get(key, 0)
                for key in ("counts", "present_counts"):
                    total[key] = [a + b for a, b in zip(total[key], part.get(key, [0] * len(w.values)))]
                for key, n in part["confusions"].items():
                    total["confusions"][key] = total["confusions"].get(key, 0) + n
    result: dict = {"images": count, "captions": captions}
    for name, total in totals.items():
        positions = max(total["positions"], 1)
        majority = max(range(len(total["counts"])), key=total["counts"].__getitem__)
        entry = {"values": words[name].values, **{k: v for k, v in total.items() if k not in
                                                  ("in_image", "reference_in_image", "present_counts")},
                 "accuracy": total["right"] / positions, "mass": total["mass"] / positions,
                 "share": total["share"] / positions, "chance": 1 / len(words[name].values),
                 "majority": total["counts"][majority] / positions, "dropped": words[name].dropped,
                 "target_cosine": target_cosine(vocabulary_targets, words[name])}
        if values_of is not None:
            entry.update(in_image=total["in_image"] / positions,
                         in_image_majority=total["present_counts"][majority] / positions,
                         reference_in_image=total["reference_in_image"] / positions)
        result[name] = entry
    return result


WORD_CLASSES = ("colour", "size", "shape", "number", "other")


def word_classes(tokenizer) -> dict[int, str]:
    """{token id: class} for the first token of every grammar word of ``WORD_CLASSES`` but "other" (the tokens
    absent): colour, size and shape words as ``attribute_words`` takes them (a word of several tokens whose first
    token is a number word is left out), then the number words and digit names. A token of two classes keeps the
    first in that order."""
    other_words = _other_grammar_words()
    classes: dict[int, str] = {}
    grammar_words = _grammar_words()
    for name in ATTRIBUTES:
        for words in grammar_words[name].values():
            for word in words:
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                if ids and not (len(ids) > 1 and tokenizer.decode([ids[0]]).strip() in other_words):
                    classes.setdefault(int(ids[0]), name)
    for word in sorted(other_words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if ids:
            classes.setdefault(int(ids[0]), "number")
    return classes


def mlm_by_word_class(model, cfg, split: str = "val") -> dict[str, dict[str, float]]:
    """MLM accuracy by the class of the masked word, the model's and the context-count reference's.

    The positions are those of the MLM evaluation (``engine.evaluation``: the fixed masks of ``MLMTask.predict``);
    the reference is ``bench.ceiling.mlm_context_counts`` on the same corpus and masks.

    Returns:
        {class of ``WORD_CLASSES`` (those with positions) and "all": {"positions", "share" (of all masked
        positions), "model" (accuracy), "context_counts" (accuracy)}}.
    """
    from uniperceiver_v2.bench.ceiling import mlm_context_counts
    from uniperceiver_v2.engine.data_setup import EvalBatches, build_task_dataset
    from uniperceiver_v2.engine.runtime import evaluation_mode, move_to_device
    from uniperceiver_v2.tasks import TASKS

    classes = word_classes(model.text_encoder.tokenizer)
    dataset = build_task_dataset(cfg, "mlm", split, train=False)
    task = TASKS["mlm"].from_dataset(cfg.tasks.mlm, dataset)
    tally: dict[str, list[int]] = {}
    device = next(model.parameters()).device
    with evaluation_mode(model), torch.no_grad():
        for _, batch, filler in EvalBatches(dataset, task.collate, cfg.tasks.mlm.batch_size, 0, 1, 0):
            if filler:
                continue
            out = task.predict(model, move_to_device(batch, device))
            for predicted, target in zip(out["predicted"].tolist(), out["target"].tolist()):
                counts = tally.setdefault(classes.get(target, "other"), [0, 0])
                counts[0] += predicted == target
                counts[1] += 1
    reference = mlm_context_counts(cfg, split, classes)["by_class"]
    total = sum(n for _, n in tally.values())
    if total == 0 or reference.keys() != tally.keys() or any(reference[k][1] != tally[k][1] for k in tally):
        raise ValueError(f"mlm_by_word_class: the model's masked positions {({k: n for k, (_, n) in tally.items()})} "
                         f"differ from the reference's {({k: n for k, (_, n) in reference.items()})}")
    result = {name: {"positions": tally[name][1], "share": tally[name][1] / total,
                     "model": tally[name][0] / tally[name][1], "context_counts": reference[name][0] / tally[name][1]}
              for name in WORD_CLASSES if name in tally}
    result["all"] = {"positions": total, "share": 1.0, "model": sum(c for c, _ in tally.values()) / total,
                     "context_counts": sum(c for c, _ in reference.values()) / total}
    return result


def _mlm_table(result: dict) -> list[str]:
    lines = ["| masked word | positions | share | model | context counts |", "| --- | --- | --- | --- | --- |"]
    for name, row in result.items():
        lines.append(f"| {name} | {row['positions']} | {row['share']:.3f} | {row['model']:.3f} | "
                     f"{row['context_counts']:.3f} |")
    return lines


def _table(result: dict) -> list[str]:
    in_image = all("in_image" in result[name] for name in ATTRIBUTES)
    columns = ["attribute", "positions", "right (arg max among its values)", "majority", "1 / values",
               "mean share of the reference's value", "mean mass of the attribute's words",
               "cosine between the values' targets"]
    if in_image:
        columns += ["chosen value in the image", "majority value in the image"]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for name in ATTRIBUTES:
        r = result[name]
        cells = [f"{name} ({len(r['values'])} values)", str(r["positions"]), f"{r['accuracy']:.3f}",
                 f"{r['majority']:.3f}", f"{r['chance']:.3f}", f"{r['share']:.3f}", f"{r['mass']:.3f}",
                 f"{r['target_cosine']:.3f}"]
        if in_image:
            cells += [f"{r['in_image']:.3f}", f"{r['in_image_majority']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from uniperceiver_v2.bench import checkpoint_parser, model_of_checkpoint, parse_checkpoint_args

    parser = checkpoint_parser("words", __doc__, split="test", images=500, what="images whose references are read")
    parser.add_argument("--top", type=int, default=5, help="confusions to list per attribute (default 5)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--mlm", action="store_true",
                        help="masked language modelling by the class of the masked word instead (all of the split's "
                             "corpus; --images and --top unused)")
    args = parse_checkpoint_args(parser, argv)

    model, cfg = model_of_checkpoint(args.checkpoint, args.overrides)
    if args.mlm:
        result = mlm_by_word_class(model, cfg, args.split)
        print(f"{args.checkpoint}, MLM on the corpus of split {args.split} (its validation corpus if it has none)")
        print("\n".join(_mlm_table(result)))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
            print(f"wrote {args.json}")
        return 0
    result = word_grounding(model, cfg, args.split, args.images)
    print(f"{args.checkpoint}, split {args.split}: {result['captions']} reference captions of {result['images']} "
          "images, teacher-forced")
    print("\n".join(_table(result)))
    if all("reference_in_image" in result[name] for name in ATTRIBUTES):
        print("the references' own values found in the image's annotations: " + ", ".join(
            f"{name} {result[name]['reference_in_image']:.3f}" for name in ATTRIBUTES))
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
