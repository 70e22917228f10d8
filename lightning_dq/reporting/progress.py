"""`PlainProgressBar`: progress as plain lines where stdout is a file or a pipe (a SLURM log, CI, `make demo >
demo.log`), where a rich bar only renders when the run exits. In a terminal the Trainer's `RichProgressBar` is used."""

import math
import sys
import time
from datetime import timedelta
from typing import IO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

from lightning_dq.nn.figures import FIGURES


def stdout_is_terminal(stream: IO | None = None) -> bool:
    """Whether `stream` (default: the current `sys.stdout`) is an interactive terminal."""
    try:
        return bool((sys.stdout if stream is None else stream).isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _count(value: float) -> str:
    return "?" if math.isinf(value) else str(int(value))


class PlainProgressBar(ProgressBar):
    """Plain-text progress lines, where stdout is not a terminal (or if listed in `trainer.callbacks`). One every
    `every_n_steps` batches and at each epoch or stage end; in `fit`: epoch, step, images/s, losses, bits/dim, ETA.

    Args:
        every_n_steps: batches between two lines (None = the Trainer's `log_every_n_steps`).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._fit_start = 0.0
        self._fit_step0 = 0
        self._window_start = 0.0  # images/s over the batches since the last line, validation time excluded
        self._window_images = 0
        self._batches_done = 0
        self._paused_at = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _every(self) -> int:
        return self.every_n_steps or max(1, int(self.trainer.log_every_n_steps))

    def _emit(self, line: str) -> None:
        if self._enabled:
            print(line, flush=True)  # sys.stdout as it is now; flushed so a log file shows it at once

    def _restart_window(self) -> None:
        self._window_start = time.monotonic()
        self._window_images = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._fit_step0 = trainer.global_step

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart_window()
        self._batches_done = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._window_images += len(batch) * trainer.world_size  # batches are (B, 3, H, W); one per rank
        self._batches_done = batch_idx + 1
        if self._batches_done % self._every() == 0 and self._batches_done < self.total_train_batches:
            self._emit(self._train_line(trainer, done=False))  # the epoch-end line covers the last batch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._emit(self._train_line(trainer, done=True))  # the epoch's validation has run: its bits/dim are known

    def _train_line(self, trainer: Trainer, done: bool) -> str:
        now = time.monotonic()
        last_epoch = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else "?"
        total_steps = trainer.estimated_stepping_batches
        parts = [f"epoch {trainer.current_epoch}/{last_epoch}" + (" done" if done else "")]
        parts.append(f"batch {self._batches_done}/{_count(self.total_train_batches)}")
        parts.append(f"step {trainer.global_step}/{_count(total_steps)}")
        if self._window_images and now > self._window_start:
            parts.append(f"{self._window_images / (now - self._window_start):.1f} img/s")
        self._restart_window()
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        if "train/loss" in metrics:
            parts.append(f"train/loss {metrics['train/loss']:.4f}")
        val = {letter: metrics["val/" + name] for letter, name in FIGURES if "val/" + name in metrics}
        if val:
            parts.append("val bits/dim " + " ".join(f"{letter} {value:.4f}" for letter, value in val.items()))
        elif "val/loss" in metrics:
            parts.append(f"val/loss {metrics['val/loss']:.4f}")
        steps_done = trainer.global_step - self._fit_step0
        if steps_done > 0 and math.isfinite(total_steps):
            eta = (now - self._fit_start) / steps_done * max(0, total_steps - trainer.global_step)
            parts.append(f"ETA {timedelta(seconds=round(eta))}")
        return "  ".join(parts)

    def _eval_batch(self, trainer: Trainer, stage: str, batch, batch_idx: int, total: float) -> None:
        self._window_images += len(batch) * trainer.world_size
        end = batch_idx + 1 == total
        if end or (batch_idx + 1) % self._every() == 0:
            rate = self._window_images / max(time.monotonic() - self._window_start, 1e-9)
            self._emit(f"{stage}  batch {batch_idx + 1}/{_count(total)}  {rate:.1f} img/s" + ("  done" if end else ""))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart_window()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "test", batch, batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._paused_at = time.monotonic()  # validation inside fit is kept out of the training images/s
        if trainer.state.fn == "validate":
            self._restart_window()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start += time.monotonic() - self._paused_at

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if trainer.state.fn == "validate":  # during fit, the epoch-end line reports validation
            self._eval_batch(trainer, "validate", batch, batch_idx, trainer.num_val_batches[dataloader_idx])
