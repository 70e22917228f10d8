"""The multi-node code path on one machine: two `torchrun --nnodes=2 --nproc_per_node=1` launches (node ranks 0
and 1, gloo on 127.0.0.1) run `lightning-dq fit` with `--trainer.num_nodes=2`; both nodes end with identical
codebooks and exactly one checkpoint set is written (by global rank 0)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dq.nn.codebook import Codebook
from lightning_dq.training.checkpoints import load_checkpoint_file
from tests.helpers import CONFIGS, REPO


class DumpCodebooks(Callback):
    """Test helper loaded by the CLI through `--trainer.callbacks+=`: each rank saves its codebook buffers."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {
            f"{name}.{b}": buf.clone()
            for name, m in pl_module.named_modules()
            if isinstance(m, Codebook)
            for b, buf in m.named_buffers()
        }
        record = {"state": state, "node_rank": trainer.node_rank, "world_size": trainer.world_size}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.xdist_group("sockets")
def test_two_torchrun_nodes_fit_with_identical_codebooks(tmp_path, free_port):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    entry = shutil.which("lightning-dq", path=os.path.dirname(sys.executable))
    assert torchrun and entry, "torchrun and the lightning-dq console script come with the install"
    root, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    dump = json.dumps(
        {"class_path": "tests.training.test_multinode.DumpCodebooks", "init_args": {"out_dir": str(dumps)}}
    )
    fit = [
        entry,
        "fit",
        *(a for n in ("base", "debug", "ddp") for a in ("--config", str(CONFIGS / f"{n}.yaml"))),
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks+={dump}",
    ]
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "--no-python",
                *fit,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    r0, r1 = (torch.load(dumps / f"rank{r}.pt") for r in range(2))
    assert (r0["node_rank"], r1["node_rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["state"] and r0["state"].keys() == r1["state"].keys()
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"{name} differs between the nodes"
    # one writer: global rank 0 saved the run's checkpoint once, holding the codebooks both nodes agree on
    assert sorted(p.name for p in (root / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    checkpoint = load_checkpoint_file(root / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    for name, value in r0["state"].items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
