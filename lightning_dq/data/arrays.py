"""The uint8 (N, 3, S, S) array behind every dataset, its exact box reduction, and the `Dataset` serving (3, r, r)
tensors of it. S -> r (k = S / r, a power of two) is one k x k box mean per pixel, summed in integers and rounded
once, half to even (2x2 sums 2, 6, 10 give 0, 2, 2): 64 -> 16 is one 4x4 box, not two rounded 2x2 steps."""

import mmap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_dq.errors import ConfigError, DataError


def servable_resolutions(native: int) -> list[int]:
    """The sides an image stored at `native` x `native` can be served at: native / 2^k, exact integers."""
    if isinstance(native, bool) or not isinstance(native, int) or native < 1:
        raise ConfigError(f"stored image side {native!r}: must be an integer >= 1")
    sizes = [native]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def check_servable(native: int, resolution: int) -> None:
    """Raise ConfigError unless `resolution` is `native` / 2^k (box averaging needs a power-of-two factor)."""
    sizes = servable_resolutions(native)
    if isinstance(resolution, bool) or resolution not in sizes:
        raise ConfigError(
            f"resolution {resolution!r} cannot be served from images stored at {native}x{native}: it must be the "
            f"stored side divided by a power of two, one of {sizes}"
        )


def box_reduce(images: np.ndarray, factor: int) -> np.ndarray:
    """Exact `factor` x `factor` box average of uint8 images (..., C, S, S), rounded half to even (integers only)."""
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
    uint8_4d = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
    if not uint8_4d or shape[1] != 3 or shape[2] != shape[3]:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {shape}"
        raise DataError(f"{source}: expected a uint8 image array of shape (N, 3, S, S), got {got}")


def npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the `.npy` array whose file `f` is at its start; `f` is left at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if fortran_order:
        raise ValueError("a Fortran-ordered array, expected C order")
    return shape, dtype


def open_npy(path: Path, random_access: bool = False) -> np.ndarray:
    """A `.npy` file as a read-only memory map; `random_access` turns off readahead (wasted on rows read at random)."""
    with open(path, "rb") as f:
        shape, dtype = npy_header(f)
        offset = f.tell()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


class ImageArrayDataset(Dataset):
    """A uint8 (N, 3, S, S) array, in RAM or a `.npy` each process maps lazily (workers get the path), as (3, r, r).

    Args:
        images: the (N, 3, S, S) uint8 array, or the path of a `.npy` file holding one.
        resolution: served side r; S / r must be a power of two (box-averaged, see `box_reduce`).
        indices: the rows of `images` served, in order (None = all rows).
        hflip: flip each image left-right with probability 1/2 (torch's RNG; training only).
        random_access: rows are read in random order (shuffled or sparse): no readahead on a mapped file.
    """

    def __init__(
        self,
        images: np.ndarray | Path,
        resolution: int,
        indices: np.ndarray | None = None,
        hflip: bool = False,
        random_access: bool = False,
    ) -> None:
        self.path = None if isinstance(images, np.ndarray) else Path(images)
        self.random_access = random_access
        self._images = images if isinstance(images, np.ndarray) else None
        check_image_array(self.images, self.path or "image array")
        self.native_resolution = self.images.shape[-1]
        check_servable(self.native_resolution, resolution)
        self.resolution = resolution
        self.indices = indices
        if indices is not None and len(indices) and (indices.min() < 0 or indices.max() >= len(self.images)):
            raise ValueError(f"indices must lie in [0, {len(self.images)}), got {indices.min()} to {indices.max()}")
        self.hflip = hflip

    @property
    def images(self) -> np.ndarray:
        """The stored (N, 3, S, S) array (memory-mapped when the dataset was given a path)."""
        if self._images is None:
            self._images = open_npy(self.path, self.random_access)
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_images"] = None  # workers map the file again
        return state

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int | list[int]) -> torch.Tensor:
        """Image `i` as (3, r, r) uint8; a list gives the batch (b, 3, r, r), b >= 0 (`batch_size=None` loaders)."""
        return self._batch(i) if isinstance(i, list) else self._batch([i])[0]

    def __getitems__(self, batch: list[int]) -> list[torch.Tensor]:
        """The DataLoader's batched fetch: one vectorised box reduction per batch."""
        return list(self._batch(batch))

    def _batch(self, positions: list[int]) -> torch.Tensor:
        rows = np.asarray(positions, dtype=np.intp)  # (B,): intp, so an empty list still indexes
        rows = rows if self.indices is None else self.indices[rows]
        stored = self.images[rows]  # (B, 3, S, S): a copy (for a mapped file: reads just these rows)
        x = torch.from_numpy(box_reduce(stored, self.native_resolution // self.resolution))  # (B, 3, r, r)
        if self.hflip:
            flip = torch.rand(len(x)) < 0.5  # (B,)
            x[flip] = x[flip].flip(-1)
        return x
