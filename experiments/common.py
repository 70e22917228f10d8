"""Shared helpers of the experiment scripts: statistics, training runs through the framework's CLI, the trained
nets and images of a run, and markdown/JSON output.

Every run is a `lightning-dq fit` of configs/base.yaml + configs/experiments.yaml in its own run directory (config,
metric record, checkpoints, W&B run as any other run), resumed with `--ckpt_path last` when it was interrupted. The
scripts import this file as `common` (they put their own folder on `sys.path`), so each runs as
`python experiments/<name>.py` and loads with importlib in the tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lightning_dq.data import ImageDataModule
from lightning_dq.errors import CheckpointError
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.training.modules import read_autoencoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "configs" / "base.yaml"), str(REPO / "configs" / "experiments.yaml")]
DATA_NOTE = (
    "cifar10-jpeg75: CIFAR-10 decoded from JPEG quality 75, a different and easier distribution; its bits/dim are NOT "
    "comparable with any published CIFAR-10 number (only comparisons on the same data mean anything)"
)
# --smoke: a tiny net on 16x16 synthetic images (NOT real images), a few steps
SMOKE = {
    "data.init_args.dataset": "synthetic",
    "data.init_args.resolution": 16,
    "data.init_args.native_resolution": 16,
    "data.init_args.val_size": 16,
    "data.init_args.synthetic_train": 112,
    "data.init_args.synthetic_test": 16,
    "data.init_args.batch_size": 8,
    "trainer.limit_val_batches": 2,
    "model.init_args.net.init_args.channels": 8,
    "model.init_args.net.init_args.res_channels": 4,
    "model.init_args.net.init_args.codebook_sizes": "[8, 8, 8]",
    "model.init_args.net.init_args.num_mixtures": 2,
}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' for a markdown table."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def entropy_bits(counts: Tensor) -> Tensor:
    """Shannon entropy in bits of histograms `(..., K)` -> `(...)`; empty bins contribute 0."""
    probs = counts.double() / counts.double().sum(dim=-1, keepdim=True).clamp_min(1e-300)  # (..., K)
    return torch.special.entr(probs).sum(dim=-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def correlation_matrix(x: Tensor) -> Tensor:
    """Pearson correlation between the columns of `x` `(N, V)` -> `(V, V)`; a constant column has none (NaN)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"correlation_matrix needs (N >= 2, V) samples, got shape {tuple(x.shape)}")
    return torch.corrcoef(x.double().T)  # (V, V); 0/0 = NaN for a constant column


def mean_abs_off_diagonal(corr: Tensor) -> float:
    """Mean |r| over the off-diagonal entries of a correlation matrix `(V, V)`, ignoring NaN entries."""
    if corr.shape[0] < 2:
        raise ValueError("mean_abs_off_diagonal needs at least 2 variables")
    return float(corr[~torch.eye(corr.shape[0], dtype=torch.bool)].abs().nanmean())


def fit_run(run_dir: Path, overrides: dict[str, Any], threads: int = 1) -> None:
    """`lightning-dq fit` of the experiments preset in `run_dir`, continuing from its last checkpoint if one exists;
    the console output goes to `run_dir/fit.log`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [arg for path in CONFIGS for arg in ("--config", path)]
    values = {"trainer.default_root_dir": run_dir, **overrides}
    args += [f"--{key}={'null' if value is None else value}" for key, value in values.items()]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    with open(run_dir / "fit.log", "a") as log:
        done = subprocess.run(
            [sys.executable, "-m", "lightning_dq.cli", "fit", *args, "--ckpt_path=last"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        raise RuntimeError(f"training in {run_dir} failed (exit {done.returncode}): see {run_dir / 'fit.log'}")


def on_schedule(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's validation curve with each step put on the grid's schedule (multiples of the first validation's step):
    runs continued with lightning_dq before the fix in ResumeCheckpoint from the checkpoint a stopped fit wrote
    recorded their validations one step late (5,001, 6,001, ... for what ran at 5,000, 6,000, ...)."""
    every = curve[0]["step"]
    return [point | {"step": round(point["step"] / every) * every} for point in curve]


def validation_points(run_dir: Path) -> list[dict[str, float]]:
    """The validation rows of a run's metric record in order, each with `trained_steps`: the record's `step` is
    Lightning's 0-based index of the last optimizer step, so a validation after k steps has step k - 1."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    points = sorted((r for r in rows if "val/bpd_decoder" in r), key=lambda r: r["step"])
    return [p | {"trained_steps": int(p["step"]) + 1} for p in points]


def trained_net(run_dir: str | Path) -> HierarchicalAutoEncoder:
    """The network of a run's last checkpoint, in eval mode."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train the runs first (experiments/dq_vs_vq.py)")
    return read_autoencoder(path)[0].eval()


def run_data(run_dir: str | Path) -> ImageDataModule:
    """The data a run trained on, set up for fit (from its saved config)."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    dm = ImageDataModule(**config["data"]["init_args"])
    dm.setup("fit")
    return dm


def run_images(run_dir: str | Path, split: str, count: int) -> Tensor:
    """The first `count` images (uint8 (N, 3, H, W), in dataset order) of a split of the data a run trained on: the
    same held-out images for every script."""
    dataset = getattr(run_data(run_dir), f"{split}_dataloader")().dataset
    return dataset[list(range(min(count, len(dataset))))]


def data_note(run_dir: str | Path) -> str:
    """What the data of a run was, for a results page (with the warning when it is the JPEG-decoded CIFAR-10)."""
    description = run_data(run_dir).data_description
    return description + (f". Note: {DATA_NOTE}" if "jpeg75" in description else "")


def analysis_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of every analysis of the runs experiments/dq_vs_vq.py trained: where they are, which init, and
    the output folder (the data is the runs' own: their config.yaml)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", default="runs/exp/dq_vs_vq/runs", help="the runs/ folder of experiments/dq_vs_vq.py")
    p.add_argument("--init", choices=["default", "kaiming"], default="kaiming", help="init of the trained nets to use")
    p.add_argument("--out", required=True)
    return p


def run_dir(runs: str | Path, mode: str, init: str, seed: int, m: int = 4) -> Path:
    """The run directory of one run of experiments/dq_vs_vq.py's grid."""
    return Path(runs) / f"{mode}_{init}_M{m}_seed{seed}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_outputs(out: Path, stem: str, data: dict[str, Any], markdown: str) -> None:
    """Write out/<stem>.json and out/<stem>.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n")
