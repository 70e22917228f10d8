"""Codes outside the model: lossless compression of images whose size is figure C (`compress`, `decompress`), and
code datasets a prior trains on (`codec.codes`). Torch and the networks only; `codec.commands` holds the commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dq.codec import coder
from lightning_dq.codec.container import Header, network_hash, pack, pixels_hash, software, unpack
from lightning_dq.errors import CheckpointError, DataError
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.prior import CodePrior


@dataclass
class Compressed:
    """A compressed file's bytes and what they cost against what the model predicts."""

    data: bytes
    payload_bits: int  # the coded stream alone (the rest is header and checksum)
    estimated_bits: float  # figure C (B without a prior) of the same tiles, computed the usual way
    dims: int  # sub-pixels of the original images: 3 * sum(H * W)

    @property
    def bits_per_dim(self) -> float:
        return 8 * len(self.data) / self.dims

    @property
    def estimated_bits_per_dim(self) -> float:
        return self.estimated_bits / self.dims


def check_rgb(image: Tensor, name: str) -> None:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}"
        raise DataError(f"{name}: expected a uint8 RGB image (3, H, W), got {got}")


def compress(
    images: Sequence[Tensor],
    autoencoder: HierarchicalAutoEncoder,
    prior: CodePrior | None = None,
    names: Sequence[str] | None = None,
    resolution: int = 32,
    group: int = 64,
    threads: int | None = None,
    checkpoint: str = "",
) -> Compressed:
    """Compress uint8 RGB images (3, H, W) of any size losslessly: the codes under `prior` (uniformly without one),
    the pixels under the decoder's probabilities, in tiles of `resolution`, `group` tiles side by side."""
    names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
    for image, name in zip(images, names, strict=True):
        check_rgb(image, name)
    threads = threads or torch.get_num_threads()
    words, estimate = coder.compress(images, autoencoder, prior, resolution, group, threads)
    header = Header(
        networks=network_hash(autoencoder, *([prior] if prior is not None else [])),
        checkpoint=checkpoint,
        prior=prior is not None,
        resolution=resolution,
        group=group,
        threads=threads,
        names=names,
        sizes=[tuple(image.shape[1:]) for image in images],
        pixels=pixels_hash(list(images)),
        software=software(),
    )
    dims = 3 * sum(h * w for h, w in header.sizes)
    return Compressed(pack(header, words), 32 * len(words), estimate, dims)


def decompress(
    data: bytes, autoencoder: HierarchicalAutoEncoder, prior: CodePrior | None = None, source: str = "the data"
) -> tuple[list[Tensor], list[str]]:
    """The images and names in the bytes of `compress`. Bytes written with other networks, damaged bytes, or a
    decode that does not reproduce the original pixels (another machine or software) are an error, never wrong
    pixels."""
    header, words = unpack(data, source)
    networks = network_hash(autoencoder, *([prior] if prior is not None else []))
    if header.prior != (prior is not None) or header.networks != networks:
        kind = "an auto-encoder and its prior" if header.prior else "an auto-encoder without a prior"
        raise CheckpointError(
            f"{source} was written with other networks ({kind}, checkpoint {header.checkpoint or 'unknown'}); "
            f"decompress it with that checkpoint"
        )
    images = coder.decompress(words, autoencoder, prior, header.sizes, header.resolution, header.group, header.threads)
    if pixels_hash(images) != header.pixels:
        raise DataError(
            f"decoding {source} did not reproduce its pixels: it decodes only with the software and CPU kind it was "
            f"written with ({header.software}, {header.threads} threads; here {software()})"
        )
    return images, header.names
