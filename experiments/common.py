"""Shared helpers of the experiment scripts: statistics (entropy, correlation, mean +- std), the data and
net settings read from `configs/`, saving and loading trained nets, and markdown/JSON output.

The experiment scripts import this file as `common` (they put their own folder on `sys.path`), so each
script still runs as `python experiments/<name>.py` and loads with importlib in the tests.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.data import ImageDataModule
from lightning_dq.errors import CheckpointError, ConfigError, DataNotFoundError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "cifar10-jpeg75"  # ../shared/data/cifar10-jpeg75
DATA_NOTE = (
    "cifar10-jpeg75: CIFAR-10 decoded from JPEG quality 75, a different and easier distribution; its bits/dim "
    "are NOT comparable with any published CIFAR-10 number (only comparisons on the same data mean anything)"
)

# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std (n)' for a markdown table."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def entropy_bits(counts: Tensor) -> Tensor:
    """Shannon entropy in bits of histograms `(..., K)` -> `(...)`; empty bins contribute 0."""
    counts = counts.double()
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # (..., K)
    logs = torch.where(probs > 0, probs.log2(), torch.zeros_like(probs))
    return -(probs * logs).sum(dim=-1)


def correlation_matrix(x: Tensor) -> Tensor:
    """Pearson correlation between the columns of `x` `(N, V)` -> `(V, V)`.

    A column with zero variance has no defined correlation: its row and column are NaN (and the
    diagonal is 1 only for columns that vary).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"correlation_matrix needs (N >= 2, V) samples, got shape {tuple(x.shape)}")
    x = x.double()
    centred = x - x.mean(dim=0, keepdim=True)  # (N, V)
    cov = centred.T @ centred  # (V, V), unnormalised
    std = cov.diagonal().sqrt()  # (V,)
    std = torch.where(std > 0, std, torch.full_like(std, float("nan")))
    return cov / std.unsqueeze(0) / std.unsqueeze(1)


def mean_abs_off_diagonal(corr: Tensor) -> float:
    """Mean |r| over the off-diagonal entries of a correlation matrix `(V, V)`, ignoring NaN entries."""
    v = corr.shape[0]
    if v < 2:
        raise ValueError("mean_abs_off_diagonal needs at least 2 variables")
    off = corr[~torch.eye(v, dtype=torch.bool)].abs()
    off = off[~off.isnan()]
    return float(off.mean()) if off.numel() else float("nan")


# ---------------------------------------------------------------------------------------------------
# settings, data and nets
# ---------------------------------------------------------------------------------------------------


def read_config(name: str) -> dict[str, Any]:
    """The YAML file configs/<name>.yaml as a dict."""
    path = REPO / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return yaml.safe_load(path.read_text())


def demo_settings() -> tuple[dict[str, Any], float]:
    """The demo net's constructor arguments and Adam learning rate from configs/demo.yaml."""
    model = read_config("demo")["model"]["init_args"]
    try:
        return dict(model["net"]["init_args"]), float(model["optimizer"]["init_args"]["lr"])
    except KeyError as err:
        raise ConfigError(f"configs/demo.yaml lacks model.init_args.net/optimizer key {err}") from None


def trained_nets_parser(doc: str, smoke_help: str) -> argparse.ArgumentParser:
    """The arguments of every analysis of the nets `experiments/dq_vs_vq.py` trained: data, where the runs
    are, which init, the output folder and the smoke switch."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="folder containing cifar-10-batches-py "
                   "(default ../shared/data/cifar10-jpeg75 next to the repository)")  # fmt: skip
    p.add_argument("--runs", default="runs/exp/dq_vs_vq/runs", help="the runs/ folder of experiments/dq_vs_vq.py")
    p.add_argument("--init", choices=["default", "kaiming"], default="kaiming", help="init of the trained nets to use")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    return p


def resolve_data_root(data_root: str | None, smoke: bool) -> Path | None:
    """The CIFAR-10 root to use: the argument, else ../shared/data/cifar10-jpeg75; None in smoke mode."""
    if smoke:
        return None
    root = Path(data_root) if data_root else DEFAULT_DATA_ROOT
    if not (root / "cifar-10-batches-py").is_dir() and root.name != "cifar-10-batches-py":
        raise DataNotFoundError(
            f"no CIFAR-10 under --data-root {root} (expected {root / 'cifar-10-batches-py'}); pass --data-root "
            f"pointing at the folder that contains cifar-10-batches-py, or use --smoke for synthetic data"
        )
    return root


def data_module(root: Path | None, batch_size: int, val_images: int, smoke: bool) -> ImageDataModule:
    """CIFAR-10 (5,000 validation images held out with seed 0, the same for every run) or, with
    `smoke`, 16x16 synthetic images (NOT real images)."""
    if smoke:
        return ImageDataModule(dataset="synthetic", batch_size=batch_size, num_workers=0, resolution=16,
                               native_resolution=16, synthetic_train=96 + val_images, val_size=val_images,
                               synthetic_test=16, seed=0)  # fmt: skip
    return ImageDataModule(dataset="cifar10", root=str(root), batch_size=batch_size, num_workers=0, resolution=32,
                           val_size=5000, seed=0)  # fmt: skip


def smoke_net_kwargs() -> dict[str, Any]:
    """A tiny net for --smoke runs on 16x16 images (M*D = 8)."""
    return dict(channels=8, res_blocks=1, res_channels=4, code_dim=2, num_codebooks=4, codebook_sizes=[8, 8, 8],
                num_mixtures=2)  # fmt: skip


def save_net(path: Path, kwargs: dict[str, Any], net: HierarchicalAutoEncoder) -> None:
    """Save a trained net as {"net_kwargs", "state_dict"} (rebuilt by `load_net`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_kwargs": kwargs, "state_dict": net.state_dict()}, path)


def load_net(path: str | Path) -> tuple[HierarchicalAutoEncoder, dict[str, Any]]:
    """A net saved by `save_net`, in eval mode, and its constructor arguments."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"net file {path} does not exist; run experiments/dq_vs_vq.py first (it writes net.pt)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"net_kwargs", "state_dict"} <= set(blob):
        raise CheckpointError(f"{path} is not a net file written by experiments/dq_vs_vq.py (keys net_kwargs, "
                              "state_dict)")  # fmt: skip
    net = HierarchicalAutoEncoder(**blob["net_kwargs"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), dict(blob["net_kwargs"])


def validation_images(root: Path | None, count: int, smoke: bool) -> Tensor:
    """The first `count` validation images (uint8 (N, 3, H, W)), the same for every script and run."""
    dm = data_module(root, batch_size=count, val_images=count, smoke=smoke)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))[:count]


def train_images(root: Path | None, count: int, smoke: bool) -> Tensor:
    """`count` training images in a fixed order (uint8 (N, 3, H, W))."""
    dm = data_module(root, batch_size=count, val_images=16, smoke=smoke)
    dm.setup("fit")
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader()))[:count]


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, data: dict[str, Any], markdown: str) -> None:
    """Write out/<stem>.json and out/<stem>.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n")
