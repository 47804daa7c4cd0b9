"""Shared builders for the task, model and API tests (no tests here): a tiny model with a small random text encoder,
synthetic samples, and a few optimisation steps on one batch.

The model is the ``tiny`` preset; only the text encoder is replaced by a 2-layer width-32 random BERT with the
embedded MiniLM tokenizer (the real MiniLM is exercised in ``test_api.py``), and the vocabulary is built from the
few texts of the test, so one training step takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from uniperceiver_v2.config import Config, get_preset
from uniperceiver_v2.data.samples import CaptionSample, ClassificationSample, DetectionSample
from uniperceiver_v2.model import UniPerceiverV2
from uniperceiver_v2.modeling.text_encoder import TextEncoder, default_model_path
from uniperceiver_v2.tasks.vocabulary import build_vocabulary

CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles on the left",
    "a yellow star next to a small circle",
    "a blue square below a red triangle",
]
CLASS_NAMES = ["circle", "square", "triangle", "star"]
IMAGE_SIZE = 64

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return _TOKENIZER


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the module: on a shared, busy CPU, two threads that wait on each other at every
    operation make these small models many times slower. Import it into a test module to use it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**task_overrides) -> Config:
    """The tiny preset; ``task_overrides`` like ``classification={"label_smoothing": 0.0}``."""
    cfg = get_preset("tiny")
    for task, values in task_overrides.items():
        for key, value in values.items():
            setattr(cfg.tasks.get(task), key, value)
    return cfg


def small_text_encoder(cfg: Config, seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    tok = tokenizer()
    hf_config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    return TextEncoder.from_hf_config(hf_config, tok, cfg.text_encoder)


def tiny_model(cfg: Config | None = None, seed: int = 0, texts: list[str] | None = None) -> UniPerceiverV2:
    cfg = cfg or tiny_config()
    text_encoder = small_text_encoder(cfg, seed)
    torch.manual_seed(seed)
    vocabulary = build_vocabulary(tokenizer(), texts or CAPTIONS)
    return UniPerceiverV2(cfg, text_encoder=text_encoder, vocabulary=vocabulary)


def images(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[torch.Tensor]:
    """Normalised-looking images that are easy to tell apart: weak noise plus a bright block whose colour and place
    depend on the index (pure noise images all look alike to a randomly initialised network)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        image = 0.3 * torch.randn(3, size, size, generator=generator)
        row, col = (i // 2) % 2, i % 2
        half = size // 2
        image[i % 3, row * half:(row + 1) * half, col * half:(col + 1) * half] += 2.5
        out.append(image)
    return out


def classification_samples(count: int = 4, seed: int = 0) -> list[ClassificationSample]:
    return [ClassificationSample(image, i % len(CLASS_NAMES), f"img{i}.png")
            for i, image in enumerate(images(count, seed))]


def caption_samples(count: int = 4, seed: int = 0) -> list[CaptionSample]:
    return [CaptionSample(image, CAPTIONS[i % len(CAPTIONS)], i, f"img{i}.png")
            for i, image in enumerate(images(count, seed))]


def detection_samples(count: int = 2, seed: int = 0) -> list[DetectionSample]:
    """Images with two square objects each, labels 0 and 1, masks filling the boxes."""
    samples = []
    for i, image in enumerate(images(count, seed)):
        boxes = torch.tensor([[8.0, 8.0, 32.0, 32.0], [36.0, 30.0, 60.0, 58.0]])
        masks = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = True
            image[:, y0:y1, x0:x1] += 2.0 * (k + 1)         # make the objects visible
        samples.append(DetectionSample(image, boxes, torch.tensor([0, 1]), masks, 100 + i,
                                       (IMAGE_SIZE, IMAGE_SIZE), f"img{i}.png"))
    return samples


def overfit(model: UniPerceiverV2, task, batch, steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps on one batch; the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
