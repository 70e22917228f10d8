"""lightning_dq.training.resolution: `ResolutionSchedule` alone sets the data size per epoch (train and val), and
names the size in the keys of a fit at several sizes (CLI runs: tests/training/test_runs.py)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_dq.data import ImageDataModule
from lightning_dq.errors import ConfigError
from lightning_dq.training.resolution import ResolutionSchedule, sized_key


class ShapeRecorder(LightningModule):
    """Records what each step receives; the loss is a dummy so the Trainer has something to optimise."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[str, int, torch.Tensor]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(("train", self.current_epoch, batch.clone()))
        return self.w * batch.float().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen.append(("val", self.current_epoch, batch.clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resolution_follows_the_epoch_under_a_trainer():
    dm = ImageDataModule(
        "synthetic", batch_size=8, num_workers=0, synthetic_train=40, val_size=8, resolution=8, native_resolution=16
    )
    model = ShapeRecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ResolutionSchedule({0: 8, 1: 16})],
    )
    trainer.fit(model, datamodule=dm)
    sizes = {(stage, epoch, x.shape[-1]) for stage, epoch, x in model.seen}
    stages = ("train", "val")
    assert sizes == {(s, 0, 8) for s in stages} | {(s, e, 16) for s in stages for e in (1, 2)}
    assert all(x.dtype == torch.uint8 and x.shape[:2] == (8, 3) for _, _, x in model.seen)
    first = {epoch: x for stage, epoch, x in model.seen if stage == "train" and x.shape[0] == 8}
    assert not torch.equal(first[1], first[2])  # a reloaded train loader reshuffles: epochs differ
    assert model.epoch_key_suffix == "_16px" if hasattr(model, "epoch_key_suffix") else True


def test_monitor_key_gets_the_final_size_only_when_sizes_change():
    schedule = ResolutionSchedule({0: 32, 10: 64})
    assert schedule.monitor_key("val/loss") == "val/loss_64px"
    assert schedule.monitor_key("train/loss_epoch") == "train/loss_64px_epoch"
    assert schedule.monitor_key("val/loss_32px") == "val/loss_32px"  # a size the user named is kept
    assert schedule.monitor_key("test/loss") == "test/loss"
    assert ResolutionSchedule({0: 32}).monitor_key("val/loss") == "val/loss"
    assert sized_key("val/bpd_decoder", 16) == "val/bpd_decoder_16px"
    with pytest.raises(ConfigError, match="needs epoch 0"):
        ResolutionSchedule({1: 32})
