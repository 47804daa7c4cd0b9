"""Tables and qualitative examples that notebooks 06-08 show from a trained model: headline metrics next to chance,
retrieval rankings, filled masks, representation similarities."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import api
from ..modeling.box_ops import box_iou
from ..viz.base import quoted_token

# --------------------------------------------------------------------------------------------------------------
# Evaluation results
# --------------------------------------------------------------------------------------------------------------
# The headline metric(s) of every task, in the paper's order (plus the class-agnostic box AP, which separates
# localisation errors from naming errors).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5"),
    "detection": ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "agnostic_bbox_AP", "agnostic_bbox_AP50"),
    "captioning": ("BLEU-4", "CIDEr"),
    "retrieval": ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"),
    "mlm": ("accuracy",),
}
# Shown after the headline metrics when the results have them: the novel-category scenes exist only in data that
# marks novel categories (the synthetic suite), the calibrated value only with tasks.detection.seen_penalties.
OPTIONAL_METRICS: dict[str, tuple[str, ...]] = {
    "detection": ("novel_bbox_AP50", "novel_calibrated_bbox_AP50"),
}
# The split column of those optional metrics: they are measured on the novel-category scenes, whatever the split.
OPTIONAL_METRIC_SPLIT = "novel scenes"


def _percent(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(100.0 * value, 2)


def chance_levels(results: Mapping[str, Mapping[str, Any]], num_classes: int | None = None,
                  vocabulary_size: int | None = None) -> dict[tuple[str, str], float]:
    """What a model that ranks the candidates at random scores, in expectation, for the metrics that have a
    closed form: classification top-k = k / C; retrieval text->image R@K = K / I and image->text
    R@K = 1 - C(T - c, K) / C(T, K) (at least one of the image's c = T / I captions among K random texts);
    masked-token accuracy = 1 / V. Detection AP and caption scores have no such baseline (about 0).

    Args:
        results: ``evaluate``'s results (retrieval's ``num_images`` and ``num_texts`` are read from it).
        num_classes: C, the classification candidates; vocabulary_size: V, the MLM candidates.

    Returns:
        (task, metric) -> chance value as a fraction.
    """
    chance: dict[tuple[str, str], float] = {}
    if num_classes:
        for k in (1, 5):
            chance[("classification", f"top{k}")] = min(k, num_classes) / num_classes
    retrieval = results.get("retrieval", {})
    if "num_images" in retrieval and "num_texts" in retrieval:
        images, texts = int(retrieval["num_images"]), int(retrieval["num_texts"])
        per_image = texts // images
        for k in (1, 5, 10):
            chance[("retrieval", f"t2i_R@{k}")] = min(k, images) / images
            miss = math.comb(texts - per_image, k) / math.comb(texts, k) if k <= texts else 0.0
            chance[("retrieval", f"i2t_R@{k}")] = 1.0 - miss
    if vocabulary_size:
        chance[("mlm", "accuracy")] = 1.0 / vocabulary_size
    return chance


def metrics_table(results: Mapping[str, Mapping[str, Any]], split: str,
                  metrics: Mapping[str, Sequence[str]] = HEADLINE_METRICS,
                  chance: Mapping[tuple[str, str], float] | None = None) -> dict[str, list]:
    """``evaluate``'s results as a table with one row per (task, metric), values x100 as the paper reports them.

    With the default ``metrics``, the :data:`OPTIONAL_METRICS` a task's results hold follow its headline rows (the
    novel-category box AP50, plain and calibrated, whose split column says :data:`OPTIONAL_METRIC_SPLIT`: they are
    measured on the novel-category scenes). A task reported as ``{"skipped": reason}`` gets one row with the
    reason; a metric that is None or NaN (COCO's
    "no ground truth in this setting") is shown as None. With ``chance`` (:func:`chance_levels`) a column gives
    each metric's random-ranking level where it has one.

    Returns:
        ``{"columns": ["task", "split", "metric", "value (x100)"(, "chance (x100)")], "rows": [...]}``.
    """

    columns = ["task", "split", "metric", "value (x100)"] + (["chance (x100)"] if chance is not None else [])
    rows = []
    for task, values in results.items():
        if "skipped" in values:
            rows.append([task, split, "skipped", str(values["skipped"])] + ([None] if chance is not None else []))
            continue
        optional = [name for name in OPTIONAL_METRICS.get(task, ()) if name in values] if metrics is HEADLINE_METRICS \
            else []
        for name in [*metrics.get(task, ()), *optional]:
            row = [task, OPTIONAL_METRIC_SPLIT if name in optional else split, name, _percent(values.get(name))]
            if chance is not None:
                row.append(_percent(chance.get((task, name))))
            rows.append(row)
    return {"columns": columns, "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Qualitative examples
# --------------------------------------------------------------------------------------------------------------
def distinct_detections(detections: Mapping[str, Any], count: int, overlap: float | None = None) -> dict[str, Any]:
    """The ``count`` best detections of *different* proposals, each with its best class.

    ``api.detect`` ranks (proposal, class) pairs, so one proposal can appear several times with different classes
    (DETR-style evaluation); for a picture, one box per proposal is clearer. Proposals are told apart by their box.
    A pair scoring 0 is left out: it is a proposal that ``tasks.detection.nms_threshold`` suppressed (its objectness
    set to 0), ranked last but no detection.

    Args:
        detections: one image's result of ``api.detect``: ``boxes`` (K, 4), ``scores`` (K,) sorted best first,
            ``labels`` (K,), optional ``masks`` (K, H, W) and ``names`` (K strings).
        count: how many to keep.
        overlap: also leave out a proposal whose box overlaps a kept one with IoU >= ``overlap`` (whatever the two
            names): one box per object in a figure, where several proposals on one object stack their captions.
            None: proposals are told apart by their box only.

    Returns:
        the same keys, restricted to the kept detections, in score order.
    """
    boxes = detections["boxes"]
    keep: list[int] = []
    seen: set[tuple[float, ...]] = set()
    scores = detections["scores"]
    for index in range(boxes.shape[0]):
        if len(keep) >= count:
            break
        if float(scores[index]) <= 0.0:              # suppressed (nms_threshold): every later pair scores 0 too
            break
        key = tuple(boxes[index].tolist())
        if key in seen:
            continue
        if overlap is not None and keep and float(box_iou(boxes[index:index + 1], boxes[keep]).max()) >= overlap:
            continue
        seen.add(key)
        keep.append(index)
    rows = torch.tensor(keep, dtype=torch.long)
    return {key: [value[i] for i in keep] if isinstance(value, list) else value[rows]
            for key, value in detections.items()}


def overlapping_detections(boxes: Any, threshold: float = 0.5) -> int:
    """How many of the (N, 4) xyxy ``boxes`` overlap at least one *other* of them with IoU > ``threshold``: the
    duplicates a detector without NMS keeps (two boxes on one object count as two)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if boxes.shape[0] < 2:
        return 0
    iou = box_iou(boxes, boxes).fill_diagonal_(0.0)                     # (N, N), a box against the others
    return int((iou > threshold).any(dim=1).sum())


def detection_verdicts(found: Mapping[str, Any], sample: Any, min_iou: float = 0.5) -> dict[str, Any]:
    """What each drawn detection of one image is, against its ground truth: ``"right"`` (IoU >= ``min_iou`` with
    an object of its class), ``"misnamed"`` (IoU >= ``min_iou`` with an object, none of its class) or ``"off"``
    (no object overlapped that much), as AP50 would see it one detection at a time.

    Args:
        found: the drawn detections (``distinct_detections`` of ``api.detect``: ``boxes`` (K, 4) xyxy, ``labels``).
        sample: the image's ground truth: ``boxes`` (N, 4) xyxy in the same pixels, ``labels`` (N,).

    Returns:
        ``{"verdicts": K strings, "right", "misnamed", "off": their counts, "objects": N, "found": how many objects
        have a right detection}``.
    """

    boxes = torch.as_tensor(found["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
    labels = torch.as_tensor(found["labels"], dtype=torch.long).reshape(-1).cpu()
    truth_boxes = torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    truth_labels = torch.as_tensor(sample.labels, dtype=torch.long).reshape(-1).cpu()
    iou = box_iou(boxes, truth_boxes) if len(boxes) and len(truth_boxes) else torch.zeros(len(boxes), len(truth_boxes))
    covers = iou >= min_iou                                                    # (K, N)
    same = covers & (labels[:, None] == truth_labels[None, :])                 # (K, N)
    verdicts = ["right" if same[k].any() else "misnamed" if covers[k].any() else "off" for k in range(len(boxes))]
    return {"verdicts": verdicts, **{name: verdicts.count(name) for name in ("right", "misnamed", "off")},
            "objects": len(truth_boxes), "found": int(same.any(dim=0).sum())}


def random_first_rank_median(total: int, correct: int) -> int:
    """The median rank of the first correct item when ``correct`` of ``total`` candidates are ranked at random: the
    smallest m with P(first correct <= m) >= 1/2, where P(first correct > m) = C(total - correct, m) / C(total, m)
    (the first m places all hold wrong candidates)."""
    if not 1 <= correct <= total:
        raise ValueError(f"random_first_rank_median: expected 1 <= correct <= total, got {correct} of {total}")
    none_yet = 1.0                                  # P(first correct > m), for m = 0, 1, ...
    for m in range(1, total + 1):
        none_yet *= (total - correct - (m - 1)) / (total - (m - 1))
        if none_yet <= 0.5:
            return m
    return total


def caption_repetition(captions: Sequence[str], run: int = 3) -> dict[str, int]:
    """How varied a set of generated captions is: how many are distinct, and how many repeat one word ``run`` or
    more times in a row (a greedy decoder caught in a loop, e.g. "a circle a a a a.").

    Returns:
        ``{"captions": N, "distinct": D, "looping": L}``.
    """
    looping = 0
    for caption in captions:
        words = [word.strip(".,;:!?\"'").lower() for word in str(caption).split()]
        words = [word for word in words if word]
        longest = current = 0
        for index, word in enumerate(words):
            current = current + 1 if index and word == words[index - 1] else 1
            longest = max(longest, current)
        looping += longest >= run
    return {"captions": len(captions), "distinct": len({" ".join(str(c).split()) for c in captions}),
            "looping": looping}


@dataclass
class RetrievalExamples:
    """Image-text similarities of a set of images and all their captions, for drawing rankings.

    Attributes:
        texts: the T captions; text_image: (T,) the image index of each caption.
        i2t: (I, T) logits ranking the texts for each image; t2i: (T, I) ranking the images for each text.
        image_queries: (I, d) the images' ``<SPE>`` representations as image-to-text queries, text_queries: (T, d)
            the captions' as text-to-image queries (``retrieval_examples`` keeps them, so that
            ``representation_similarity(examples=...)`` and ``explore.retrieval(..., examples=...)`` encode nothing
            again); None when not kept.
    """

    texts: list[str]
    text_image: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor
    image_queries: torch.Tensor | None = None
    text_queries: torch.Tensor | None = None

    def texts_for_image(self, image: int, top: int = 5) -> tuple[list[str], list[bool], list[float]]:
        """The ``top`` best texts for image ``image``: (texts, whether each is one of its captions, logits)."""
        scores, order = self.i2t[image].topk(min(top, self.i2t.shape[1]))
        return ([self.texts[t] for t in order.tolist()], [int(self.text_image[t]) == image for t in order.tolist()],
                scores.tolist())

    def images_for_text(self, text: int, top: int = 5) -> tuple[list[int], list[bool], list[float]]:
        """The ``top`` best images for text ``text``: (image indices, whether each is its image, logits)."""
        scores, order = self.t2i[text].topk(min(top, self.t2i.shape[1]))
        return order.tolist(), [i == int(self.text_image[text]) for i in order.tolist()], scores.tolist()

    def recall_at(self, k: int) -> dict[str, float]:
        """R@k of these examples in both directions (image->text: any of its captions in the top k)."""
        top_texts = self.i2t.topk(min(k, self.i2t.shape[1]), dim=1).indices                  # (I, k)
        i2t = (self.text_image[top_texts] == torch.arange(self.i2t.shape[0])[:, None]).any(dim=1)
        top_images = self.t2i.topk(min(k, self.t2i.shape[1]), dim=1).indices                 # (T, k)
        t2i = (top_images == self.text_image[:, None]).any(dim=1)
        return {f"i2t_R@{k}": float(i2t.float().mean()), f"t2i_R@{k}": float(t2i.float().mean())}

    def ranks(self) -> dict[str, torch.Tensor]:
        """The rank (1 = first) of the correct item of every query, ties counted against the model as in
        ``retrieval_recall``: ``"i2t"`` (I,) the best-ranked of each image's captions, ``"t2i"`` (T,) each caption's
        own image."""
        images = torch.arange(self.i2t.shape[0])
        correct = self.text_image[None, :] == images[:, None]                               # (I, T)
        best = self.i2t.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)      # (I, 1)
        i2t = ((self.i2t >= best) & ~correct).sum(dim=1) + 1
        own = self.t2i.gather(1, self.text_image[:, None])                                  # (T, 1)
        others = torch.ones_like(self.t2i, dtype=torch.bool).scatter_(1, self.text_image[:, None], False)
        t2i = ((self.t2i >= own) & others).sum(dim=1) + 1
        return {"i2t": i2t, "t2i": t2i}

    def ranking_summary(self) -> dict[str, float | int]:
        """Where the correct items rank and how much the first places are shared (hubness).

        Returns:
            ``images``, ``texts``; ``i2t_median_rank`` and ``t2i_median_rank`` (1 = first; the lower median) with
            ``i2t_random_rank`` = (T + 1) / (c + 1) and ``t2i_random_rank`` = (I + 1) / 2, the mean rank of the
            first correct item under a random ranking (c = T / I captions per image), and
            ``i2t_random_median_rank`` / ``t2i_random_median_rank`` its median (:func:`random_first_rank_median`),
            the one to read a median rank against; ``i2t_distinct_top1``: how
            many different captions are some image's first, ``i2t_largest_hub``: the most images sharing one first
            caption; ``t2i_distinct_top1`` and ``t2i_largest_hub`` the same for the images first for a caption.
        """
        ranks = self.ranks()
        num_images, num_texts = self.i2t.shape
        per_image = num_texts / max(num_images, 1)
        first_texts = torch.bincount(self.i2t.argmax(dim=1), minlength=num_texts)
        first_images = torch.bincount(self.t2i.argmax(dim=1), minlength=num_images)
        return {"images": int(num_images), "texts": int(num_texts),
                "i2t_median_rank": int(ranks["i2t"].median()), "t2i_median_rank": int(ranks["t2i"].median()),
                "i2t_random_rank": (num_texts + 1) / (per_image + 1), "t2i_random_rank": (num_images + 1) / 2,
                "i2t_random_median_rank": random_first_rank_median(num_texts, max(1, round(per_image))),
                "t2i_random_median_rank": random_first_rank_median(num_images, 1),
                "i2t_distinct_top1": int((first_texts > 0).sum()), "i2t_largest_hub": int(first_texts.max()),
                "t2i_distinct_top1": int((first_images > 0).sum()), "t2i_largest_hub": int(first_images.max())}


def retrieval_examples(model, images: Sequence[Any], captions: Sequence[Sequence[str]]) -> RetrievalExamples:
    """Score ``images`` against all their captions as ``api.retrieve`` does (v2 eq. (6) in both directions), and keep
    the query representations (``image_queries``, ``text_queries``) for ``representation_similarity``.

    Args:
        images: I images (PIL or (3, H, W) tensors); captions: per image its reference captions.
    """
    if len(images) != len(captions):
        raise ValueError(f"retrieval_examples: {len(images)} images but {len(captions)} caption lists")
    texts = [text for per_image in captions for text in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image], dtype=torch.long)
    scores = api.retrieval_representations(model, list(images), texts)
    return RetrievalExamples(texts, text_image, scores["i2t"].float(), scores["t2i"].float(),
                             scores["image_queries"].float(), scores["text_queries"].float())


def representation_similarity(model=None, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None,
                              *, examples: RetrievalExamples | None = None) -> dict[str, float]:
    """How alike the model's ``<SPE>`` representations g(f(.)) of *different* inputs are: the mean and the minimum
    cosine similarity over all pairs of ``images`` (as image-to-text queries) and over all pairs of ``texts`` (as
    text-to-image queries).

    A healthy model spreads different inputs apart; values near 1 mean the representations have collapsed (every
    input gives nearly the same vector, so every candidate gets the same score and the gradients of v2 eq. (7) vanish).

    Either ``model, images, texts`` (encodes them), or ``examples=``, the result of ``retrieval_examples``: its
    images and the first caption of each image, from the representations it kept (nothing is encoded again).

    Returns:
        ``{"images_mean", "images_min", "texts_mean", "texts_min"}``.
    """
    if examples is not None:
        if model is not None or images is not None or texts is not None:
            raise ValueError("representation_similarity: pass either model, images and texts, or examples=")
        if examples.image_queries is None or examples.text_queries is None:
            raise ValueError("representation_similarity: these examples kept no representations "
                             "(make them with retrieval_examples)")
        image_queries = examples.image_queries
        first = [int((examples.text_image == i).nonzero()[0]) for i in examples.text_image.unique().tolist()]
        text_queries = examples.text_queries[first]                                # the first caption of each image
        if len(image_queries) < 2 or len(text_queries) < 2:
            raise ValueError("representation_similarity: needs at least two images and two texts")
    else:
        if model is None or images is None or texts is None:
            raise ValueError("representation_similarity: pass model, images and texts, or examples=")
        if len(images) < 2 or len(texts) < 2:
            raise ValueError("representation_similarity: needs at least two images and two texts")
        scores = api.retrieval_representations(model, list(images), list(texts))
        image_queries, text_queries = scores["image_queries"], scores["text_queries"]
    out = {}
    for name, vectors in (("images", image_queries), ("texts", text_queries)):
        unit = torch.nn.functional.normalize(vectors.float(), dim=1)
        cosine = unit @ unit.T                                                     # (N, N)
        pairs = cosine[~torch.eye(len(unit), dtype=torch.bool, device=cosine.device)]
        out[f"{name}_mean"], out[f"{name}_min"] = float(pairs.mean()), float(pairs.min())
    return out


# Words a fill-in example does not hide: a masked sentence-initial "a" or "the" is guessed from position alone
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "and", "with", "in", "on", "at", "to", "by", "is", "are"})


def mask_one_word(sentence: str, tokenizer, rng: random.Random, mask: str = "<mask>",
                  skip: frozenset[str] | set[str] = frozenset()) -> tuple[str, str] | None:
    """Hide one word of ``sentence`` behind ``mask`` for ``api.fill_mask``.

    Only a word that the tokenizer keeps as a single token can be hidden (``fill_mask`` predicts one token per
    mask), and none of ``skip`` (compared in lower case); among those one is drawn with ``rng``.

    Returns:
        (the sentence with the word replaced by ``mask``, the word as the tokenizer writes it), or None when no
        word of the sentence is a single token.
    """
    words = sentence.split()
    candidates = []
    for index, word in enumerate(words):
        core = word.strip(".,;:!?\"'")
        if not core.isalpha() or core.lower() in skip:
            continue
        tokens = tokenizer.tokenize(core)
        if len(tokens) == 1 and tokens[0] != tokenizer.unk_token:
            candidates.append((index, core, tokens[0]))
    if not candidates:
        return None
    index, core, token = rng.choice(candidates)
    words[index] = words[index].replace(core, mask, 1)
    return " ".join(words), token


def fill_mask_examples(model, sentences: Sequence[str], count: int, seed: int = 0, top_k: int = 5
                       ) -> dict[str, list]:
    """Masked language modelling on ``count`` sentences, one hidden content word each (:func:`mask_one_word`
    without :data:`FUNCTION_WORDS`).

    Returns:
        ``{"columns": ["masked sentence", "hidden word", "top-k predictions", "hit@1"], "rows": [...]}``; the
        predictions as "word (probability)".
    """
    from ..api import MASK

    rng = random.Random(seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    masked, truths = [], []
    for index in order:
        hidden = mask_one_word(sentences[index], model.text_encoder.tokenizer, rng, MASK, skip=FUNCTION_WORDS)
        if hidden is not None:
            masked.append(hidden[0])
            truths.append(hidden[1])
        if len(masked) == count:
            break
    if not masked:
        raise ValueError("fill_mask_examples: no sentence has a content word the tokenizer keeps as one token")
    predictions = api.fill_mask(model, masked, top_k=top_k)
    rows = []
    for text, truth, prediction in zip(masked, truths, predictions):
        candidates = prediction["candidates"][0]
        rows.append([text, truth, ", ".join(f"{quoted_token(c['token'])} ({c['score']:.2f})" for c in candidates),
                     candidates[0]["token"] == truth])
    return {"columns": ["masked sentence", "hidden word", f"top-{top_k} predictions", "hit@1"], "rows": rows}


def ceiling_table(results: Mapping[str, Mapping[str, Any]], ceiling: Mapping[str, Any]) -> dict[str, list]:
    """The model's retrieval, captioning and MLM numbers (x100) next to what the data allows (``bench.ceiling``).

    The references are not upper bounds: the attribute oracle reads no positions or relations, a model is scored
    against all of an image's references while one reference is scored against the others, and the MLM row counts
    two tokens of context only. A model can pass each of them.

    Args:
        results: ``evaluate``'s task -> metrics of one split.
        ceiling: ``bench.ceiling.ceilings`` of the same split (an MLM row when it holds ``mlm_context_counts``).

    Returns:
        ``{"columns": ["metric", "model", "reference", "reference is", "chance"], "rows": [...]}``; a metric the
        model was not evaluated on is None.
    """
    oracle = "attribute oracle (category, colour, size, background)"
    rows = []
    for key, name in (("i2t_R@1", "retrieval R@1 image->text"), ("t2i_R@1", "retrieval R@1 text->image")):
        rows.append([name, _percent(results.get("retrieval", {}).get(key)),
                     _percent(ceiling["retrieval_oracle"][key]), oracle, _percent(ceiling["chance"][key])])
    for key in ("BLEU-4", "CIDEr"):
        model = results.get("captioning", {}).get(key)
        rows.append([f"captioning {key}", _percent(model), _percent(ceiling["captioning_reference_agreement"][key]),
                     "one reference against the others", None])
        rows.append([f"captioning {key}", _percent(model), _percent(ceiling["captioning_grammar_caption"][key]),
                     "the grammar's caption of the true scene", None])
    if "mlm_context_counts" in ceiling:
        reference = ceiling["mlm_context_counts"]
        rows.append(["MLM accuracy", _percent(results.get("mlm", {}).get("accuracy")), _percent(reference["accuracy"]),
                     "the token the training corpus holds most often between the same two neighbours either side "
                     f"(`bench.ceiling.mlm_context_counts`; {reference.get('corpus_split', 'val')} corpus)",
                     None])
    return {"columns": ["metric", "model", "reference", "reference is", "chance"], "rows": rows}
