"""Convert downsampled ImageNet's npz files to the memory-mapped cache, once, before any training run.

    python -m lightning_dq.prepare --dataset imagenet64 --root /data/imagenet64 [--cache_dir /scratch/cache]
    make prepare-imagenet64 DATA_ROOT=/data/imagenet64 [CACHE_DIR=/scratch/cache]

ImageNet-64's conversion writes about 16 GB, which can take longer than a DDP barrier waits, so it runs
here in one process and not inside a multi-GPU launch. Training runs then need the same `root` and
`cache_dir` (`--data.init_args.cache_dir`); a cache that is already current is left as is. Exit status 2
with one message (no traceback) when the files are missing, damaged or of another version.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from lightning_dq.data import ImageDataModule
from lightning_dq.errors import UserError


def prepare(dataset: str, root: str, cache_dir: str | None = None) -> list[str]:
    """Convert (if needed) every split of `dataset` under `root`; returns one line per cache file."""
    dm = ImageDataModule(dataset, root=root, cache_dir=cache_dir, num_workers=0)
    lines = []
    for cache in dm.prepare_imagenet():
        shape = np.load(cache, mmap_mode="r", allow_pickle=False).shape  # (N, 3, S, S)
        lines.append(f"{cache}: {shape[0]} images {shape[2]}x{shape[3]}, {cache.stat().st_size / 1e9:.2f} GB")
    return lines


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_dq.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["imagenet32", "imagenet64"], required=True)
    parser.add_argument("--root", required=True, help="folder of the npz files (or of their official subfolders)")
    parser.add_argument("--cache_dir", default=None, help="where the cache goes (default <root>/lightning_dq_cache)")
    ns = parser.parse_args(args)
    try:
        lines = prepare(ns.dataset, ns.root, ns.cache_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    cache_arg = f" --data.init_args.cache_dir={ns.cache_dir}" if ns.cache_dir else ""
    print("\n".join([*lines, f"ready: train with --data.init_args.root={ns.root}{cache_arg}"]))


if __name__ == "__main__":
    main()
