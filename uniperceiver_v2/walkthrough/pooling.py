"""Notebook 02: the M' attention poolings of v2 eq. (3) before and after training.

Untrained, every pool is an almost exact average of the map (its query starts small, as in CLIP), so a figure of
the untrained pools shows nothing. Two ways to put trained pools on the page:

* :func:`encoder_of_run`: the image encoder of notebook 06's run, when its checkpoint exists (the pools trained
  by the generalist's own tasks, as in the paper; how far they move from a uniform average depends on what those
  losses ask of them: the decoder also reads every cell of F_L as a flattened token);
* :func:`train_attention_pools`: a short training of the image encoder alone, seconds on a CPU, with a stand-in
  objective that needs the pools: name every category present in a detection scene (multi-label, binary
  cross-entropy) from the M' pooled tokens only. A scene holds several objects at different places, so a pool
  that weights the cells holding objects can keep more of them than a plain average.

:func:`pool_spread` measures how many cells a pool effectively averages, exp(entropy of its weights): h w for a
uniform pool, 1 for a pool on a single cell. :func:`pool_similarity` measures whether the pools look at the same
cells: the cosine between two pools' deviations from the uniform share.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data import CocoInstances, pad_images
from ..data.transforms import detection_eval_transform
from ..modeling import ImageEncoder
from .runs import training_dir, training_status

__all__ = ["PoolTraining", "RunEncoder", "encoder_of_run", "mean_pairwise", "pool_similarity", "pool_spread",
           "train_attention_pools"]


def pool_spread(weights: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of attention weights over their last axis: the number of cells a pool effectively averages.

    Args:
        weights: (..., n) non-negative weights summing to 1 over the last axis (e.g. ``attention_pool_weights``,
            (B, M', h w)); padding cells carry weight 0 and do not count.

    Returns:
        (...,) values in [1, n]: n for a uniform average, 1 for a single cell.
    """
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    return entropy.exp()


def pool_similarity(weights: torch.Tensor) -> torch.Tensor:
    """How alike the pools' weight maps are: the cosine between the deviations of two pools' weights from the
    uniform share 1/n, for every pair of pools.

    Args:
        weights: (M', n) weights of M' pools over the same n valid cells, each summing to 1 (leave padding cells
            out: with weight 0 in every pool they would deviate alike in every pool and raise the cosines).

    Returns:
        (M', M') cosines in [-1, 1]: 1 where two pools favour and avoid the same cells in the same proportions, 0
        where their patterns are unrelated, below 0 where one favours the cells the other avoids; a pool at exactly
        the uniform share has no pattern and a cosine of 0 with every pool (1 with itself is not guaranteed then).
    """
    if weights.ndim != 2:
        raise ValueError(f"weights: expected (M', n) weights of the pools over the same cells, got shape "
                         f"{tuple(weights.shape)}")
    centred = weights - 1.0 / weights.shape[-1]
    return F.normalize(centred, dim=-1) @ F.normalize(centred, dim=-1).T


def query_lengths(encoder: ImageEncoder) -> torch.Tensor:
    """(M',) the length of each pool's learned query q_i: scaling q_i by beta multiplies the pool's logits by beta,
    so the length acts as an inverse softmax temperature (longer: sharper pools)."""
    pools = encoder.global_representations.pools
    return pools.query.detach().reshape(pools.num_pools, -1).norm(dim=-1)


def mean_pairwise(similarity: torch.Tensor) -> float:
    """The mean of the off-diagonal entries of a square (M, M) matrix (nan for M < 2)."""
    count = similarity.shape[0]
    if count < 2:
        return float("nan")
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=similarity.device)
    return float(similarity[off_diagonal].mean())


@dataclass
class PoolTraining:
    """The result of :func:`train_attention_pools`.

    Attributes:
        encoder: the trained image encoder, global half only (``use_regional=False``), in evaluation mode.
        history: one record per iteration, ``{"iteration", "loss", "spread"}`` with ``spread`` the mean over the
            batch and the pools of :func:`pool_spread` (``viz.plot_curves`` draws it).
        iterations, seconds: length and wall-clock time of the training.
    """

    encoder: ImageEncoder
    history: list[dict[str, Any]]
    iterations: int
    seconds: float


def train_attention_pools(cfg: Config, iterations: int = 150, batch_size: int = 16, lr: float = 3e-3,
                          query_lr_mult: float = 10.0, seed: int = 0) -> PoolTraining:
    """Train an image encoder's backbone and global representations on the scenes of ``cfg.data`` (detection
    training split) to name the categories of each scene from its M' pooled tokens.

    The objective is a stand-in (the paper's pools are trained by every task of the generalist through the unified
    decoder); it is cheap and needs what the pools are for, a summary of the whole image. The queries learn at
    ``query_lr_mult`` x ``lr``: they start small, and their length is the sharpness of the pool (a logit scale),
    which a short run must grow quickly.

    Args:
        cfg: the configuration whose ``image_encoder`` (``use_regional`` is switched off: no proposals are
            needed) and ``data`` (root, splits, detection evaluation size) are used.
        iterations: optimizer steps, each on ``batch_size`` scenes drawn at random.
        seed: initialisation and the draws.

    Returns:
        :class:`PoolTraining`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if cfg.image_encoder.num_global_pools < 1:
        raise ValueError("image_encoder.num_global_pools is 0: there are no attention pools to train")
    data = cfg.data
    scenes = CocoInstances(data.path(data.detection_images, data.train_split),
                           data.path(data.detection_annotations, data.train_split),
                           transform=detection_eval_transform(data.det_eval_size, data.det_eval_max_long))
    num_classes = len(scenes.class_names)
    torch.manual_seed(seed)
    encoder = ImageEncoder(dataclasses.replace(cfg.image_encoder, use_regional=False)).train()
    pools, width = cfg.image_encoder.num_global_pools, cfg.image_encoder.hidden_dim
    head = nn.Linear(pools * width, num_classes)
    query = encoder.global_representations.pools.query
    others = [p for p in encoder.parameters() if p is not query] + list(head.parameters())
    optimizer = torch.optim.AdamW([{"params": others}, {"params": [query], "lr": lr * query_lr_mult}], lr=lr,
                                  weight_decay=1e-4)
    draw = random.Random(seed)
    history = []
    started = time.monotonic()
    for iteration in range(iterations):
        batch = [scenes[index] for index in draw.sample(range(len(scenes)), min(batch_size, len(scenes)))]
        images, padding, _ = pad_images([sample.image for sample in batch])            # (B, 3, H, W), (B, H, W)
        present = torch.zeros(len(batch), num_classes)                                 # (B, C) multi-hot
        for row, sample in enumerate(batch):
            present[row, sample.labels] = 1.0
        out = encoder(images, padding)
        pooled = out.tokens[:, :pools]                                                 # (B, M', d)
        loss = F.binary_cross_entropy_with_logits(head(pooled.flatten(1)), present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        spread = pool_spread(out.attention_pool_weights.detach()).mean()               # over B and M'
        history.append({"iteration": iteration, "loss": loss.item(), "spread": spread.item()})
    return PoolTraining(encoder.eval(), history, iterations, time.monotonic() - started)


@dataclass
class RunEncoder:
    """The image encoder of notebook 06's run (:func:`encoder_of_run`).

    Attributes:
        encoder: the trained image encoder, in evaluation mode.
        checkpoint: the checkpoint it comes from; iteration: the iteration of that checkpoint.
    """

    encoder: ImageEncoder
    checkpoint: os.PathLike
    iteration: int


def encoder_of_run(run_dir: str | os.PathLike) -> RunEncoder | None:
    """The image encoder of the newest checkpoint of notebook 06's run in ``{run_dir}/train``, or None when that
    run has not saved one yet (the model is rebuilt from the configuration recorded in the checkpoint)."""
    from transformers.utils import logging as transformers_logging

    from ..engine.build import build_model

    status = training_status(training_dir(run_dir), iterations=0)
    if status.checkpoint is None:
        return None
    transformers_logging.disable_progress_bar()      # the text encoder's "Loading weights" bar, in a notebook
    model = build_model(None, checkpoint=status.checkpoint)
    return RunEncoder(model.image_encoder.eval(), status.checkpoint, status.iteration)
