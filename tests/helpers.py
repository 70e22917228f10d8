"""What many tests share: the repository's paths, and THE shrunk config: configs/debug.yaml's tiny network
(the README code structure: 3 levels, M=5, K=32; tiny widths), as a Python object or as CLI overrides."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import struct
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback

from lightning_dq.data import ImageDataModule
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"  # real CIFAR-10, when the machine has it (tests skip otherwise)
DEBUG_NET = yaml.safe_load((CONFIGS / "debug.yaml").read_text())["model"]["init_args"]["net"]["init_args"]


def config_args(*names: str) -> list[str]:
    """`config_args("base", "debug")` -> `["--config", ".../configs/base.yaml", "--config", ".../debug.yaml"]`."""
    return [arg for name in names for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]


def debug_net_args() -> list[str]:
    """The debug network as overrides (`--model.init_args.net.init_args.channels=16` ...), for any config."""
    return [f"--model.init_args.net.init_args.{key}={value}" for key, value in DEBUG_NET.items()]


def debug_net(seed: int | None = 0, **kwargs) -> HierarchicalAutoEncoder:
    """The debug network in Python (`kwargs` override its arguments), seeded unless `seed` is None."""
    if seed is not None:
        torch.manual_seed(seed)
    return HierarchicalAutoEncoder(**(DEBUG_NET | kwargs))


def uint8_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, 3, side, side)."""
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- data files in the real on-disk formats ---------------------------------------------------------------


def images(n: int, side: int, seed: int) -> np.ndarray:
    """Random uint8 (n, 3, side, side): asymmetric, so any transposition or channel mix-up changes them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch pickled as Python 2's cPickle did: keys and pixel bytes as Python-2 `str` opcodes."""

    def pystr(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: decoded with pickle.load's `encoding`
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def int4(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    dtype = b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R"  # numpy.dtype("u1", False, True)
    dtype += b"(K\x03X\x01\x00\x00\x00|NNN" + int4(-1) * 2 + b"K\x00tb"  # its state, then BUILD
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + pystr(b"b") + b"\x87R"
    array += b"(K\x01" + int4(data.shape[0]) + int4(data.shape[1]) + b"\x86" + dtype + b"\x89"
    array += pystr(data.tobytes()) + b"tb"
    listing = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + pystr(b"labels") + listing + pystr(b"data") + array + b"u."


def write_cifar_batch(path: Path, batch: np.ndarray, keys: str = "bytes") -> None:
    """One CIFAR-10 batch file; keys: "bytes" (Python 3, bytes keys), "str" (Python 3) or "py2"."""
    data = batch.reshape(len(batch), 3072)  # planar rows: R plane, G plane, B plane
    labels = [i % 10 for i in range(len(batch))]
    if keys == "py2":
        path.write_bytes(py2_pickle(data, labels))
        return
    names = [f"{i}.png" for i in labels]
    record = {"batch_label": "fixture", "labels": labels, "data": data, "filenames": names}
    if keys == "bytes":
        record = {k.encode(): v for k, v in record.items()}
    path.write_bytes(pickle.dumps(record, protocol=2))


def write_cifar(root: Path, train: list[np.ndarray], test: np.ndarray, keys: str = "bytes") -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, batch in enumerate(train, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", batch, keys)
    write_cifar_batch(folder / "test_batch", test, keys)
    return folder


def write_imagenet(root: Path, side: int, train: list[np.ndarray], val: np.ndarray, official: bool) -> None:
    """Chrabaszcz npz files, flat in root or in the official unzipped subfolders (64: part1/part2)."""
    mean = np.concatenate(train).reshape(-1, 3 * side * side).mean(0)
    for i, batch in enumerate(train, start=1):
        folder = root / (f"Imagenet{side}_train_part{1 + (i > 5)}_npz" if official else "")
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.arange(1, len(batch) + 1)  # 1-based, as in the real files
        data = batch.reshape(len(batch), -1)
        np.savez(folder / f"train_data_batch_{i}.npz", data=data, labels=labels, mean=mean)
    folder = root / (f"Imagenet{side}_val_npz" if official else "")
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "val_data.npz", data=val.reshape(len(val), -1), labels=np.ones(len(val), int))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def flip_bytes(path: Path, at: float, count: int = 16) -> None:
    """Invert `count` bytes starting at fraction `at` of the file (a damaged sector, a bad copy)."""
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    raw[start : start + count] = bytes(255 - b for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def served(dm: ImageDataModule, split: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """All images of a split in dataset order (no shuffle) and the rows of the stored array they are."""
    dataset = getattr(dm, f"{split}_dataloader")().dataset
    return torch.stack([dataset[i] for i in range(len(dataset))]), dataset.indices


class KillAt(Callback):
    """Fault injection for tests of resume: SIGKILL this process when training reaches global step `step` (before
    that step runs), like a preempted job: nothing is flushed.

    Args:
        step: global step at which to die.
        rank: only the process of this global rank dies (None: every rank).
    """

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run, what `wandb sync` uploads (`run-*.wandb`: a LevelDB log of
    `wandb_internal_pb2.Record`s in 32 KiB blocks, each chunk 7 header bytes: crc32, length, type FULL=1 FIRST=2
    MIDDLE=3 LAST=4)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, block, records, buf = path.read_bytes(), 7, 32768, [], b""  # 7: the file's ":W&B" header
    while pos + 7 <= len(data):
        if block - pos % block < 7 or data[pos : pos + 7] == bytes(7):  # block tail padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf = (buf if kind in (3, 4) else b"") + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(buf))
    return records


class FullDisk:
    """A device with `free` bytes left under `folder`: writes to files opened there fail with ENOSPC once it is used
    up, as on a full disk, and `shutil.disk_usage` reports what is left (`report` overrides it, e.g. to pass a
    free-space check that another process then beats). Installed with `monkeypatch`."""

    def __init__(self, monkeypatch, folder: Path, free: int, report: int | None = None) -> None:
        import builtins
        import io
        import shutil

        self.folder, self.free, self.report = Path(folder).resolve(), free, report
        real_open, real_usage = io.open, shutil.disk_usage

        def limited_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+")
            return _Limited(f, self) if writing and Path(file).resolve().is_relative_to(self.folder) else f

        def usage(path):
            total, used, free = real_usage(path)
            if not Path(path).resolve().is_relative_to(self.folder):
                return type(real_usage(path))(total, used, free)
            return type(real_usage(path))(total, used, self.free if self.report is None else self.report)

        monkeypatch.setattr(builtins, "open", limited_open)
        monkeypatch.setattr(io, "open", limited_open)
        monkeypatch.setattr(shutil, "disk_usage", usage)


class _Limited:
    """A file whose writes draw on a `FullDisk`'s free bytes."""

    def __init__(self, f, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        size = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        if size > self._disk.free:
            self._disk.free = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.free -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class FillDiskAt(Callback):
    """Fault injection: at the start of training epoch `epoch`, the device of `<run dir>/<folder>` has no space left
    (`FullDisk`); the test undoes it with `FillDiskAt.patch.undo()`.

    Args:
        epoch: the training epoch whose writes fail.
        folder: the part of the run directory that is full ("" = all of it).
    """

    patch = None

    def __init__(self, epoch: int, folder: str = "") -> None:
        self.epoch = epoch
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import pytest

            FillDiskAt.patch = pytest.MonkeyPatch()
            FullDisk(FillDiskAt.patch, Path(trainer.default_root_dir) / self.folder, free=0)
