"""Checkpoints: written atomically (a kill or a full disk leaves the previous file), read with `weights_only=True`,
checked against the model before Lightning reads them, ranked per image size, and holding what an exact resume
needs beyond Lightning's state (RNG states, partial epoch aggregates; the data order: `ResumableDataLoader`)."""

import io
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import Metric

from lightning_dq.errors import CheckpointError, ConfigError, disk_full

MAX_LISTED = 12  # keys shown per category in a mismatch message


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` via a temporary file in the same folder, fsync and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()  # serialised first: a full disk is then an OSError at write (torch's writer would raise
    torch.save(obj, buffer)  # a RuntimeError "unexpected pos" that names nothing)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never a mix
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full(err, path, "checkpoint") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename durable (directories cannot be opened everywhere, e.g. Windows)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint with `weights_only=True`; raise `CheckpointError` naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check --ckpt_path or the run directory)")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive; a torn file is not
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({path.stat().st_size} bytes, no valid zip "
            f"directory); it was probably cut off by a crash or an incomplete copy: use an earlier checkpoint from "
            f"{path.parent} or copy the file again"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} contains a pickled Python object ({found.group(1) if found else 'not plain data'}), "
            f"not only tensors, numbers, strings and containers, so it is not loaded (loading must not run code from "
            f"a file). If you trust the file, load it with torch.load(..., weights_only=False) and re-save plain types"
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
    """Lightning checkpoint IO (`trainer.plugins`): atomic writes, safe reads; remote paths use Lightning's IO."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location)


def check_model_matches(state_dict: Mapping[str, Any], model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Raise `CheckpointError` listing the keys and shapes where `state_dict` and `model` disagree. Networks the model
    builds from the checkpoint itself (an attribute still None, e.g. a `PriorModule`'s) are not compared."""
    built_on_load = {name for name, value in vars(model).items() if value is None}
    state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in built_on_load}
    expected = model.state_dict()
    problems = {
        "shape mismatches": [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
        ],
        "missing in checkpoint": [k for k in expected if k not in state_dict],
        "not in the model": [k for k in state_dict if k not in expected],
    }
    lines = []
    for title, items in problems.items():
        if items:
            more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:MAX_LISTED]) + more)
    if lines:
        raise CheckpointError(
            f"checkpoint {path} was saved from a different model configuration than the one configured now:\n"
            + "\n".join(lines)
            + "\nUse the config the checkpoint was trained with (its config.yaml in the run directory)."
        )


def validate_ckpt_path(trainer: Trainer, model: LightningModule, ckpt_path: str | None) -> None:
    """Check `--ckpt_path` before Lightning loads it: readable, and saved from this model's configuration (`last`: the
    newest `last*.ckpt` of the checkpoint folders; `best`, `hpc`, `registry` and remote paths are Lightning's)."""
    if ckpt_path is None or "://" in str(ckpt_path) or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        found = [p for folder in folders for p in folder.glob("last*.ckpt")]
        if not found:
            return  # Lightning warns and starts from scratch: resubmitting the same command just works
        ckpt_path = max(found, key=os.path.getmtime)
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)  # mmap: the tensors are not read, only the index
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {ckpt_path} has no 'state_dict': it is not a Lightning checkpoint")
    check_model_matches(checkpoint["state_dict"], model, ckpt_path)


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for the run directory: `last.ckpt` every epoch and the best `save_top_k` by `monitor`, ranked
    among the epochs that logged `monitor` only (in a fit at several sizes, the size `ResolutionSchedule` names);
    saved at the end of the training epoch, after its train and val aggregates are logged.

    Args: those of `lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args, save_on_train_epoch_end: bool | None = True, **kwargs) -> None:
        super().__init__(*args, save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        top_k = self.save_top_k
        if self.monitor is not None and self.monitor not in trainer.callback_metrics:
            self.save_top_k = 0  # an epoch that cannot be ranked (another image size) writes last.ckpt only
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self.save_top_k = top_k


def rng_states() -> dict[str, Any]:
    """The random states of Python, NumPy, torch (CPU) and CUDA (per device) as plain, weights-only types."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": (version, list(internal), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
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


class ResumeCheckpoint(ModelCheckpoint):
    """Writes `last-step.ckpt` every `every_n_train_steps` optimizer steps, and adds to every checkpoint of the run
    what Lightning does not save: the RNG states (rank 0's, restored on every rank before the first batch after a
    resume) and the partial epoch aggregates (summed over ranks; after a resume rank 0 holds the sum).

    Args:
        every_n_train_steps: optimizer steps between writes of `last-step.ckpt` (0 = never; the RNG and metric
            states still go into the checkpoints other callbacks write).
    """

    CHECKPOINT_NAME_LAST = "last-step"  # any `last*.ckpt` is a candidate of `--ckpt_path last`

    def __init__(self, every_n_train_steps: int = 500) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(f"resume.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        super().__init__(
            save_last=bool(every_n_train_steps),
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=0,
            enable_version_counter=False,
        )
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:  # next to the run's other checkpoints, so `--ckpt_path last` sees all of them
            others = [c.dirpath for c in trainer.checkpoint_callbacks if c is not self and getattr(c, "dirpath", None)]
            self.dirpath = others[0] if others else os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # every rank runs this (Lightning dumps the checkpoint everywhere, rank 0 writes it): collectives are safe
        metrics = {}
        for name, metric in sorted(pl_module.named_modules()):
            if isinstance(metric, Metric):
                states = metric.metric_state  # every state of our metrics is a sum-reduced tensor
                metrics[name] = {s: trainer.strategy.reduce(v.clone(), reduce_op="sum") for s, v in states.items()}
        checkpoint["lightning_dq_resume"] = {"rng": rng_states(), "metrics": metrics}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # ModelCheckpoint would write last-step.ckpt once more; the run's last.ckpt covers the end

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("lightning_dq_resume")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        # Lightning's restart from a mid-epoch checkpoint written after the step finished (the end-of-fit last.ckpt
        # when max_steps or early stopping ends a fit mid-epoch) counts that step twice for the loggers: every later
        # row and validation would be recorded one step late. Both count optimizer steps of our one optimizer.
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        modules = dict(pl_module.named_modules())
        for name, states in pending["metrics"].items():
            metric = modules.get(name)
            if isinstance(metric, Metric):
                metric.reset()
                if trainer.global_rank == 0:  # rank 0 carries the whole (all-rank) partial aggregate
                    for state, value in states.items():
                        setattr(metric, state, value.to(getattr(metric, state).device, getattr(metric, state).dtype))
        # last: the RNG must be exactly as it was after the checkpointed step when this step's maths start
        set_rng_states(pending["rng"])
