"""Training-control callbacks: when codebooks restart dead codes, a check that DDP ranks hold identical codebooks,
non-finite steps skipped on every rank together, and a learning-rate monitor that tolerates no logger."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import Tensor

from lightning_dq.errors import ConfigError, TrainingDivergedError
from lightning_dq.nn.codebook import Codebook
from lightning_dq.nn.distributed import is_distributed


class CodebookReset(Callback):
    """Decides *when* dead codes are restarted; `Codebook.restart_dead_codes` decides *how*.

    Args:
        every_n_steps: allow restarts on every n-th training step (1 = every step, as in the paper's code); the
            other steps only do the EMA update.
        stop_after_step: no restarts from this global step on (None = never stop), so the final codebooks are not
            perturbed right before evaluation.
    """

    def __init__(self, every_n_steps: int = 1, stop_after_step: int | None = None) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"codebook_reset.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.stop_after_step = stop_after_step

    def enabled_at(self, step: int) -> bool:
        """Whether restarts are allowed at global step `step`."""
        return step % self.every_n_steps == 0 and (self.stop_after_step is None or step < self.stop_after_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        enabled = self.enabled_at(trainer.global_step)
        for module in pl_module.modules():
            if isinstance(module, Codebook):
                module.restart_enabled = enabled


def codebooks_out_of_sync(module: torch.nn.Module) -> dict[str, float]:
    """The `Codebook`s whose state differs between DDP ranks -> the largest difference (a collective; empty when the
    quantizer's synchronisation works)."""
    if not is_distributed():
        return {}
    out = {}
    for name, cb in sorted((n, m) for n, m in module.named_modules() if isinstance(m, Codebook)):
        state = torch.cat([cb.embed.flatten(), cb.cluster_size.flatten(), cb.embed_avg.flatten()]).double()
        gathered = [torch.empty_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, state)
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if diff > 0:
            out[name] = diff
    return out


class CodebookSyncCheck(Callback):
    """Under DDP, check at the end of every n-th training epoch that all ranks hold identical codebooks, and stop
    with an error naming the codebook if not (e.g. a custom quantizer that skips the all-reduce).

    Args:
        every_n_epochs: how often to compare (0 disables); one all-gather of the codebooks.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs < 1 or trainer.current_epoch % self.every_n_epochs:
            return
        drift = codebooks_out_of_sync(pl_module)
        if drift:
            raise RuntimeError(f"codebooks differ across DDP ranks after epoch {trainer.current_epoch}: {drift}")


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose loss or gradients are not finite, on every rank together; stop after too many
    in a row.

    Runs after backward (and DDP's gradient all-reduce) and before clipping; the loss flag is summed over ranks, so
    every rank decides the same. A skipped step sets every gradient to None, which leaves the parameters and the
    optimizer state untouched (so every checkpoint holds finite weights), and counts in `train/skipped_steps`.
    Cost: one scalar all-reduce and one host sync per optimizer step.

    Args:
        max_consecutive: stop the run with `TrainingDivergedError` after this many skipped steps in a row
            (0 = never stop).
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
        ok = torch.ones((), dtype=torch.bool, device=pl_module.device)
        if params:  # the max-norm is NaN or inf exactly when a gradient holds one (and cannot overflow)
            ok = torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params], float("inf"), foreach=True))
        if self._loss_finite is not None:
            ok = ok & self._loss_finite.to(ok.device)
        self._loss_finite = None
        bad = trainer.strategy.reduce((~ok).float(), reduce_op="sum")  # ranks that saw a non-finite value
        if float(bad) > 0:  # the one host sync: the decision is the same on every rank
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
            raise TrainingDivergedError(
                f"{self.consecutive} consecutive training steps (up to global step {trainer.global_step}) had a "
                f"non-finite loss or gradient and were skipped; stopping (non_finite_guard.max_consecutive="
                f"{self.max_consecutive}). Those steps changed no weight, so the checkpoints in {folder} are finite: "
                f"lower the learning rate or check the data, then resume with --ckpt_path last"
            )


class LearningRateLogger(LearningRateMonitor):
    """`LearningRateMonitor` that stays silent when the run has no logger (e.g. `--trainer.logger=false`)."""

    def on_train_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
