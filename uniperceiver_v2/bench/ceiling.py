"""What the data allows: an attribute oracle's retrieval, the captions' own agreement and a masked-word reference.

    python -m uniperceiver_v2.bench ceiling [--config tiny] [--split test] [--results EVAL_JSON] [--json OUT]
        [--no-mlm] [key.sub=value ...]

    e.g. python -m uniperceiver_v2.bench ceiling --split test \\
        data.root=/tmp/speed/data/synthetic_small data.synthetic_profile=small

Reads only the split's annotation files of the synthetic suite (``data.caption_annotations`` and
``data.detection_annotations`` under ``data.root``; no pixels) and the text corpora (``data.corpus``), and prints:

* **Retrieval, attribute oracle.** Each image is known by the (category, colour, size) of its annotated objects
  and its background (the ``attributes`` of each instance and the ``background`` of each image record), but not
  by positions or relations. Each caption is parsed into claims with the grammar's own word lists
  (``data.grammar``): noun phrases ("two small red triangles", "a violet disc", "three objects", "one blue item")
  and the background ("a striped background"). A phrase with a number word claims exactly that many objects of
  its category and colour (all of the stated size); one without claims at least one such object. Phrases that
  constrain nothing ("the largest *object* is ...") are dropped. score(image, caption) = how many of the
  caption's claims hold in the image, an integer. **Ties are broken at random**: a jitter in [0, 0.5) drawn
  once per (image, caption) pair from a fixed seed is added, so among equal scores the order is a fixed random
  permutation that does not know which pair is right (the expected R@K of random tie-breaking, up to sampling
  noise). R@1/5/10 both ways come from ``metrics.retrieval.retrieval_recall`` on that matrix; the same on the
  integer scores, where ``retrieval_recall`` counts every tie against the right answer, is printed as a lower
  bound. The brief's score only counts what holds, so for image->text a wrong caption with three true claims
  and one false outranks a right caption with two: a second oracle scores claims held minus claims
  contradicted (text->image is the same, the number of claims being fixed per caption). As a check of the
  parser, every caption's claims must hold in its own image (``claims_hold_own``).
* **Retrieval, chance**: image->text 1 - C(T - c, K) / C(T, K) averaged over images (c = the image's captions,
  T = all captions), text->image K / images.
* **Captioning, reference agreement** (leave-one-out): reference j of every image scored with
  ``metrics.captioning.caption_metrics`` against the image's other references, averaged over j = 0..4 (so
  against 4 references, where a model is scored against 5: BLEU is a little lower than with 5).
* **Captioning, grammar caption**: the grammar (``grammar.describe``) writes one new caption per image from the
  scene rebuilt from the annotations (categories, colours, sizes, background; positions and areas from the
  visible masks, exactly as the generator computed them; which object covers which is approximated from the
  visible masks, the annotations hold no full masks), with its own random generator (seed, draw, image id), and
  it is scored against all references, like a model's caption: a model that knew the scene and the grammar, but
  not which of its random wordings the annotators drew. Averaged over 3 draws.
* **Masked language modelling, context-count predictor** (``mlm_context_counts``; the MLM corpus
  ``data.corpus``, not the captions): the words of the split's corpus are masked exactly as the model's
  evaluation masks them (the config's text-encoder tokenizer, ``text_encoder.max_length`` with truncation,
  ``tasks.mlm.choose_masked_positions`` with ``tasks.mlm.mask_prob`` and the fixed per-sentence draws of
  ``EVAL_MASK_SEED``), and each masked token is predicted from counts, in the *training* corpus, of the tokens
  seen between the same neighbours: the two on either side (l2 l1 _ r1 r2), else (l1 _ r1), else (l1 _), else
  (_ r1), else the most frequent token; the token seen there most often wins, a tie going to the one more frequent
  in the whole training corpus. The training counts hold the real neighbours; a masked neighbour of the evaluation
  (several words of a sentence are masked at once) is a mask symbol that no training context holds, so a context
  with one never matches and the prediction backs off past it. Not a ceiling: it is a reference, what local
  context alone predicts, and a model that reads the whole sentence can beat it. The suite has no test corpus: a
  split without one (test) is scored on the validation corpus, and the table says so. With a ``data.root`` alone
  (no ``Config``) the tiny preset's text encoder and MLM settings are used.

``--results`` takes a ``python -m uniperceiver_v2.evaluate`` JSON and prints the model's numbers next to these.
``ceilings(root_or_cfg, split)`` returns them as a dict of plain numbers (the notebooks use it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from uniperceiver_v2.data import grammar

KS = (1, 5, 10)
TIE_JITTER = 0.5  # below 1: only breaks ties between the integer scores


# ---------------------------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Claim:
    """One thing a caption says that attributes alone can check.

    A noun phrase: ``category`` (None for "object" / "item" / "figure"), ``colour``, ``size`` (None when not
    stated) and ``count`` (an exact number of objects of that category and colour, None for "at least one").
    A background mention: ``background`` set, the rest None.
    """

    category: str | None = None
    colour: str | None = None
    size: str | None = None
    count: int | None = None
    background: str | None = None


def _vocabulary() -> tuple[dict[tuple[str, ...], str | None], dict[tuple[str, ...], str], dict[str, tuple[str, Any]]]:
    """Token sequences of every noun form (-> category, None for generic nouns), of every background phrase
    (-> background kind, without its article) and the modifier words (-> ("size" | "colour" | "count", value))."""
    nouns: dict[tuple[str, ...], str | None] = {}
    for category, forms in grammar.NOUNS.items():
        for form in forms:
            for word in form:
                nouns[tuple(grammar.tokenize(word))] = category
    for form in grammar.GENERIC_NOUNS:
        for word in form:
            nouns[tuple(grammar.tokenize(word))] = None
    backgrounds: dict[tuple[str, ...], str] = {}
    for kind, phrases in grammar.BACKGROUND_PHRASES.items():
        for phrase in phrases:
            tokens = grammar.tokenize(phrase)
            backgrounds[tuple(tokens[1:] if tokens[0] in ("a", "an") else tokens)] = kind
    modifiers: dict[str, tuple[str, Any]] = {"single": ("count", 1)}
    for size, words in grammar.SIZE_WORDS.items():
        modifiers.update({word: ("size", size) for word in words})
    for colour, words in grammar.COLOUR_WORDS.items():
        modifiers.update({word: ("colour", colour) for word in words})
    modifiers.update({word: ("count", n) for n, word in grammar.NUMBER_WORDS.items()})
    return nouns, backgrounds, modifiers


_NOUNS, _BACKGROUNDS, _MODIFIERS = _vocabulary()
_LONGEST = max(len(key) for key in (*_NOUNS, *_BACKGROUNDS))


def _match(tokens: list[str], start: int, table: dict) -> int:
    """Length of the longest key of ``table`` starting at ``tokens[start]``, 0 when none does."""
    for length in range(min(_LONGEST, len(tokens) - start), 0, -1):
        if tuple(tokens[start:start + length]) in table:
            return length
    return 0


def parse_claims(caption: str) -> list[Claim]:
    """The claims of a grammar caption, in order: its noun phrases (longest noun form first, with the size,
    colour and number words right before it) and its background mention; phrases that constrain nothing
    ("the largest object") are left out.

    >>> parse_claims("Two small red triangles left of a violet disc on stripes.")  # doctest: +NORMALIZE_WHITESPACE
    [Claim(category='triangle', colour='red', size='small', count=2, background=None),
     Claim(category='circle', colour='purple', size=None, count=None, background=None),
     Claim(category=None, colour=None, size=None, count=None, background='stripes')]
    """
    tokens = grammar.tokenize(caption)
    claims: list[Claim] = []
    consumed = 0  # tokens before this index belong to an earlier match
    start = 0
    while start < len(tokens):
        length = _match(tokens, start, _BACKGROUNDS)
        if length:
            claims.append(Claim(background=_BACKGROUNDS[tuple(tokens[start:start + length])]))
            start = consumed = start + length
            continue
        length = _match(tokens, start, _NOUNS)
        if not length:
            start += 1
            continue
        found: dict[str, Any] = {}
        before = start - 1
        while before >= consumed and tokens[before] in _MODIFIERS:
            kind, value = _MODIFIERS[tokens[before]]
            found.setdefault(kind, value)
            before -= 1
        claim = Claim(_NOUNS[tuple(tokens[start:start + length])], found.get("colour"), found.get("size"),
                      found.get("count"))
        if claim != Claim():
            claims.append(claim)
        start = consumed = start + length
    return claims


# ---------------------------------------------------------------------------------------------------- images
@dataclass
class SceneAttributes:
    """What the oracle knows of one image: its objects' (category, colour, size) and its background."""

    objects: list[tuple[str, str, str]]
    background: str

    def __post_init__(self) -> None:
        # Objects per (category, colour, size) pattern with None as a wildcard: each claim is then two look-ups.
        self._counts = Counter(
            pattern for obj in self.objects for pattern in product(*((value, None) for value in obj))
        )

    def holds(self, claim: Claim) -> bool:
        """Does ``claim`` hold in this image (see ``Claim``)?"""
        if claim.background is not None:
            return claim.background == self.background
        matching = self._counts[(claim.category, claim.colour, claim.size)]
        if claim.count is None:
            return matching >= 1
        # "two small red triangles": exactly two red triangles, and both small.
        return matching == claim.count == self._counts[(claim.category, claim.colour, None)]


def score_matrix(scenes: list[SceneAttributes], captions: list[str]) -> np.ndarray:
    """(images, captions) int: how many of each caption's claims hold in each image."""
    columns: dict[Claim, np.ndarray] = {}
    scores = np.zeros((len(scenes), len(captions)), dtype=np.int64)
    for j, caption in enumerate(captions):
        for claim in parse_claims(caption):
            if claim not in columns:
                columns[claim] = np.array([scene.holds(claim) for scene in scenes], dtype=np.int64)
            scores[:, j] += columns[claim]
    return scores


def tie_broken(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """``scores`` (integers) plus a jitter in [0, 0.5) per pair from ``seed``: a fixed random order among ties."""
    jitter = np.random.default_rng(seed).random(scores.shape) * TIE_JITTER
    return scores.astype(np.float64) + jitter


def chance_recall(text_to_image: list[int], num_images: int, ks=KS) -> dict[str, float]:
    """Expected R@K of a random ranking (see the module docstring)."""
    num_texts = len(text_to_image)
    per_image = Counter(text_to_image)
    chance = {}
    for k in ks:
        misses = [math.comb(num_texts - per_image[i], k) / math.comb(num_texts, k) for i in range(num_images)]
        chance[f"i2t_R@{k}"] = float(1.0 - np.mean(misses))
    for k in ks:
        chance[f"t2i_R@{k}"] = min(1.0, k / num_images)
    return chance


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class SplitAnnotations:
    """A split's captioned images in the order of the captions file (as ``CocoCaptions`` reads them)."""

    image_ids: list[int]
    captions: list[list[str]]
    scenes: list[SceneAttributes]
    descriptions: list[grammar.SceneDescription]


def _data_config(root_or_cfg):
    from uniperceiver_v2.config import Config, DataConfig

    if isinstance(root_or_cfg, Config):
        return root_or_cfg.data
    if isinstance(root_or_cfg, DataConfig):
        return root_or_cfg
    return DataConfig(root=str(root_or_cfg))


def _description(record: dict, annotations: list[dict], names: dict[int, str]) -> grammar.SceneDescription:
    """The grammar's scene from the annotations: positions and areas from the visible masks (as the generator
    computes them); "A covers B" when A (drawn later) has more visible pixels inside B's box than the generator's
    threshold, with the box for B's whole object (the full masks are not recorded). On the small suite's test
    split this gives the generator's set of overlaps for 432 of the 500 scenes (85 of 3025 pairs differ)."""
    import pycocotools.mask as mask_utils

    height, width = int(record["height"]), int(record["width"])
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
    objects = []
    for annotation, mask in zip(annotations, masks):
        ys, xs = np.nonzero(mask)
        objects.append(grammar.ObjectDescription(
            category=names[annotation["category_id"]], colour=annotation["attributes"]["colour"],
            size=annotation["attributes"]["size"], x=float((xs.mean() + 0.5) / width),
            y=float((ys.mean() + 0.5) / height), area=float(mask.sum() / (width * height))))
    occlusions = set()
    for back, annotation in enumerate(annotations):
        x, y, w, h = (int(round(v)) for v in annotation["bbox"])
        for front in range(back + 1, len(annotations)):
            hidden = int(masks[front][y:y + h, x:x + w].sum())
            if hidden > max(4, 0.03 * w * h):
                occlusions.add((front, back))
    return grammar.SceneDescription(objects, record["background"], occlusions)


def read_split(root_or_cfg, split: str) -> SplitAnnotations:
    """Captions, oracle attributes and grammar scenes of ``split`` (a ``data.root`` path or a ``Config``).

    Raises:
        DataError: a missing file, or annotations without the synthetic suite's attributes (real data).
    """
    from uniperceiver_v2.data.coco import load_json
    from uniperceiver_v2.data.summary import DataError

    d = _data_config(root_or_cfg)
    caption_file = d.path(d.caption_annotations, split)
    instance_file = d.path(d.detection_annotations, split)
    captions_data, instances = load_json(caption_file), load_json(instance_file)
    records = {int(r["id"]): r for r in instances["images"]}
    names = {int(c["id"]): c["name"] for c in instances["categories"]}
    objects: dict[int, list[dict]] = {image_id: [] for image_id in records}
    for annotation in sorted(instances["annotations"], key=lambda a: a["id"]):
        if "attributes" not in annotation:
            raise DataError(f"{instance_file}: annotation {annotation.get('id')} has no 'attributes' (colour, "
                            f"size); the ceiling needs the synthetic suite's annotations")
        objects[int(annotation["image_id"])].append(annotation)
    by_image: dict[int, list[str]] = {}
    for record in captions_data["images"]:
        by_image.setdefault(int(record["id"]), [])
    for annotation in captions_data["annotations"]:
        caption = " ".join(str(annotation["caption"]).split())
        if caption and int(annotation["image_id"]) in by_image:
            by_image[int(annotation["image_id"])].append(caption)
    image_ids = [image_id for image_id, captions in by_image.items() if captions]
    missing = [image_id for image_id in image_ids if "background" not in records.get(image_id, {})]
    if missing:
        raise DataError(f"{instance_file}: image {missing[0]} is missing or has no 'background'; the ceiling needs "
                        f"the synthetic suite's annotations")
    scenes, descriptions = [], []
    for image_id in image_ids:
        annotations = objects[image_id]
        scenes.append(SceneAttributes(
            [(names[a["category_id"]], a["attributes"]["colour"], a["attributes"]["size"]) for a in annotations],
            records[image_id]["background"]))
        descriptions.append(_description(records[image_id], annotations, names))
    return SplitAnnotations(image_ids, [by_image[i] for i in image_ids], scenes, descriptions)


# ---------------------------------------------------------------------------------------------------- masked words
MASKED = -1  # a masked neighbour in an evaluation context; never a training token, so such a context never matches
OUTSIDE = -2  # a neighbour beyond either end of the sequence (the ends hold the special tokens [CLS] / [SEP])
CONTEXT_LEVELS = ("l2 l1 _ r1 r2", "l1 _ r1", "l1 _", "_ r1")
BACKOFF_LEVELS = (*CONTEXT_LEVELS, "most frequent")
_TOKENIZE_CHUNK = 2048  # sentences tokenised at a time


def contexts(sequence: Sequence[Hashable], i: int) -> tuple[tuple[Hashable, ...], ...]:
    """The contexts of position ``i`` of ``sequence`` in the order of ``CONTEXT_LEVELS``: (l2, l1, r1, r2),
    (l1, r1), (l1,), (r1,), ``OUTSIDE`` past either end."""
    def at(j: int) -> Hashable:
        return sequence[j] if 0 <= j < len(sequence) else OUTSIDE

    l2, l1, r1, r2 = at(i - 2), at(i - 1), at(i + 1), at(i + 2)
    return (l2, l1, r1, r2), (l1, r1), (l1,), (r1,)


class ContextCounts:
    """How often each token is seen between each context (``contexts``) of a training corpus, and the prediction
    of a masked token from them.

    Args:
        sequences: the tokens of each training sentence (ids, or any hashable but ``MASKED`` / ``OUTSIDE``), special
            tokens included: they are neighbours, never predicted.
        special: the special tokens.

    The training contexts hold the real neighbours. Predicting, a masked neighbour is ``MASKED``, which no training
    context holds: a context with a masked neighbour never matches and the prediction backs off to one without it
    (with l1 masked only (_ r1) or the most frequent token are left). The model's evaluation masks several words of
    a sentence at once, and so does this predictor's.
    """

    def __init__(self, sequences: Iterable[Sequence[Hashable]], special: Iterable[Hashable] = ()):
        special = set(special)
        self.tables: list[defaultdict[tuple, Counter]] = [defaultdict(Counter) for _ in CONTEXT_LEVELS]
        self.overall: Counter = Counter()
        for sequence in sequences:
            for i, token in enumerate(sequence):
                if token in special:
                    continue
                self.overall[token] += 1
                for table, context in zip(self.tables, contexts(sequence, i)):
                    table[context][token] += 1
        if not self.overall:
            raise ValueError("ContextCounts: the training sequences hold no word token")
        self.most_frequent = self.best(self.overall)

    def best(self, counts: Counter) -> Hashable:
        """The token of ``counts`` seen most often; a tie goes to the token more frequent in the whole training
        corpus, then to the one ``counts`` saw first."""
        return max(counts, key=lambda token: (counts[token], self.overall[token]))

    def predict(self, sequence: Sequence[Hashable], i: int) -> tuple[Hashable, str]:
        """The predicted token at position ``i`` of ``sequence`` (masked neighbours ``MASKED``) and the level of
        ``BACKOFF_LEVELS`` it came from: the first context seen in training."""
        for level, table, context in zip(CONTEXT_LEVELS, self.tables, contexts(sequence, i)):
            counts = table.get(context)
            if counts:
                return self.best(counts), level
        return self.most_frequent, BACKOFF_LEVELS[-1]


def score_masked(counts: ContextCounts, sequences: Iterable[Sequence[Hashable]],
                 masked: Iterable[Sequence[bool]], classes: Mapping[Hashable, str] | None = None) -> dict[str, Any]:
    """Predict every masked position of ``sequences`` (``masked``: one flag per token), each sentence's masked
    tokens read as ``MASKED``.

    Args:
        classes: optionally a word class per token (a token not in it is "other"): the positions are also counted
            by the class of their true token.

    Returns:
        {"accuracy" (correct / masked, NaN without any), "masked" (positions), "backoff" ({level of
        ``BACKOFF_LEVELS``: positions predicted there})}, and with ``classes`` "by_class" ({class: [correct,
        positions]}).
    """
    correct = 0
    backoff = dict.fromkeys(BACKOFF_LEVELS, 0)
    by_class: dict[str, list[int]] = {}
    for sequence, flags in zip(sequences, masked):
        seen = [MASKED if flag else token for token, flag in zip(sequence, flags)]
        for i, flag in enumerate(flags):
            if flag:
                prediction, level = counts.predict(seen, i)
                correct += prediction == sequence[i]
                backoff[level] += 1
                if classes is not None:
                    tally = by_class.setdefault(classes.get(sequence[i], "other"), [0, 0])
                    tally[0] += prediction == sequence[i]
                    tally[1] += 1
    total = sum(backoff.values())
    result = {"accuracy": correct / total if total else math.nan, "masked": total, "backoff": backoff}
    if classes is not None:
        result["by_class"] = by_class
    return result


def tokenize_and_mask(tokenizer, texts: Sequence[str], max_length: int, special_ids: Sequence[int],
                      mask_prob: float | None = None) -> tuple[list[list[int]], list[list[bool]]]:
    """The token ids of each text as the model tokenises them (``TextEncoder.tokenize``: truncated to
    ``max_length``; padding removed) and, with ``mask_prob``, the positions its evaluation masks
    (``choose_masked_positions`` with the per-sentence draws of ``EVAL_MASK_SEED``: they do not depend on the
    batch, so the texts are tokenised in chunks); without, no position is masked."""
    from uniperceiver_v2.tasks.mlm import EVAL_MASK_SEED, choose_masked_positions, sentence_draws

    sequences: list[list[int]] = []
    masked: list[list[bool]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start:start + _TOKENIZE_CHUNK])
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        input_ids, attention_mask = batch["input_ids"].long(), batch["attention_mask"].long()
        flags = (choose_masked_positions(input_ids, attention_mask, special_ids, mask_prob,
                                         draws=sentence_draws(chunk, input_ids.shape[1], EVAL_MASK_SEED))
                 if mask_prob is not None else attention_mask.new_zeros(attention_mask.shape, dtype=bool))
        for ids, keep, row in zip(input_ids.tolist(), attention_mask.tolist(), flags.tolist()):
            sequences.append([token for token, k in zip(ids, keep) if k])
            masked.append([flag for flag, k in zip(row, keep) if k])
    return sequences, masked


def _mlm_config(root_or_cfg):
    """The ``Config`` whose data, text encoder and MLM settings are used: as given, or for a ``data.root`` path or a
    ``DataConfig`` the tiny preset with that data."""
    from uniperceiver_v2.config import Config, get_preset

    if isinstance(root_or_cfg, Config):
        return root_or_cfg
    return replace(get_preset("tiny"), data=_data_config(root_or_cfg))


def mlm_corpus(d, split: str) -> tuple[Path, str]:
    """The corpus file ``split`` is scored on and its split: its own, else (the synthetic suite has no test
    corpus) the validation corpus."""
    path = d.path(d.corpus, split)
    if not path.is_file() and d.path(d.corpus, d.val_split).is_file():
        return d.path(d.corpus, d.val_split), d.val_split
    return path, split


def _read_corpus(path: Path, on_invalid: str) -> list[str]:
    from uniperceiver_v2.data import TextCorpus

    corpus = TextCorpus(path, on_invalid=on_invalid)  # the MLM task's reader: stripped non-blank lines
    return [corpus[i] for i in range(len(corpus))]


def mlm_context_counts(root_or_cfg, split: str, classes: Mapping[Hashable, str] | None = None) -> dict[str, Any]:
    """The context-count predictor of the module docstring on the corpus of ``split``, with counts from the
    training corpus (``data.corpus`` of ``data.train_split``). ``root_or_cfg``: a ``Config``, or a ``data.root`` /
    ``DataConfig`` (then with the tiny preset's text encoder and ``tasks.mlm``). Only the tokenizer is loaded.

    Returns:
        {"accuracy", "masked" (masked positions), "backoff" ({level: positions predicted there}, levels of
        ``BACKOFF_LEVELS``), "corpus" (the file scored), "corpus_split" (its split: the validation one when
        ``split`` has no corpus), "train_corpus"}; with ``classes`` ({token id: word class}) also "by_class"
        (``score_masked``).

    Raises:
        DataError: a corpus is missing or empty.
    """
    from transformers import AutoTokenizer

    from uniperceiver_v2.data.summary import DataError
    from uniperceiver_v2.modeling.text_encoder import resolve_model_path

    cfg = _mlm_config(root_or_cfg)
    d = cfg.data
    train_path = d.path(d.corpus, d.train_split)
    eval_path, eval_split = mlm_corpus(d, split)
    train_texts, eval_texts = _read_corpus(train_path, d.on_invalid), _read_corpus(eval_path, d.on_invalid)
    # The tokenizer TextEncoder loads, without the language model; its special_token_ids are these.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.text_encoder), local_files_only=True)
    special_ids = sorted(set(tokenizer.all_special_ids))
    max_length = cfg.text_encoder.max_length
    train_sequences, _ = tokenize_and_mask(tokenizer, train_texts, max_length, special_ids)
    try:
        counts = ContextCounts(train_sequences, special_ids)
    except ValueError as error:
        raise DataError(f"{train_path}: no word token to count") from error
    sequences, masked = tokenize_and_mask(tokenizer, eval_texts, max_length, special_ids, cfg.tasks.mlm.mask_prob)
    return {**score_masked(counts, sequences, masked, classes), "corpus": str(eval_path), "corpus_split": eval_split,
            "train_corpus": str(train_path)}


# ---------------------------------------------------------------------------------------------------- ceilings
def reference_agreement(references: dict[int, list[str]]) -> dict[str, float]:
    """Each image's j-th reference against its other references, averaged over j (images with >= 2 references)."""
    from uniperceiver_v2.metrics.captioning import caption_metrics

    runs = []
    for j in range(max(len(refs) for refs in references.values())):
        held = {i: refs for i, refs in references.items() if len(refs) > max(j, 1)}
        if held:
            runs.append(caption_metrics({i: refs[j] for i, refs in held.items()},
                                        {i: refs[:j] + refs[j + 1:] for i, refs in held.items()}))
    return _mean(runs)


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}


def grammar_captions(data: SplitAnnotations, seed: int = 0, draw: int = 0) -> dict[int, str]:
    """One new grammar caption per image from its rebuilt scene, generator seeded by (seed, draw, image id)."""
    return {image_id: grammar.describe(scene, np.random.default_rng([seed, draw, image_id]), count=1)[0]
            for image_id, scene in zip(data.image_ids, data.descriptions)}


def ceilings(root_or_cfg, split: str = "test", seed: int = 0, grammar_draws: int = 3,
             mlm: bool = True) -> dict[str, Any]:
    """The numbers of the module docstring for ``split`` of the suite at ``root_or_cfg`` (a ``data.root`` path,
    a ``Config`` or its ``DataConfig``); ``seed`` draws the tie-break jitter and the grammar captions, whose
    metrics are averaged over ``grammar_draws`` independent draws (each one caption per image). ``mlm=False``
    leaves out the context-count predictor (it reads the text corpora and loads the text encoder's tokenizer: the
    config's, or the tiny preset's when ``root_or_cfg`` is not a ``Config``).

    Returns:
        {"split", "num_images", "num_texts", "retrieval_oracle" (claims held, ties at random),
        "retrieval_oracle_ties_against" (the same, every tie counted against the right answer),
        "retrieval_oracle_held_minus_failed" (claims held minus claims contradicted, ties at random: a caption
        the image contradicts ranks below any it does not; text->image equals "retrieval_oracle"),
        "chance" ({"i2t_R@K", "t2i_R@K"}), "captioning_reference_agreement", "captioning_grammar_caption"
        ({"BLEU-1".."BLEU-4", "CIDEr"}), "claims_per_caption" (mean), "claims_hold_own" (fraction of captions
        all of whose claims hold in their own image; 1.0 unless the parser misreads the grammar),
        "mlm_context_counts" (``mlm_context_counts``; only with ``mlm``)}.
    """
    import torch

    from uniperceiver_v2.metrics.captioning import caption_metrics
    from uniperceiver_v2.metrics.retrieval import retrieval_recall

    data = read_split(root_or_cfg, split)
    texts = [caption for captions in data.captions for caption in captions]
    text_to_image = [i for i, captions in enumerate(data.captions) for _ in captions]
    scores = score_matrix(data.scenes, texts)
    num_claims = np.array([len(parse_claims(text)) for text in texts])
    failed = num_claims[None, :] - scores
    own = scores[text_to_image, np.arange(len(texts))]
    references = dict(zip(data.image_ids, data.captions))
    result = {
        "split": split,
        "num_images": len(data.image_ids),
        "num_texts": len(texts),
        "retrieval_oracle": retrieval_recall(torch.from_numpy(tie_broken(scores, seed)), text_to_image, KS),
        "retrieval_oracle_ties_against": retrieval_recall(torch.from_numpy(scores.astype(np.float64)),
                                                          text_to_image, KS),
        "retrieval_oracle_held_minus_failed": retrieval_recall(torch.from_numpy(tie_broken(scores - failed, seed)),
                                                               text_to_image, KS),
        "chance": chance_recall(text_to_image, len(data.image_ids)),
        "captioning_reference_agreement": reference_agreement(references),
        "captioning_grammar_caption": _mean([caption_metrics(grammar_captions(data, seed, draw), references)
                                             for draw in range(grammar_draws)]),
        "claims_per_caption": float(num_claims.mean()),
        "claims_hold_own": float(np.mean(own == num_claims)),
    }
    if mlm:
        result["mlm_context_counts"] = mlm_context_counts(root_or_cfg, split)
    return result


# ---------------------------------------------------------------------------------------------------- printing
def _model_results(path: str | None) -> dict[str, dict[str, float]]:
    if path is None:
        return {}
    record = json.loads(Path(path).read_text())
    return record.get("results", record)


def _cell(value: float | None) -> str:
    return f"{value:>8.3f}" if value is not None else f"{'-':>8}"


def print_table(result: dict[str, Any], model: dict[str, dict[str, float]] | None = None, out=None) -> None:
    """The ceilings as a small table, with a model's evaluation results (task -> metrics) below each block."""
    model, out = model or {}, out or sys.stdout
    print(f"split {result['split']}: {result['num_images']} images, {result['num_texts']} captions; "
          f"{result['claims_per_caption']:.2f} claims per caption, all true of the own image for "
          f"{100 * result['claims_hold_own']:.1f} %", file=out)
    header = "".join(f"{f'R@{k}':>8}" for k in KS)
    print(f"\n{'retrieval':<44}{'image -> text':^24}  {'text -> image':^24}", file=out)
    print(f"{'':<44}{header}  {header}", file=out)
    rows = [("attribute oracle, ties at random", result["retrieval_oracle"]),
            ("attribute oracle, ties against", result["retrieval_oracle_ties_against"]),
            ("oracle, held minus failed, ties at random", result["retrieval_oracle_held_minus_failed"]),
            ("chance", result["chance"])]
    if "i2t_R@1" in model.get("retrieval", {}):
        rows.append(("model", model["retrieval"]))
    for label, row in rows:
        cells = ["".join(_cell(row.get(f"{d}_R@{k}")) for k in KS) for d in ("i2t", "t2i")]
        print(f"{label:<44}{cells[0]}  {cells[1]}", file=out)
    metrics = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr")
    print(f"\n{'captioning':<44}" + "".join(f"{m:>8}" for m in metrics), file=out)
    rows = [("a reference vs the other 4 (leave-one-out)", result["captioning_reference_agreement"]),
            ("grammar caption of the scene vs all 5", result["captioning_grammar_caption"])]
    if "BLEU-4" in model.get("captioning", {}):
        rows.append(("model vs all 5", model["captioning"]))
    for label, row in rows:
        print(f"{label:<44}" + "".join(_cell(row.get(m)) for m in metrics), file=out)
    predictor, model_mlm = result.get("mlm_context_counts"), model.get("mlm", {}).get("accuracy")
    if predictor is None and model_mlm is None:
        return
    print(f"\n{'masked language modelling':<44}{'accuracy':>8}", file=out)
    if predictor is not None:
        print(f"{'context-count predictor (a reference)':<44}{_cell(predictor['accuracy'])}", file=out)
    if model_mlm is not None:
        print(f"{'model':<44}{_cell(model_mlm)}", file=out)
    if predictor is not None:
        corpus = f"the {predictor['corpus_split']} corpus {predictor['corpus']}"
        if predictor["corpus_split"] != result["split"]:
            corpus += f" (no {result['split']} corpus: the {predictor['corpus_split']} one instead)"
        backoff = ", ".join(f"({level}) {count}" for level, count in predictor["backoff"].items())
        print(f"{predictor['masked']} masked tokens of {corpus}", file=out)
        print(f"counted in {predictor['train_corpus']}; predicted from {backoff}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniperceiver_v2.bench ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or YAML (default: tiny); data.* sets the suite")
    parser.add_argument("--split", default=None, help="split name (default: the config's data.test_split)")
    parser.add_argument("--seed", type=int, default=0, help="tie-break jitter and grammar captions (default 0)")
    parser.add_argument("--results", default=None, help="an evaluate JSON whose numbers to print alongside")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--no-mlm", action="store_true", help="leave out the masked-language-modelling reference")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)

    from uniperceiver_v2.config import load_config
    from uniperceiver_v2.data.summary import DataError

    cfg = load_config(args.config, args.overrides)
    split = args.split or cfg.data.test_split
    d = cfg.data
    # Generate the quick suite only where nothing is: ensure_data would regenerate a suite of another profile.
    if not d.path(d.caption_annotations, split).is_file() and not (Path(d.root) / "manifest.json").is_file():
        from uniperceiver_v2.engine.data_setup import ensure_data

        ensure_data(cfg)
    try:
        result = ceilings(cfg, split, args.seed, mlm=not args.no_mlm)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"data.root {d.root}", end="; ")
    print_table(result, _model_results(args.results))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
