"""Shared fixtures: a free TCP port, the real CLI's configs and the debug net, data files in the real formats."""

from __future__ import annotations

import os
import pickle
import random
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


def pytest_configure(config) -> None:
    """One torch intra-op thread per test process and its subprocesses (CLI, DDP ranks): the tensors are tiny,
    and with 2 xdist workers on 2 cores a second thread per process mostly spin-waits (see `one_thread`)."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test starts from the environment the session started with: a test that runs DDP in-process
    (Lightning sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ... there) must not make a later test's subprocess
    believe it is already one rank of a launched job (it would wait for peers that never come)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a free TCP port for a `torch.distributed` rendezvous.

    Ports come from 20000-32767, below Linux's ephemeral range (32768-60999): a port the OS hands out
    for bind(0) or an outgoing connection (gloo opens many) can be taken by another socket between the
    moment it is picked and the moment the store binds it (EADDRINUSE, seen in CI); these cannot.
    """

    def pick() -> int:
        rng = random.Random()
        for _ in range(100):
            port = rng.randrange(20000, 32768)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free TCP port in 20000-32767")

    return pick


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    tensors are tiny, and on a shared, loaded 2-core machine a second intra-op thread mostly spin-waits (it
    multiplied the CPU time of a debug-net training step). Module-scoped, so module-scoped fits get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the real CLI ---------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="session")
def configs() -> Callable[..., list[str]]:
    """`configs("base", "cifar10")` -> `["--config", ".../configs/base.yaml", "--config", ".../cifar10.yaml"]`,
    layered in that order."""

    def layered(*names: str) -> list[str]:
        return [arg for name in names for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]

    return layered


@pytest.fixture(scope="session")
def debug_net() -> list[str]:
    """configs/debug.yaml's tiny network as command-line overrides (`--model.init_args.net.init_args.channels=16`
    ...), read from the file so they follow it: the debug net on top of any config without its data section."""
    config = yaml.safe_load((CONFIGS / "debug.yaml").read_text())
    net = config["model"]["init_args"]["net"]["init_args"]
    return [f"--model.init_args.net.init_args.{key}={value}" for key, value in net.items()]


# --- data fixtures in the real on-disk formats ------------------------------------------------------------


def random_images(n: int, side: int, seed: int) -> np.ndarray:
    """Random uint8 (n, 3, side, side): asymmetric, so any transposition or channel mix-up changes them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def _cifar_batch(path: Path, images: np.ndarray) -> None:
    """One CIFAR-10 python batch as the official files are read in Python 3: a protocol-2 pickle of a dict with
    bytes keys, `data` (N, 3072) uint8 planar rows (R plane, G plane, B plane) and `labels` a list of ints."""
    labels = [i % 10 for i in range(len(images))]
    record = {b"batch_label": b"fixture", b"labels": labels, b"data": images.reshape(len(images), 3072),
              b"filenames": [f"{i}.png".encode() for i in range(len(images))]}  # fmt: skip
    path.write_bytes(pickle.dumps(record, protocol=2))


@pytest.fixture(scope="session")
def write_cifar10() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """`write_cifar10(root, per_batch, num_test)` writes `root/cifar-10-batches-py/` (data_batch_1..5,
    test_batch, batches.meta) of random 32x32 images; returns (train pool (5 * per_batch, 3, 32, 32), test)."""

    def write(root: Path, per_batch: int = 4, num_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        train = [random_images(per_batch, 32, seed) for seed in range(5)]
        for i, batch in enumerate(train, start=1):
            _cifar_batch(folder / f"data_batch_{i}", batch)
        test = random_images(num_test, 32, 99)
        _cifar_batch(folder / "test_batch", test)
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        return np.concatenate(train), test

    return write


@pytest.fixture(scope="session")
def write_imagenet() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """`write_imagenet(root, side, per_batch, num_val, official)` writes the image-net.org downsampled npz files:
    train_data_batch_1..10.npz and val_data.npz with `data` (N, 3*side*side) uint8 channel-first rows,
    `labels` (1-based) and, in train files, `mean`; flat in `root` or in the official unzipped folders
    (`Imagenet64_train_part1_npz/`, ...). Returns (train pool (10 * per_batch, 3, side, side), val)."""

    def write(root: Path, side: int, per_batch: int = 2, num_val: int = 4, official: bool = False):
        train = [random_images(per_batch, side, seed) for seed in range(10)]
        mean = np.concatenate(train).reshape(-1, 3 * side * side).mean(0)
        for i, batch in enumerate(train, start=1):
            folder = root / (f"Imagenet{side}_train_part{1 + (i > 5)}_npz" if official else "")
            folder.mkdir(parents=True, exist_ok=True)
            labels = np.arange(1, len(batch) + 1)
            np.savez(folder / f"train_data_batch_{i}.npz", data=batch.reshape(len(batch), -1), labels=labels, mean=mean)
        val = random_images(num_val, side, 99)
        folder = root / (f"Imagenet{side}_val_npz" if official else "")
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "val_data.npz", data=val.reshape(num_val, -1), labels=np.ones(num_val, int))
        return np.concatenate(train), val

    return write
