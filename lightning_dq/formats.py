"""On-disk image formats read into uint8 (N, 3, S, S) arrays (channel-first, RGB), with strict checks.

- CIFAR-10, official python version: `cifar-10-batches-py/{data_batch_1..5, test_batch}`, pickled
  dicts whose `data` is uint8 (N, 3072): per row the R plane, then G, then B, each 32x32 row-major.
- Downsampled ImageNet 32/64, image-net.org npz version (Chrabaszcz et al. 2017):
  `train_data_batch_1..10.npz` and `val_data.npz`, `data` uint8 (N, 3*S*S) in the same planar layout,
  converted once, batch by batch, into one `.npy` file that is then read memory-mapped.
- An image folder: PNG/JPEG files, centre-cropped to a square and box-resized with Pillow.
- `sample`: lossless photos shipped inside scikit-image, cut into non-overlapping patches.
- `synthetic`: seeded shapes, gradients and stripes. NOT real images; for tests and smoke runs.

Every reader raises `DataError` (corrupt, truncated, wrong format or version) or `DataNotFoundError`
(missing files) naming the file and what to do; nothing is skipped or truncated silently. npz and npy
files are read with `allow_pickle=False`. CIFAR-10's official files are Python pickles, so they cannot be
read without unpickling: `_CifarUnpickler` only resolves the few numpy/builtin names those files contain
(a pickle naming anything else is refused before it can run code).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_dq.errors import DataError, DataNotFoundError

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
CACHE_FORMAT = 2  # bump when the cache layout or its signature changes: older caches then read as stale

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


def cifar10_other_versions(root: Path) -> list[Path]:
    """Folders under `root` that hold a CIFAR version this reader does not read (binary, CIFAR-100)."""
    return [root / name for name in ("cifar-10-batches-bin", "cifar-100-python") if (root / name).is_dir()]


def read_cifar10(directory: Path, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Read CIFAR-10 batches `names` from `directory` into one uint8 (N, 3, 32, 32) array.

    Returns the images and the names of the files whose md5 differs from the official file (they are
    still read: valid files from another source are allowed, the caller says so).
    """
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 file {directory / missing[0]} is missing ({len(missing)} of {', '.join(names)} missing "
            f"in {directory}): extract the official python version ({CIFAR10_URL}) again, or set download=True"
        )
    images, not_official = [], []
    for name in names:
        path = directory / name
        raw = path.read_bytes()
        if hashlib.md5(raw).hexdigest() != CIFAR10_MD5.get(name):
            not_official.append(name)
        images.append(_cifar10_batch(raw, path))
    return np.concatenate(images), not_official


# The only globals the official batches (Python 2 cPickle) and Python-3 re-pickles of them reference: the
# numpy array/dtype/scalar constructors (under numpy 1 and numpy 2 module names) and `_codecs.encode`
# (protocol 2's encoding of bytes). Taken from live objects so numpy's private module layout is not imported.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.int64(0).__reduce__()[0]
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches only: any global outside `_CIFAR_GLOBALS` is refused (pickles run code)."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch never refers to it")
        return found


def _cifar10_batch(raw: bytes, path: Path) -> np.ndarray:
    fix = f"extract the official python version ({CIFAR10_URL}) again"
    try:
        # The official files are Python-2 pickles: without an encoding their byte strings fail to load.
        # encoding="bytes" gives bytes keys; Python-3-written files keep bytes keys under any encoding.
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a truncated or corrupt pickle can fail with almost any exception type
        raise DataError(
            f"{path} is not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); {fix}"
        ) from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict with key 'data', got {type(batch).__name__}; {fix}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    if data is None:
        raise DataError(f"{path}: no key 'data' (keys: {', '.join(map(str, batch)) or 'none'}); {fix}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: key 'data' must be uint8 of shape (N, 3072), got {_describe(data)}; {fix}")
    return data.reshape(-1, 3, 32, 32)  # rows are channel-first planes R, G, B, each 32x32 row-major


# --- Downsampled ImageNet (npz) ---------------------------------------------------------------------


def oord_signs(root: Path, size: int) -> list[Path]:
    """Files and folders under `root` that are the van den Oord et al. (2016) downsampled ImageNet or one of
    its usual conversions: the `train_SxS`/`valid_SxS` PNG folders or tars, PixelCNN++'s `imgnet_SxS.npz`
    (keys trainx/testx, (N, S, S, 3)) and VDVAE's `imagenetS-train.npy` / `-valid.npy` ((N, S, S, 3))."""
    names = [f"{split}_{size}x{size}{ext}" for split in ("train", "valid") for ext in ("", ".tar")]
    names += [f"imgnet_{size}x{size}.npz", f"imagenet{size}-train.npy", f"imagenet{size}-valid.npy"]
    return [root / name for name in names if (root / name).exists()]


def _oord_message(what: str, size: int) -> str:
    return (
        f"{what} looks like the van den Oord et al. (2016, PixelRNN) downsampled ImageNet: PNG folders "
        f"train_{size}x{size}/valid_{size}x{size}, or conversions of them holding (N, {size}, {size}, 3) "
        f"interleaved-RGB arrays (npz keys trainx/testx, no labels). imagenet{size} reads the image-net.org npz "
        f"version (Chrabaszcz et al. 2017: train_data_batch_1..10.npz and val_data.npz, key 'data' of planar "
        f"(N, {3 * size * size}) rows, 1-based labels). The two versions were downsampled differently, so their "
        f"bits/dim are not comparable: get 'Downsampled ImageNet {size}x{size}' (npz) from {IMAGENET_URL}, or "
        f"serve the PNG folders with dataset 'folder' and name that version next to every number"
    )


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
                raise DataError(f"ImageNet-{size}: {name} found twice ({hits[0]}, {hits[1]}); keep one")
            found[split] += hits
            missing += [name] if not hits else []
    if missing:
        oord = oord_signs(root, size)
        if oord:
            raise DataError(_oord_message(", ".join(str(p) for p in oord), size))
        every = sum(len(names) for names in IMAGENET_FILES.values())
        listing = "all of them" if len(missing) == every else ", ".join(missing)
        raise DataNotFoundError(
            f"ImageNet-{size} files missing under {root}: {listing}. This dataset cannot be "
            f"downloaded automatically (a login is needed): get 'Downsampled ImageNet {size}x{size}' (npz) "
            f"from {IMAGENET_URL} and unzip train_data_batch_1..10.npz and val_data.npz into {root} "
            f"(directly, or as the official subfolders Imagenet{size}_train..._npz/, Imagenet{size}_val_npz/)"
        )
    return found


def npz_image_count(path: Path, size: int) -> int:
    """Number of images in an npz batch, checked from the header of its `data` array (pixels not read)."""
    fix = f"unzip it again from the 'Downsampled ImageNet {size}x{size}' (npz) archive ({IMAGENET_URL})"
    try:
        with zipfile.ZipFile(path) as archive:
            keys = [name.removesuffix(".npy") for name in archive.namelist()]
            if "data" not in keys:
                if {"trainx", "testx"} & set(keys):
                    raise DataError(_oord_message(f"{path} (keys {', '.join(keys)})", size))
                raise DataError(f"{path}: no 'data' array in this npz file (keys: {', '.join(keys) or 'none'}; "
                                f"expected data, labels); {fix}")  # fmt: skip
            with archive.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy format version {version} for 'data'")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                shape, _, dtype = (read_header or np.lib.format.read_array_header_2_0)(f)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable npz file ({type(err).__name__}: {err}); {fix}") from err
    if len(shape) == 4 and shape[1:] == (size, size, 3):
        raise DataError(_oord_message(f"{path} ('data' is {dtype} {shape})", size))
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * size * size:
        raise DataError(
            f"{path}: 'data' must be uint8 of shape (N, {3 * size * size}) for {size}x{size} images, "
            f"got {dtype} {shape}; is this the ImageNet-{size} npz version? {fix}"
        )
    return shape[0]


def _npz_data(path: Path, size: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["data"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:  # a bad CRC shows only when read
        raise DataError(
            f"{path} is not a readable npz file ({type(err).__name__}: {err}); unzip it again from the "
            f"'Downsampled ImageNet {size}x{size}' (npz) archive ({IMAGENET_URL})"
        ) from err


def default_cache_dir(root: Path) -> Path:
    """Where the converted ImageNet arrays go unless `cache_dir` says otherwise: `<root>/lightning_dq_cache`."""
    return root / IMAGENET_CACHE


def imagenet_cache(cache_dir: Path, size: int, split: str) -> Path:
    """Path of the converted (N, 3, S, S) uint8 `.npy` file of one split; its record is the `.json` beside it."""
    return cache_dir / f"imagenet{size}_{split}.npy"


def _signature(files: Sequence[Path], root: Path, shape: Sequence[int]) -> dict:
    """What a cache was converted from: npz paths relative to `root` (the data may be mounted elsewhere on
    another machine) with their byte sizes, the array shape and the cache format."""
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size] for p in files]
    return {"format": CACHE_FORMAT, "files": listing, "shape": list(shape)}


def cache_problem(cache: Path, files: Sequence[Path], root: Path) -> str | None:
    """None when `cache` is complete and was converted from exactly `files`; otherwise what is wrong."""
    meta = cache.with_suffix(".json")
    if not cache.is_file():
        return f"{cache} does not exist"
    try:
        recorded = json.loads(meta.read_text())
        shape, size = tuple(recorded["shape"]), recorded["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its record {meta} is missing or unreadable ({type(err).__name__}: {err})"
    if recorded.get("format") != CACHE_FORMAT:
        return f"{cache} was written in an older cache format ({recorded.get('format')}, now {CACHE_FORMAT})"
    expected = _signature(files, root, shape)
    if recorded["files"] != expected["files"]:
        changed = [f"{a[0]} ({a[1]} bytes)" for a in expected["files"] if a not in recorded["files"]]
        changed += [f"{a[0]} gone" for a in recorded["files"] if a[0] not in {b[0] for b in expected["files"]}]
        return f"{cache} was converted from other npz files (changed since: {', '.join(changed)})"
    if cache.stat().st_size != size:
        return f"{cache} is {cache.stat().st_size} bytes, {size} when written: truncated or damaged"
    return None


def cache_is_current(cache: Path, files: Sequence[Path], root: Path) -> bool:
    """Whether `cache` exists, is complete and was converted from exactly `files` (paths and byte sizes)."""
    return cache_problem(cache, files, root) is None


def convert_npz(files: Sequence[Path], size: int, cache: Path, root: Path) -> None:
    """Stream npz batches into one uint8 (N, 3, S, S) `.npy` file, one batch in memory at a time.

    Written to a temporary file, then renamed (atomic): a reader never sees a half-written cache. The
    record (`.json`) is written last, so a cache without one reads as not converted.
    """
    counts = [npz_image_count(path, size) for path in files]
    shape = (sum(counts), 3, size, size)
    need = int(np.prod(shape, dtype=np.int64)) + 4096
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    where = f"set cache_dir (make prepare-imagenet{size} CACHE_DIR=...) to a writable folder with {_bytes(need)}"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache.parent).free
        if free < need:
            raise DataError(f"{cache.parent} has {_bytes(free)} free, the ImageNet-{size} cache needs "
                            f"{_bytes(need)}: {where}")  # fmt: skip
        cache.with_suffix(".json").unlink(missing_ok=True)  # the old record no longer describes the file
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path, count in zip(files, counts, strict=True):
                data = _npz_data(path, size)  # (n, 3*S*S): the planar rows are already (3, S, S) in C order
                if data.shape != (count, 3 * size * size) or data.dtype != np.uint8:
                    raise DataError(f"{path}: 'data' is {_describe(data)}, its header said ({count}, {3 * size**2})")
                f.write(memoryview(np.ascontiguousarray(data)))
                del data
        record = {**_signature(files, root, shape), "bytes": tmp.stat().st_size}
        os.replace(tmp, cache)
        meta_tmp = tmp.with_suffix(".json")
        meta_tmp.write_text(json.dumps(record))
        os.replace(meta_tmp, cache.with_suffix(".json"))
    except OSError as err:
        if isinstance(err, DataNotFoundError):
            raise
        why = f"{type(err).__name__}: {err}"
        raise DataError(f"cannot write the ImageNet-{size} cache {cache} ({why}): {where}") from err
    finally:
        with contextlib.suppress(OSError):  # e.g. NotADirectoryError when the folder could not be made
            tmp.unlink(missing_ok=True)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --- Image folders ----------------------------------------------------------------------------------


def list_images(directory: Path) -> tuple[list[Path], list[Path]]:
    """(PNG/JPEG files, other files) under `directory` (recursive), each sorted by relative path.

    Image files of a format this reader does not take (GIF, WebP, TIFF, BMP, ...) raise `DataError`: they
    would otherwise be dropped without a word. Other files (notes, hidden files) are returned for the
    caller to report.
    """
    if not directory.is_dir():
        raise DataNotFoundError(f"image folder {directory} does not exist: set root to the folder of PNG/JPEG files")
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).as_posix())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    other_image_types = set(Image.registered_extensions()) - set(IMAGE_SUFFIXES)
    unsupported = [p for p in files if p.suffix.lower() in other_image_types]
    if unsupported:
        raise DataError(
            f"{unsupported[0]} ({len(unsupported)} such files under {directory}) is not PNG/JPEG: convert these "
            f"images to PNG (lossless) or remove them; only {', '.join(IMAGE_SUFFIXES)} are read"
        )
    if not images:
        raise DataNotFoundError(
            f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) found under {directory}: set root to the image folder"
        )
    return images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


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
        raise DataError(
            f"{path} is not a readable 8-bit PNG/JPEG ({type(err).__name__}: {err}): replace or remove the file"
        ) from err
    w, h = rgb.size
    side = min(w, h)
    if side < size:
        raise DataError(
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
        raise DataError(f"skimage.data.{name}: expected a uint8 RGB photo, got {_describe(photo)}")
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
