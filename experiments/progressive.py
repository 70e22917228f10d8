"""The paper's convergence claim for progressive training: one model trained at 16x16 first, then 32x32, against
the same model trained at 32x32 only, at equal compute.

    .venv/bin/python experiments/progressive.py --data-root ~/data --out runs/exp/progressive
    .venv/bin/python experiments/progressive.py --smoke --out /tmp/progressive

Both runs use the experiments preset (configs/experiments.yaml) through `lightning-dq fit`, with "epochs" of
`--epoch-steps` steps, a checkpoint kept at the end of every epoch. The 32x32 run trains `--epochs` epochs; the
progressive run trains `--epochs-16` epochs at 16x16 (the 32x32 images box-averaged 2x2) and then as many at 32x32
as makes the same number of training FLOPs, counted with torch's flop counter (forward and backward per image at
each size). Every kept checkpoint is then evaluated at 32x32 on the same held-out images (figure A, the decoder's
bits/dim), so both curves are A at 32 px against cumulative FLOPs, and against wall time (from the checkpoints'
file times). Result: `progressive.json`, `.md` and `progressive.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOKE, data_note, fit_run, fmt_mean_std, markdown_table, run_images, write_outputs  # noqa: E402

from lightning_dq.nn.figures import likelihood_figures  # noqa: E402
from lightning_dq.training.modules import read_autoencoder  # noqa: E402


def flops_per_image(run_dir: Path, side: int) -> float:
    """Training FLOPs (forward and backward) of one image of side `side` for the net of a run."""
    net = read_autoencoder(next((run_dir / "checkpoints").glob("epoch=*.ckpt")))[0].train()
    x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        net(x).loss(0.25).backward()
    return counter.get_total_flops() / 2


@torch.no_grad()
def bpd_at(checkpoint: Path, images: torch.Tensor) -> float:
    """Figure A of a checkpoint's net on uint8 images (N, 3, 32, 32), in bits/dim."""
    net = read_autoencoder(checkpoint)[0].eval()
    out = net(images)
    return float(likelihood_figures(out.recon, net.code_shapes(32), (32, 32))["bpd_decoder"].mean())


def curve(run_dir: Path, images: torch.Tensor, flops: dict[int, float], sizes: dict[int, int], batch: int, steps: int):
    """(epoch, cumulative FLOPs, seconds, A at 32px) after every epoch of a run."""
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch=*.ckpt"), key=lambda p: int(p.name[6:].split("-")[0]))
    start = (run_dir / "config.yaml").stat().st_mtime  # written when the fit started
    points, total = [], 0.0
    for path in checkpoints:
        epoch = int(path.name[6:].split("-")[0])
        total = sum(flops[sizes[e]] * batch * steps for e in range(epoch + 1))
        points.append(
            {"epoch": epoch, "flops": total, "seconds": path.stat().st_mtime - start, "A": bpd_at(path, images)}
        )
    return points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="folder containing cifar-10-batches-py (default: the preset's)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=16, help="epochs of the 32x32-only run (its compute is the budget)")
    p.add_argument("--epochs-16", type=int, default=8, help="epochs at 16x16 of the progressive run")
    p.add_argument("--epoch-steps", type=int, default=250, help="training steps per epoch")
    p.add_argument("--val-images", type=int, default=256, help="held-out images every checkpoint is evaluated on")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny net, synthetic images, a few steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.epochs, args.epochs_16, args.epoch_steps, args.val_images = 4, 4, 2, 16
    out = Path(args.out)
    base = {"trainer.max_epochs": None, "trainer.max_steps": -1, "trainer.limit_train_batches": args.epoch_steps}
    base |= {"trainer.val_check_interval": None, "trainer.check_val_every_n_epoch": 1, "checkpoint.save_top_k": -1}
    base |= {"checkpoint.monitor": None}  # every epoch kept, whatever its size
    base |= {"data.init_args.root": args.data_root} if args.data_root else {}
    smoke = SMOKE | {"data.init_args.native_resolution": 32, "data.init_args.resolution": 32} if args.smoke else {}
    # FLOPs at 16x16 are about a quarter of those at 32x32: the exact ratio is counted after the first run
    runs = {}
    for seed in range(args.seeds):
        fixed = out / "runs" / f"fixed32_seed{seed}"
        if not (
            fixed / "checkpoints" / f"epoch={args.epochs - 1}-step={args.epochs * args.epoch_steps}.ckpt"
        ).is_file():
            fit_run(fixed, base | smoke | {"seed_everything": seed, "trainer.max_epochs": args.epochs})
        flops = {side: flops_per_image(fixed, side) for side in (16, 32)}
        saved = args.epochs_16 * (1 - flops[16] / flops[32])  # 32x32 epochs the progressive run may add
        total = args.epochs_16 + round(args.epochs - args.epochs_16 + saved)
        progressive = out / "runs" / f"progressive_seed{seed}"
        schedule = {
            "resolution_schedule.milestones": f"{{0: 16, {args.epochs_16}: 32}}",
            "data.init_args.resolution": 16,
        }
        if not (progressive / "checkpoints" / f"epoch={total - 1}-step={total * args.epoch_steps}.ckpt").is_file():
            fit_run(progressive, base | smoke | schedule | {"seed_everything": seed, "trainer.max_epochs": total})
        runs[seed] = {"fixed": fixed, "progressive": progressive, "flops": flops, "epochs": (args.epochs, total)}
    images = run_images(runs[0]["fixed"], "val", args.val_images)
    batch = int(SMOKE["data.init_args.batch_size"]) if args.smoke else 16
    results = {}
    for seed, run in runs.items():
        sizes_fixed = dict.fromkeys(range(args.epochs), 32)
        sizes_prog = {e: 16 if e < args.epochs_16 else 32 for e in range(run["epochs"][1])}
        results[seed] = {
            "fixed32": curve(run["fixed"], images, run["flops"], sizes_fixed, batch, args.epoch_steps),
            "progressive": curve(run["progressive"], images, run["flops"], sizes_prog, batch, args.epoch_steps),
            "flops_per_image": run["flops"],
        }
    summary, md = summarize(results, args, data_note(runs[0]["fixed"]))
    write_outputs(out, "progressive", summary, md)
    plot(results, out / "progressive.png")
    print(md)
    return summary


def summarize(results: dict[int, dict], args: argparse.Namespace, data: str) -> tuple[dict, str]:
    """Final A at 32 px of both runs per seed, and the paired difference (progressive - fixed)."""
    rows, diffs = [], []
    for seed, r in results.items():
        fixed, prog = r["fixed32"][-1], r["progressive"][-1]
        diffs.append(prog["A"] - fixed["A"])
        rows.append([seed, f"{fixed['A']:.4f}", f"{prog['A']:.4f}", f"{diffs[-1]:+.4f}", f"{fixed['flops'] / 1e12:.2f}",
                     f"{prog['flops'] / 1e12:.2f}", f"{fixed['seconds']:.0f}", f"{prog['seconds']:.0f}"])  # fmt: skip
    header = ["seed", "A 32 only", "A progressive", "difference", "TFLOP 32 only", "TFLOP progressive", "s 32 only",
              "s progressive"]  # fmt: skip
    md = "\n".join([
        "# Progressive training 16 -> 32 vs 32 only, equal compute (experiments/progressive.py)", "",
        f"Data: {data}.", "",
        f"32 only: {args.epochs} epochs of {args.epoch_steps} steps; progressive: {args.epochs_16} epochs at 16x16, "
        "then 32x32 up to the same training FLOPs. A (decoder-only bits/dim, not a bound) at 32x32 on "
        f"{args.val_images} held-out images after the last epoch.", "",
        markdown_table(header, rows), "",
        f"Paired difference (progressive - 32 only), mean ± std over seeds: {fmt_mean_std(diffs, 4)}.", "",
        "![A against cumulative FLOPs and wall time](progressive.png)",
    ])  # fmt: skip
    return {"args": vars(args), "results": {str(k): v for k, v in results.items()}, "differences": diffs}, md


def plot(results: dict[int, dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for seed, r in results.items():
        for name, style in (("fixed32", "-"), ("progressive", "--")):
            points = r[name]
            label = f"{'32 only' if name == 'fixed32' else '16 -> 32'} (seed {seed})"
            axes[0].plot([p["flops"] / 1e12 for p in points], [p["A"] for p in points], style, marker="o", label=label)
            axes[1].plot([p["seconds"] / 60 for p in points], [p["A"] for p in points], style, marker="o", label=label)
    axes[0].set_xlabel("cumulative training TFLOP")
    axes[1].set_xlabel("wall time (minutes)")
    axes[0].set_ylabel("A at 32x32, bits/dim (decoder only)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
