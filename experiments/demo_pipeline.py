"""The demo pipeline measured end to end: `make demo` then `make demo-prior` (configs/demo.yaml, prior_demo.yaml),
once without and once with an EMA of the weights, and the lossless codec on the test split.

    .venv/bin/python experiments/demo_pipeline.py --data-root ../shared/data/cifar10-jpeg75 --out runs/exp/demo_pipeline
    .venv/bin/python experiments/demo_pipeline.py --smoke --out /tmp/demo_pipeline

For each `--ema` decay (0 = off): the demo auto-encoder (same seed, data and steps), a demo prior on its codes, and
`test` of the prior (A, B, C on the whole test split) with the split, or its first `--coded-images`, coded
losslessly (`evaluation_report.coded_images`): val A of the auto-encoder's last epoch (EMA and raw weights), test A,
B, C and the bits actually written. The coded images are also written as PNG (Pillow, optimize) and lossless WebP
(method 6), one file per image, for the bits/dim a general-purpose lossless codec needs, and compressed and
decompressed again through the Python API. Result: `demo_pipeline.json` and `.md`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_NOTE, markdown_table, write_outputs  # noqa: E402

from lightning_dq.codec import decompress  # noqa: E402
from lightning_dq.codec.commands import networks  # noqa: E402
from lightning_dq.data import ImageDataModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYERS = [REPO / "configs" / name for name in ("base.yaml", "demo.yaml")]
SMOKE = [  # 16x16 synthetic images (NOT real images), a tiny net, a few steps
    "--data.init_args.dataset=synthetic",
    "--data.init_args.fallback=none",
    "--data.init_args.resolution=16",
    "--data.init_args.native_resolution=16",
    "--data.init_args.val_size=32",
    "--data.init_args.synthetic_train=160",
    "--data.init_args.synthetic_test=24",
    "--data.init_args.batch_size=16",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
]
SMOKE_NET = ["--model.init_args.net.init_args.channels=8", "--model.init_args.net.init_args.res_channels=4"]


def cli(args: list[str], log: Path) -> None:
    """`lightning-dq ARGS`, its console output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline")
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "lightning_dq.cli", *args], env=env, stdout=f, stderr=f)
    if done.returncode:
        raise RuntimeError(f"`lightning-dq {' '.join(args[:1])}` failed (exit {done.returncode}): see {log}")


def last_validation(run_dir: Path) -> dict[str, float]:
    """The last row of a run's metric record that holds val/bpd_decoder."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return [r for r in rows if "val/bpd_decoder" in r][-1]


def pipeline(out: Path, decay: float, common: list[str], net: list[str], coded: int) -> dict:
    """The auto-encoder, the prior and the coded test of one EMA decay; their figures."""
    ae, prior = out / f"ema{decay:g}" / "ae", out / f"ema{decay:g}" / "prior"
    layers = [arg for path in LAYERS for arg in ("--config", str(path))]
    ema = [f"--ema.decay={decay}"]
    if not (ae / "checkpoints" / "last.ckpt").is_file() or not (ae / "fit.done").is_file():
        cli(
            ["fit", *layers, *common, *net, *ema, f"--trainer.default_root_dir={ae}", "--ckpt_path=last"],
            ae / "fit.log",
        )
        (ae / "fit.done").touch()
    prior_args = [*layers, "--config", str(REPO / "configs" / "prior_demo.yaml"), *common, *ema]
    prior_args += [
        f"--trainer.default_root_dir={prior}",
        f"--model.init_args.autoencoder_ckpt={ae / 'checkpoints'}/last.ckpt",
    ]
    if not (prior / "fit.done").is_file():
        cli(["fit", *prior_args, "--ckpt_path=last"], prior / "fit.log")
        (prior / "fit.done").touch()
    cli(["test", *prior_args, "--ckpt_path=last", f"--evaluation_report.coded_images={coded}"], prior / "test.log")
    report = json.loads((prior / "evaluation.json").read_text())
    val = last_validation(ae)
    return {
        "ema_decay": decay,
        "val_A": val["val/bpd_decoder"],
        "val_A_raw": val.get("val_raw/bpd_decoder"),
        "test": report["figures"],
        "coded": report.get("coded"),
        "test_images": report["num_images"],
        "whole_split": report["whole_split"],
        "data": report["data"],
        "autoencoder": report["autoencoder"],
        "runs": {"autoencoder": str(ae), "prior": str(prior)},
    }


def test_images(prior_dir: Path) -> torch.Tensor:
    """The test split the prior's `test` ran on, uint8 (N, 3, H, W) in order."""
    config = yaml.safe_load((prior_dir / "config_test.yaml").read_text())
    data = ImageDataModule(**config["data"]["init_args"])  # the data the test ran on
    data.setup("test")
    dataset = data.test_dataloader().dataset
    return dataset[list(range(len(dataset)))]


def round_trip(prior_dir: Path, images: torch.Tensor, coded: dict) -> dict:
    """Decompress the test's coded file with the prior checkpoint through the Python API; compare the pixels."""
    autoencoder, prior, _ = networks(prior_dir / "checkpoints" / "last.ckpt")
    data = Path(coded["file"]).read_bytes()
    decoded, _ = decompress(data, autoencoder, prior, coded["file"])
    identical = sum(torch.equal(a, b) for a, b in zip(images, decoded, strict=True))
    return {"images": len(images), "pixel_identical": identical, "bytes": len(data), "report_bytes": coded["bytes"]}


def general_codecs(images: torch.Tensor) -> dict[str, float]:
    """Bits/dim of images written one file per image as PNG (optimize) and lossless WebP (method 6)."""
    codecs = {"PNG": {"format": "PNG", "optimize": True}}
    codecs["WebP lossless"] = {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}
    sizes = dict.fromkeys(codecs, 0)
    for image in images.permute(0, 2, 3, 1).numpy():  # (H, W, 3) uint8 each
        for name, kwargs in codecs.items():
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, **kwargs)
            sizes[name] += buffer.tell()
    return {name: 8 * size / images.numel() for name, size in sizes.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default="data/", help="the folder holding cifar-10-batches-py")
    p.add_argument("--ema", type=float, nargs="+", default=[0.0, 0.99], help="EMA decays (0 = off)")
    p.add_argument(
        "--coded-images", type=int, default=-1, help="test images coded and round-tripped (-1: the whole split)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny synthetic run (NOT real images): checks the script")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = [f"--data.init_args.root={args.data_root}"] + (SMOKE if args.smoke else [])
    net = SMOKE_NET if args.smoke else []
    # the first decay's test codes its images (the codec's measurement); the others give their figures only
    results = [pipeline(out, d, common, net, args.coded_images if i == 0 else 0) for i, d in enumerate(args.ema)]
    first = Path(results[0]["runs"]["prior"])
    images = test_images(first)
    images = images[: results[0]["coded"]["images"]]  # the coded ones
    codecs = general_codecs(images)
    trip = round_trip(first, images, results[0]["coded"])
    rows = []
    for r in results:
        t, c = r["test"], r["coded"]
        raw = "n/a" if r["val_A_raw"] is None else f"{r['val_A_raw']:.4f}"
        cells = [f"{r['ema_decay']:g}", f"{r['val_A']:.4f}", raw]
        cells += [f"{t[key]:.4f}" for key in ("A bpd_decoder", "B bpd_uniform", "C bpd_prior")]
        if c is None:
            cells += ["not coded"] * 4
        else:  # against C of the same (coded) images, which the codec computes the usual way
            overhead = c["bpd_coded"] * (1 - c["stream_bits"] / (8 * c["bytes"]))
            cells += [
                str(c["images"]),
                f"{c['bpd_coded']:.4f}",
                f"{100 * (c['bpd_coded'] / c['bpd_estimated'] - 1):+.3f}%",
            ]
            cells += [f"{overhead:.6f}"]
        rows.append(cells)
    header = ["EMA decay", "val A", "val A raw weights", "test A", "test B", "test C", "images coded"]
    header += ["C coded (bits written)", "coded vs C of those images", "of which header + checksum"]
    general = [[name, f"{bpd:.4f}"] for name, bpd in codecs.items()]
    general = markdown_table(["general-purpose lossless codec, one file per test image", "bits/dim"], general)
    notes = f"Data: {results[0]['data']}." + (f" {DATA_NOTE}." if "jpeg75" in results[0]["data"] else "")
    markdown = "\n\n".join([markdown_table(header, rows), general, notes])
    markdown += (
        f"\n\nRound trip (EMA decay {results[0]['ema_decay']:g}, Python API): {trip['pixel_identical']} of "
        f"{trip['images']} test images pixel-identical after decompressing the test's coded file "
        f"({trip['bytes']:,} bytes)."
    )
    write_outputs(out, "demo_pipeline", {"runs": results, "general_codecs": codecs, "round_trip": trip}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
