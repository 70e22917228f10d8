"""CIFAR-10, official python version: `cifar-10-batches-py/{data_batch_1..5, test_batch}`, pickled dicts whose
`data` is uint8 (N, 3072): per row the R plane, then G, then B, each 32x32 row-major.

The official files are Python pickles, which run code when loaded: `_CifarUnpickler` resolves only the few
numpy/builtin names those files contain, and refuses a pickle naming anything else before it can run.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
FIX = f"extract the official python version ({CIFAR10_URL}) again"


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
    """CIFAR-10 batches `names` of `directory` as one uint8 (N, 3, 32, 32) array, and the names of the files whose
    md5 differs from the official file (they are still read: the caller says so)."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 file {directory / missing[0]} is missing ({len(missing)} of {', '.join(names)} missing in "
            f"{directory}): {FIX}, or set download=True"
        )
    images, not_official = [], []
    for name in names:
        raw = (directory / name).read_bytes()
        if hashlib.md5(raw, usedforsecurity=False).hexdigest() != CIFAR10_MD5.get(name):
            not_official.append(name)
        images.append(_cifar10_batch(raw, directory / name))
    return np.concatenate(images), not_official


# The only globals the official batches (Python 2 cPickle) and Python 3 re-pickles of them reference: numpy's
# array, dtype and scalar constructors (under the numpy 1 and numpy 2 module names) and `_codecs.encode`
# (protocol 2's encoding of bytes), taken from live objects so numpy's private modules are not imported.
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
    """Unpickles CIFAR-10 batches only: any global outside `_CIFAR_GLOBALS` is refused."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch never refers to it")
        return found


def _cifar10_batch(raw: bytes, path: Path) -> np.ndarray:
    try:
        # Python 2 pickles: without an encoding their byte strings fail to load; encoding="bytes" gives bytes keys
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a truncated or corrupt pickle can fail with almost any exception type
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); {FIX}") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict with key 'data', got {type(batch).__name__}; {FIX}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    if data is None:
        raise DataError(f"{path}: no key 'data' (keys: {', '.join(map(str, batch)) or 'none'}); {FIX}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        raise DataError(f"{path}: key 'data' must be uint8 of shape (N, 3072), got {got}; {FIX}")
    return data.reshape(-1, 3, 32, 32)  # rows are channel-first planes R, G, B, each 32x32 row-major
