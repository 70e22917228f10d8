"""Image storage and serving: the uint8 (N, 3, S, S) array behind every dataset, exact box reduction to
smaller sizes, and the torch `Dataset` that serves (3, r, r) uint8 tensors at the current resolution.

The on-disk format readers that fill these arrays are in `lightning_dq.formats`. No Lightning here.

Resolution reduction (stored side S -> served side r, S/r = k a power of two) is one k x k box average
per output pixel, computed exactly in integers and rounded once, half to even: the sum s of the k*k
uint8 values gives q, rem = divmod(s, k*k); the result is q + 1 when 2*rem > k*k, or when 2*rem == k*k
and q is odd, else q (e.g. sums 2, 6, 10 of a 2x2 block give 0, 2, 2). So 64 -> 16 is a single 4x4 box
(one rounding), which can differ by 1 from two rounded 2x2 steps: it is the correctly rounded mean of
the 16 pixels. Batches are reduced in one vectorised call (`ImageArrayDataset.__getitems__`).

Evaluation under DDP uses `EvenShardSampler`: every image once, the same number of batches on every rank.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_dq.errors import ConfigError, DataError


def servable_resolutions(native: int) -> list[int]:
    """The sides an image stored at `native` x `native` can be served at: native / 2^k, exact integers."""
    if isinstance(native, bool) or not isinstance(native, int) or native < 1:
        raise ConfigError(f"stored image side {native!r}: must be an integer >= 1")
    sizes, r = [native], native
    while r % 2 == 0:
        r //= 2
        sizes.append(r)
    return sizes


def check_resolution(native: int, resolution: int) -> None:
    """Raise ConfigError unless `resolution` is `native` / 2^k (box averaging needs a power-of-two factor)."""
    sizes = servable_resolutions(native)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution not in sizes:
        raise ConfigError(
            f"resolution {resolution!r} cannot be served from images stored at {native}x{native}: it must be "
            f"the stored side divided by a power of two, one of {sizes}"
        )


def box_reduce(images: np.ndarray, factor: int) -> np.ndarray:
    """Exact `factor` x `factor` box average of uint8 images (..., C, S, S), rounded half to even.

    Integer arithmetic only (see the module docstring); `factor` is a power of two, 1 returns the input.
    """
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"box_reduce: factor must be a power of two, got {factor}")
    if factor == 1:
        return images
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"box_reduce: image side {h}x{w} is not divisible by the factor {factor}")
    total = images.astype(np.uint16 if factor <= 16 else np.uint32)  # block sums reach 255 * factor^2
    for _ in range(factor.bit_length() - 1):  # pairwise sums: 2x2 blocks, then 4x4, ...
        total = total[..., 0::2, :] + total[..., 1::2, :]
        total = total[..., 0::2] + total[..., 1::2]  # (..., C, h/2^i, w/2^i)
    shift = 2 * (factor.bit_length() - 1)  # factor^2 = 2^shift
    # sum / 2^shift rounded half to even: add half - 1, plus 1 when the truncated quotient is odd
    return ((total + ((1 << (shift - 1)) - 1) + ((total >> shift) & 1)) >> shift).astype(np.uint8)


def check_image_array(images: np.ndarray, source: object) -> None:
    """Raise DataError unless `images` is a uint8 (N, 3, S, S) array; `source` names where it came from."""
    shape = getattr(images, "shape", None)
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1] != 3
        or images.shape[2] != images.shape[3]
    ):
        raise DataError(
            f"{source}: expected a uint8 image array of shape (N, 3, S, S), got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')} {shape}"
        )


class ImageArrayDataset(Dataset):
    """Serves the images of a uint8 (N, 3, S, S) array as (3, r, r) uint8 tensors.

    The array is either held in RAM (a numpy array) or a `.npy` file that each process opens memory-mapped
    on first access (pickling the dataset for a DataLoader worker sends the path, never the pixels). The
    dataset is immutable: a new resolution is a new (cheap) dataset over the same storage.

    Args:
        images: the (N, 3, S, S) uint8 array, or the path of a `.npy` file holding one.
        resolution: served side r; S / r must be a power of two (box-averaged, see `box_reduce`).
        indices: the rows of `images` this dataset serves, in order (None = all rows).
        hflip: flip each image left-right with probability 1/2 (torch's RNG; for training only).
        random_access: rows are read in random order (shuffled or sparse subsets): tell the kernel not to
            read ahead around each image of a memory-mapped file (I/O that would mostly be wasted).
    """

    def __init__(
        self,
        images: np.ndarray | Path,
        resolution: int,
        indices: np.ndarray | None = None,
        hflip: bool = False,
        random_access: bool = False,
    ) -> None:
        self.random_access = random_access
        self.path = None if isinstance(images, np.ndarray) else Path(images)
        self._images = images if isinstance(images, np.ndarray) else None
        check_image_array(self.images, self.path or "image array")
        self.native_resolution = self.images.shape[-1]
        check_resolution(self.native_resolution, resolution)
        self.resolution = resolution
        self.indices = indices
        n = len(self.images)
        if indices is not None and len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}), got {indices.min()} to {indices.max()}")
        self.hflip = hflip

    @property
    def images(self) -> np.ndarray:
        """The stored (N, 3, S, S) array (an `np.memmap` when the dataset was given a path)."""
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r", allow_pickle=False)
            if self.random_access and hasattr(mmap, "MADV_RANDOM") and hasattr(self._images, "_mmap"):
                self._images._mmap.madvise(mmap.MADV_RANDOM)
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_images"] = None  # a pickled memmap would carry all its pixels; workers re-map the file
        return state

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int | list[int]) -> Tensor:
        """Image `i` as (3, r, r) uint8; a list of positions gives their batch (b, 3, r, r), b may be 0
        (the form a DataLoader with `batch_size=None` and a sampler of index lists asks for)."""
        if isinstance(i, list):
            return self._batch(i)
        row = i if self.indices is None else int(self.indices[i])
        image = box_reduce(self.images[row], self.native_resolution // self.resolution)  # (3, r, r)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # (3, r, r) uint8, own memory
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __getitems__(self, batch: list[int]) -> list[Tensor]:
        """Several images at once (the DataLoader's batched fetch): one vectorised box reduction per batch
        instead of one per image, the same values as `__getitem__`."""
        return list(self._batch(batch))

    def _batch(self, positions: list[int]) -> Tensor:
        rows = np.asarray(positions, dtype=np.intp)  # (B,): intp, so an empty list still indexes
        rows = rows if self.indices is None else self.indices[rows]
        stored = self.images[rows]  # (B, 3, S, S): a copy (for a memmap: reads just these rows)
        x = torch.from_numpy(box_reduce(stored, self.native_resolution // self.resolution))  # (B, 3, r, r)
        if self.hflip:
            flip = torch.rand(len(x)) < 0.5  # (B,)
            x[flip] = x[flip].flip(-1)
        return x


class EvenShardSampler(DistributedSampler):
    """Evaluation batches of one DDP rank: every image of the split exactly once over all ranks, and the
    same number of batches on every rank.

    Rank r gets the r-th of `num_replicas` contiguous shards (sizes differ by at most one), cut into
    ceil(ceil(N / num_replicas) / batch_size) batches of near-equal size (at most `batch_size`). Equal
    batch counts keep any per-step collective matched across ranks, and a rank is never left with no
    batch at all (Lightning would skip its whole evaluation loop, epoch-end metric syncs included, while
    the others wait in them): when a split has fewer images than ranks, the ranks without an image get
    one empty (0, 3, r, r) batch. Lightning's own `DistributedSampler` pads shards with repeated images
    instead, counting up to `num_replicas - 1` images twice.

    Yields lists of positions: use it with `DataLoader(dataset, batch_size=None, sampler=...)`, where
    `ImageArrayDataset[list]` returns the batch. Being a `DistributedSampler`, Lightning keeps it as is.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        shards = np.array_split(np.arange(len(dataset)), num_replicas)
        per_rank = len(shards[0])  # the largest shard: array_split puts the extra images first
        batches = -(-per_rank // batch_size)
        self.batches = [b.tolist() for b in np.array_split(shards[rank], batches)] if batches else []
        self.num_samples = len(shards[rank])
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
