"""Training-control callbacks: when codebooks restart dead codes, which image size each epoch trains at,
and a learning-rate monitor that tolerates runs without a logger.

Callbacks talk to the model and data only through documented attributes: `Codebook` instances (found
by type) and the datamodule's `resolution`, `check_resolution` and `resolution_for_epoch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dq.quantize import Codebook


class CodebookReset(Callback):
    """Decides *when* dead codes are restarted; `Codebook.restart_dead_codes` decides *how*.

    Args:
        every_n_steps: allow restarts on every n-th training step (1 = every step, as in the paper's
            code). The other steps only do the EMA update.
        stop_after_step: no restarts from this global step on (None = never stop), so the final
            codebooks are not perturbed right before evaluation.
    """

    def __init__(self, every_n_steps: int = 1, stop_after_step: int | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"codebook_reset.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.stop_after_step = every_n_steps, stop_after_step

    def enabled_at(self, step: int) -> bool:
        """Whether restarts are allowed at global step `step`."""
        return step % self.every_n_steps == 0 and (self.stop_after_step is None or step < self.stop_after_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        enabled = self.enabled_at(trainer.global_step)
        for module in pl_module.modules():
            if isinstance(module, Codebook):
                module.restart_enabled = enabled


def codebooks_out_of_sync(module: torch.nn.Module) -> dict[str, float]:
    """Names of the `Codebook`s whose state differs between DDP ranks -> largest absolute difference.

    A collective: every rank must call it. Empty in a single process, and empty under DDP when the
    quantizer's synchronisation works (it makes the codebooks bit-identical on every rank).
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
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
    """Under DDP, verify at the end of every n-th training epoch that all ranks hold identical codebooks,
    and stop with an error naming the codebook if not (e.g. a custom quantizer that skips the all-reduce).

    Args:
        every_n_epochs: how often to compare (0 disables). Costs one all-gather of the codebooks.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs < 1 or trainer.current_epoch % self.every_n_epochs:
            return
        drift = codebooks_out_of_sync(pl_module)
        if drift:
            raise RuntimeError(f"codebooks differ across DDP ranks after epoch {trainer.current_epoch}: {drift}")


class ResolutionSchedule(Callback):
    """Train one model progressively at increasing image sizes: epoch milestones -> resolution.

    `milestones={0: 32, 100: 64}` trains at 32x32 for epochs 0-99 and at 64x64 from epoch 100 on;
    validation follows the training size. An empty mapping leaves the datamodule's resolution alone.

    The resolution is a function of the epoch, handed to the datamodule as `resolution_for_epoch`, which
    the datamodule consults each time Lightning (re)builds a dataloader; so a run resumed from a
    checkpoint trains at the size of the epoch it resumes in. `validate` and `test` outside `fit` use the
    last scheduled size (the model's final training size). The Trainer must rebuild dataloaders
    every epoch (`reload_dataloaders_every_n_epochs: 1`); `setup` fails early otherwise, and when the
    data or the model cannot serve a scheduled size.

    Args:
        milestones: first epoch of each stage -> image side for that stage. Must contain epoch 0.
    """

    def __init__(self, milestones: Mapping[int, int] | None = None) -> None:
        self.milestones = dict(sorted((int(e), int(r)) for e, r in (milestones or {}).items()))
        if self.milestones and 0 not in self.milestones:
            raise ValueError(
                f"resolution_schedule.milestones must start at epoch 0, got {self.milestones}; add 0: <size>"
            )

    def resolution_at(self, epoch: int) -> int:
        """Image side of epoch `epoch` under the schedule."""
        return [r for e, r in self.milestones.items() if e <= epoch][-1]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.milestones:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "resolution_for_epoch"):
            raise MisconfigurationException(
                "resolution_schedule needs a datamodule with a settable resolution (lightning_dq.data.ImageDataModule)"
            )
        sizes = sorted(set(self.milestones.values()))
        if stage == "fit" and len(sizes) > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise MisconfigurationException(
                f"resolution_schedule.milestones={self.milestones} changes the image size, which only takes "
                f"effect if dataloaders are rebuilt each epoch: set trainer.reload_dataloaders_every_n_epochs=1 "
                f"(it is {trainer.reload_dataloaders_every_n_epochs})"
            )
        net = getattr(pl_module, "net", None)
        for size in sizes:
            datamodule.check_resolution(size)
            if net is not None and hasattr(net, "check_resolution"):
                net.check_resolution(size)
        if stage == "fit":
            datamodule.resolution_for_epoch = self.resolution_at
        else:  # validate/test/predict evaluate the trained model at the size training ended with
            datamodule.resolution_for_epoch = None
            datamodule.resolution = self.milestones[max(self.milestones)]


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
