"""On-disk image formats read into uint8 (N, 3, S, S) arrays (channel-first, RGB), with strict checks.

- CIFAR-10, official python version: `cifar-10-batches-py/{data_batch_1..5, test_batch}`, pickled
  dicts whose `data` is uint8 (N, 3072): per row the R plane, then G, then B, each 32x32 row-major.
- Downsampled ImageNet 32/64, image-net.org npz version (Chrabaszcz et al. 2017):
  `train_data_batch_1..10.npz` and `val_data.npz`, `data` uint8 (N, 3*S*S) in the same planar layout,
  converted once, batch by batch, into one `.npy` file that is then read memory-mapped.
- An image folder: PNG/JPEG files, centre-cropped to a square and box-resized with Pillow.
- `sample`: lossless photos shipped inside scikit-image, cut into non-overlapping patches.
- `synthetic`: seeded shapes, gradients and stripes. NOT real images; for tests and smoke runs.

Every reader raises an error naming the file and what was expected; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_MD5 = {  # the official files (cs.toronto.edu/~kriz/cifar.html)
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

IMAGENET_URL = "https://image-net.org/download-images.php"
IMAGENET_FILES = {"train": [f"train_data_batch_{i}.npz" for i in range(1, 11)], "test": ["val_data.npz"]}
IMAGENET_CACHE = "lightning_dq_cache"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Held-out photos (a whole photo is never split across train/val/test); the stereo pair stays together.
SAMPLE_PHOTOS = {
    "train": ("astronaut", "immunohistochemistry", "motorcycle_left", "motorcycle_right"),
    "val": ("chelsea",),
    "test": ("coffee",),
}


def _describe(value: object) -> str:
    return f"{type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', '')}".strip()


# --- CIFAR-10 ---------------------------------------------------------------------------------------


def find_cifar10(root: Path) -> Path | None:
    """The `cifar-10-batches-py` directory: `root/cifar-10-batches-py`, or `root` itself; None if neither."""
    for directory in (root / CIFAR10_DIR, root):
        if directory.name == CIFAR10_DIR and directory.is_dir():
            return directory
    return None


def read_cifar10(directory: Path, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Read CIFAR-10 batches `names` from `directory` into one uint8 (N, 3, 32, 32) array.

    Returns the images and the names of the files whose md5 differs from the official file (they are
    still read: valid files from another source are allowed, the caller says so).
    """
    images, not_official = [], []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 file {path} is missing: {directory} must hold {', '.join(names)} (the official "
                f"python version, {CIFAR10_URL}, extracted)"
            )
        raw = path.read_bytes()
        if hashlib.md5(raw).hexdigest() != CIFAR10_MD5.get(name):
            not_official.append(name)
        images.append(_cifar10_batch(raw, path))
    return np.concatenate(images), not_official


def _cifar10_batch(raw: bytes, path: Path) -> np.ndarray:
    try:
        # The official files are Python-2 pickles: without an encoding their byte strings fail to load.
        # encoding="bytes" gives bytes keys; Python-3-written files keep bytes keys under any encoding.
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # a truncated or corrupt pickle can fail with almost any exception type
        raise ValueError(f"{path} is not a readable CIFAR-10 pickle ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with key 'data', got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: key 'data' must be uint8 of shape (N, 3072), got {_describe(data)}")
    return data.reshape(-1, 3, 32, 32)  # rows are channel-first planes R, G, B, each 32x32 row-major


# --- Downsampled ImageNet (npz) ---------------------------------------------------------------------


def imagenet_files(root: Path, size: int) -> dict[str, list[Path]]:
    """Locate the npz files of ImageNet-`size`, directly in `root` or in the official unzipped
    subfolders (`Imagenet64_train_part1_npz/`, `Imagenet64_val_npz/`, ...): split -> files, in order."""
    parts = ("train", "train_part1", "train_part2", "val")
    folders = [root] + [root / f"Imagenet{size}_{part}_npz" for part in parts]
    found: dict[str, list[Path]] = {}
    missing = []
    for split, names in IMAGENET_FILES.items():
        found[split] = []
        for name in names:
            hits = [folder / name for folder in folders if (folder / name).is_file()]
            if len(hits) > 1:
                raise ValueError(f"ImageNet-{size}: {name} found twice ({hits[0]}, {hits[1]}); keep one")
            found[split] += hits
            missing += [name] if not hits else []
    if missing:
        raise FileNotFoundError(
            f"ImageNet-{size} files missing under {root}: {', '.join(missing)}. This dataset cannot be "
            f"downloaded automatically (a login is needed): get 'Downsampled ImageNet {size}x{size}' (npz) "
            f"from {IMAGENET_URL} and unzip train_data_batch_1..10.npz and val_data.npz into {root} "
            f"(directly, or as the official subfolders Imagenet{size}_train..._npz/, Imagenet{size}_val_npz/)"
        )
    return found


def npz_image_count(path: Path, size: int) -> int:
    """Number of images in an npz batch, checked from the header of its `data` array (pixels not read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version} for 'data'")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
            shape, _, dtype = (read_header or np.lib.format.read_array_header_2_0)(f)
    except KeyError as err:
        raise ValueError(f"{path}: no 'data' array in this npz file (expected keys data, labels)") from err
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable npz file ({type(err).__name__}: {err})") from err
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * size * size:
        raise ValueError(
            f"{path}: 'data' must be uint8 of shape (N, {3 * size * size}) for {size}x{size} images, "
            f"got {dtype} {shape}"
        )
    return shape[0]


def _npz_data(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["data"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable npz file ({type(err).__name__}: {err})") from err


def _signature(files: Sequence[Path], shape: tuple[int, ...]) -> dict:
    return {"files": [[str(p.resolve()), p.stat().st_size] for p in files], "shape": list(shape)}


def imagenet_cache(root: Path, size: int, split: str) -> Path:
    """Path of the converted (N, 3, S, S) uint8 `.npy` file of one split."""
    return root / IMAGENET_CACHE / f"imagenet{size}_{split}.npy"


def cache_is_current(cache: Path, files: Sequence[Path]) -> bool:
    """Whether `cache` exists and was converted from exactly `files` (paths and byte sizes)."""
    meta = cache.with_suffix(".json")
    if not (cache.is_file() and meta.is_file()):
        return False
    recorded = json.loads(meta.read_text())
    return recorded == _signature(files, tuple(recorded.get("shape", ())))


def convert_npz(files: Sequence[Path], size: int, cache: Path) -> None:
    """Stream npz batches into one uint8 (N, 3, S, S) `.npy` file, one batch in memory at a time.

    Written to a temporary file, then renamed (atomic): a reader never sees a half-written cache.
    """
    counts = [npz_image_count(path, size) for path in files]
    shape = (sum(counts), 3, size, size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path, count in zip(files, counts, strict=True):
                data = _npz_data(path)  # (n, 3*S*S): the planar rows are already (3, S, S) in C order
                if data.shape != (count, 3 * size * size) or data.dtype != np.uint8:
                    raise ValueError(f"{path}: 'data' is {_describe(data)}, header: ({count}, {3 * size**2})")
                f.write(memoryview(np.ascontiguousarray(data)))
                del data
        os.replace(tmp, cache)
        meta_tmp = tmp.with_suffix(".json")
        meta_tmp.write_text(json.dumps(_signature(files, shape)))
        os.replace(meta_tmp, cache.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)


# --- Image folders ----------------------------------------------------------------------------------


def list_images(directory: Path) -> list[Path]:
    """All PNG/JPEG files under `directory` (recursive), sorted by relative path."""
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist")
    paths = [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) found under {directory}")
    return sorted(paths, key=lambda p: p.relative_to(directory).as_posix())


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 (3, size, size): the centred square crop, box-resized (never upscaled).

    Grey and palette images become RGB; an alpha channel is dropped. Pillow's BOX filter is an area
    average, the same kind of reduction as `box_reduce`.
    """
    try:
        with Image.open(path) as im:
            im.verify()  # PNG chunk CRCs and structure: load() alone accepts some truncated PNGs
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"):
                raise ValueError(f"unsupported pixel mode {im.mode!r}, expected 8-bit RGB or grey")
            rgb = im.convert("RGB")
    except Exception as err:  # Pillow reports corrupt or truncated files with several exception types
        raise ValueError(f"{path} is not a readable 8-bit PNG/JPEG ({type(err).__name__}: {err})") from err
    w, h = rgb.size
    side = min(w, h)
    if side < size:
        raise ValueError(
            f"{path} is {w}x{h}, smaller than the stored size {size}x{size}; images are never upscaled: "
            f"lower native_resolution or remove the file"
        )
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.BOX)
    return np.asarray(rgb).transpose(2, 0, 1).copy()  # (3, S, S)


def read_folder(paths: Sequence[Path], size: int) -> np.ndarray:
    """Image files as one uint8 (N, 3, size, size) array, in the given order."""
    images = np.empty((len(paths), 3, size, size), np.uint8)
    for i, path in enumerate(paths):
        images[i] = read_image(path, size)
    return images


# --- Embedded sample photos and synthetic images -----------------------------------------------------


def sample_photo(name: str) -> np.ndarray:
    """One scikit-image photo (shipped in its wheel, read offline) as uint8 (3, H, W)."""
    import skimage.data  # imported here: slow to import, and only this dataset needs it

    if name.startswith("motorcycle_"):
        photo = skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1]  # (H, W, 3)
    else:
        photo = getattr(skimage.data, name)()  # (H, W, 3)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"skimage.data.{name}: expected a uint8 RGB photo, got {_describe(photo)}")
    return photo.transpose(2, 0, 1)


def sample_patches(names: Sequence[str], size: int) -> np.ndarray:
    """Non-overlapping size x size patches of the named photos: row-major grid from the top-left corner
    of each photo, the leftover right and bottom strips (narrower than a patch) unused. (N, 3, S, S)."""
    patches = []
    for name in names:
        photo = sample_photo(name)
        rows, cols = photo.shape[1] // size, photo.shape[2] // size
        grid = photo[:, : rows * size, : cols * size].reshape(3, rows, size, cols, size)
        patches.append(grid.transpose(1, 3, 0, 2, 4).reshape(-1, 3, size, size))
    return np.ascontiguousarray(np.concatenate(patches))


def synthetic_images(count: int, size: int, seed: int | Sequence[int]) -> np.ndarray:
    """`count` seeded structured images (N, 3, S, S): a two-colour gradient at a random angle with one
    rectangle, disc or stripe pattern on top. NOT natural images: for tests and smoke runs only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (S, S) each, in [0, 1]
    images = np.empty((count, 3, size, size), np.uint8)
    for i in range(count):
        c0, c1, fg = rng.uniform(0, 255, (3, 3, 1, 1))
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        image = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-9)  # (3, S, S) gradient
        x0, y0 = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.15, 0.4)
        kind = rng.integers(3)
        if kind == 0:
            mask = (abs(xx - x0) < r) & (abs(yy - y0) < r * rng.uniform(0.5, 1.5))
        elif kind == 1:
            mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r**2
        else:
            mask = np.sin(2 * np.pi * rng.uniform(2, 6) * (np.cos(2 * a) * xx + np.sin(2 * a) * yy)) > 0
        images[i] = np.rint(np.where(mask, fg, image))
    return images
