"""Shared fixtures."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import pytest


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
