"""The public inference API: build a model, then classify / detect / caption / retrieve / fill masks.

    from uniperceiver_v2 import api
    model = api.build_model("tiny", checkpoint="runs/tiny/checkpoints")  # or a .safetensors file; None = random
    api.classify(model, [Image.open("cat.jpg")], ["cat", "dog", "tiger shark"])
    api.detect(model, images, ["cat", "dog"], score_threshold=0.3)
    api.caption(model, images, beam_size=3)
    api.retrieve(model, images, ["a cat on a sofa", "two dogs"])
    api.fill_mask(model, ["a <mask> sits on the sofa"])

Every function here takes the model first (the model itself knows nothing of image files or tokenising prompts:
this module is where raw inputs become batches). Resizing, ImageNet normalisation and padding happen inside with the
evaluation transforms of ``uniperceiver_v2.data`` (``data.image_size`` square crops for the whole-image tasks;
shorter side ``data.det_eval_size`` for detection). Every call runs in evaluation mode without gradients and returns
the model to the mode it was in.

Inputs (checked by ``uniperceiver_v2.api_checks``; anything else raises ``ValueError`` naming the argument):

- images: one image or a list; each a PIL image of any mode (grayscale, palette, RGBA composited over white,
  16-bit), the path of an image file, or a tensor (3, H, W) with H, W >= 1, either uint8 (0-255, divided by 255)
  or float with finite values in [0, 1] (a float image in 0-255 or an already normalised one is refused).
- class names / texts: a list of non-blank strings, never a single string (``["circle"]``, not ``"circle"``);
  class names must also be distinct after tokenisation (equal names would share one probability).
  ``fill_mask`` alone also takes one string, which must contain ``<mask>``.
- ``top_k``, ``beam_size``, ``max_length``, ``max_detections``: ints >= 1; a ``top_k`` above the number of
  candidates returns them all. ``score_threshold``: in [0, 1].

Checkpoints are read without unpickling anything: a ``.safetensors`` file, or a checkpoint folder / run folder
written by ``engine.checkpoint.save_checkpoint`` (safetensors weights, SHA-256-verified).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image

from uniperceiver_v2 import api_checks as checks
from uniperceiver_v2.data.collate import pad_images
from uniperceiver_v2.data.transforms import Normalize, resize_image, shorter_side_size, whole_image_eval_transform
from uniperceiver_v2.engine.build import build_model, load_weights
from uniperceiver_v2.engine.runtime import evaluation_mode
from uniperceiver_v2.model import UniPerceiverV2
from uniperceiver_v2.tasks.captioning import CaptioningTask
from uniperceiver_v2.tasks.classification import ClassificationTask, ClassificationTaskBatch
from uniperceiver_v2.tasks.detection import DetectionTask
from uniperceiver_v2.tasks.mlm import MaskedLanguageModelingTask
from uniperceiver_v2.tasks.retrieval import RetrievalTask

__all__ = [
    "MASK",
    "MASK_FORMATS",
    "build_model",
    "caption",
    "classify",
    "detect",
    "fill_mask",
    "load_weights",
    "prepare_detection_images",
    "prepare_whole_images",
    "retrieval_representations",
    "retrieve",
    "to_image_tensor",
]

ImageInput = Image.Image | torch.Tensor | str | os.PathLike

# The literal that marks a word to fill in ``fill_mask`` (replaced by the tokenizer's own mask token).
MASK = "<mask>"

# How ``detect`` returns masks (see its docstring).
MASK_FORMATS = ("full", "crop", "rle", "none")


# -------------------------------------------------------------------------------------------------- inputs
def to_image_tensor(image: ImageInput, index: int = 0) -> torch.Tensor:
    """A PIL image (any mode), an image file or a tensor (3, H, W) (uint8, or float in [0, 1]) -> float32
    (3, H, W) in [0, 1]; ``ValueError`` naming ``images[index]`` otherwise (``api_checks.image_tensor``)."""
    return checks.image_tensor(image, f"images[{index}]")


def prepare_whole_images(model: UniPerceiverV2, images, task: str = "classification"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images for ``task`` (classification / captioning / retrieval) as its evaluation dataset prepares them:
    resize to ``data.image_size`` with the task's centre crop (``data.transforms.WHOLE_IMAGE_CROP``: classification
    the central 87.5 %, captioning and retrieval the whole image), normalise.

    Returns:
        images (B, 3, S, S) and padding_mask (B, S, S) on the model's device.
    """
    transform = whole_image_eval_transform(task, model.config.data.image_size)
    tensors = [transform(to_image_tensor(image, i)) for i, image in enumerate(checks.image_list(images))]
    batch, padding_mask, _ = pad_images(tensors)
    return batch.to(model.device), padding_mask.to(model.device)


def prepare_detection_images(model: UniPerceiverV2, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images for detection: shorter side ``data.det_eval_size`` (longer <= ``data.det_eval_max_long``), normalised,
    padded.

    Returns:
        images (B, 3, H, W), padding_mask (B, H, W), orig_sizes (B, 2) (height, width) of the given images.
    """
    data, normalize = model.config.data, Normalize()
    tensors, sizes = [], []
    for i, image in enumerate(checks.image_list(images)):
        pixels = to_image_tensor(image, i)
        height, width = pixels.shape[-2:]
        sizes.append((height, width))
        size = shorter_side_size(height, width, data.det_eval_size, data.det_eval_max_long)
        tensors.append(normalize(resize_image(pixels, size)))
    batch, padding_mask, _ = pad_images(tensors)
    return batch.to(model.device), padding_mask.to(model.device), torch.tensor(sizes, device=model.device)


# -------------------------------------------------------------------------------------------------- tasks
def classify(model: UniPerceiverV2, images, class_names: Sequence[str], top_k: int = 5) -> list[list[dict]]:
    """Zero-shot classification: any list of class names, none needs to have been seen in training.

    Args:
        class_names: a list of distinct, non-blank names (a single string is refused: pass ``["circle"]``).
        top_k: int >= 1; above the number of classes, all classes are returned.

    Returns:
        per image, the min(top_k, C) best classes, best first: ``{"label": str, "index": int (position in
        class_names), "score": float (softmax probability over class_names)}``.
    """
    names = checks.text_list(class_names, "class_names", model.tokenize)
    top_k = checks.positive_int(top_k, "top_k")
    task = ClassificationTask(model.config.tasks.classification, names)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images)
        prediction = task.predict(model, ClassificationTaskBatch(pixels, padding_mask, None, tuple(names)), top_k)
    return [[{"label": names[c], "index": c, "score": s}
             for c, s in zip(labels.tolist(), scores.tolist())]
            for labels, scores in zip(prediction["labels"], prediction["scores"])]


def detect(model: UniPerceiverV2, images, class_names: Sequence[str], score_threshold: float = 0.0,
           masks: str = "full", max_detections: int | None = None) -> list[dict]:
    """Open-vocabulary detection and instance segmentation against any list of class names.

    Args:
        class_names: a list of distinct, non-blank names (a single string is refused: pass ``["circle"]``).
        score_threshold: in [0, 1]; detections scoring below it are dropped before their masks are made.
        masks: how masks are returned (when ``tasks.detection.segmentation``):
            ``"full"``: one (K, H, W) bool tensor on the given image's pixels, K * H * W bytes;
            ``"crop"``: per detection ``{"offset": (x, y), "mask": (h, w) bool}``, the mask cropped to the smallest
            rectangle holding its pixels (lossless: ``full[k, y:y + h, x:x + w] = mask``; (0, 0) when empty);
            ``"rle"``: per detection COCO run-length encoding ``{"size": [H, W], "counts": str}``
            (``pycocotools.mask.decode`` restores it; JSON-ready);
            ``"none"``: no masks (boxes only, nothing pasted).
        max_detections: keep at most this many (proposal, class) pairs per image; default
            ``tasks.detection.max_detections``.

    Memory: masks are pasted at the given image's resolution one kept detection at a time (a proposal kept with
    several classes, once), so apart from the result a call needs about 9 bytes per pixel of the largest image for
    its masks (one mask upsampled in float32 twice, plus its bool; 81 MB at 3000 x 3000) instead of 8 bytes per pixel
    per detection. The returned masks take: "full" 1 byte per pixel per detection (9 MB per detection at
    3000 x 3000); "crop" 1 byte per pixel of each mask's rectangle (as much as "full" for a mask spanning the
    image); "rle" a few bytes per run of equal pixels down the columns (kilobytes for a smooth mask); "none"
    nothing.

    Returns:
        per image, detections sorted by score (at most ``max_detections``, score >= ``score_threshold``):
        ``boxes`` (K, 4) float xyxy in pixels of the given image, ``scores`` (K,) in [0, 1] (sigmoid(objectness) *
        class probability), ``labels`` (K,) long positions in ``class_names``, ``names`` (K strings), and ``masks``
        as chosen above.
    """
    names = checks.text_list(class_names, "class_names", model.tokenize)
    threshold = checks.probability(score_threshold, "score_threshold")
    checks.one_of(masks, "masks", MASK_FORMATS)
    config = model.config.tasks.detection
    if max_detections is not None:
        config = replace(config, max_detections=checks.positive_int(max_detections, "max_detections"))
    if masks == "none":
        config = replace(config, segmentation=False)
    encode = {"crop": _crop_mask, "rle": _rle_mask}.get(masks)
    task = DetectionTask(config, names)
    with evaluation_mode(model):
        pixels, padding_mask, orig_sizes = prepare_detection_images(model, images)
        predictions = task.detect(model, pixels, padding_mask, orig_sizes, names, threshold, encode)
    results = []
    for prediction in predictions:
        result = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                  for key, value in prediction.items()}
        result["names"] = [names[c] for c in result["labels"].tolist()]
        results.append(result)
    return results


def _crop_mask(mask: torch.Tensor) -> dict:
    """(H, W) bool -> ``{"offset": (x, y), "mask": (h, w) bool}`` on the smallest rectangle holding its pixels."""
    rows = mask.any(dim=1).nonzero().flatten()
    columns = mask.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return {"offset": (0, 0), "mask": torch.zeros(0, 0, dtype=torch.bool)}
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    # a copy, not a view: a view would keep the whole (H, W) mask alive
    return {"offset": (left, top), "mask": mask[top:bottom, left:right].cpu().clone()}


def _rle_mask(mask: torch.Tensor) -> dict:
    """(H, W) bool -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (str, not bytes: JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy()[:, :, None].astype(np.uint8)))[0]
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def caption(model: UniPerceiverV2, images, beam_size: int | None = None, max_length: int | None = None,
            all_beams: bool = False) -> list[dict]:
    """Describe each image.

    Args:
        beam_size: 1 = greedy; default ``tasks.captioning.beam_size``.
        max_length: maximum number of generated tokens; default ``tasks.captioning.max_length``.
        all_beams: also list every hypothesis the beam search ended with.

    Returns:
        per image ``{"caption": str, "token_ids": list[int], "score": float (sum of token log-probabilities)}``;
        with ``all_beams`` also ``"beams"``: the ``beam_size`` hypotheses as such dicts, best first.
    """
    beam_size = checks.optional_positive_int(beam_size, "beam_size")
    max_length = checks.optional_positive_int(max_length, "max_length")
    task = CaptioningTask(model.config.tasks.captioning)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images, "captioning")
        return task.generate(model, pixels, padding_mask, beam_size, max_length, all_beams=bool(all_beams))


def retrieve(model: UniPerceiverV2, images, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Score every image against every text, in both directions.

    Args:
        texts: a list of non-blank texts (a single string is refused: pass ``["a cat"]``); repeats are allowed.

    Returns:
        ``i2t`` (I, T) logits cos / tau ranking the texts for each image, ``t2i`` (T, I) ranking the images for each
        text, and ``i2t_ranking`` (I, T) / ``t2i_ranking`` (T, I) long: candidate indices, best first.
    """
    scores = retrieval_representations(model, images, texts)
    i2t, t2i = scores["i2t"], scores["t2i"]
    return {"i2t": i2t, "t2i": t2i, "i2t_ranking": i2t.argsort(dim=1, descending=True),
            "t2i_ranking": t2i.argsort(dim=1, descending=True)}


def retrieval_representations(model: UniPerceiverV2, images, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """What ``retrieve`` scores with: the ``<SPE>`` representations of the images and texts as queries, and the
    logits of both directions (v2 eq. (6)).

    Returns:
        ``image_queries`` (I, d) and ``text_queries`` (T, d), detached, on the CPU; ``i2t`` (I, T) and ``t2i`` (T, I)
        logits as ``retrieve`` returns them.
    """
    texts = checks.text_list(texts, "texts")
    task = RetrievalTask(model.config.tasks.retrieval)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images, "retrieval")
        image_queries, image_candidates, _ = task.embed_images(model, pixels, padding_mask)
        text_queries, text_candidates, _ = task.embed_texts(model, texts)
        i2t = model.similarity(image_queries, text_candidates, "retrieval_i2t").cpu()
        t2i = model.similarity(text_queries, image_candidates, "retrieval_t2i").cpu()
    return {"image_queries": image_queries.detach().cpu(), "text_queries": text_queries.detach().cpu(),
            "i2t": i2t, "t2i": t2i}


def fill_mask(model: UniPerceiverV2, texts: str | Sequence[str], top_k: int = 5) -> list[dict]:
    """Fill every ``<mask>`` (one token each) of each text with the model's vocabulary (masked language modelling).

    Args:
        texts: one text or a non-empty list; every text needs at least one ``<mask>``.
        top_k: int >= 1 candidates per mask; above the vocabulary size, the whole vocabulary.

    Returns:
        per text ``{"text": str with every mask replaced by its best token, "tokens": list[str] the best token per
        mask, "candidates": per mask a list of min(top_k, V) {"token": str, "score": float (probability)}}``.
    """
    texts = checks.text_list([texts] if isinstance(texts, str) else texts, "texts")
    top_k = checks.positive_int(top_k, "top_k")
    tokenizer = model.text_encoder.tokenizer
    for i, text in enumerate(texts):
        if MASK not in text:
            raise ValueError(f"fill_mask: texts[{i}] = {text!r} has no {MASK}")
    task = MaskedLanguageModelingTask(model.config.tasks.mlm)
    with evaluation_mode(model):
        tokens = model.tokenize([text.replace(MASK, tokenizer.mask_token) for text in texts])
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        masked = input_ids == model.text_encoder.mask_token_id
        for i, text in enumerate(texts):
            if int(masked[i].sum()) != text.count(MASK):
                raise ValueError(f"fill_mask: texts[{i}] has {text.count(MASK)} {MASK} but {int(masked[i].sum())} "
                                 f"survive tokenisation (text_encoder.max_length="
                                 f"{model.config.text_encoder.max_length})")
        hidden, _ = task.masked_representations(model, input_ids, attention_mask, masked)
        probs = model.similarity(hidden, model.vocabulary_embeddings("mlm"), "mlm").softmax(dim=1)   # (M, V)
        scores, index = probs.topk(min(top_k, probs.shape[1]), dim=1)
        best = model.vocabulary[index[:, 0]]
        filled = input_ids.masked_scatter(masked, best)
    results, start = [], 0
    for i in range(len(texts)):
        count = int(masked[i].sum())
        rows = range(start, start + count)
        start += count
        candidates = [[{"token": tokenizer.convert_ids_to_tokens(int(model.vocabulary[v])), "score": float(s)}
                       for v, s in zip(index[r].tolist(), scores[r].tolist())] for r in rows]
        results.append({
            "text": tokenizer.decode(filled[i][attention_mask[i].bool()], skip_special_tokens=True),
            "tokens": [c[0]["token"] for c in candidates],
            "candidates": candidates,
        })
    return results
