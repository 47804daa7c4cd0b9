"""Per-task data for the trainer: datasets from ``Config.data``, infinite sharded batch streams, eval batches.

Unmixed sampling (Sec. 4.4) draws one task per iteration, so each task needs its own endless supply of
batches that can be paused for many iterations and resumed exactly after a restart. A :class:`TaskStream`
gives that:

* **Sharding.** Epoch ``e`` of a task is a permutation of its dataset drawn from ``(seed, task, e)``, the
  same on every rank; it is padded by wrapping around to a multiple of the world size and rank ``r`` takes
  every ``world_size``-th index starting at ``r`` (as ``torch.utils.data.DistributedSampler`` does), so the
  ranks see disjoint parts of each epoch. A rank's stream is the concatenation of its shards of epochs 0,
  1, 2, ...; a batch may straddle two epochs, so a dataset smaller than the global batch still works.
* **Position.** The state of a stream is (epoch, position inside this rank's shard), counted in samples
  *consumed by the trainer* (not fetched by prefetching workers), so a checkpoint restarts exactly at the
  next unseen sample.
* **Augmentation randomness.** Every sample is loaded with torch's, numpy's and python's global generators
  seeded from ``(seed, task, epoch, dataset index)``, and restored afterwards; a batch is collated with
  them seeded from its samples' seeds. A sample's random crop or flip therefore does not depend on which
  worker loads it, on prefetching, on the world size or on a resume, and loading never disturbs the
  trainer's own random streams (dropout, denoising noise).

The trainer passes ``run.seed`` as the streams' seed; ``data.seed`` is the synthetic suite's generation seed.

Data safety (``ensure_data``, ``build_task_dataset``, ``data_report``):

* **Nothing is written into a user's folder.** The synthetic suite is generated only into a new or empty
  ``data.root``, or one whose ``manifest.json`` the generator wrote; any other folder is read as real data if it
  holds the files the config reads, else refused with the missing files named.
* **Nothing is dropped silently.** Every reader gets ``data.on_invalid``; with ``data.preflight`` every image file a
  dataset will read is opened before it is used (``data/preflight.py``); what was skipped, and why, is in each
  dataset's ``summary()`` and in the report ``train`` prints and saves as ``<run.output_dir>/data_check.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config, ConfigError
from ..data.summary import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "EvalBatches",
    "SeededCollate",
    "SeededSamples",
    "ShardedStreamSampler",
    "TaskStream",
    "build_task_dataset",
    "build_task_datasets",
    "data_report",
    "ensure_data",
    "format_data_report",
    "missing_inputs",
    "novel_detection_dataset",
    "save_data_report",
    "shard_of_epoch",
    "task_inputs",
    "task_seed",
]


def task_seed(task: str) -> int:
    """A stable per-task seed component (CRC-32 of the name, independent of the order of the tasks)."""
    return zlib.crc32(task.encode("utf-8"))


def shard_of_epoch(dataset_size: int, epoch: int, rank: int, world_size: int, seed: int, task: str) -> np.ndarray:
    """Dataset indices of rank ``rank`` in epoch ``epoch``.

    Returns:
        (ceil(dataset_size / world_size),) int64: every ``world_size``-th entry, from ``rank`` on, of the
        epoch's permutation, padded by wrapping around to a multiple of ``world_size``.
    """
    if dataset_size < 1:
        raise ValueError(f"task {task!r}: the dataset is empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    permutation = np.random.default_rng([seed, task_seed(task), epoch]).permutation(dataset_size)
    padded_size = -(-dataset_size // world_size) * world_size
    padded = np.resize(permutation, padded_size)   # np.resize repeats the array from its start
    return padded[rank::world_size].astype(np.int64)


class ShardedStreamSampler(Sampler):
    """Infinite sampler of ``(dataset index, sample seed)`` pairs: this rank's stream from a given position.

    Args:
        dataset_size: number of samples of the task's dataset.
        rank, world_size: this process and the number of processes.
        seed: the run's data seed (the same on every rank).
        task: the task name (enters every permutation and sample seed).
        epoch, position: where the stream starts (``position`` within this rank's shard of ``epoch``).
    """

    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int, task: str,
                 epoch: int = 0, position: int = 0) -> None:
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.task = task
        self.shard_size = -(-dataset_size // world_size)
        if not 0 <= position < self.shard_size:
            raise ValueError(f"task {task!r}: position {position} not in [0, {self.shard_size})")
        self.epoch = epoch
        self.position = position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = self.epoch, self.position
        while True:
            shard = shard_of_epoch(self.dataset_size, epoch, self.rank, self.world_size, self.seed, self.task)
            for index in shard[position:]:
                sample_seed = np.random.SeedSequence(
                    [self.seed, task_seed(self.task), epoch, int(index)]).generate_state(1)[0]
                yield int(index), int(sample_seed)
            epoch, position = epoch + 1, 0


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed torch's (CPU), numpy's and python's global generators; restore their previous states on exit."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, seed)``: returns ``(dataset[index], seed)`` with ``dataset[index]``
    computed under ``_seeded_global_rngs(seed)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        with _seeded_global_rngs(seed):
            return self.dataset[index], seed


class SeededCollate:
    """Collate ``(sample, seed)`` pairs with the global generators seeded from all the batch's sample seeds,
    so random choices made while batching (e.g. which words masked language modelling hides, if a task
    draws them in ``collate``) are a function of the batch's content only."""

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[tuple[Any, int]]) -> Any:
        seed = int(np.random.SeedSequence([seed for _, seed in items]).generate_state(1)[0])
        with _seeded_global_rngs(seed):
            return self.collate_fn([sample for sample, _ in items])


class TaskStream:
    """Endless, resumable batches of one task on this rank (see the module docstring).

    Args:
        task: task name.
        dataset: map-style dataset of the task's training samples.
        collate_fn: list of samples -> batch (the task's ``collate``).
        batch_size: samples per batch on this rank.
        rank, world_size, seed: as for :class:`ShardedStreamSampler`.
        num_workers: DataLoader worker processes (0 loads in the main process). Workers start when the
            stream is first used, so a task that is never drawn costs nothing.
    """

    def __init__(self, task: str, dataset: Dataset, collate_fn: Callable[[list], Any], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0) -> None:
        if len(dataset) < 1:
            raise ValueError(f"task {task!r}: its training dataset is empty")
        self.task = task
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.shard_size = -(-len(dataset) // world_size)
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator | None = None

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            sampler = ShardedStreamSampler(len(self.dataset), self.rank, self.world_size, self.seed, self.task,
                                           self.epoch, self.position)
            # A generator of its own: creating a DataLoader iterator draws a base seed from it, which would
            # otherwise consume the global generator and shift the trainer's dropout / noise streams.
            loader = DataLoader(SeededSamples(self.dataset), batch_size=self.batch_size, sampler=sampler,
                                collate_fn=SeededCollate(self.collate_fn), num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed))
            self._iterator = iter(loader)
        batch = next(self._iterator)
        consumed = self.position + self.batch_size
        self.epoch += consumed // self.shard_size
        self.position = consumed % self.shard_size
        return batch

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position", "shard_size"}: where the next batch starts on this rank."""
        return {"epoch": self.epoch, "position": self.position, "shard_size": self.shard_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position. A different world size changes the shard size: the stream then
        continues at the same fraction of the saved epoch (not sample-exact, and logged)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if int(state["shard_size"]) != self.shard_size:
            fraction = position / int(state["shard_size"])
            position = min(int(round(fraction * self.shard_size)), self.shard_size - 1)
            logger.warning("task %s: the saved stream position was for shards of %d samples, now %d "
                           "(world size or dataset changed); continuing at %.0f%% of epoch %d",
                           self.task, state["shard_size"], self.shard_size, 100 * fraction, epoch)
        self.epoch, self.position = epoch, position
        self._iterator = None   # the next batch rebuilds the loader from the restored position


# ----------------------------------------------------------------------------------------------------------------
# Datasets of each task, from Config.data
# ----------------------------------------------------------------------------------------------------------------
def task_inputs(cfg: Config, task: str, split: str) -> list[tuple[str, Path]]:
    """(config key, path) of every file or folder the dataset of ``task`` on ``split`` reads first."""
    d = cfg.data
    if task == "classification":
        return [("data.classification_root", d.path(d.classification_root, split))]
    if task == "detection":
        return [("data.detection_images", d.path(d.detection_images, split)),
                ("data.detection_annotations", d.path(d.detection_annotations, split))]
    if task in ("captioning", "retrieval"):
        return [("data.caption_images", d.path(d.caption_images, split)),
                ("data.caption_annotations", d.path(d.caption_annotations, split))]
    if task == "mlm":
        return [("data.corpus", d.path(d.corpus, split))]
    raise ConfigError(f"tasks.{task}: no dataset is known for this task")


def missing_inputs(cfg: Config, split: str | None = None) -> list[tuple[str, Path]]:
    """(config key, path) of the inputs of the enabled tasks on ``split`` (default: the training split) that do not
    exist, each once."""
    split = cfg.data.train_split if split is None else split
    missing: list[tuple[str, Path]] = []
    for task in cfg.tasks.names():
        for key, path in task_inputs(cfg, task, split):
            if not path.exists() and (key, path) not in missing:
                missing.append((key, path))
    return missing


def ensure_data(cfg: Config) -> None:
    """Make sure ``data.root`` can be read, generating the synthetic suite only where that destroys nothing.

    With ``data.synthetic_profile`` set (the default), ``data.root`` is
      * a complete suite written by the generator (``manifest.json`` names it): used as it is; if it was generated
        for another profile or seed than ``data.synthetic_profile`` / ``data.seed`` say, a warning says so (it is
        not regenerated: pointing ``data.root`` at an existing suite needs no second key);
      * new, empty, or an incomplete suite of the generator (an interrupted generation, a file deleted): the suite
        is generated there (``data.seed`` is its generation seed);
      * anything else: the user's data, never written into. It is read as real data when every input of the
        enabled tasks' training split exists; otherwise ``DataError`` names the folder and the missing paths.
    With ``data.synthetic_profile=null`` nothing is generated or checked here.

    In a distributed run every rank takes the same decision (all look at the folder before anything is written);
    only rank 0 generates, the others wait for it.
    """
    from ..data.synthetic import ensure_synthetic
    from .distributed import barrier, get_rank

    if cfg.data.synthetic_profile is None:
        return
    barrier()
    generate = _needs_generation(cfg)
    barrier()
    if generate:
        if get_rank() == 0:
            ensure_synthetic(cfg.data.root, cfg.data.synthetic_profile, seed=cfg.data.seed)
        barrier()


def _needs_generation(cfg: Config) -> bool:
    """Whether ``ensure_data`` generates at ``data.root`` (see there); reads only. Raises ``DataError`` for a
    user's folder that is not a complete data set."""
    from ..data.suite import is_new_or_empty, written_by_generator
    from ..data.synthetic import find_suite, suite_matches

    d = cfg.data
    root = Path(d.root)
    manifest = find_suite(root)
    if manifest is not None:
        if not suite_matches(manifest, d.synthetic_profile, d.seed):
            logger.warning(
                "data.root=%s holds the synthetic suite %r (seed %s), not %r (seed %s) as data.synthetic_profile / "
                "data.seed say: it is read as it is, not regenerated (point data.root at a new folder to generate "
                "%r there)", root, manifest.get("profile"), manifest.get("seed"), d.synthetic_profile, d.seed,
                d.synthetic_profile)
        return False
    if is_new_or_empty(root) or written_by_generator(root):
        return True
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a folder")
    missing = missing_inputs(cfg)
    if missing:
        listed = ", ".join(f"{path.relative_to(root)} ({key})" for key, path in missing)
        raise DataError(
            f"data.root={root}: this folder is not a synthetic suite (it has no manifest.json written by the "
            f"generator), so nothing is generated into it, and it is not a complete data set either: missing "
            f"{listed}. Point data.root at a new or empty folder to generate the synthetic suite there, or add "
            f"the missing files (their paths come from the data.* keys named)")
    logger.info("data.root=%s has no synthetic suite manifest: reading it as real data (nothing is generated)", root)
    return False


def build_task_dataset(cfg: Config, task: str, split: str, train: bool) -> Dataset:
    """The dataset of ``task`` for ``split`` with the paper's training or evaluation transforms (appendix B).

    * classification: ``ImageFolderClassification(data.classification_root)``, random resized crop + flip
      (training) or resize + center crop (evaluation) to ``data.image_size``.
    * detection: ``CocoInstances(data.detection_images, data.detection_annotations)``, random shorter-side
      resize in [det_min_size, det_max_size] + crop ``det_crop_size`` + flip (training), or shorter side
      ``det_eval_size`` (evaluation); masks always in training (the region proposal network's mask losses),
      at evaluation only with ``tasks.detection.segmentation``.
    * captioning, retrieval: ``CocoCaptions(data.caption_images, data.caption_annotations)``, one sample per
      caption (training) or per image with all its captions (evaluation), resized to ``data.image_size``
      without crop or flip in both cases: captions name positions ("left of") and objects a crop could cut.
    * mlm: ``TextCorpus(data.corpus)``.

    Every reader follows ``data.on_invalid``; with ``data.preflight`` every image file is checked once here
    (``data/preflight.py``: exists, header decodes, size matches its record), so a bad file stops the run now
    (``data.on_invalid=error``) or is left out and counted in ``summary()`` (``skip``), not found when sampled.

    Raises:
        DataError: naming the missing or malformed file (and record).
    """
    dataset = _read_task_dataset(cfg, task, split, train)
    if cfg.data.preflight:
        _preflight(dataset)
    return dataset


def _preflight(dataset: Dataset) -> None:
    from ..data.preflight import check_dataset

    problems = check_dataset(dataset)
    if len(dataset) == 0:
        raise DataError(f"{dataset.summary().source}: no usable record left after the pre-flight check "
                        f"({len(problems)} image files failed; see the warning above)")


def _read_task_dataset(cfg: Config, task: str, split: str, train: bool) -> Dataset:
    from ..data import CocoCaptions, CocoInstances, ImageFolderClassification, TextCorpus
    from ..data import transforms as T

    d = cfg.data
    if task == "classification":
        transform = (T.classification_train_transform(d.image_size, d.crop_min_scale, d.zoom_out_prob,
                                                       d.zoom_out_min_scale) if train
                     else T.whole_image_eval_transform("classification", d.image_size))
        return ImageFolderClassification(d.path(d.classification_root, split), transform=transform,
                                         on_invalid=d.on_invalid)
    if task == "detection":
        transform = (T.detection_train_transform(d.det_min_size, d.det_max_size, d.det_max_long, d.det_crop_size)
                     if train else T.detection_eval_transform(d.det_eval_size, d.det_eval_max_long))
        # The region proposal network always trains with its mask losses; evaluation decodes masks only when
        # instance segmentation is evaluated.
        return CocoInstances(d.path(d.detection_images, split), d.path(d.detection_annotations, split),
                             transform=transform, with_masks=train or cfg.tasks.detection.segmentation,
                             on_invalid=d.on_invalid)
    if task in ("captioning", "retrieval"):
        return CocoCaptions(d.path(d.caption_images, split), d.path(d.caption_annotations, split),
                            iterate="caption" if train else "image",
                            transform=T.whole_image_eval_transform(task, d.image_size), on_invalid=d.on_invalid)
    if task == "mlm":
        return TextCorpus(d.path(d.corpus, split), on_invalid=d.on_invalid)
    raise ConfigError(f"tasks.{task}: no dataset is known for this task")


def build_task_datasets(cfg: Config, split: str, train: bool, tasks: Sequence[str] | None = None) -> dict[str, Dataset]:
    """``build_task_dataset`` for every task in ``tasks`` (default: the enabled ones)."""
    names = cfg.tasks.names() if tasks is None else list(tasks)
    return {name: build_task_dataset(cfg, name, split, train) for name in names}


def novel_detection_dataset(cfg: Config) -> Dataset:
    """The novel-category scenes (``data.novel_images`` / ``data.novel_annotations``), evaluation transform:
    objects of categories never annotated for detection training (paper appendix C, Fig. 4). Checked like
    ``build_task_dataset`` with ``data.preflight``."""
    dataset = _read_novel_dataset(cfg)
    if cfg.data.preflight:
        _preflight(dataset)
    return dataset


def _read_novel_dataset(cfg: Config) -> Dataset:
    from ..data import CocoInstances
    from ..data import transforms as T

    d = cfg.data
    return CocoInstances(Path(d.root) / d.novel_images, Path(d.root) / d.novel_annotations,
                         transform=T.detection_eval_transform(d.det_eval_size, d.det_eval_max_long),
                         with_masks=cfg.tasks.detection.segmentation, on_invalid=d.on_invalid)


# ----------------------------------------------------------------------------------------------------------------
# What a run reads: the report printed by ``train`` and saved as <run.output_dir>/data_check.json
# ----------------------------------------------------------------------------------------------------------------
def data_report(cfg: Config, train_datasets: Mapping[str, Dataset], eval_split: str | None = None) -> dict[str, Any]:
    """What each dataset of a run kept and skipped, and why: a JSON-serialisable dict.

    ``train_datasets`` are the training datasets already built (and checked, with ``data.preflight``). With
    ``eval_split``, the evaluation datasets of the enabled tasks on that split (and the novel-category scenes,
    when detection is enabled and ``data.novel_annotations`` exists) are read and checked too, so that a bad file
    there stops the run before training (``data.on_invalid=error``) instead of failing an evaluation at its end.
    An evaluation dataset that cannot be read at all (its annotation file or corpus missing or malformed) is
    listed under "unreadable" with a warning: the evaluation skips that task, as ``engine.evaluation`` does.

    Returns:
        {"data_root", "on_invalid", "preflight", "datasets": {"<split>/<task>": DatasetSummary as a dict},
        "unreadable": {"<split>/<task>": the reading error}}.

    Raises:
        DataError: from an evaluation dataset whose image files fail the pre-flight check.
    """
    summaries = {f"{cfg.data.train_split}/{task}": dataset.summary()
                 for task, dataset in train_datasets.items() if hasattr(dataset, "summary")}
    unreadable: dict[str, str] = {}
    if eval_split is not None:
        names = [(f"{eval_split}/{task}", task) for task in cfg.tasks.names()]
        if cfg.tasks.detection.enabled and (Path(cfg.data.root) / cfg.data.novel_annotations).is_file():
            names.append(("novel/detection", "novel"))
        for name, task in names:
            try:
                dataset = (_read_novel_dataset(cfg) if task == "novel"
                           else _read_task_dataset(cfg, task, eval_split, train=False))
            except DataError as error:
                logger.warning("%s cannot be read, so its evaluation will be skipped: %s", name, error)
                unreadable[name] = str(error)
                continue
            if cfg.data.preflight:
                _preflight(dataset)
            summaries[name] = dataset.summary()
    return {"data_root": cfg.data.root, "on_invalid": cfg.data.on_invalid, "preflight": cfg.data.preflight,
            "datasets": {name: summary.to_dict() for name, summary in summaries.items()}, "unreadable": unreadable}


def format_data_report(report: Mapping[str, Any]) -> str:
    """A few lines: per dataset what was kept and what was skipped (with reasons and examples)."""
    def counts(values: Mapping[str, int]) -> str:
        return ", ".join(f"{key} {value}" for key, value in values.items()) or "none"

    if not report["preflight"]:
        check = "no pre-flight check (data.preflight=false)"
    elif report.get("decode"):
        check = "every image file decoded"
    else:
        check = "pre-flight check of every image file"
    lines = [f"data: {report['data_root']} (data.on_invalid={report['on_invalid']}, {check})"]
    for name, summary in report["datasets"].items():
        lines.append(f"  {name}: kept {counts(summary['kept'])}; skipped {counts(summary['skipped'])}")
        for reason, examples in summary["examples"].items():
            lines.append(f"    e.g. {reason}: {'; '.join(examples)}")
    for name, error in report.get("unreadable", {}).items():
        lines.append(f"  {name}: cannot be read: {error}")
    return "\n".join(lines)


def save_data_report(report: Mapping[str, Any], output_dir: str | Path) -> Path:
    """Write ``report`` as ``<output_dir>/data_check.json``; returns the path."""
    path = Path(output_dir) / "data_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Evaluation batches
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EvalBatches:
    """This rank's part of an evaluation set, in batches of consecutive dataset indices.

    Rank r takes the indices r, r + W, r + 2W, ... (W = world size), unpadded, so every sample is evaluated
    exactly once over all ranks. Every rank runs the same number of batches: the model encodes candidate
    targets (class names, vocabulary) with collectives on the first batch, so a rank that ran out of data
    would leave the others waiting. A rank with fewer batches gets filler batches (one repeated sample) whose
    results the caller drops (``is_filler``).

    Iterate it for ``(indices, batch, is_filler)``.
    """

    dataset: Dataset
    collate_fn: Callable[[list], Any]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        size = len(self.dataset)
        if size < 1:
            raise ValueError("evaluation dataset is empty")
        shard = list(range(self.rank, size, self.world_size))
        largest_shard = -(-size // self.world_size)
        self.num_batches = -(-largest_shard // self.batch_size)
        self.batches = [shard[i:i + self.batch_size] for i in range(0, len(shard), self.batch_size)]
        self.num_real = len(self.batches)
        self.batches += [[0]] * (self.num_batches - self.num_real)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[list[int], Any, bool]]:
        loader = DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=self.collate_fn,
                            num_workers=self.num_workers)
        for number, batch in enumerate(loader):
            yield self.batches[number], batch, number >= self.num_real
