"""Crash-safe training checkpoints: safetensors weights, a weights-only training state, a JSON record.

Layout of a checkpoint directory:

    <directory>/
        latest                    one line: the name of the newest complete checkpoint
        iter_0000500/
            model.safetensors     model weights (tied tensors stored once, see safetensors.torch.save_model)
            training_state.pt     optimizer, scheduler, RNG states (one per rank), extra_state; torch.save'd
                                  plain containers and tensors only, loaded with torch.load(weights_only=True)
            meta.json             iteration, UTC time, config and its SHA-256, size and SHA-256 of each file

Crash safety: a checkpoint is written into a hidden temporary directory next to its final place, flushed to
disk, then renamed into place; only then is `latest` replaced (write a temporary file, rename). A crash at
any point leaves the previous checkpoint complete and `latest` pointing to it. Loading verifies each file's
size and SHA-256 against meta.json, so a truncated or corrupted file is reported by name instead of being
half-loaded. Nothing is ever unpickled beyond tensors and plain containers.

If `latest` names a folder that is missing or incomplete (no readable meta.json, a file missing or of another
size than recorded: what a lost disk write or a hand-deleted folder leaves), `find_latest` warns, naming both,
and falls back to the newest complete checkpoint; a file whose SHA-256 differs is never skipped over silently,
loading it is an error. Loaded weights are checked by `check_weights`: a NaN / inf, or a magnitude above
`MAX_ABS_WEIGHT`, is an error naming the file and the tensors.

`write_text_atomic` is how every small state file of a run (`latest`, the trainer's run_info.json and
evaluation results) is written: a temporary file in the same folder, fsync, then os.replace, so a reader sees
the old or the new content, never a torn one.

In a distributed run call `save_checkpoint` and `load_checkpoint` on every rank: saving gathers each rank's
RNG state (so ranks keep different dropout / augmentation streams after a resume) and only rank 0 writes;
loading restores each rank's own RNG state.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import operator
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from uniperceiver_v2.engine.distributed import barrier, get_rank, get_world_size, is_distributed

__all__ = [
    "CheckpointError",
    "MAX_ABS_WEIGHT",
    "capture_rng_state",
    "check_weights",
    "config_hash",
    "find_latest",
    "load_checkpoint",
    "read_checkpoint_meta",
    "restore_rng_state",
    "save_checkpoint",
    "write_text_atomic",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)$")

# The largest absolute value a loaded floating-point weight or buffer may hold. This model's trained weights stay
# below 10 and BatchNorm running variances of pre-trained backbones below about 1e4. Setting one of the three
# highest exponent bits of a float32 scales it by 2**32, 2**64 or 2**128, which puts any weight above 2.4e-4
# beyond 1e6 (lower bits give factors no bound can tell from training; NaN / inf are always caught).
MAX_ABS_WEIGHT = 1e6


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or does not fit the model / optimizer it is loaded into."""


def _checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# ----------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python `random`, numpy's global generator, torch CPU and CUDA).

    Everything is a tensor or a plain container, so it survives torch.load(weights_only=True).
    """
    version, mt_state, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss_next],
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            saved = state["cuda"]
            if len(saved) != torch.cuda.device_count():
                warnings.warn(
                    f"checkpoint holds CUDA RNG states of {len(saved)} devices, this process sees "
                    f"{torch.cuda.device_count()}; restoring the first {min(len(saved), torch.cuda.device_count())}",
                    stacklevel=2,
                )
            for index, cuda_state in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device=index)
        else:
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; not restored", stacklevel=2)


# ----------------------------------------------------------------------------------------------- helpers


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError if `obj` holds anything torch.load(weights_only=True) would refuse to load."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (list, tuple):
        for index, item in enumerate(obj):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only tensors, "
        "None, bool, int, float, str, lists, tuples and dicts (convert numpy values with .item() or "
        "torch.from_numpy)"
    )


def config_hash(config: Any) -> str:
    """SHA-256 of a config (dataclass or mapping) serialised as canonical JSON."""
    return hashlib.sha256(_config_json(config).encode()).hexdigest()


def _config_json(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.dumps(config, sort_keys=True, default=str)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames inside `path` durable; directories cannot be opened for fsync on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the file `path` with `text` so that a crash at any point leaves either the old or the new content:
    write a temporary file in the same folder, fsync it, os.replace it over `path`, fsync the folder."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def check_weights(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise CheckpointError naming `source` and the tensors if a floating-point tensor holds NaN / inf or a
    value beyond `MAX_ABS_WEIGHT` in absolute value; integer tensors (counters, token ids) are not checked.

    A plain .safetensors file has no checksum, so a flipped exponent bit would otherwise load as a weight of,
    e.g., 4e36 and only show up as a diverged loss much later.
    """
    non_finite, too_large = [], []
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            non_finite.append(f"{name} ({int((~finite).sum())} of {tensor.numel()} values)")
            continue
        largest = float(tensor.detach().abs().max())
        if largest > MAX_ABS_WEIGHT:
            too_large.append(f"{name} (|value| up to {largest:.3g})")
    if non_finite:
        raise CheckpointError(f"{source}: NaN or inf in {len(non_finite)} tensor(s): {_listing(non_finite)}; the "
                              "file is corrupt or was saved from a diverged run")
    if too_large:
        raise CheckpointError(f"{source}: {len(too_large)} tensor(s) hold values beyond {MAX_ABS_WEIGHT:g} in "
                              f"absolute value, implausible for a weight: {_listing(too_large)}; the file is "
                              "corrupt (e.g. a flipped exponent bit) or was saved from a diverged run")


def _listing(names: list[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return shown if len(names) <= count else f"{shown} and {len(names) - count} more"


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for child in directory.iterdir() if directory.is_dir() else []:
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


# ----------------------------------------------------------------------------------------------- save


def save_checkpoint(
    directory: str | os.PathLike,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra_state: dict[str, Any] | None = None,
    *,
    config: Any = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint `iter_{iteration}` under `directory` atomically and point `latest` to it.

    Args:
        directory: parent directory of all checkpoints of a run.
        iteration: training iteration the checkpoint represents (the number of completed steps).
        model: the model (a DistributedDataParallel wrapper is unwrapped).
        optimizer: its state_dict is saved (None for a weights-only checkpoint).
        scheduler: its state_dict is saved.
        extra_state: anything else to restore, e.g. {"sampler_seed": 0, "best_ap": 0.31}; only tensors and
            plain containers (checked here, with an error naming the offending entry).
        config: the run's config (dataclass or mapping), recorded in meta.json with its SHA-256.
        keep_last: keep this many newest checkpoints (None keeps all).

    Returns:
        The checkpoint's path (on every rank).

    Call it on every rank (it gathers their RNG states; only rank 0 writes, then all meet at a barrier).
    """
    directory = Path(directory)
    iteration = operator.index(iteration)
    if iteration < 0:
        raise ValueError(f"save_checkpoint: iteration must be >= 0, got {iteration}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    extra_state = {} if extra_state is None else extra_state
    _check_plain(extra_state, "extra_state")

    rng_state = capture_rng_state()
    if is_distributed():
        rng_states: list[Any] = [None] * get_world_size()
        dist.all_gather_object(rng_states, rng_state)
    else:
        rng_states = [rng_state]

    name = _checkpoint_name(iteration)
    final = directory / name
    if get_rank() == 0:
        training_state = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_per_rank": rng_states,
            "extra_state": extra_state,
        }
        _check_plain(training_state, "training state")
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        temporary = directory / f".tmp-{name}-{os.getpid()}"
        temporary.mkdir()
        try:
            safetensors.torch.save_model(_unwrap(model), str(temporary / MODEL_FILE))
            torch.save(training_state, temporary / STATE_FILE)
            files = {}
            for file_name in (MODEL_FILE, STATE_FILE):
                _fsync_file(temporary / file_name)
                files[file_name] = {
                    "bytes": (temporary / file_name).stat().st_size,
                    "sha256": _sha256(temporary / file_name),
                }
            meta = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "world_size": get_world_size(),
                "torch_version": torch.__version__,
                "config_sha256": config_hash(config) if config is not None else None,
                "config": json.loads(_config_json(config)) if config is not None else None,
                "files": files,
            }
            (temporary / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync_file(temporary / META_FILE)
            _fsync_dir(temporary)
            if final.exists():
                # Re-saving an iteration: move the old copy aside so the rename below cannot fail.
                retired = directory / f".tmp-retired-{name}-{os.getpid()}"
                os.replace(final, retired)
                os.replace(temporary, final)
                shutil.rmtree(retired)
            else:
                os.replace(temporary, final)
            _write_latest(directory, name)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        if keep_last is not None:
            for _, old in _list_checkpoints(directory)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    barrier()
    return final


def _write_latest(directory: Path, name: str) -> None:
    write_text_atomic(directory / LATEST_FILE, name + "\n")


# ----------------------------------------------------------------------------------------------- load


def find_latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory`, or None if there is none yet.

    Follows the `latest` pointer; without one (a crash between renaming a checkpoint into place and writing
    the pointer), takes the highest `iter_*` directory. A folder that is missing or incomplete (see
    `_incomplete`) is skipped with a warning naming it and the checkpoint used instead; if no complete
    checkpoint is left, that is a CheckpointError (never a silent start from scratch).
    """
    directory = Path(directory)
    pointer = directory / LATEST_FILE
    checkpoints = [path for _, path in reversed(_list_checkpoints(directory))]   # newest first
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _CHECKPOINT_NAME.match(name):
            raise CheckpointError(f"{pointer}: expected a checkpoint name like 'iter_0000100', got {name!r}")
        target = directory / name
        problem = _incomplete(target)
        if problem is None:
            return target
        fallback = next((path for path in checkpoints if path != target and _incomplete(path) is None), None)
        if fallback is None:
            raise CheckpointError(f"{pointer} points to {target}, which {problem}; no other complete checkpoint "
                                  f"in {directory}")
        warnings.warn(f"{pointer} points to {target}, which {problem}; using {fallback}, the newest complete "
                      "checkpoint", stacklevel=2)
        return fallback
    skipped = []
    for path in checkpoints:
        problem = _incomplete(path)
        if problem is None:
            if skipped:
                warnings.warn(f"{directory}: skipped incomplete checkpoint(s) {'; '.join(skipped)}; using {path}",
                              stacklevel=2)
            return path
        skipped.append(f"{path} ({problem})")
    if skipped:
        raise CheckpointError(f"{directory} holds no complete checkpoint: {'; '.join(skipped)}")
    return None


def _incomplete(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not a complete checkpoint folder (as a phrase after "which"), or None if it is.

    Cheap: meta.json readable, every file it lists present with the recorded size. SHA-256 is verified on load.
    """
    if not checkpoint.is_dir():
        return "does not exist"
    meta_path = checkpoint / META_FILE
    if not meta_path.is_file():
        return f"has no {META_FILE}"
    try:
        files = json.loads(meta_path.read_text())["files"]
        records = [(name, int(record["bytes"])) for name, record in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"has an unreadable {META_FILE} ({type(error).__name__}: {error})"
    for file_name, recorded in records:
        file_path = checkpoint / file_name
        if not file_path.is_file():
            return f"is incomplete: {file_path} is missing"
        size = file_path.stat().st_size
        if size != recorded:
            return f"is incomplete: {file_path} is corrupt: {size} bytes, {META_FILE} records {recorded}"
    return None


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path} holds neither a checkpoint ({META_FILE}) nor a {LATEST_FILE} pointer")
    return latest


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint (or of the latest one, given the run directory): iteration, time, config..."""
    meta_path = _resolve(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{meta_path}: cannot read checkpoint record: {error}") from error
    for key in ("format_version", "iteration", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing key {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
    return meta


def _verify_files(checkpoint: Path, meta: Mapping[str, Any]) -> None:
    for file_name, record in meta["files"].items():
        file_path = checkpoint / file_name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path} is missing")
        size = file_path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{file_path} is corrupt: {size} bytes, {META_FILE} records {record['bytes']}")
        if _sha256(file_path) != record["sha256"]:
            raise CheckpointError(f"{file_path} is corrupt: SHA-256 differs from the one in {META_FILE}")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint into `model` (and `optimizer`, `scheduler`, this rank's RNG states).

    Args:
        path: a checkpoint directory (`.../iter_0000500`) or a run directory (its `latest` is loaded).
        model: receives the weights (strict: missing or unexpected names are an error); they are copied
            onto the model's own devices.
        optimizer: receives the optimizer state if given; its state tensors move to the parameters' devices.
        scheduler: receives the scheduler state if given.
        restore_rng: restore python / numpy / torch RNG states, so the run continues the same random streams.

    Returns:
        The `extra_state` dict given to `save_checkpoint`. The iteration is in `read_checkpoint_meta(path)`.

    Raises:
        CheckpointError: naming the file that is missing, corrupt, or does not match the model / optimizer, or
            the tensors holding NaN / inf or values beyond MAX_ABS_WEIGHT (`check_weights`).
    """
    checkpoint = _resolve(path)
    meta = read_checkpoint_meta(checkpoint)
    _verify_files(checkpoint, meta)

    model_path = checkpoint / MODEL_FILE
    try:
        safetensors.torch.load_model(_unwrap(model), str(model_path), strict=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{model_path} does not fit the model: {error}") from error
    # The SHA-256 proves the file is the one saved, not that the run had not diverged before saving it.
    check_weights(_unwrap(model).state_dict(), model_path)

    state_path = checkpoint / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises several unrelated types; all mean "unreadable file"
        raise CheckpointError(f"{state_path}: cannot load training state: {error}") from error

    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{state_path} holds no optimizer state (saved with optimizer=None)")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{state_path}: optimizer state does not fit the optimizer: {error}") from error
    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"{state_path} holds no scheduler state (saved with scheduler=None)")
        scheduler.load_state_dict(state["scheduler"])

    if restore_rng:
        rng_states = state["rng_per_rank"]
        rank = get_rank()
        if len(rng_states) != get_world_size():
            warnings.warn(
                f"{state_path} was saved by {len(rng_states)} ranks and is loaded by {get_world_size()}; "
                f"rank {rank} takes the RNG state of saved rank {rank % len(rng_states)}",
                stacklevel=2,
            )
        restore_rng_state(rng_states[rank % len(rng_states)])
    return state["extra_state"]
