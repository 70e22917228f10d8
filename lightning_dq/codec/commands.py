"""`lightning-dq encode`, `compress` and `decompress`: codes and compressed files from trained checkpoints.

    lightning-dq encode --ckpt runs/demo/checkpoints/last.ckpt --config configs/base.yaml --config configs/demo.yaml \\
        --out runs/demo/codes                      # every split's codes, once, for `--data.init_args.codes`
    lightning-dq compress --ckpt runs/demo-prior/checkpoints/last.ckpt a.png b.png --out images.ldq
    lightning-dq decompress images.ldq --out decoded/

Like `cli.py`, this module sits above every layer: it reads checkpoints (training) and data configs (the CLI).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from lightning_dq.codec import compress, decompress
from lightning_dq.codec.codes import write_split
from lightning_dq.codec.container import unpack, write_atomic
from lightning_dq.errors import CheckpointError, DataError
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.prior import CodePrior
from lightning_dq.training.checkpoints import load_checkpoint_file
from lightning_dq.training.modules import PriorModule, read_autoencoder


def networks(path: str | Path) -> tuple[HierarchicalAutoEncoder, CodePrior | None, int]:
    """The auto-encoder (and the prior of a prior checkpoint) of a checkpoint, and the image side it trained at."""
    checkpoint = load_checkpoint_file(path)
    side = int((checkpoint.get("datamodule_hyper_parameters") or {}).get("resolution", 32))
    if "net_config" in checkpoint:
        return read_autoencoder(path)[0].eval(), None, side
    if "prior_config" not in checkpoint:
        raise CheckpointError(f"{path} is neither an auto-encoder nor a prior checkpoint of lightning-dq")
    module = PriorModule.load_from_checkpoint(path, map_location="cpu")
    return module.autoencoder.eval(), module.prior.eval(), side


def read_rgb(path: Path, convert: bool) -> torch.Tensor:
    """An image file as uint8 (3, H, W); a grey or alpha image is an error unless `convert` (announced)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGB" and not convert:
                raise DataError(
                    f"{path} is a {image.mode} image, not RGB: convert it, or pass --convert-rgb to convert it here "
                    f"(an alpha channel is dropped)"
                )
            if image.mode != "RGB":
                print(f"{path}: converted from {image.mode} to RGB", flush=True)
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read the image {path}: {err}") from None
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


def compress_command(argv: list[str]) -> None:
    """`lightning-dq compress`: RGB image files -> one lossless file whose size is figure C (B without a prior)."""
    p = argparse.ArgumentParser(prog="lightning-dq compress", description=compress_command.__doc__.split(": ", 1)[1])
    p.add_argument("images", nargs="+", help="PNG, JPEG, ... files (any size; coded in tiles of the model's side)")
    p.add_argument("--ckpt", required=True, help="a prior checkpoint (figure C) or an auto-encoder checkpoint (B)")
    p.add_argument("--out", required=True, help="the compressed file to write")
    p.add_argument("--group", type=int, default=64, help="tiles coded side by side (speed; the file records it)")
    p.add_argument("--convert-rgb", action="store_true", help="convert grey or alpha images to RGB (announced)")
    args = p.parse_args(argv)
    net, prior, side = networks(args.ckpt)
    paths = [Path(image) for image in args.images]
    images = [read_rgb(path, args.convert_rgb) for path in paths]
    result = compress(images, net, prior, [path.stem for path in paths], side, args.group, checkpoint=args.ckpt)
    write_atomic(args.out, result.data, "compressed file")
    overhead = 8 * len(result.data) - result.payload_bits
    print(
        f"{args.out}: {len(result.data):,} bytes ({overhead / 8:,.0f} of header and checksum) for {len(images)} images"
    )
    figure = "C" if prior is not None else "B"
    print(f"estimated = figure {figure} of the same images, computed from the model's probabilities")
    coded, estimated = result.bits_per_dim, result.estimated_bits_per_dim
    print(f"bits/dim coded {coded:.4f} estimated {estimated:.4f} ({len(images)} images)", flush=True)


def decompress_command(argv: list[str]) -> None:
    """`lightning-dq decompress`: a compressed file -> the original images as PNG files named after the inputs."""
    p = argparse.ArgumentParser(
        prog="lightning-dq decompress", description=decompress_command.__doc__.split(": ", 1)[1]
    )
    p.add_argument("file")
    p.add_argument("--out", required=True, help="folder of the PNG files")
    p.add_argument("--ckpt", default=None, help="the checkpoint the file was written with (default: the one it names)")
    args = p.parse_args(argv)
    try:
        data = Path(args.file).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {args.file}: {err.strerror or err}") from None
    header, _ = unpack(data, args.file)
    ckpt = args.ckpt or header.checkpoint
    if not ckpt or not Path(ckpt).is_file():
        raise CheckpointError(f"{args.file} was written with checkpoint {ckpt!r}, which is not here: pass --ckpt")
    net, prior, _ = networks(ckpt)
    images, names = decompress(data, net, prior, args.file)  # everything decoded before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        path = out / f"{name}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path.with_name(f".{path.name}.tmp"), format="PNG")
        path.with_name(f".{path.name}.tmp").replace(path)
    print(f"{len(images)} images written to {out}", flush=True)


def encode_command(argv: list[str]) -> None:
    """`lightning-dq encode`: every split of a data config encoded once by an auto-encoder, for a prior's training."""
    from lightning_dq.cli import build_cli  # the data config is parsed exactly as `fit` parses it

    p = argparse.ArgumentParser(prog="lightning-dq encode", description=encode_command.__doc__.split(": ", 1)[1])
    p.add_argument("--ckpt", required=True, help="an auto-encoder checkpoint")
    p.add_argument("--out", required=True, help="the folder of the code files (replaced when it exists)")
    p.add_argument("--batch-size", type=int, default=256)
    args, config = p.parse_known_args(argv)
    net, prior, _ = networks(args.ckpt)
    if prior is not None:
        raise CheckpointError(f"{args.ckpt} is a prior checkpoint: encode with its auto-encoder's checkpoint")
    datamodule = build_cli([*config, "--trainer.logger=false"], run=False).datamodule
    checkpoint = load_checkpoint_file(args.ckpt, mmap=True)
    about = {"checkpoint": str(Path(args.ckpt).resolve()), "epoch": checkpoint.get("epoch")}
    about["global_step"] = checkpoint.get("global_step")
    out, tmp = Path(args.out), Path(args.out).with_name(f".{Path(args.out).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split, stage in (("train", "fit"), ("val", "fit"), ("test", "test")):
            datamodule.setup(stage)
            dataset = getattr(datamodule, f"{split}_dataloader")().dataset  # in its own order, not shuffled
            about["dataset"] = datamodule.data_description
            loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=datamodule.num_workers)
            record = write_split(tmp, split, net, loader, len(dataset), about)
            print(f"{split}: {record['images']} images, codes {record['code_shapes']}", flush=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial code folder stays behind
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(f"codes written to {out}: train a prior on them with --data.init_args.codes={out}", flush=True)


COMMANDS = {"encode": encode_command, "compress": compress_command, "decompress": decompress_command}
