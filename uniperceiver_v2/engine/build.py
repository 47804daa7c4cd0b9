"""Building a model and what training needs around it: ``build_model`` (a preset, a YAML file or a config, and
optionally a checkpoint), the tasks with their candidate lists, and the training datasets.

Checkpoints are read without unpickling anything: a ``.safetensors`` file, or a checkpoint folder / run folder
written by ``engine.checkpoint.save_checkpoint`` (safetensors weights, SHA-256-verified). Either way the weights
are checked before use (``engine.checkpoint.check_weights``): NaN / inf, or a value beyond ``MAX_ABS_WEIGHT`` (1e6)
in absolute value, is an error naming the file and the tensors; a plain ``.safetensors`` file has no checksum
that would catch, e.g., a flipped exponent bit.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch.utils.data import Dataset

from ..config import Config, ConfigError, config_from_dict, load_config
from ..model import UniPerceiverV2
from .checkpoint import check_weights, load_checkpoint, read_checkpoint_meta

__all__ = ["build_model", "build_tasks", "build_training", "load_weights", "vocabulary_texts"]


def build_model(config: str | Path | Config | None = "tiny", checkpoint: str | Path | None = None, *,
                vocabulary_texts: Iterable[str] | None = None) -> UniPerceiverV2:
    """A ``UniPerceiverV2`` in evaluation mode, on the CPU (move it with ``.to(device)``; call ``.train()`` to train).

    Args:
        config: a preset name ("tiny", "r50", "swin_base", "swin_large"), a YAML config path, a ``Config``, or None
            for the config recorded in the checkpoint folder's meta.json.
        checkpoint: None (random initialisation; the text encoder starts from its pre-trained weights), a
            ``.safetensors`` file (``safetensors.torch.save_model`` of the model), or a checkpoint folder / run folder
            of ``engine.checkpoint.save_checkpoint`` (the newest checkpoint of a run folder is used).
        vocabulary_texts: the training texts whose words become the language tasks' vocabulary (captioning and MLM
            pick from it); a checkpoint brings its own vocabulary.
    """
    if config is None:
        if checkpoint is None or Path(checkpoint).is_file():
            raise ConfigError("build_model: config=None reads the config of a checkpoint folder; give a folder "
                              "written by save_checkpoint, or a preset name")
        checkpoint = _checkpoint_location(Path(checkpoint))
        saved = read_checkpoint_meta(checkpoint).get("config")
        if saved is None:
            raise ConfigError(f"{checkpoint}: meta.json records no config; pass the config to build_model")
        cfg = config_from_dict(saved)
    elif isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(config)
    if checkpoint is not None and cfg.image_encoder.backbone_weights is not None:
        # The checkpoint brings every weight, the backbone's included: the backbone's initial weights (a file the
        # run started from, perhaps by a path relative to another folder) are not read. The config keeps the record.
        start = copy.deepcopy(cfg)
        start.image_encoder.backbone_weights = None
        model = UniPerceiverV2(start)
        model.config = cfg
    else:
        model = UniPerceiverV2(cfg)
    if vocabulary_texts is not None:
        from ..tasks.vocabulary import build_vocabulary

        model.set_vocabulary(build_vocabulary(model.text_encoder.tokenizer, vocabulary_texts))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def _checkpoint_location(path: Path) -> Path:
    """A training run's output folder keeps its checkpoints in ``checkpoints/``: accept the run folder too."""
    if path.is_dir() and not (path / "meta.json").exists() and not (path / "latest").exists() \
            and (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def load_weights(model: UniPerceiverV2, checkpoint: str | Path) -> None:
    """Load weights (and the vocabulary buffer) from a ``.safetensors`` file, a ``save_checkpoint`` folder, or a
    training run's output folder (its newest checkpoint).

    Raises ``CheckpointError`` naming the file and tensors if a weight is NaN / inf or beyond ``MAX_ABS_WEIGHT``.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    path = _checkpoint_location(path)
    if path.is_dir():
        load_checkpoint(path, model, restore_rng=False)
        return
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint {path}: expected a .safetensors file or a checkpoint folder (other formats "
                         f"would need unpickling)")
    state = safetensors.torch.load_file(str(path), device=str(model.device))
    check_weights(state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"{path} does not fit the model built from the config: {error}") from error


def vocabulary_texts(datasets: Mapping[str, Dataset]) -> Iterator[str]:
    """Every training caption and corpus sentence, for the language tasks' vocabulary."""
    for name in ("captioning", "retrieval"):
        if name in datasets:
            dataset = datasets[name]
            yield from itertools.chain.from_iterable(dataset.captions_of(i) for i in range(dataset.num_images))
            break
    if "mlm" in datasets:
        corpus = datasets["mlm"]
        yield from (corpus[i] for i in range(len(corpus)))


def build_tasks(cfg: Config, datasets: Mapping[str, Dataset]) -> dict:
    """The task objects (``tasks.TASKS``), with their candidate lists (class names) from ``datasets``."""
    from ..tasks import TASKS

    return {name: TASKS[name].from_dataset(cfg.tasks.get(name), dataset) for name, dataset in datasets.items()}


def build_training(cfg: Config):
    """(model in training mode, tasks, training datasets) for the enabled tasks; generates the synthetic suite if
    configured. The language tasks' vocabulary is built from the training texts, the same on every rank.

    The model is initialised from ``torch.manual_seed(run.seed)``, the same on every rank (DDP also broadcasts
    rank 0's weights when it wraps the model).
    """
    from .data_setup import build_task_datasets, ensure_data

    ensure_data(cfg)
    datasets = build_task_datasets(cfg, cfg.data.train_split, train=True)
    torch.manual_seed(cfg.run.seed)
    texts = vocabulary_texts(datasets) if "captioning" in datasets or "mlm" in datasets else None
    model = build_model(cfg, vocabulary_texts=texts).train()
    return model, build_tasks(cfg, datasets), datasets
