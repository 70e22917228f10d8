"""Training-control callbacks: when codebooks restart dead codes, which image size each epoch trains at,
and a learning-rate monitor that tolerates runs without a logger.

Callbacks talk to the model and data only through documented attributes: `Codebook` instances (found
by type) and the datamodule's `resolution`, `check_resolution` and `resolution_for_epoch`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from lightning_dq.errors import ConfigError
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
    checkpoint trains at the size of the epoch it resumes in. The milestones are saved in checkpoints and a
    resume with different ones is refused. `validate` and `test` with a checkpoint use the size of that
    checkpoint's epoch; without one, the last scheduled size.

    Checked before training: the Trainer rebuilds dataloaders every epoch
    (`reload_dataloaders_every_n_epochs: 1`), `data.init_args.resolution` equals the size of epoch 0, the
    data and the model serve every scheduled size, best-checkpoint ranking (`checkpoint.monitor`) compares
    epochs of the final size only, and one forward+backward at the largest size and the configured batch
    fits in memory (so an out-of-memory at 64x64 shows in the first minute, not at epoch 100). A fit at
    several sizes names the size in its epoch metric keys (`val/bpd_decoder_32px`; see lightning_dq.module).

    Args:
        milestones: first epoch of each stage -> image side for that stage. Must contain epoch 0.
        probe_largest: run the forward+backward memory check at the largest size when fitting.
    """

    def __init__(self, milestones: Mapping[int, int] | None = None, probe_largest: bool = True) -> None:
        self.milestones = dict(sorted((int(e), int(r)) for e, r in (milestones or {}).items()))
        if self.milestones and 0 not in self.milestones:
            raise ConfigError(
                f"resolution_schedule.milestones must start at epoch 0, got {self.milestones}; add 0: <size>"
            )
        if any(e < 0 or r < 1 for e, r in self.milestones.items()):
            raise ConfigError(f"resolution_schedule.milestones needs epochs >= 0 and sizes >= 1, got {self.milestones}")
        self.probe_largest = probe_largest

    @property
    def sizes(self) -> list[int]:
        return sorted(set(self.milestones.values()))

    def resolution_at(self, epoch: int) -> int:
        """Image side of epoch `epoch` under the schedule."""
        return [r for e, r in self.milestones.items() if e <= epoch][-1]

    def state_dict(self) -> dict:
        return {"milestones": self.milestones}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # validate/test: the size of the checkpoint's epoch. Lightning restores before it builds the
        # evaluation dataloaders, so the loaders already serve that size.
        if self.milestones and trainer.state.fn != "fit" and checkpoint.get("epoch") is not None:
            trainer.datamodule.resolution = self.resolution_at(checkpoint["epoch"])

    def load_state_dict(self, state_dict: dict) -> None:
        saved = {int(e): int(r) for e, r in state_dict.get("milestones", {}).items()}
        if saved != self.milestones:
            raise ConfigError(
                f"the checkpoint was trained with resolution_schedule.milestones={saved}, the config says "
                f"{self.milestones}: resume with the same milestones (--resolution_schedule.milestones='{saved}')"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.milestones:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "resolution_for_epoch"):
            raise ConfigError(
                "resolution_schedule needs a datamodule with a settable resolution (lightning_dq.data.ImageDataModule)"
            )
        sizes = self.sizes
        if stage == "fit" and len(sizes) > 1:
            if trainer.reload_dataloaders_every_n_epochs != 1:
                raise ConfigError(
                    f"resolution_schedule.milestones={self.milestones} changes the image size, which only takes "
                    f"effect if dataloaders are rebuilt each epoch: set trainer.reload_dataloaders_every_n_epochs=1 "
                    f"(it is {trainer.reload_dataloaders_every_n_epochs})"
                )
            self._check_monitor(trainer, sizes[-1])
        if stage == "fit" and datamodule.resolution != self.milestones[0]:
            raise ConfigError(
                f"data.init_args.resolution={datamodule.resolution} but resolution_schedule.milestones starts at "
                f"{self.milestones[0]} (epoch 0): set both to the same size"
            )
        net = getattr(pl_module, "net", None)
        for size in sizes:
            datamodule.check_resolution(size)
            if net is not None and hasattr(net, "check_resolution"):
                net.check_resolution(size)
        pl_module.size_in_keys = stage == "fit" and len(sizes) > 1
        if stage == "fit":
            datamodule.resolution_for_epoch = self.resolution_at
        else:  # validate/test/predict: the final size, or the checkpoint's epoch's size (on_load_checkpoint)
            datamodule.resolution_for_epoch = None
            datamodule.resolution = self.milestones[max(self.milestones)]

    @staticmethod
    def _check_monitor(trainer: Trainer, final: int) -> None:
        for callback in trainer.checkpoint_callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor.split("/")[0] in ("train", "val") and f"_{final}px" not in monitor:
                raise ConfigError(
                    f"checkpoint.monitor={monitor!r} would rank epochs trained at different sizes against each "
                    f"other: monitor a key of the final size, e.g. --checkpoint.monitor=val/loss_{final}px"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_largest and len(self.sizes) > 1 and hasattr(pl_module, "net"):
            probe_memory(trainer, pl_module, self.sizes[-1])


def probe_memory(trainer: Trainer, pl_module: LightningModule, side: int) -> None:
    """One forward+backward of the auto-encoder at `side` x `side` and the configured batch size, leaving no
    trace: codebook buffers, gradients and RNG states are restored afterwards."""
    batch = getattr(trainer.datamodule, "batch_size", 1)
    codebooks = {name: {k: v.clone() for k, v in m.state_dict().items()}
                 for name, m in pl_module.named_modules() if isinstance(m, Codebook)}  # fmt: skip
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=pl_module.device)
        try:
            with trainer.precision_plugin.forward_context():
                out = pl_module(x)
                loss = out.recon.mean() + pl_module.beta * out.commitment
            loss.backward()
        except torch.OutOfMemoryError as err:
            raise ConfigError(
                f"one training step at {side}x{side} (the largest size of resolution_schedule) with batch "
                f"{batch} runs out of memory: lower data.init_args.batch_size or use more devices ({err})"
            ) from None
    pl_module.zero_grad(set_to_none=True)
    modules = dict(pl_module.named_modules())
    for name, state in codebooks.items():
        modules[name].load_state_dict(state)


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


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for the run directory: `last.ckpt` every epoch, plus the best `save_top_k` by
    `monitor`, ranked only among epochs that logged `monitor`. In a progressive run, monitoring a key of the
    final size (`val/loss_64px`) so ranks only the final size's epochs; the other epochs still update
    `last.ckpt`. Saved at the end of the training epoch, after the epoch's train and val aggregates are
    logged, so the checkpoint and the metric record agree.

    Args: those of `lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args, save_on_train_epoch_end: bool | None = True, **kwargs) -> None:
        super().__init__(*args, save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            other_size = re.compile(re.sub(r"_\d+px", r"_\\d+px", re.escape(self.monitor)))
            if "px" in self.monitor and any(other_size.fullmatch(k) for k in monitor_candidates):
                return  # an epoch trained at another image size: not comparable
        super()._save_topk_checkpoint(trainer, monitor_candidates)
