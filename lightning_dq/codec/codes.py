"""Code datasets: every image of a split encoded once, so a prior trains on codes without an auto-encoder pass.

A folder holds, per split, `<split>.npy` (N, T) in the smallest unsigned type that holds K (the codes of each image
flat, in sequence order: `CodeGeometry.flatten`) and `<split>.json`: the auto-encoder's content hash
(`network_hash`), its checkpoint, epoch and step, the code shapes, the dataset, the split and the resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dq.codec.container import network_hash, write_atomic
from lightning_dq.errors import CheckpointError, DataError, DataNotFoundError, disk_full
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder


def code_dtype(codebook_sizes: Iterable[int]) -> np.dtype:
    """The smallest unsigned integer type that holds every code."""
    largest = max(codebook_sizes) - 1
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(t).max))


@torch.no_grad()
def write_split(
    folder: Path, split: str, net: HierarchicalAutoEncoder, batches: Iterable[Tensor], count: int, about: dict
):
    """Encode `count` images of uint8 batches (B, 3, r, r) with `net` into `folder/<split>.npy` and its record; the
    array is filled through a memory map and renamed into place only when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    net.eval()
    side = None
    tmp = folder / f".{split}.npy.tmp"
    codes = None
    done = 0
    for x in batches:
        side = x.shape[-1]
        flat = net.geometry.flatten(net.encode(x)).numpy()  # (B, T) int64
        if codes is None:
            shape = (count, flat.shape[1])
            codes = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=code_dtype(net.geometry.codebook_sizes), shape=shape
            )
            reserve(tmp, folder / f"{split}.npy")
        codes[done : done + len(flat)] = flat
        done += len(flat)
    if codes is None or done != count:
        raise DataNotFoundError(f"{split}: {done} images encoded, {count} expected")
    codes.flush()
    del codes
    tmp.replace(folder / f"{split}.npy")
    record = about | {"split": split, "resolution": side, "images": count, "autoencoder_hash": network_hash(net)}
    record["code_shapes"] = net.code_shapes(side)
    write_atomic(folder / f"{split}.json", json.dumps(record, indent=1).encode(), "code record")
    return record


def reserve(path: Path, final: Path) -> None:
    """Allocate the blocks of a sparse file `path` now: a full disk is then an error naming `final`, not a crash
    (SIGBUS) when a page of the memory map is written."""
    try:
        with open(path, "r+b") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise disk_full(err, final, "code file", "run the command again") from err


def read_record(folder: str | Path, split: str) -> dict:
    path = Path(folder) / f"{split}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataNotFoundError(
            f"no code record {path} ({type(err).__name__}): run `lightning-dq encode` first"
        ) from None


def check_codes_match(folder: str | Path, net: HierarchicalAutoEncoder, split: str = "train") -> dict:
    """The record of a split, after checking that `net` wrote it (one line naming both if not)."""
    record = read_record(folder, split)
    if record["autoencoder_hash"] != network_hash(net):
        raise CheckpointError(
            f"the codes in {folder} were written by the auto-encoder of {record.get('checkpoint')}, not by this "
            f"prior's auto-encoder: encode the data again with it (`lightning-dq encode`)"
        )
    return record


class CodeDataset(Dataset):
    """The codes of one split (memory-mapped), served as flat int64 tensors (T,) in sequence order; a list of
    positions gives their batch (B, T) (what an evaluation sampler of index lists asks for).

    Args:
        folder: a folder `lightning-dq encode` wrote.
        split: "train", "val" or "test".
        images: the number of images the data config has in this split (checked).
        resolution: the image side of the data config (checked).
    """

    def __init__(self, folder: str | Path, split: str, images: int, resolution: int) -> None:
        self.path = Path(folder) / f"{split}.npy"
        self.record = read_record(folder, split)
        if (self.record["images"], self.record["resolution"]) != (images, resolution):
            raise DataError(
                f"{self.path} holds the codes of {self.record['images']} {split} images at {self.record['resolution']}"
                f"x{self.record['resolution']}, the data config {images} at {resolution}x{resolution}: encode again "
                f"with this data config"
            )
        self._codes: np.ndarray | None = None

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:  # each DataLoader worker maps the file itself
            self._codes = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._codes

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_codes": None}

    def __len__(self) -> int:
        return self.record["images"]

    def __getitem__(self, i: int | list[int]) -> Tensor:
        return torch.from_numpy(self.codes[np.asarray(i, dtype=np.intp)].astype(np.int64))
