"""Cross-correlation of encoder features between channels vs between spatial positions, and dependence
between the quantized sub-tensors of DQ vs VQ.

    .venv/bin/python experiments/correlation.py --runs runs/exp/dq_vs_vq/runs --out runs/exp/correlation

1. Encoder features (bottom-level encoder output (N, C, h, w) of held-out real images):
   - between channels: at each position, the Pearson correlation across images between every pair of
     channels; mean |r| over the pairs, averaged over positions;
   - between positions: for each channel, the correlation across images between every pair of
     positions; mean |r| over the pairs, averaged over channels.
   Constant (dead) channels or positions have no correlation and are left out.
2. Quantized sub-tensors of the bottom level (the M slices of D channels the decoder receives):
   - mean |r| between channels of different slices (pairs within one slice excluded), over all
     (image, position) samples;
   - mutual information (bits) between the codes of two codebooks, from their joint histogram
     (plug-in estimate), averaged over pairs, and the code entropy per codebook.
   In "vq" mode every codebook quantizes the same vector, so its slices are expected to be dependent.

Nets: the trained DQ and VQ nets of experiments/dq_vs_vq.py (same init, seeds 0..--seeds-1) and a
random-init control; figures are mean ± std over the seeds. Heat maps: `correlation_*.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    analysis_parser,
    correlation_matrix,
    data_note,
    entropy_bits,
    fmt_mean_std,
    markdown_table,
    mean_abs_off_diagonal,
    run_dir,
    run_images,
    trained_net,
    write_outputs,
)
from matplotlib.figure import Figure  # noqa: E402

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder  # noqa: E402
from lightning_dq.nn.codebook import code_histogram  # noqa: E402
from lightning_dq.nn.heads import to_unit_range  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def channel_and_spatial_correlation(features: Tensor) -> dict[str, float]:
    """Mean |r| between channels (per position, across images) and between positions (per channel).

    features: (N, C, h, w) -> {"channel": ..., "spatial": ...}.
    """
    n, c, h, w = features.shape
    per_position = features.reshape(n, c, h * w).permute(2, 0, 1)  # (hw, N, C)
    per_channel = features.reshape(n, c, h * w).permute(1, 0, 2)  # (C, N, hw)
    channel = [mean_abs_off_diagonal(correlation_matrix(x)) for x in per_position]
    spatial = [mean_abs_off_diagonal(correlation_matrix(x)) for x in per_channel]
    return {"channel": _nanmean(channel), "spatial": _nanmean(spatial)}


def cross_slice_correlation(quantized: Tensor, m: int) -> tuple[float, Tensor]:
    """Mean |r| between channels of different slices of quantized (N, M*D, h, w); and the (MD, MD) matrix."""
    n, md, h, w = quantized.shape
    corr = correlation_matrix(quantized.permute(0, 2, 3, 1).reshape(-1, md))  # (MD, MD)
    slice_of = torch.arange(md) // (md // m)  # (MD,)
    across = slice_of.unsqueeze(0) != slice_of.unsqueeze(1)  # (MD, MD)
    values = corr[across].abs()
    values = values[~values.isnan()]
    return (float(values.mean()) if values.numel() else float("nan")), corr


def mutual_information_bits(a: Tensor, b: Tensor, k: int) -> float:
    """Plug-in mutual information (bits) between two code sequences a, b (N,) with values in 0..k-1:
    H(a) + H(b) - H(a, b) from the empirical joint histogram."""
    joint = code_histogram((a * k + b).unsqueeze(0), k * k).view(k, k)  # (K, K)
    return float(entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.flatten()))


def code_dependence(codes: Tensor, k: int) -> dict[str, float]:
    """Codes (N, M, h, w) of one level -> mean pairwise MI between codebooks and mean entropy (bits)."""
    m = codes.shape[1]
    flat = codes.transpose(0, 1).reshape(m, -1)  # (M, N*h*w)
    pairs = [mutual_information_bits(flat[i], flat[j], k) for i in range(m) for j in range(i + 1, m)]
    entropy = float(entropy_bits(code_histogram(flat, k)).mean())
    return {"mi_bits": sum(pairs) / len(pairs) if pairs else float("nan"), "entropy_bits": entropy}


def _nanmean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).nanmean())


# ---------------------------------------------------------------------------------------------------
# features of a net
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def bottom_level(net: HierarchicalAutoEncoder, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder features (N, C, h, w), quantized tensor (N, M*D, h, w) and codes (N, M, h, w) of the bottom level."""
    net.eval()
    features = net.encoders[0](to_unit_range(images))  # (N, C, h, w)
    codes = net.encode(images)[-1]  # (N, M, h, w), bottom level is last (top first)
    return features, net.quantizers[0].embed_codes(codes), codes


def analyse(net: HierarchicalAutoEncoder, images: Tensor) -> tuple[dict[str, float], dict[str, Tensor]]:
    features, quantized, codes = bottom_level(net, images)
    q = net.quantizers[0]
    figures = channel_and_spatial_correlation(features)
    figures["cross_slice"], q_corr = cross_slice_correlation(quantized, q.num_codebooks)
    figures.update(code_dependence(codes, q.codebook_size))
    n, c, h, w = features.shape
    per_position = features.reshape(n, c, h * w).permute(2, 0, 1)  # (hw, N, C)
    per_channel = features.reshape(n, c, h * w).permute(1, 0, 2)  # (C, N, hw)
    maps = {
        "channel": torch.stack([correlation_matrix(x).abs() for x in per_position]).nanmean(0),  # (C, C)
        "spatial": torch.stack([correlation_matrix(x).abs() for x in per_channel]).nanmean(0),  # (hw, hw)
        "quantized": q_corr,
    }
    return figures, maps


def plot_maps(maps: dict[str, dict[str, Tensor]], path: Path) -> None:
    """Heat maps of |r|: rows = nets, columns = channels, positions, quantized slices."""
    titles = {
        "channel": "encoder: channels (mean over positions)",
        "spatial": "encoder: positions (mean over channels)",
        "quantized": "quantized bottom level: M*D channels",
    }
    fig = Figure(figsize=(12, 3.9 * len(maps)))
    axes = fig.subplots(len(maps), 3, squeeze=False)
    for row, (label, net_maps) in enumerate(maps.items()):
        for col, key in enumerate(titles):
            image = axes[row][col].imshow(net_maps[key].abs().float().numpy(), vmin=0, vmax=1, cmap="viridis")
            axes[row][col].set_title(f"{label}\n{titles[key]}", fontsize=9)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.6, label="|Pearson r|")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = analysis_parser(__doc__)
    p.add_argument("--seeds", type=int, default=3, help="training seeds to analyse (mean ± std over them)")
    p.add_argument("--images", type=int, default=1000, help="held-out images")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.images < 2:
        p.error(f"--seeds must be >= 1 and --images >= 2, got {args.seeds} and {args.images}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    first = run_dir(args.runs, "dq", args.init, 0)
    images = run_images(first, "val", args.images)
    args.images = len(images)
    print(
        f"[correlation] budget: forward passes of {args.images} images through {2 * args.seeds + 1} nets; no training"
    )
    per_net: dict[str, list[dict[str, float]]] = {}
    maps: dict[str, dict[str, Tensor]] = {}
    for seed in range(args.seeds):
        for mode in ("dq", "vq"):
            net = trained_net(run_dir(args.runs, mode, args.init, seed))
            figures, net_maps = analyse(net, images)
            per_net.setdefault(f"trained {mode}", []).append(figures)
            if seed == 0:
                maps[f"trained {mode} (seed 0)"] = net_maps
    torch.manual_seed(1234)
    figures, net_maps = analyse(HierarchicalAutoEncoder(**dict(net.config, mode="dq")), images)
    per_net["random init, dq"] = [figures]
    maps["random init, dq"] = net_maps
    keys = [
        ("channel", "encoder: mean abs(r) between channels"),
        ("spatial", "encoder: mean abs(r) between positions"),
        ("cross_slice", "quantized: mean abs(r) across slices"),
        ("mi_bits", "codes: MI between codebooks (bits)"),
        ("entropy_bits", "codes: entropy per codebook (bits)"),
    ]
    rows = [
        [label, len(runs)] + [fmt_mean_std([r[k] for r in runs]) for k, _ in keys] for label, runs in per_net.items()
    ]
    md = "\n".join(
        [
            "# Correlation: channels vs positions, DQ vs VQ sub-tensors (experiments/correlation.py)",
            "",
            f"{args.images} held-out images; bottom level ({net.quantizers[0].num_codebooks} codebooks of "
            f"{net.quantizers[0].codebook_size} codes); mean ± std over training seeds.",
            "",
            f"Data: {data_note(first)}.",
            "",
            markdown_table(["net", "seeds", *[t for _, t in keys]], rows),
            "",
            "![correlation heat maps](correlation_maps.png)",
        ]
    )
    summary = {"args": vars(args), "figures": per_net}
    out = Path(args.out)
    write_outputs(out, "correlation", summary, md)
    plot_maps(maps, out / "correlation_maps.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()
