"""Exact resume: a fit SIGKILLed mid-epoch (in a real subprocess, during the second epoch of a progressive
32px -> 64px schedule) and restarted with `--ckpt_path last` ends with exactly the weights (raw and EMA), EMA
codebooks, optimizer state and epoch metrics (EMA and raw validation) of the same fit run without interruption; a
fit continued to more steps records its validations at their steps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from lightning_dq.cli import main
from lightning_dq.training.checkpoints import load_checkpoint_file
from tests.helpers import CONFIGS, REPO

LAYERS = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
ARGS = [
    *LAYERS,
    "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--resume.every_n_train_steps=1",
    "--resolution_schedule.milestones={0: 32, 1: 64}",
    "--checkpoint.monitor=val/loss_64px",
    "--ema.decay=0.5",
]
KILL_STEP = 6  # epoch 1 (steps 4-7) at 64px, after 2 of its 4 batches


def epoch_rows(root: Path) -> dict[str, float]:
    """Epoch-level values of the metric record (train aggregates and validation), by key and epoch."""
    with (root / "metrics.csv").open(newline="") as f:
        out = {}
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and (key.endswith("_epoch") or key.startswith(("val/", "val_raw/"))):
                    out[f"{key}@{row.get('epoch')}"] = float(value)
        return out


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(["fit", *ARGS, f"--trainer.default_root_dir={straight}"])

    kill = json.dumps({"class_path": "tests.helpers.KillAt", "init_args": {"step": KILL_STEP}})
    cmd = [
        sys.executable,
        "-m",
        "lightning_dq.cli",
        "fit",
        *ARGS,
        f"--trainer.default_root_dir={killed}",
        f"--trainer.callbacks+={kill}",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    step_ckpt = load_checkpoint_file(killed / "checkpoints" / "last-step.ckpt")
    assert step_ckpt["global_step"] == KILL_STEP and step_ckpt["epoch"] == 1  # killed mid-epoch

    main(["fit", *ARGS, f"--trainer.default_root_dir={killed}", "--ckpt_path=last"])

    a = load_checkpoint_file(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():  # EMA weights and EMA codebook buffers
        assert torch.equal(value, b["state_dict"][name]), f"{name} differs after resume"
    assert a["ema"]["step"] == b["ema"]["step"] == 8 and a["ema"]["raw"].keys() == b["ema"]["raw"].keys()
    for name, value in a["ema"]["raw"].items():  # the raw weights
        assert torch.equal(value, b["ema"]["raw"][name]) and not torch.equal(value, a["state_dict"][name]), name
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in opt_a.items():
        for key, value in state.items():
            assert torch.equal(value, opt_b[index][key]), f"optimizer state {index}.{key} differs after resume"
    # the metric record: the epoch interrupted by the kill has the same aggregates as the uninterrupted one
    record_a, record_b = epoch_rows(straight), epoch_rows(killed)
    assert any(k.startswith("train/loss_64px_epoch@1") for k in record_a), sorted(record_a)
    assert record_a == record_b


def test_a_fit_continued_to_more_steps_records_its_validations_at_their_steps(tmp_path):
    # validation every 2 steps in one long epoch; the first fit ends mid-epoch at max_steps 4 and writes last.ckpt after
    # its step 4 finished (newer than last-step.ckpt of step 3), the second continues from it to step 8: Lightning
    # counted step 4 twice for the loggers, which recorded the later validations at 6 and 8 instead of 5 and 7
    args = [
        *LAYERS,
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=1",
        "--trainer.max_epochs=null",
        "--trainer.limit_train_batches=20",
        "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null",
        "--resume.every_n_train_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(["fit", *args, "--trainer.max_steps=4"])
    main(["fit", *args, "--trainer.max_steps=8", "--ckpt_path=last"])
    with (tmp_path / "metrics.csv").open(newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f) if row.get("val/loss")]
    assert steps == [1, 3, 5, 7]  # the record's step is the 0-based index of the last optimizer step
