"""`ResolutionSchedule`, the owner of image sizes: it alone sets the data's `resolution`, checks that data and model
serve every size, and names the size in the epoch keys of a fit at several sizes (`val/bpd_decoder_32px`)."""

import re
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dq.errors import ConfigError
from lightning_dq.nn.codebook import Codebook

SIZED = re.compile(r"_\d+px(?=(_epoch)?$)")


def sized_key(key: str, side: int) -> str:
    """`val/loss` -> `val/loss_64px`, `train/loss_epoch` -> `train/loss_64px_epoch`."""
    return re.sub(r"(_epoch)?$", f"_{side}px\\1", key, count=1)


class ResolutionSchedule(Callback):
    """Train one model progressively at increasing image sizes: epoch milestones -> resolution. `{0: 32, 100: 64}`
    trains at 32x32 for epochs 0-99, at 64x64 from 100 on; validation follows. The milestones are saved in checkpoints
    (a resume with others is refused); `validate`/`test` of a checkpoint run at its epoch's size. Before a fit at
    several sizes: loaders must be rebuilt each epoch, `data.init_args.resolution` must be epoch 0's, a
    `checkpoint.monitor` without a size gets the final one (`val/loss_64px`), and one forward+backward at the largest
    size and batch checks the memory (an out-of-memory at 64x64 shows in the first minute, not epoch 100).

    Args:
        milestones: first epoch of each stage -> image side for that stage; must contain epoch 0.
        probe_largest: run the forward+backward memory check at the largest size when fitting.
    """

    def __init__(self, milestones: Mapping[int, int] | None = None, probe_largest: bool = True) -> None:
        self.milestones = dict(sorted((int(e), int(r)) for e, r in (milestones or {}).items()))
        if self.milestones and (min(self.milestones) != 0 or min(self.milestones.values()) < 1):
            raise ConfigError(
                f"resolution_schedule.milestones needs epoch 0 and epochs >= 0 -> sizes >= 1, got {self.milestones}"
            )
        self.probe_largest = probe_largest
        self._epoch = 0  # the epoch a run resumed from a checkpoint of this fit trains in (saved in checkpoints)

    @property
    def sizes(self) -> list[int]:
        return sorted(set(self.milestones.values()))

    def resolution_at(self, epoch: int) -> int:
        return [r for e, r in self.milestones.items() if e <= epoch][-1]

    def monitor_key(self, monitor: str | None) -> str | None:
        """The key checkpoints rank by: in a fit at several sizes, a train/val key without a size gets the final one."""
        if len(self.sizes) < 2 or not monitor or monitor.split("/")[0] not in ("train", "val") or SIZED.search(monitor):
            return monitor
        return sized_key(monitor, self.sizes[-1])

    def state_dict(self) -> dict:
        return {"milestones": self.milestones, "epoch": self._epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = {int(e): int(r) for e, r in state_dict.get("milestones", {}).items()}
        if saved != self.milestones:
            raise ConfigError(
                f"the checkpoint was trained with resolution_schedule.milestones={saved}, the config says "
                f"{self.milestones}: resume with the same milestones (--resolution_schedule.milestones='{saved}')"
            )
        self._epoch = int(state_dict.get("epoch", 0))

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # validate/test: the size of the checkpoint's epoch (restored before the evaluation loaders are built)
        if self.milestones and trainer.state.fn != "fit" and checkpoint.get("epoch") is not None:
            trainer.datamodule.resolution = self.resolution_at(checkpoint["epoch"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.milestones:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "resolution"):
            raise ConfigError("resolution_schedule needs a datamodule with a settable `resolution` (ImageDataModule)")
        configured = datamodule.resolution
        for size in self.sizes:
            datamodule.resolution = size  # a ConfigError when the data cannot serve this size
        datamodule.resolution = self.milestones[0] if stage == "fit" else self.milestones[max(self.milestones)]
        if stage != "fit":
            return
        if configured != self.milestones[0]:
            raise ConfigError(
                f"data.init_args.resolution={configured} but resolution_schedule.milestones starts at "
                f"{self.milestones[0]} (epoch 0): set both to the same size"
            )
        if len(self.sizes) > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                f"resolution_schedule.milestones={self.milestones} changes the image size, which only takes effect if "
                f"dataloaders are rebuilt each epoch: set trainer.reload_dataloaders_every_n_epochs=1 (it is "
                f"{trainer.reload_dataloaders_every_n_epochs})"
            )
        for callback in trainer.checkpoint_callbacks:
            callback.monitor = self.monitor_key(callback.monitor)

    def _check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The model's down-sampling must serve every size (the prior's auto-encoder is known only from here on)."""
        net = getattr(pl_module, "code_net", None)
        for size in self.sizes or [getattr(trainer.datamodule, "resolution", None)]:
            if net is not None and size is not None:
                try:
                    net.geometry.check(size)
                except ConfigError as err:
                    raise ConfigError(f"data.init_args.resolution={size} does not fit the model: {err}") from None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_model(trainer, pl_module)
        if self.milestones:  # Lightning restores its loops after this hook, so the epoch comes from our state
            trainer.datamodule.resolution = self.resolution_at(self._epoch)
        if len(self.sizes) > 1:  # a run resumed mid-epoch does not start that epoch again
            pl_module.epoch_key_suffix = sized_key("", self.resolution_at(self._epoch))
        if self.probe_largest and len(self.sizes) > 1 and hasattr(pl_module, "beta"):
            probe_memory(trainer, pl_module, self.sizes[-1])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._check_model(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_model(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = trainer.current_epoch
        if len(self.sizes) > 1:  # the epoch's keys name its size, so each size is its own curve
            pl_module.epoch_key_suffix = sized_key("", self.resolution_at(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = trainer.current_epoch + 1  # runs before the checkpoint callbacks save this state
        if self.milestones:  # the next epoch's loaders are built at its start, after this hook
            trainer.datamodule.resolution = self.resolution_at(self._epoch)


def probe_memory(trainer: Trainer, pl_module: LightningModule, side: int) -> None:
    """One forward+backward at `side` and the configured batch, leaving no trace (codebooks, gradients, RNG reset)."""
    batch = getattr(trainer.datamodule, "batch_size", 1)
    codebooks = [m for m in pl_module.modules() if isinstance(m, Codebook)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in codebooks]
    with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
        x = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=pl_module.device)
        try:
            with trainer.precision_plugin.forward_context():
                loss = pl_module(x).loss(pl_module.beta)
            loss.backward()
        except torch.OutOfMemoryError as err:
            raise ConfigError(
                f"one training step at {side}x{side} (the largest size of resolution_schedule) with batch {batch} runs "
                f"out of memory: lower data.init_args.batch_size or use more devices ({err})"
            ) from None
    pl_module.zero_grad(set_to_none=True)
    for codebook, state in zip(codebooks, saved, strict=True):
        codebook.load_state_dict(state)
