"""Evaluation under DDP counts every image exactly once: 2 real gloo processes (Lightning's DDP launcher),
validation during `fit` (sanity check and every epoch), `validate` and `test`, splits not divisible by the
world size and splits smaller than it (a rank with no image gets an empty batch and nobody hangs).

The test runs this file as a script; Lightning re-runs it as rank 1. Each rank records a digest of every
image it was served, the batch sizes and the epoch total all-reduced by torchmetrics (a collective that
hangs if one rank skips its evaluation loop)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torchmetrics import SumMetric

from lightning_dq.data import ImageDataModule
from lightning_dq.data.arrays import ImageArrayDataset
from lightning_dq.data.samplers import EvenShardSampler
from tests.helpers import REPO, config_args

pytestmark = pytest.mark.xdist_group("sockets")
BATCH = 4
# name -> (trainer call, synthetic_train, val_size, synthetic_test): val 13 and test 7 are odd (Lightning's
# DistributedSampler would repeat one image), val 1 and test 1 are smaller than the world size
RUNS = {
    "fit13": ("fit", 40, 13, 7),
    "fit1": ("fit", 20, 1, 7),
    "validate13": ("validate", 40, 13, 7),
    "test7": ("test", 40, 13, 7),
    "test1": ("test", 40, 13, 1),
}


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16]


def data(run: str) -> ImageDataModule:
    _, train, val, test = RUNS[run]
    return ImageDataModule(
        "synthetic",
        batch_size=BATCH,
        num_workers=0,
        resolution=8,
        synthetic_train=train,
        val_size=val,
        synthetic_test=test,
    )


class Recorder(LightningModule):
    """Records what every evaluation step of this rank receives, and the all-reduced epoch image count."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.images = SumMetric()
        self.steps: list[dict] = []
        self.totals: list[dict] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.w * batch.float().mean()

    def _evaluate(self, batch: torch.Tensor, stage: str) -> None:
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 8, 8)
        phase = "sanity" if self.trainer.sanity_checking else f"{stage}{self.current_epoch}"
        self.steps.append({"phase": phase, "size": len(batch), "digests": [digest(x) for x in batch]})
        self.images.update(torch.tensor(float(len(batch))))

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        phase = "sanity" if self.trainer.sanity_checking else f"{stage}{self.current_epoch}"
        self.totals.append({"phase": phase, "images": int(self.images.compute())})  # all-reduced over ranks
        self.images.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_all(out: Path) -> None:
    """Every run of RUNS with one 2-process DDP Trainer each (rank 0 launches rank 1 on the first)."""
    for run, (call, *_) in RUNS.items():
        model = Recorder()
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=2,
            limit_train_batches=2,
            num_sanity_val_steps=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        getattr(trainer, call)(model, datamodule=data(run))
        record = {"steps": model.steps, "totals": model.totals, "world": trainer.world_size}
        (out / f"{run}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def split_digests(run: str, split: str) -> list[str]:
    dm = data(run)
    dm.setup("test" if split == "test" else "fit")
    dataset = getattr(dm, f"{split}_dataloader")().dataset
    return [digest(dataset[i]) for i in range(len(dataset))]


def test_every_image_once_on_two_ranks(tmp_path, free_port):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, (call, *_) in RUNS.items():
        split = "test" if call == "test" else "val"
        expected = sorted(split_digests(name, split))
        assert len(set(expected)) == len(expected)  # distinct images: a repeat would show below
        ranks = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2]
        phases = {"fit": ["sanity", "val0", "val1"], "validate": ["val0"], "test": ["test0"]}[call]
        for phase in phases:
            steps = [[s for s in r["steps"] if s["phase"] == phase] for r in ranks]
            seen = sorted(d for rank_steps in steps for s in rank_steps for d in s["digests"])
            assert seen == expected, (name, phase)  # every image exactly once over both ranks
            assert len(steps[0]) == len(steps[1]) >= 1  # the same number of batches on both ranks
            assert all(s["size"] <= BATCH for rank_steps in steps for s in rank_steps)
            totals = [next(t["images"] for t in r["totals"] if t["phase"] == phase) for r in ranks]
            assert totals == [len(expected)] * 2  # the all-reduced count: no hang, no double count
    sizes = [[s["size"] for s in json.loads((tmp_path / f"test1_rank{r}.json").read_text())["steps"]] for r in (0, 1)]
    assert sizes == [[1], [0]]  # 1 test image, 2 ranks: rank 1 evaluates one empty batch


@pytest.mark.slow  # a second 2-process launch (2 minutes on the loaded shared CPUs); the data part is tested above
def test_cli_fit_validation_smaller_than_the_world(tmp_path, free_port):
    """The real console entry and model: 1 validation image on 2 ranks is counted once (Lightning's sampler
    would serve it to both), and the rank with the empty batch neither hangs nor fails."""
    args = [
        "fit",
        *config_args("base", "ddp", "debug"),
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.val_size=1",
        "--trainer.limit_val_batches=1.0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    run = subprocess.run(
        [sys.executable, "-m", "lightning_dq.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.csv")
    counts = [float(row["val/num_images"]) for row in csv.DictReader(metrics.open()) if row.get("val/num_images")]
    assert counts == [1.0]


@pytest.mark.parametrize(
    ("n", "world", "batch", "batches", "empty"),
    [(13, 2, 4, 2, 0), (37, 2, 8, 3, 0), (64, 3, 8, 3, 0), (1, 2, 4, 1, 1), (5, 4, 1, 2, 3), (0, 2, 4, 0, 0)],
)
def test_even_shard_sampler_partitions_exactly(n, world, batch, batches, empty):
    dataset = ImageArrayDataset(np.zeros((n, 3, 2, 2), np.uint8), 2)
    per_rank = [list(EvenShardSampler(dataset, batch, num_replicas=world, rank=r)) for r in range(world)]
    assert [i for rank in per_rank for b in rank for i in b] == list(range(n))  # contiguous shards, each once
    assert [len(rank) for rank in per_rank] == [batches] * world  # ceil(ceil(n / world) / batch) on every rank
    assert all(len(b) <= batch for rank in per_rank for b in rank)
    assert sum(len(b) == 0 for rank in per_rank for b in rank) == empty  # only where a shard is too short
    if n:  # a DataLoader with batch_size=None serves these lists as whole uint8 batches, empty ones included
        last = EvenShardSampler(dataset, batch, num_replicas=world, rank=world - 1)  # the shortest shard
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=last)
        assert [tuple(x.shape) for x in loader] == [(len(b), 3, 2, 2) for b in per_rank[-1]]


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))
