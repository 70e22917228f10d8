"""CIFAR-10, official python version (`cifar-10-batches-py/`: pickled dicts, `data` uint8 (N, 3072) of R, G, B
planes), its download, and the fallback to `sample` when missing. Pickles run code when loaded: `_CifarUnpickler`
resolves only the few numpy/builtin names these files contain, and refuses any other before it can run."""

import codecs
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.datasets.utils import download_and_extract_archive

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
_MD5_WARNED: set[Path] = set()  # files already reported as differing from the official md5 (this process)


def find_cifar10(root: Path) -> Path | None:
    """The `cifar-10-batches-py` directory: `root/cifar-10-batches-py`, or `root` itself; None if neither."""
    return next((d for d in (root / CIFAR10_DIR, root) if d.name == CIFAR10_DIR and d.is_dir()), None)


def download_cifar10(root: Path, fallback: str) -> None:
    """Download and extract the archive into `root` unless all files are there; on failure raise, or warn (fallback)."""
    directory = find_cifar10(root)
    if directory is not None and all((directory / name).is_file() for name in CIFAR10_MD5):
        return
    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_ARCHIVE_MD5)
    except (OSError, RuntimeError, tarfile.TarError) as err:  # offline (URLError is an OSError); bad file
        if fallback == "none":
            raise DataNotFoundError(
                f"downloading CIFAR-10 from {CIFAR10_URL} into {root} failed ({err}); fetch and extract "
                f"cifar-10-python.tar.gz yourself, or point root at the folder that contains {CIFAR10_DIR}"
            ) from err
        rank_zero_warn(f"downloading CIFAR-10 from {CIFAR10_URL} failed ({err}); using fallback='sample'")


def cifar10_fallback(root: Path, download: bool, fallback: str, side: int) -> str:
    """`root` holds no `cifar-10-batches-py`: raise the error that names the fix, or (fallback "sample") warn
    loudly and return the note that `side` x `side` sample patches are served instead."""
    why = "download failed" if download else "download=False"
    expected = f"expected {root / CIFAR10_DIR}/data_batch_1..5, test_batch"
    other = [root / name for name in ("cifar-10-batches-bin", "cifar-100-python") if (root / name).is_dir()]
    if other:
        raise DataError(
            f"{other[0]} is not the CIFAR-10 python version this dataset reads ({expected}): get "
            f"cifar-10-python.tar.gz from {CIFAR10_URL} and extract it into {root}, or set download=True"
        )
    if fallback == "none":
        raise DataNotFoundError(
            f"no CIFAR-10 under {root} ({expected}; {why}): set download=True to fetch it, or set root to "
            f"the folder that contains {CIFAR10_DIR}"
        )
    rank_zero_warn(
        f"DATA FALLBACK: no CIFAR-10 under {root} ({why}); serving the 'sample' dataset instead (scikit-image "
        f"photos cut into {side}x{side} patches; NOT CIFAR-10, numbers are not comparable with CIFAR-10 results)"
    )
    return f"FALLBACK: no cifar10 under {root} ({why}), sample photos served instead"


def read_cifar10(directory: Path, names: list[str], notes: dict[str, None]) -> np.ndarray:
    """CIFAR-10 batches `names` of `directory` as one uint8 (N, 3, 32, 32) array. Files whose md5 is not the
    official one are still read, warned about once per process and recorded in `notes`."""
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
    if not_official:
        notes["files differ from the official CIFAR-10 md5s: not comparable to published work"] = None
    new = [name for name in not_official if (directory / name).resolve() not in _MD5_WARNED]
    _MD5_WARNED.update((directory / name).resolve() for name in not_official)
    if new:
        rank_zero_warn(
            f"{directory}: md5 of {', '.join(new)} differs from the official CIFAR-10 files; read anyway (the format "
            f"is valid), but these are not the official pixels: do not compare results with published CIFAR-10 numbers"
        )
    return np.concatenate(images)


# The only globals the official batches (Python 2 cPickle) and Python 3 re-pickles of them reference: numpy's
# array, dtype and scalar constructors (numpy 1 and 2 module names) and `_codecs.encode` (protocol 2's bytes),
# taken from live objects so numpy's private modules are not imported.
_CIFAR_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
for _core in ("core", "_core"):
    _CIFAR_GLOBALS[f"numpy.{_core}.multiarray", "_reconstruct"] = np.zeros(1).__reduce__()[0]
    _CIFAR_GLOBALS[f"numpy.{_core}.multiarray", "scalar"] = np.int64(0).__reduce__()[0]
    _CIFAR_GLOBALS[f"numpy.{_core}.numeric", "_frombuffer"] = np.zeros(1).__reduce_ex__(5)[0]


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
