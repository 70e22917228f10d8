"""Data-loading throughput of `ImageDataModule`: CIFAR-10 training images per second through the train
DataLoader, with num_workers 0 and 2, at the stored 32x32 and box-reduced to 16x16.

One "epoch" = a fresh `train_dataloader()` (as Lightning builds with `reload_dataloaders_every_n_epochs=1`,
so worker start-up is included) iterated to the end: 45,000 images (val_size 5,000 held out), batch 128,
shuffled. Variants run interleaved, round-robin, in one process: ratios between them are meaningful, the
absolute numbers on a shared machine are not. The files are read once, before timing.

Data: `--root`, a folder holding `cifar-10-batches-py` (e.g. the JPEG-decoded copy of the development machines: fine
for speed, not for likelihood numbers).

    .venv/bin/python benchmarks/data_loading.py --root data/                  # 3 repeats (~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from lightning_dq.data import ImageDataModule


def epoch(dm: ImageDataModule, workers: int, resolution: int) -> tuple[float, float]:
    """Build a fresh train loader and iterate it to the end: (images per second with worker start-up
    included, seconds until the first batch arrived)."""
    dm.num_workers, dm.resolution = workers, resolution
    start = time.perf_counter()
    seen, first = 0, 0.0
    for batch in dm.train_dataloader():  # (B, 3, r, r) uint8
        first = first or time.perf_counter() - start
        seen += batch.shape[0]
    return seen / (time.perf_counter() - start), first


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--root", required=True, help="folder that contains cifar-10-batches-py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 16])
    args = parser.parse_args()

    dm = ImageDataModule("cifar10", root=args.root, batch_size=args.batch_size, num_workers=0, val_size=5000)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-official md5 warning: expected for the JPEG-decoded copy
        dm.setup("fit")
    setup_s = time.perf_counter() - start

    variants = [(w, r) for r in args.resolutions for w in args.workers]
    results: dict[tuple[int, int], list[tuple[float, float]]] = {v: [] for v in variants}
    epoch(dm, 0, args.resolutions[0])  # warm-up (allocator, caches): not counted
    for _ in range(args.repeats):
        for workers, resolution in variants:
            results[(workers, resolution)].append(epoch(dm, workers, resolution))

    print(f"data: {dm.data_description}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"setup (read + md5 of 5 batches, 150 MB) {setup_s:.2f} s; {args.repeats} repeats, interleaved\n"
    )
    print("| num_workers | resolution | images/s (median) | min - max | vs num_workers=0 | first batch (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workers, resolution in variants:
        rates, firsts = zip(*results[(workers, resolution)], strict=True)
        base = statistics.median(rate for rate, _ in results[(args.workers[0], resolution)])
        median = statistics.median(rates)
        print(
            f"| {workers} | {resolution}x{resolution} | {median:,.0f} | {min(rates):,.0f} - "
            f"{max(rates):,.0f} | {median / base:.2f}x | {statistics.median(firsts):.3f} |"
        )


if __name__ == "__main__":
    main()
