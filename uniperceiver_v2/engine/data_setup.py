"""Per-task data for the trainer: datasets from ``Config.data``, infinite sharded batch streams, eval loaders.

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
  seeded from ``(seed, task, epoch, dataset index)``, and restored afterwards. A sample's random crop or
  flip therefore does not depend on which worker loads it, on prefetching, on the world size or on a
  resume, and loading never disturbs the trainer's own random streams (dropout, denoising noise).
"""

from __future__ import annotations

import contextlib
import logging
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "SeededCollate",
    "SeededSamples",
    "ShardedStreamSampler",
    "TaskStream",
    "build_eval_loader",
    "build_task_dataset",
    "build_task_streams",
    "shard_of_epoch",
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
