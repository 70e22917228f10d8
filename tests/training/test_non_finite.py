"""Non-finite steps: Adam skips parameters whose grad is None; `NonFiniteGuard` skips a step with a NaN on
one of 2 gloo ranks on both ranks, counts it, and stops both ranks together after N consecutive skips."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_dq.errors import TrainingDivergedError
from lightning_dq.nn.quantizer import DepthwiseQuantizer
from lightning_dq.training.callbacks import NonFiniteGuard


def test_adam_leaves_parameters_and_state_alone_when_grad_is_none():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    after_one = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    w.grad = None  # what NonFiniteGuard does to a skipped step
    opt.step()
    assert torch.equal(w.detach(), after_one)
    for key, value in opt.state[w].items():
        assert torch.equal(value, state[key]), key
    assert float(opt.state[w]["step"]) == 1.0


class TinyQuantized(LightningModule):
    """conv -> DQ quantizer -> conv; rank `bad_rank` gets a NaN input at the global steps in `bad_steps`."""

    def __init__(self, bad_rank: int, bad_steps: set[int]) -> None:
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 4, 1)
        self.quantizer = DepthwiseQuantizer(4, num_codebooks=2, codebook_size=4, code_dim=2)
        self.dec = torch.nn.Conv2d(4, 3, 1)
        self.bad_rank, self.bad_steps = bad_rank, bad_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.clone()  # (B, 3, 2, 2)
        if self.global_rank == self.bad_rank and self.global_step in self.bad_steps:
            x[0, 0, 0, 0] = float("nan")
        out = self.quantizer(self.enc(x))
        return (self.dec(out.quantized) - x).pow(2).mean() + 0.25 * out.commitment

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(rank: int, out_dir: str, bad_steps: set[int], max_steps: int) -> dict:
    torch.manual_seed(0)
    model = TinyQuantized(bad_rank=1, bad_steps=bad_steps)
    data = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(rank))
    guard = NonFiniteGuard(max_consecutive=3)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out_dir, "checkpoints"), every_n_train_steps=1, save_last=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        logger=False,
        callbacks=[guard, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    error = None
    try:
        trainer.fit(model, DataLoader(data, batch_size=4))
    except TrainingDivergedError as err:
        error = str(err)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "state": state,
        "skipped": guard.skipped_steps,
        "step": trainer.global_step,
        "error": error,
        "logged": float(trainer.callback_metrics.get("train/skipped_steps", -1)),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    # torchrun-style environment: Lightning joins these processes instead of launching its own
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    once = _fit(rank, os.path.join(out_dir, "once"), bad_steps={2, 5}, max_steps=8)
    diverged = _fit(rank, os.path.join(out_dir, "diverged"), bad_steps=set(range(3, 100)), max_steps=50)
    torch.save({"once": once, "diverged": diverged}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.xdist_group("sockets")
def test_nan_on_one_rank_skips_on_both_and_stops_both_together(tmp_path, free_port):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)  # returns: nobody hangs
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for run in ("once", "diverged"):
        for name, value in results[0][run]["state"].items():
            assert torch.equal(value, results[1][run]["state"][name]), f"{run}: {name} differs between ranks"
            assert torch.isfinite(value.float()).all(), f"{run}: {name}"
    # NaN at steps 2 and 5 on rank 1 only: both ranks skipped both steps and trained on
    for r in results:
        once = r["once"]
        assert once["error"] is None and once["step"] == 8
        assert once["skipped"] == 2 and once["logged"] == 2.0
    # NaN from step 3 on: both ranks stop after 3 consecutive skips, at the same step, with the same error
    for r in results:
        diverged = r["diverged"]
        assert diverged["skipped"] == 3 and "3 consecutive training steps" in diverged["error"]
        assert "--ckpt_path last" in diverged["error"]
        assert diverged["step"] == 5  # steps 3 and 4 were counted by Lightning; step 5 raised before stepping
    last = torch.load(tmp_path / "diverged" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    for name, value in last["state_dict"].items():
        assert torch.isfinite(value.float()).all(), name
        # the skipped steps changed nothing: the last checkpoint holds the weights the run stopped with
        assert torch.equal(value, results[0]["diverged"]["state"][name]), name


def test_single_process_skip_with_gradient_clipping():
    torch.manual_seed(0)
    model = TinyQuantized(bad_rank=0, bad_steps={1})
    guard = NonFiniteGuard(max_consecutive=2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        gradient_clip_val=2.0,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(torch.randn(16, 3, 2, 2), batch_size=4))
    assert trainer.global_step == 3 and guard.skipped_steps == 1 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b.float()).all() for b in model.quantizer.codebook.buffers())
