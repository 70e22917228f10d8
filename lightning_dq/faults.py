"""Non-finite training steps: skip them on every rank together, count them, stop after too many in a row.

A NaN or inf in the loss or in any gradient skips that optimizer step (weights and optimizer state stay as
they were) on every DDP rank at once, and is counted in `train/skipped_steps`. After
`max_consecutive` skipped steps in a row the run stops with `TrainingDivergedError`; since no skipped step
changed anything, every checkpoint written so far holds finite weights, and `--ckpt_path last` resumes
from the last of them.

Why every rank agrees: DDP all-reduces gradients during backward, so a NaN in one rank's gradients is a
NaN in every rank's; the loss is per-rank, so its flag is summed over ranks with one scalar all-reduce.
The decision is therefore identical everywhere, and all ranks skip (or raise) together: no rank is left
waiting in a collective. The quantizer's codebooks are protected the same way (see
`lightning_dq.quantize.Codebook`). Cost: one scalar all-reduce and one host sync per optimizer step.

`KillAt` is a fault-injection callback for drills and tests: it SIGKILLs its own process at a given step.
"""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_dq.errors import ConfigError, UserError


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose loss or gradients are not finite, on every rank together.

    The check runs in `on_before_optimizer_step`, after backward (and DDP's gradient all-reduce) and before
    gradient clipping; a skipped step sets every gradient to None, which makes torch optimizers (Adam,
    AdamW, SGD, ...) leave the parameters and their state (moments, step count) untouched. Lightning still
    counts the step in `global_step`. Under fp16 mixed precision the GradScaler's own overflow skips are
    counted here too.

    Args:
        max_consecutive: stop the run after this many skipped steps in a row (0 = never stop).
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 0:
            raise ConfigError(f"non_finite_guard.max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0  # total over the run (saved in checkpoints)
        self.consecutive = 0  # skipped steps in a row, reset by a good step
        self._loss_finite: Tensor | None = None

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.consecutive = int(state_dict["consecutive"])

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # () bool, kept on the device
        # with gradient accumulation, one non-finite micro-batch spoils the accumulated gradient
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flags = [torch.isfinite(p.grad).all() for p in params]  # grads are already identical on all ranks
        if self._loss_finite is not None:
            flags.append(self._loss_finite.to(pl_module.device))
        bad = (~torch.stack(flags).all()).float() if flags else torch.zeros((), device=pl_module.device)
        bad = trainer.strategy.reduce(bad, reduce_op="sum")  # number of ranks that saw a non-finite value
        self._loss_finite = None
        if float(bad) > 0:  # the one host sync: the decision is identical on every rank
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"{self.consecutive} consecutive training steps (up to global step {trainer.global_step}) had a "
                f"non-finite loss or gradient and were skipped; stopping (non_finite_guard.max_consecutive="
                f"{self.max_consecutive}). The weights were not changed by those steps, so the checkpoints in "
                f"{_checkpoint_dir(trainer)} are finite: lower the learning rate or check the data, then resume "
                f"with --ckpt_path last"
            )


def _checkpoint_dir(trainer: Trainer) -> str:
    callback = trainer.checkpoint_callback
    return str(getattr(callback, "dirpath", None) or trainer.default_root_dir)


class KillAt(Callback):
    """Fault injection: SIGKILL this process when training reaches global step `step` (before that step
    runs). Only for drills and tests of resume; nothing is flushed, exactly like a preempted job.

    Args:
        step: global step at which to die.
        rank: only the process with this global rank dies (None: every rank).
    """

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)
