"""The public inference API: build a model, then classify / detect / caption / retrieve / fill masks.

    from uniperceiver_v2 import api
    model = api.build_model("tiny", checkpoint="runs/tiny/checkpoints")  # or a .safetensors file; None = random
    api.classify(model, [Image.open("cat.jpg")], ["cat", "dog", "tiger shark"])
    api.detect(model, images, ["cat", "dog"], score_threshold=0.3)
    api.caption(model, images, beam_size=3)
    api.retrieve(model, images, ["a cat on a sofa", "two dogs"])
    api.fill_mask(model, ["a <mask> sits on the sofa"])

Every function here takes the model first (the model itself knows nothing of image files or tokenising prompts:
this module is where raw inputs become batches). Images are PIL
images (any mode) or tensors (3, H, W) (float in [0, 1] or uint8), of any size, alone or in a list; resizing,
ImageNet normalisation and padding happen inside with the evaluation transforms of ``uniperceiver_v2.data``
(``data.image_size`` square crops for the whole-image tasks; shorter side ``data.det_eval_size`` for detection).
Every call runs in evaluation mode without gradients and returns the model to the mode it was in.

Checkpoints are read without unpickling anything: a ``.safetensors`` file, or a checkpoint folder / run folder
written by ``engine.checkpoint.save_checkpoint`` (safetensors weights, SHA-256-verified).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from uniperceiver_v2.data.collate import pad_images
from uniperceiver_v2.data.images import pil_to_rgb_array
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
    "build_model",
    "caption",
    "classify",
    "detect",
    "fill_mask",
    "load_weights",
    "prepare_detection_images",
    "prepare_whole_images",
    "retrieve",
    "to_image_tensor",
]

ImageInput = Image.Image | torch.Tensor

# The literal that marks a word to fill in ``fill_mask`` (replaced by the tokenizer's own mask token).
MASK = "<mask>"


# -------------------------------------------------------------------------------------------------- inputs
def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (Image.Image, torch.Tensor)):
        return [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


def to_image_tensor(image: ImageInput, index: int = 0) -> torch.Tensor:
    """A PIL image (any mode) or a tensor (3, H, W) -> float32 (3, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        array = pil_to_rgb_array(image, f"images[{index}]")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{index}]: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise TypeError(f"images[{index}]: expected a float (values in [0, 1]) or uint8 tensor, got {image.dtype}")
        return image.float()
    raise TypeError(f"images[{index}]: expected a PIL image or a tensor, got {type(image).__name__}")


def prepare_whole_images(model: UniPerceiverV2, images, task: str = "classification"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images for ``task`` (classification / captioning / retrieval) as its evaluation dataset prepares them:
    resize to ``data.image_size`` with the task's centre crop (``data.transforms.WHOLE_IMAGE_CROP``: classification
    the central 87.5 %, captioning and retrieval the whole image), normalise.

    Returns:
        images (B, 3, S, S) and padding_mask (B, S, S) on the model's device.
    """
    transform = whole_image_eval_transform(task, model.config.data.image_size)
    tensors = [transform(to_image_tensor(image, i)) for i, image in enumerate(_as_list(images))]
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
    for i, image in enumerate(_as_list(images)):
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

    Returns:
        per image, the min(top_k, C) best classes, best first: ``{"label": str, "index": int (position in
        class_names), "score": float (softmax probability over class_names)}``.
    """
    names = [str(name) for name in class_names]
    task = ClassificationTask(model.config.tasks.classification, names)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images)
        prediction = task.predict(model, ClassificationTaskBatch(pixels, padding_mask, None, tuple(names)), top_k)
    return [[{"label": names[c], "index": c, "score": s}
             for c, s in zip(labels.tolist(), scores.tolist())]
            for labels, scores in zip(prediction["labels"], prediction["scores"])]


def detect(model: UniPerceiverV2, images, class_names: Sequence[str], score_threshold: float = 0.0) -> list[dict]:
    """Open-vocabulary detection and instance segmentation against any list of class names.

    Returns:
        per image, detections sorted by score (at most ``tasks.detection.max_detections``, score >=
        ``score_threshold``): ``boxes`` (K, 4) float xyxy in pixels of the given image, ``scores`` (K,) in [0, 1]
        (sigmoid(objectness) * class probability), ``labels`` (K,) long positions in ``class_names``, ``names``
        (K strings), and ``masks`` (K, H, W) bool on the given image when ``tasks.detection.segmentation``.
    """
    names = [str(name) for name in class_names]
    task = DetectionTask(model.config.tasks.detection, names)
    with evaluation_mode(model):
        pixels, padding_mask, orig_sizes = prepare_detection_images(model, images)
        predictions = task.detect(model, pixels, padding_mask, orig_sizes, names)
    results = []
    for prediction in predictions:
        keep = prediction["scores"] >= score_threshold
        result = {key: value[keep].cpu() for key, value in prediction.items()}
        result["names"] = [names[c] for c in result["labels"].tolist()]
        results.append(result)
    return results


def caption(model: UniPerceiverV2, images, beam_size: int | None = None, max_length: int | None = None
            ) -> list[dict]:
    """Describe each image.

    Args:
        beam_size: 1 = greedy; default ``tasks.captioning.beam_size``.
        max_length: maximum number of generated tokens; default ``tasks.captioning.max_length``.

    Returns:
        per image ``{"caption": str, "token_ids": list[int], "score": float (sum of token log-probabilities)}``.
    """
    task = CaptioningTask(model.config.tasks.captioning)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images, "captioning")
        return task.generate(model, pixels, padding_mask, beam_size, max_length)


def retrieve(model: UniPerceiverV2, images, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Score every image against every text, in both directions.

    Returns:
        ``i2t`` (I, T) logits cos / tau ranking the texts for each image, ``t2i`` (T, I) ranking the images for each
        text, and ``i2t_ranking`` (I, T) / ``t2i_ranking`` (T, I) long: candidate indices, best first.
    """
    texts = [str(text) for text in texts]
    if not texts:
        raise ValueError("retrieve: no texts given")
    task = RetrievalTask(model.config.tasks.retrieval)
    with evaluation_mode(model):
        pixels, padding_mask = prepare_whole_images(model, images, "retrieval")
        image_queries, image_candidates, _ = task.embed_images(model, pixels, padding_mask)
        text_queries, text_candidates, _ = task.embed_texts(model, texts)
        i2t = model.similarity(image_queries, text_candidates, "retrieval_i2t").cpu()
        t2i = model.similarity(text_queries, image_candidates, "retrieval_t2i").cpu()
    return {"i2t": i2t, "t2i": t2i, "i2t_ranking": i2t.argsort(dim=1, descending=True),
            "t2i_ranking": t2i.argsort(dim=1, descending=True)}


def fill_mask(model: UniPerceiverV2, texts: str | Sequence[str], top_k: int = 5) -> list[dict]:
    """Fill every ``<mask>`` (one token each) of each text with the model's vocabulary (masked language modelling).

    Returns:
        per text ``{"text": str with every mask replaced by its best token, "tokens": list[str] the best token per
        mask, "candidates": per mask a list of min(top_k, V) {"token": str, "score": float (probability)}}``.
    """
    texts = [texts] if isinstance(texts, str) else [str(text) for text in texts]
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
