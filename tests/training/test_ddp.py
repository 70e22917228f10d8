"""Lightning DDP with 2 CPU processes (gloo): identical codebooks on every rank, exact test counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_dq.nn.quantizer import DepthwiseQuantizer
from lightning_dq.training.callbacks import out_of_sync, replica_states
from tests.helpers import CONFIGS

# tests that open sockets run in one xdist worker (`--dist loadgroup`): a port picked as free in one
# process can otherwise be taken by another test's gloo connections before it is bound
pytestmark = pytest.mark.xdist_group("sockets")


def _sync_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": DepthwiseQuantizer(4, 2, 8, 2), "b": DepthwiseQuantizer(4, 2, 8, 2)})
    ema = {"ema": torch.arange(3.0)}  # as `replica_states` adds a fit's EMA weights
    before = out_of_sync(replica_states(model) | ema)
    if rank == 1:  # corrupt one codebook and one EMA weight on one rank only
        model["b"].codebook.embed[0, 0, 0] += 0.5
        ema["ema"][2] += 0.25
    after = out_of_sync(replica_states(model) | ema)
    torch.save({"before": before, "after": after}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sync_check_detects_a_drifted_codebook(tmp_path, free_port):
    mp.spawn(_sync_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["before"] == {}
        assert result["after"] == {"b.codebook": pytest.approx(0.5), "ema": 0.25}


def _cli(*args: str, cwd: Path, port: int) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process: Lightning's DDP launcher re-runs it per rank
    (MASTER_PORT set: Lightning would otherwise pick an ephemeral port, see conftest.free_port)."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "lightning_dq.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_lightning_ddp_two_cpu_processes(tmp_path, free_port):
    layered = [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "ddp.yaml"),
        "--config",
        str(CONFIGS / "debug.yaml"),
        "--trainer.devices=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.synthetic_test=37",
        "--data.init_args.batch_size=8",
    ]
    fit = _cli("fit", *layered, "--trainer.max_epochs=2", "--ema.decay=0.9", cwd=tmp_path, port=free_port())
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "MEMBER: 2/2" in fit.stderr  # two processes really ran
    # CodebookSyncCheck (on by default) compared the ranks' codebooks and EMA weights after every epoch, no error
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    evaluate = ["test", *layered, f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=1.0"]
    test = _cli(*evaluate, cwd=tmp_path, port=free_port())
    assert test.returncode == 0, test.stderr[-3000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    # 37 images, batch 8, 2 ranks: every test image exactly once (no padding duplicates)
    assert report["num_images"] == 37 and report["whole_split"]
