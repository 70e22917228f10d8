"""Checkpoints: written atomically, read safely, and holding everything an exact resume needs.

- `AtomicCheckpointIO` (Lightning `CheckpointIO` plugin, `trainer.plugins` in configs/base.yaml): writes a
  checkpoint to a temporary file in the same directory, fsyncs it and renames it over the target, so a
  kill at any moment leaves either the previous complete file or the new complete file, never a torn
  one. Reads with `weights_only=True` (no pickled code runs) and turns a truncated or corrupt file into a
  `CheckpointError` that names it.
- `load_checkpoint_file` / `check_model_matches`: the same safe read, and a comparison of a checkpoint's
  `state_dict` with a model that lists missing, unexpected and mis-shaped keys; the CLI runs both on
  `--ckpt_path` before Lightning touches the file (`validate_ckpt_path`).
- `ResumeCheckpoint` (the `resume` config group): writes `last-step.ckpt` every N optimizer steps (so a
  kill loses at most N steps; `--ckpt_path last` takes the newest `last*.ckpt`) and adds to *every*
  checkpoint what Lightning does not save: the RNG states and the partial epoch aggregates of the
  module's torchmetrics. With the datamodule's `ResumableDataLoader` (below) a run killed mid-epoch
  resumes to the same weights as an uninterrupted run.
- `ResumableDataLoader`: a `DataLoader` with Lightning's stateful-loader protocol (`state_dict` /
  `load_state_dict`): it records how many batches of the current epoch it has handed out, and after a
  restore skips that many sampler batches (indices only, no images are read) at the start of its next
  epoch. The order must be a function of (seed, epoch), which `ImageDataModule` guarantees.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

from lightning_dq.errors import CheckpointError, ConfigError

MAX_LISTED = 12  # keys shown per category in a mismatch message


# ---------------------------------------------------------------------------------------------------
# reading and writing
# ---------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` via a temporary file in the same directory, fsync and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never a mix
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint with `weights_only=True`; raise `CheckpointError` naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check --ckpt_path or the run directory)")
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6 is a zip archive; a torn file is not
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({path.stat().st_size} bytes, no valid "
            f"zip directory); it was probably cut off by a crash or an incomplete copy: use an earlier "
            f"checkpoint from {path.parent} or copy the file again"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} contains a pickled Python object ({found.group(1) if found else 'not plain data'}), "
            f"not only tensors, numbers, strings and containers, so it is not loaded (weights_only=True: loading "
            f"must not run code from a file). If you trust the file, load it in Python with "
            f"torch.load(..., weights_only=False) and re-save it with plain types"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt and cannot be read ({type(err).__name__}: {err}); use an earlier "
            f"checkpoint from {path.parent}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes (temporary file, fsync, rename), safe reads with clear errors.

    Remote paths (`s3://...`) fall back to Lightning's default IO, which writes the file in one call.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location)


def check_model_matches(state_dict: Mapping[str, Any], model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Raise `CheckpointError` listing the keys and shapes where `state_dict` and `model` disagree.

    Submodules the model builds from the checkpoint itself (an attribute that is still None, e.g. a
    `PriorModule`'s auto-encoder before `on_load_checkpoint`) are not compared."""
    built_on_load = {name for name, value in vars(model).items() if value is None}
    state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in built_on_load}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = []
    for title, items in (("shape mismatches", shapes), ("missing in checkpoint", missing),
                         ("not in the model", unexpected)):  # fmt: skip
        if items:
            more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:MAX_LISTED]) + more)
    raise CheckpointError(
        f"checkpoint {path} was saved from a different model configuration than the one configured now:\n"
        + "\n".join(lines)
        + "\nUse the config the checkpoint was trained with (its config.yaml in the run directory)."
    )


def validate_ckpt_path(trainer: Trainer, model: LightningModule, ckpt_path: str | None) -> None:
    """Check `--ckpt_path` before Lightning loads it: readable, and saved from this model's configuration.

    `last` is resolved like Lightning does (the newest `last*.ckpt` of the checkpoint callbacks); `best`,
    `hpc`, `registry` and remote paths are left to Lightning.
    """
    if ckpt_path is None or "://" in str(ckpt_path) or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        found = {p for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                 for p in cb._find_last_checkpoints(trainer)}  # fmt: skip
        if not found:
            return  # Lightning warns and starts from scratch: resubmitting the same command just works
        ckpt_path = max(found, key=os.path.getmtime)
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)  # mmap: tensors are not read, only the index
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {ckpt_path} has no 'state_dict': it is not a Lightning checkpoint")
    check_model_matches(checkpoint["state_dict"], model, ckpt_path)


# ---------------------------------------------------------------------------------------------------
# what an exact resume needs beyond Lightning's checkpoint
# ---------------------------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The random states of Python, NumPy, torch (CPU) and CUDA (per device) as plain, weights-only types."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = states["python"]
    states["python"] = (version, list(internal), gauss)
    kind, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of `rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _summable(metric: Metric) -> bool:
    return all(metric._reductions[name] in ("sum", dim_zero_sum) and isinstance(getattr(metric, name), torch.Tensor)
               for name in metric._defaults)  # fmt: skip


class ResumeCheckpoint(ModelCheckpoint):
    """Writes `last-step.ckpt` every `every_n_train_steps` optimizer steps and makes every checkpoint resumable
    exactly (the `resume` config group).

    Lightning's checkpoints hold the model (EMA codebook buffers included), optimizer, loops and callbacks
    (restart schedule, metric history). This adds, to every checkpoint of the run:

    - the RNG states (Python, NumPy, torch, CUDA) at save time, restored right before the first training
      batch after a resume. Rank 0's states are saved and restored on every rank (ranks are seeded alike);
    - the partial epoch aggregates of the module's torchmetrics (sum-reducible states, summed over ranks;
      after a resume rank 0 holds the sum and the other ranks start from zero, so the epoch value is exact
      for any number of ranks).

    Args:
        every_n_train_steps: optimizer steps between writes of `last-step.ckpt` (0 = never; the RNG and
            metric states are still added to the checkpoints other callbacks write).
    """

    CHECKPOINT_NAME_LAST = "last-step"  # any `last*.ckpt` is a candidate of `--ckpt_path last`

    def __init__(self, every_n_train_steps: int = 500) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(f"resume.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(save_last=bool(every_n_train_steps), save_top_k=0, every_n_train_steps=every_n_train_steps,
                         every_n_epochs=0, enable_version_counter=False)  # fmt: skip
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self._every_n_train_steps, resume=True)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:  # next to the run's other checkpoints, so `--ckpt_path last` sees all of them
            others = [
                cb.dirpath for cb in trainer.checkpoint_callbacks if cb is not self and getattr(cb, "dirpath", None)
            ]
            self.dirpath = others[0] if others else os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs on every rank (Lightning dumps the checkpoint everywhere, rank 0 writes it): collectives are safe
        metrics = {}
        for name, metric in sorted(pl_module.named_modules()):
            if isinstance(metric, Metric) and _summable(metric):
                states = {
                    s: trainer.strategy.reduce(getattr(metric, s).clone(), reduce_op="sum") for s in metric._defaults
                }
                metrics[name] = {"states": states, "update_count": metric._update_count}
        checkpoint["lightning_dq_resume"] = {"rng": rng_states(), "metrics": metrics}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # ModelCheckpoint would write last-step.ckpt once more; the run's last.ckpt covers the end

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("lightning_dq_resume")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        modules = dict(pl_module.named_modules())
        for name, saved in pending["metrics"].items():
            metric = modules.get(name)
            if not isinstance(metric, Metric):
                continue
            metric.reset()
            if trainer.global_rank == 0:  # rank 0 carries the whole (all-rank) partial aggregate
                for state, value in saved["states"].items():
                    setattr(metric, state, value.to(getattr(metric, state).device, getattr(metric, state).dtype))
            metric._update_count = saved["update_count"]
        # last: the RNG must be exactly as it was after the checkpointed step when this step's maths start
        set_rng_states(pending["rng"])


class _SkipFirst:
    """Batch sampler wrapper that drops its first `skip` batches once (lazily, at the first `next`, so
    a `DistributedSampler.set_epoch` that Lightning calls after `iter()` still applies)."""

    def __init__(self, sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return len(self.sampler)  # Lightning counts the epoch's batches from the full length

    def __iter__(self) -> Iterator:
        it = iter(self.sampler)
        skip, self.skip = self.skip, 0  # once: a persistent-workers iterator keeps this object for later epochs
        for _ in range(skip):
            next(it, None)
        yield from it


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that Lightning can checkpoint mid-epoch (its `_Stateful` protocol).

    `state_dict()` is the number of batches handed out by the current iteration (Lightning does not
    prefetch from loaders with a length, so that is the number of batches trained on). After
    `load_state_dict`, the next iteration skips that many batches of the sampler's order; the order must
    not depend on the RNG state at `iter()` time (use a generator seeded from (seed, epoch), or
    DDP's `DistributedSampler`, whose order is a function of (seed, epoch)).
    """

    _yielded = 0
    _skip = 0

    @property
    def _index_sampler(self):
        # the batch sampler the iterator draws indices from (a DataLoader-private hook, stable since torch 1.x)
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def __iter__(self) -> Iterator:
        # `_index_sampler` is read while the iterator is built, so the skip applies to this iteration only
        start, iterator = self._skip, super().__iter__()
        self._skip = 0
        self._yielded = start
        for batch in iterator:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict["batches_yielded"])
