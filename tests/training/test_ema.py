"""`EMA`: a known answer on a scalar driven by a fixed sequence of steps (with a resume in the middle), and, on the
real auto-encoder, validation figures that are those of the EMA weights with the live codebooks (`val`) and of the
raw weights with the same codebooks (`val_raw`)."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_dq.cli import build_cli, main
from lightning_dq.errors import ConfigError
from lightning_dq.training.checkpoints import atomic_save, load_checkpoint_file
from lightning_dq.training.ema import EMA
from tests.helpers import CONFIGS, debug_net


class Scalar(LightningModule):
    """One weight w under SGD at lr 1 with loss (epoch + 1) * w: w falls by 1, 2, 3, ... in epochs 0, 1, 2, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.register_buffer("steps", torch.zeros(()))  # a buffer: the EMA must leave it alone

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.current_epoch + 1) * self.w

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1))  # one step per epoch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def scalar_fit(epochs: int, ckpt_path=None, decay: float = 0.5) -> tuple[Scalar, Trainer]:
    trainer = Trainer(max_epochs=epochs, callbacks=[EMA(decay)], logger=False, enable_checkpointing=False)
    trainer.fit(model := Scalar(), ckpt_path=ckpt_path)
    return model, trainer


def test_ema_of_a_fixed_sequence_of_steps_resumes_exactly(tmp_path):
    # raw w: 0 -> -1 -> -3 -> -6 -> -10; EMA (decay 0.5, from w = 0): -0.5, -1.75, -3.875, -6.9375 (exact in binary)
    model, trainer = scalar_fit(4)
    assert model.w.item() == -6.9375 and model.steps.item() == 4  # after a fit the model holds the EMA
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    checkpoint = load_checkpoint_file(tmp_path / "end.ckpt")
    assert checkpoint["state_dict"]["w"].item() == -6.9375 and checkpoint["ema"]["raw"]["w"].item() == -10.0
    _, trainer = scalar_fit(2)  # -1, -3 raw; -0.5, -1.75 EMA
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = scalar_fit(4, tmp_path / "half.ckpt")
    assert resumed.w.item() == -6.9375 and resumed.steps.item() == 4
    with pytest.raises(ConfigError, match=r"ema.decay=0.5, the config says 0.25"):
        scalar_fit(4, tmp_path / "half.ckpt", decay=0.25)


CONFIG = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
SMALL = ["--trainer.enable_model_summary=false", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]


def validated(root, ckpt) -> dict[str, float]:
    """`validate` of a checkpoint through the real CLI's classes."""
    cli = build_cli([*CONFIG, *SMALL, f"--trainer.default_root_dir={root}"], run=False)
    return cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)[0]


def test_validation_reports_ema_and_raw_weights_with_the_live_codebooks(tmp_path):
    root = tmp_path / "fit"
    main(["fit", *CONFIG, *SMALL, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2", "--ema.decay=0.8"])
    with (root / "metrics.csv").open(newline="") as f:
        last = [r for r in csv.DictReader(f) if r.get("val/bpd_decoder")][-1]
    ckpt = root / "checkpoints" / "last.ckpt"  # saved after the last validation; holds the codebooks it used
    checkpoint = load_checkpoint_file(ckpt)
    assert checkpoint["ema"]["raw"].keys() == {f"net.{name}" for name, _ in debug_net().named_parameters()}
    ema = validated(tmp_path / "v1", ckpt)
    assert ema["val/bpd_decoder"] == pytest.approx(float(last["val/bpd_decoder"]), abs=1e-5)
    checkpoint["state_dict"].update(checkpoint["ema"]["raw"])
    atomic_save(checkpoint, tmp_path / "raw.ckpt")
    raw = validated(tmp_path / "v2", tmp_path / "raw.ckpt")
    assert raw["val/bpd_decoder"] == pytest.approx(float(last["val_raw/bpd_decoder"]), abs=1e-5)
    assert abs(raw["val/bpd_decoder"] - ema["val/bpd_decoder"]) > 1e-3  # two different sets of weights
