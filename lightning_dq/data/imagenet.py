"""Downsampled ImageNet 32/64, the image-net.org npz version (Chrabaszcz et al. 2017), and its memory-mapped cache:
the npz files are converted once into one `.npy` per split that every process maps (no rank holds ImageNet-64's
15.7 GB in RAM). The van den Oord et al. (2016) version is refused: its bits/dim are not comparable."""

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from lightning_dq.data.arrays import check_image_array, npy_header
from lightning_dq.errors import DataError, DataNotFoundError, disk_full

IMAGENET_URL = "https://image-net.org/download-images.php"
IMAGENET_FILES = {"train": [f"train_data_batch_{i}.npz" for i in range(1, 11)], "test": ["val_data.npz"]}
IMAGENET_COUNTS = {"train": 1_281_167, "test": 50_000}  # the full ILSVRC-2012 train and val sets
CACHE_FORMAT = 2  # bump when the cache layout or its record changes: older caches then read as stale


def _refetch(size: int) -> str:
    return f"unzip it again from the 'Downsampled ImageNet {size}x{size}' (npz) archive ({IMAGENET_URL})"


def _oord_message(what: str, size: int) -> str:
    return (
        f"{what} looks like the van den Oord et al. (2016, PixelRNN) downsampled ImageNet (PNG folders "
        f"train_{size}x{size}/valid_{size}x{size}, or conversions to (N, {size}, {size}, 3) interleaved-RGB arrays, "
        f"npz keys trainx/testx). imagenet{size} reads the image-net.org npz version (Chrabaszcz et al. 2017: planar "
        f"(N, {3 * size * size}) rows under 'data'). The two were downsampled differently, so their bits/dim are not "
        f"comparable: get 'Downsampled ImageNet {size}x{size}' (npz) from {IMAGENET_URL}, or serve the PNG folders "
        f"with dataset 'folder' and name that version next to every number"
    )


def imagenet_files(root: Path, size: int) -> dict[str, list[Path]]:
    """split -> the npz files of ImageNet-`size` in order, directly in `root` or in the official subfolders."""
    folders = [root] + [root / f"Imagenet{size}_{part}_npz" for part in ("train", "train_part1", "train_part2", "val")]
    found: dict[str, list[Path]] = {split: [] for split in IMAGENET_FILES}
    missing = []
    for split, names in IMAGENET_FILES.items():
        for name in names:
            hits = [folder / name for folder in folders if (folder / name).is_file()]
            if len(hits) > 1:
                raise DataError(f"ImageNet-{size}: {name} found twice ({hits[0]}, {hits[1]}); keep one")
            found[split] += hits
            missing += [] if hits else [name]
    if missing:
        names = [f"{split}_{size}x{size}{ext}" for split in ("train", "valid") for ext in ("", ".tar")]
        names += [f"imgnet_{size}x{size}.npz", f"imagenet{size}-train.npy", f"imagenet{size}-valid.npy"]
        oord = [str(root / name) for name in names if (root / name).exists()]
        if oord:
            raise DataError(_oord_message(", ".join(oord), size))
        listing = "all of them" if len(missing) == 11 else ", ".join(missing)
        raise DataNotFoundError(
            f"ImageNet-{size} files missing under {root}: {listing}. It cannot be downloaded automatically (a login "
            f"is needed): get 'Downsampled ImageNet {size}x{size}' (npz) from {IMAGENET_URL} and unzip "
            f"train_data_batch_1..10.npz and val_data.npz into {root} (directly or in the official subfolders)"
        )
    return found


def npz_image_count(path: Path, size: int) -> int:
    """The image count of an npz batch, checked from the header of its `data` array (pixels not read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = [name.removesuffix(".npy") for name in archive.namelist()]
            if {"trainx", "testx"} & set(keys):
                raise DataError(_oord_message(f"{path} (keys {', '.join(keys)})", size))
            if "data" not in keys:
                listing = ", ".join(keys) or "none"
                raise DataError(f"{path}: no 'data' array (keys: {listing}; expected data, labels); {_refetch(size)}")
            with archive.open("data.npy") as f:
                shape, dtype = npy_header(f)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable npz file ({type(err).__name__}: {err}); {_refetch(size)}") from err
    if len(shape) == 4 and shape[1:] == (size, size, 3):
        raise DataError(_oord_message(f"{path} ('data' is {dtype} {shape})", size))
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * size * size:
        raise DataError(
            f"{path}: 'data' must be uint8 of shape (N, {3 * size * size}) for {size}x{size} images, got {dtype} "
            f"{shape}; is this the ImageNet-{size} npz version? {_refetch(size)}"
        )
    return shape[0]


def imagenet_cache(cache_dir: Path, size: int, split: str) -> Path:
    """The converted (N, 3, S, S) uint8 `.npy` file of one split; its record is the `.json` beside it."""
    return cache_dir / f"imagenet{size}_{split}.npy"


def _signature(files: list[Path], root: Path, shape: tuple[int, ...]) -> dict:
    """What a cache was converted from: npz paths relative to `root` (it may move) and sizes, shape, format."""
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size] for p in files]
    return {"format": CACHE_FORMAT, "files": listing, "shape": list(shape)}


def cache_problem(cache: Path, files: list[Path], root: Path) -> str | None:
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
    expected = _signature(files, root, shape)["files"]
    if recorded["files"] != expected:
        changed = [f"{a[0]} ({a[1]} bytes)" for a in expected if a not in recorded["files"]]
        changed += [f"{a[0]} gone" for a in recorded["files"] if a[0] not in {b[0] for b in expected}]
        return f"{cache} was converted from other npz files (changed since: {', '.join(changed)})"
    if cache.stat().st_size != size:
        return f"{cache} is {cache.stat().st_size} bytes, {size} when written: truncated or damaged"
    return None


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def convert_npz(files: list[Path], size: int, cache: Path, root: Path) -> None:
    """Stream npz batches, one at a time, into a temporary `.npy` renamed when whole; its `.json` record comes last."""
    counts = [npz_image_count(path, size) for path in files]
    row = 3 * size * size  # one image: planar (3, S, S) in C order
    shape = (sum(counts), 3, size, size)
    need = int(np.prod(shape, dtype=np.int64)) + 4096
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    where = f"set cache_dir (lightning-dq prepare --cache_dir ...) to a writable folder with {_bytes(need)} free"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache.parent).free
        if free < need:
            raise DataError(
                f"{cache.parent} has {_bytes(free)} free, the ImageNet-{size} cache needs {_bytes(need)}: {where}"
            )
        cache.with_suffix(".json").unlink(missing_ok=True)  # the old record no longer describes the file
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path, count in zip(files, counts, strict=True):
                try:
                    with np.load(path, allow_pickle=False) as npz:
                        data = npz["data"]  # (n, row)
                except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:  # a bad CRC shows only when read
                    why = f"{type(err).__name__}: {err}"
                    raise DataError(f"{path} is not a readable npz file ({why}); {_refetch(size)}") from err
                if data.shape != (count, row) or data.dtype != np.uint8:
                    raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, its header said ({count}, {row})")
                f.write(memoryview(np.ascontiguousarray(data)))
        record = {**_signature(files, root, shape), "bytes": tmp.stat().st_size}
        os.replace(tmp, cache)
        tmp.with_suffix(".json").write_text(json.dumps(record))
        os.replace(tmp.with_suffix(".json"), cache.with_suffix(".json"))
    except OSError as err:
        if (full := disk_full(err, cache, f"ImageNet-{size} cache", "run it again")) is not err:
            raise full from err
        why = f"{type(err).__name__}: {err}"
        raise DataError(f"cannot write the ImageNet-{size} cache {cache} ({why}): {where}") from err
    finally:
        with contextlib.suppress(OSError):  # e.g. NotADirectoryError when the folder could not be made
            tmp.unlink(missing_ok=True)


def prepare_imagenet(root: Path, size: int, cache_dir: Path) -> list[Path]:
    """Convert every split whose cache is missing or stale (announcing it); returns the cache files."""
    caches = []
    for split, files in imagenet_files(root, size).items():
        cache = imagenet_cache(cache_dir, size, split)
        problem = cache_problem(cache, files, root)
        if problem is not None:
            print(f"converting imagenet{size} {split} ({len(files)} npz files) to {cache} ({problem})", flush=True)
            convert_npz(files, size, cache, root)
        caches.append(cache)
    return caches


def open_imagenet(root: Path, size: int, cache_dir: Path, split: str) -> np.ndarray:
    """The memory-mapped (N, 3, S, S) cache of one split; if missing or stale, a `DataError` naming the command."""
    option = f" --cache_dir {cache_dir}" if cache_dir != root / "lightning_dq_cache" else ""
    command = f"lightning-dq prepare --dataset imagenet{size} --root {root}{option}"
    hint = f"convert the npz files once, before training: `{command}` (a single-process run converts in prepare_data())"
    cache = imagenet_cache(cache_dir, size, split)
    problem = cache_problem(cache, imagenet_files(root, size)[split], root)
    if problem is not None:
        raise DataError(f"no usable imagenet{size} cache for the {split} split ({problem}): {hint}")
    try:
        images = np.load(cache, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{cache} is not a readable .npy file ({err}): {hint}") from err
    check_image_array(images, cache)
    return images
