"""Shared fixtures: one thread per test process, a clean environment per test, a free TCP port (shared helpers that
are not fixtures: tests/helpers.py)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable

import pytest
import torch


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
