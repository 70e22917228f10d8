"""The compressed file: what identifies the networks it needs, and checks that refuse damage instead of decoding it.

    magic b"LDQC" | version (1 byte) | header length (4 bytes) | header (zlib-compressed UTF-8 JSON)
    | words (8-byte count, then uint32) | SHA-256 of everything before it (32 bytes)

All integers are little-endian. The header names the images and their sizes, the tiling, the content hash of the
networks (decoding with others is refused), the software and thread count that wrote the file, and a SHA-256 of
the pixels, which decoding checks: a file is never decoded into wrong pixels without an error (docs/codec.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dq.errors import DataError, disk_full

MAGIC = b"LDQC"
VERSION = 2  # 2: the header is zlib-compressed (names and sizes of 10,000 images: 240 KB of JSON, ~1% of C)


def network_hash(*networks: nn.Module) -> str:
    """SHA-256 of the networks' constructor arguments (`config`) and weights: the same for a checkpoint and any copy
    of its network (a prior checkpoint's auto-encoder included)."""
    digest = hashlib.sha256()
    for net in networks:
        digest.update(json.dumps(getattr(net, "config", {}), sort_keys=True).encode())
        for name, value in sorted(net.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pixels_hash(images: list[Tensor]) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Header:
    """What a file says about itself (docs/codec.md lists every field)."""

    networks: str  # network_hash of the auto-encoder (and the prior)
    checkpoint: str  # the checkpoint the file was written with (a hint; the hash decides)
    prior: bool  # codes under a learned prior (figure C) or uniform (figure B)
    resolution: int  # the tile side
    group: int  # tiles coded side by side
    threads: int  # intra-op threads of the writer: the reader uses the same
    names: list[str]
    sizes: list[tuple[int, int]]  # (H, W) per image
    pixels: str  # SHA-256 of the images
    software: dict = field(default_factory=dict)  # torch version, CPU capability of the writer


def software() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def pack(header: Header, words: np.ndarray) -> bytes:
    """The file's bytes: header, coded words and checksum."""
    text = zlib.compress(json.dumps(asdict(header)).encode(), 9)
    body = MAGIC + bytes([VERSION]) + struct.pack("<I", len(text)) + text
    body += struct.pack("<Q", len(words)) + words.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, source: str = "the data") -> tuple[Header, np.ndarray]:
    """The header and the coded words of a file's bytes; foreign, truncated or damaged bytes are a `DataError`
    naming `source`."""
    if data[:4] != MAGIC:
        raise DataError(f"{source} is not a lightning-dq compressed file (it does not start with {MAGIC!r})")
    if len(data) < 49 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise DataError(f"{source} is truncated or damaged (its checksum does not match): it cannot be decoded")
    if data[4] != VERSION:
        raise DataError(f"{source} has format version {data[4]}; this lightning-dq reads version {VERSION}")
    (length,) = struct.unpack_from("<I", data, 5)
    header = json.loads(zlib.decompress(data[9 : 9 + length]))
    header["sizes"] = [tuple(size) for size in header["sizes"]]
    (count,) = struct.unpack_from("<Q", data, 9 + length)
    words = np.frombuffer(data, dtype="<u4", count=count, offset=17 + length).astype(np.uint32)
    return Header(**header), words


def write_atomic(path: str | Path, data: bytes, what: str) -> None:
    """Write `data` to `path` through a temporary file renamed over it: a failure leaves no partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full(err, path, what, "run the command again") from err
