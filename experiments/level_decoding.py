"""What each level encodes: every level decoded alone (the other levels' quantized tensors zeroed), DQ next
to VQ (the paper's Fig. 4 analogue).

    .venv/bin/python experiments/level_decoding.py --runs runs/exp/dq_vs_vq/runs --out runs/exp/level_decoding

For the trained DQ and VQ nets of one seed of experiments/dq_vs_vq.py: rows = original images, all levels,
then each level alone (top first), decoded with `HierarchicalAutoEncoder.decode(codes, keep_levels=[i])`
and shown as the head's deterministic reconstruction. Also a table of the reconstruction MSE (pixels in
[0, 1]) of each row over `--images` held-out images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import analysis_parser, data_note, markdown_table, run_dir, run_images, trained_net, write_outputs  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder  # noqa: E402
from lightning_dq.nn.figures import reconstruction_mse  # noqa: E402
from lightning_dq.nn.heads import head_reconstruct  # noqa: E402


@torch.no_grad()
def level_reconstructions(net: HierarchicalAutoEncoder, images: Tensor) -> dict[str, Tensor]:
    """uint8 images (N, 3, H, W) -> {"all levels": ..., "level i alone": ...}, each uint8 (N, 3, H, W)."""
    net.eval()
    codes = net.encode(images)  # per level, top first: (N, M, h, w)
    rows = {"all levels": None, **{f"level {i} alone": [i] for i in range(net.num_levels)}}
    return {
        name: head_reconstruct(net.head, net.decode(codes, keep_levels=keep), net.num_mixtures)
        for name, keep in rows.items()
    }


def mse(a: Tensor, b: Tensor) -> float:
    """Mean squared error of two uint8 image batches in [0, 1] pixel units."""
    return float(reconstruction_mse(a, b).mean())


def plot_grid(panels: dict[str, tuple[Tensor, dict[str, Tensor]]], path: Path, show: int) -> None:
    """One column per net: rows = originals, then each reconstruction row; `show` images per row."""
    fig = Figure(figsize=(6 * len(panels), 5.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, (originals, recons)) in zip(axes[0], panels.items(), strict=True):
        rows = [originals[:show]] + [r[:show] for r in recons.values()]
        grid = make_grid(torch.cat(rows), nrow=show, padding=2, pad_value=255)  # (3, H', W') uint8
        ax.imshow(grid.permute(1, 2, 0).numpy())
        side = originals.shape[-1] + 2
        ax.set_yticks([side * (i + 0.5) for i in range(len(rows))], ["original", *recons])
        ax.set_xticks([])
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = analysis_parser(__doc__)
    p.add_argument("--seed", type=int, default=0, help="training seed of the nets to show")
    p.add_argument("--images", type=int, default=256, help="held-out images of the MSE table")
    p.add_argument("--show", type=int, default=8, help="images per row of the grid")
    args = p.parse_args(argv)
    if args.images < 1 or args.show < 1:
        p.error(f"--images and --show must be >= 1, got {args.images} and {args.show}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    first = run_dir(args.runs, "dq", args.init, args.seed)
    images = run_images(first, "val", args.images)
    args.images, args.show = len(images), min(args.show, len(images))
    print(
        f"[level_decoding] budget: {args.images} held-out images through 2 nets, 1 + levels decodes each; no training"
    )
    panels, table = {}, {}
    for mode in ("dq", "vq"):
        recons = level_reconstructions(trained_net(run_dir(args.runs, mode, args.init, args.seed)), images)
        panels[f"{mode.upper()} (init {args.init}, seed {args.seed})"] = (images, recons)
        table[mode] = {name: mse(r, images) for name, r in recons.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_grid(panels, out / "level_decoding.png", args.show)
    names = list(table["dq"])
    md = "\n".join(
        [
            "# Each level decoded alone (experiments/level_decoding.py)",
            "",
            f"Data: {data_note(first)}.",
            "",
            f"Reconstruction MSE (pixels in [0, 1]) over {args.images} held-out images; levels are numbered top (0, "
            "coarsest) first; a level 'alone' has the other levels' quantized tensors replaced by zeros.",
            "",
            markdown_table(
                ["decoded from", "DQ", "VQ"], [[n, f"{table['dq'][n]:.4f}", f"{table['vq'][n]:.4f}"] for n in names]
            ),
            "",
            "![levels](level_decoding.png)",
        ]
    )
    summary = {"args": vars(args), "mse": table}
    write_outputs(out, "level_decoding", summary, md)
    print(md)
    return summary


if __name__ == "__main__":
    main()
