"""Training-control callbacks: when codebooks restart dead codes, a check that DDP ranks hold identical codebooks
and EMA weights, and non-finite steps skipped on every rank together."""

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_dq.errors import ConfigError, TrainingDivergedError
from lightning_dq.nn.codebook import Codebook
from lightning_dq.nn.distributed import is_distributed
from lightning_dq.training.ema import EMA


class CodebookReset(Callback):
    """Decides *when* dead codes are restarted; `Codebook.restart_dead_codes` decides *how*.

    Args:
        every_n_steps: allow restarts on every n-th training step (1 = every step, as in the paper's code); the
            other steps only do the EMA update.
        stop_after_step: no restarts from this global step on (None = never), so evaluation sees unperturbed codebooks.
    """

    def __init__(self, every_n_steps: int = 1, stop_after_step: int | None = None) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"codebook_reset.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.stop_after_step = stop_after_step

    def enabled_at(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and (self.stop_after_step is None or step < self.stop_after_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        enabled = self.enabled_at(trainer.global_step)
        for module in pl_module.modules():
            if isinstance(module, Codebook):
                module.restart_enabled = enabled


def out_of_sync(states: dict[str, Tensor]) -> dict[str, float]:
    """Name -> largest difference between DDP ranks, for each tensor that differs (a collective; {} in sync)."""
    out = {}
    for name, state in sorted(states.items()) if is_distributed() else ():
        state = state.detach().flatten().double()
        gathered = [torch.empty_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, state)
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if diff > 0:
            out[name] = diff
    return out


def replica_states(pl_module: LightningModule, trainer: Trainer | None = None) -> dict[str, Tensor]:
    """What every DDP rank must hold alike beyond what DDP syncs: each `Codebook`'s state and the EMA weights."""
    codebooks = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, Codebook)]
    states = {n: torch.cat([m.embed.flatten(), m.cluster_size.flatten(), m.embed_avg.flatten()]) for n, m in codebooks}
    for ema in [c for c in trainer.callbacks if isinstance(c, EMA) and c.shadow] if trainer else []:
        states["ema"] = torch.cat([t.flatten() for t in ema.shadow.values()])
    return states


class CodebookSyncCheck(Callback):
    """Under DDP, check at the end of every n-th training epoch that all ranks hold identical codebooks and EMA
    weights, and stop with an error naming what differs if not (e.g. a custom quantizer that skips the all-reduce).

    Args:
        every_n_epochs: how often to compare (0 disables); one all-gather per codebook.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs < 1 or trainer.current_epoch % self.every_n_epochs:
            return
        drift = out_of_sync(replica_states(pl_module, trainer))
        if drift:
            raise RuntimeError(f"DDP ranks differ after epoch {trainer.current_epoch}: {drift}")


class NonFiniteGuard(Callback):
    """Skip optimizer steps with a non-finite loss or gradient, on every rank together; stop after too many in a row.
    Runs after backward (and DDP's gradient all-reduce), before clipping; the flag is summed over ranks, so every rank
    decides alike. A skipped step sets every gradient to None: parameters and optimizer state stay untouched (every
    checkpoint holds finite weights); counted in `train/skipped_steps`. Cost: one scalar all-reduce and one host sync.

    Args:
        max_consecutive: stop with `TrainingDivergedError` after this many skipped steps in a row (0 = never).
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
