"""Lossless coding of images with a trained auto-encoder and its prior: the size of the result is figure C (figure B
without a prior), in real bits.

Each image is cut into tiles of the model's resolution (edge tiles padded by replicating the last row and column;
decoding crops them away). Tiles are coded in groups of `group`: first the codes of the group, position by position
in sequence order, under the prior's conditionals (`PriorStream` fed the true codes) or uniformly; then its pixels
under the decoder's 256-bin probabilities given the codes: every R value, then G given R, then B given R and G
(`head_channel_probs`), with `constriction`'s range coder. Encoder and decoder run the same computations on the same
groups, in fp32 with autocast off and the same number of threads, so their probabilities are the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dq.codec.probabilities import head_channel_probs
from lightning_dq.errors import DataError
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.figures import likelihood_figures
from lightning_dq.nn.heads import head_nll
from lightning_dq.nn.prior import CodePrior, PriorStream

MODEL = constriction.stream.model.Categorical(perfect=False)  # the exact quantisation is very slow
PIXEL_CHUNK = 8  # tiles whose pixel probabilities are built at once: (8, mixtures, 255, 32, 32) fp32 ~ 80 MB


def tile(image: Tensor, side: int) -> Tensor:
    """uint8 (3, H, W) -> tiles (n, 3, side, side), row-major; the last row and column of tiles are padded by
    replicating the image's last row and column."""
    _, h, w = image.shape
    rows, cols = -(-h // side), -(-w // side)
    padded = F.pad(image[None].float(), (0, cols * side - w, 0, rows * side - h), mode="replicate")[0]
    return padded.to(torch.uint8).view(3, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(-1, 3, side, side)


def untile(tiles: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `tile`: tiles (n, 3, side, side) -> the uint8 image (3, height, width)."""
    side = tiles.shape[-1]
    rows, cols = -(-height // side), -(-width // side)
    image = tiles.view(rows, cols, 3, side, side).permute(2, 0, 3, 1, 4).reshape(3, rows * side, cols * side)
    return image[:, :height, :width].contiguous()


def tile_count(height: int, width: int, side: int) -> int:
    return -(-height // side) * -(-width // side)


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """No gradients, no autocast, and a fixed number of intra-op threads (a reduction may be split by thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.set_num_threads(before)


def _codes(coder, net: HierarchicalAutoEncoder, prior: CodePrior | None, side: int, n: int, codes: Tensor | None):
    """Encode (`codes` (n, T) given) or decode (None) the codes of n tiles position by position; returns (n, T)."""
    sizes = [k for h, w, m, k in net.geometry.shapes(side) for _ in range(h * w * m)]  # K of every position
    stream = PriorStream(prior, n, side) if prior is not None else None
    out = torch.zeros(n, len(sizes), dtype=torch.long)
    for t, k in enumerate(sizes):
        logits = stream.logits() if stream is not None else torch.zeros(n, k)  # (n, K) fp32
        probs = F.softmax(logits, dim=-1).double().numpy()  # the coder rescales them to its fixed-point table
        if codes is None:
            out[:, t] = torch.from_numpy(coder.decode(MODEL, probs).astype(np.int64))
        else:
            coder.encode(codes[:, t].numpy().astype(np.int32), MODEL, probs)
            out[:, t] = codes[:, t]
        if stream is not None:
            stream.push(out[:, t])
    return out


def _pixels(coder, net: HierarchicalAutoEncoder, params: Tensor, pixels: Tensor | None) -> Tensor:
    """Encode (`pixels` (n, 3, s, s) uint8 given) or decode the pixels of n tiles channel by channel under the head's
    probabilities `params` (n, P, s, s) given their codes; returns the pixels."""
    out = torch.zeros(params.shape[0], 3, *params.shape[2:], dtype=torch.uint8) if pixels is None else pixels
    for start in range(0, len(out), PIXEL_CHUNK):
        chunk, x = params[start : start + PIXEL_CHUNK], out[start : start + PIXEL_CHUNK]
        for channel in range(3):
            probs = head_channel_probs(net.head, chunk, x, channel, net.num_mixtures)  # (g, 256, s, s)
            table = probs.permute(0, 2, 3, 1).reshape(-1, 256).double().numpy()  # (g*s*s, 256), pixels row-major
            if pixels is None:
                values = torch.from_numpy(coder.decode(MODEL, table).astype(np.uint8))
                x[:, channel] = values.view(x.shape[0], *x.shape[2:])
            else:
                coder.encode(x[:, channel].reshape(-1).numpy().astype(np.int32), MODEL, table)
    return out


def estimated_bits(net: HierarchicalAutoEncoder, prior: CodePrior | None, tiles: Tensor) -> float:
    """Figure C (figure B without a prior) of `tiles`, computed the usual way, in total bits."""
    side = tiles.shape[-1]
    out = net(tiles)
    log_prob = prior.log_prob(out.codes) if prior is not None else None
    nll = head_nll(net.head, out.params, tiles, net.num_mixtures)
    figures = likelihood_figures(nll, net.code_shapes(side), (side, side), log_prob)
    return float(figures["bpd_prior" if prior is not None else "bpd_uniform"].double().sum()) * 3 * side**2


def compress(
    images: Sequence[Tensor], net: HierarchicalAutoEncoder, prior: CodePrior | None, side: int, group: int, threads: int
) -> tuple[np.ndarray, float]:
    """Code uint8 RGB images (3, H, W) of any size: the compressed words (uint32), and figure C (B without a prior)
    of their tiles computed the usual way, in total bits."""
    net.geometry.check(side)
    tiles = torch.cat([tile(image, side) for image in images])  # (n, 3, side, side)
    coder = constriction.stream.queue.RangeEncoder()
    estimate = 0.0
    net.eval()
    prior = prior.eval() if prior is not None else None
    with deterministic(threads):
        for start in range(0, len(tiles), group):
            x = tiles[start : start + group]
            codes = _codes(coder, net, prior, side, len(x), net.geometry.flatten(net.encode(x)))
            _pixels(coder, net, net.decode(net.geometry.unflatten(codes, side)), x)  # the decoder's view of x
            estimate += estimated_bits(net, prior, x)
    return coder.get_compressed(), estimate


def decompress(
    words: np.ndarray,
    net: HierarchicalAutoEncoder,
    prior: CodePrior | None,
    sizes: Sequence[tuple[int, int]],
    side: int,
    group: int,
    threads: int,
) -> list[Tensor]:
    """The uint8 images (3, H, W) of `sizes` coded in `words` by `compress` with the same arguments."""
    counts = [tile_count(h, w, side) for h, w in sizes]
    coder = constriction.stream.queue.RangeDecoder(words)
    tiles = []
    net.eval()
    prior = prior.eval() if prior is not None else None
    with deterministic(threads):
        for start in range(0, sum(counts), group):
            codes = _codes(coder, net, prior, side, min(group, sum(counts) - start), None)
            tiles.append(_pixels(coder, net, net.decode(net.geometry.unflatten(codes, side)), None))
    if not coder.maybe_exhausted():
        raise DataError("the coded stream holds more than its header describes")
    bounds = np.cumsum([0, *counts])
    tiles = torch.cat(tiles) if tiles else torch.zeros(0, 3, side, side, dtype=torch.uint8)
    return [untile(tiles[bounds[i] : bounds[i + 1]], h, w) for i, (h, w) in enumerate(sizes)]
