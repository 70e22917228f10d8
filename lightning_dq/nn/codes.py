"""`CodeGeometry`: the code structure of an auto-encoder, the one source of code grid shapes. Codes are lists of int64
(B, M, h_l, w_l), top level first; their sequence order (prior, code files, codec) is level, row, column, M."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dq.errors import ConfigError


@dataclass(frozen=True)
class CodeGeometry:
    """The code structure of an auto-encoder (`HierarchicalAutoEncoder.geometry`).

    Args:
        codebook_sizes: K per level, top level first.
        num_codebooks: M, codebooks per level.
        downsample: image side / bottom level's grid side.
    """

    codebook_sizes: tuple[int, ...]
    num_codebooks: int
    downsample: int

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def factor(self) -> int:
        """Image side / top level's grid side: the side must be a multiple of it."""
        return self.downsample * 2 ** (self.num_levels - 1)

    def check(self, resolution: int) -> None:
        """Raise ConfigError unless images of side `resolution` give an integer grid at every level."""
        if not isinstance(resolution, int) or resolution < self.factor or resolution % self.factor:
            raise ConfigError(
                f"resolution={resolution!r} is not a multiple of {self.factor}, the model's total down-sampling "
                f"(downsample {self.downsample} x 2^{self.num_levels - 1} levels)"
            )

    def shapes(self, resolution: int) -> list[tuple[int, int, int, int]]:
        """(h, w, M, K) of each level's codes, top first, for square images of side `resolution`."""
        self.check(resolution)
        sides = [resolution // (self.factor >> level) for level in range(self.num_levels)]  # top first
        return [(s, s, self.num_codebooks, k) for s, k in zip(sides, self.codebook_sizes, strict=True)]

    def sequence_length(self, resolution: int) -> int:
        """The number of codes of one image of side `resolution` (all levels, all codebooks)."""
        return sum(h * w * m for h, w, m, _ in self.shapes(resolution))

    def flatten(self, levels: Sequence[Tensor]) -> Tensor:
        """Per level (B, M, h, w, *rest) -> (B, T, *rest) in sequence order (level, row, column, codebook)."""
        return torch.cat([x.movedim(1, 3).flatten(1, 3) for x in levels], 1)

    def unflatten(self, flat: Tensor | Sequence[Tensor], resolution: int) -> list[Tensor]:
        """Inverse of `flatten`: (B, T, *rest), or per level (B, h*w*M, *rest), to per level (B, M, h, w, *rest)."""
        shapes = self.shapes(resolution)
        if isinstance(flat, Tensor):
            if flat.dim() < 2 or flat.shape[1] != self.sequence_length(resolution):
                raise ValueError(
                    f"flat codes must have shape (B, {self.sequence_length(resolution)}, ...) for "
                    f"{resolution}x{resolution} images, got {tuple(flat.shape)}"
                )
            flat = flat.split([h * w * m for h, w, m, _ in shapes], 1)
        pairs = zip(flat, shapes, strict=True)
        return [x.reshape(x.shape[0], h, w, m, *x.shape[2:]).movedim(3, 1) for x, (h, w, m, _) in pairs]

    def check_codes(self, codes: Sequence[Tensor], values: bool = False) -> int:
        """Check codes (levels, dtype, shapes; with `values` the range: a host sync); return the image side implied."""
        if not isinstance(codes, list | tuple) or len(codes) != self.num_levels:
            got = f"{len(codes)} items" if isinstance(codes, list | tuple) else type(codes).__name__
            raise ValueError(f"codes must be a list of {self.num_levels} tensors, one per level, top first; got {got}")
        if any(not isinstance(c, Tensor) or c.dtype != torch.int64 or c.dim() != 4 for c in codes):
            got = [f"{c.dtype} {tuple(c.shape)}" if isinstance(c, Tensor) else type(c).__name__ for c in codes]
            raise ValueError(f"codes must be int64 tensors (B, M, h, w), top level first; got {got}")
        resolution = codes[-1].shape[-1] * self.downsample  # the bottom grid fixes the image side
        try:
            self.check(resolution)
        except ConfigError as err:
            raise ValueError(
                f"codes[-1] of shape {tuple(codes[-1].shape)} implies {resolution}x{resolution} images: {err}"
            ) from None
        for level, (c, (h, w, m, k)) in enumerate(zip(codes, self.shapes(resolution), strict=True)):
            if tuple(c.shape) != (codes[0].shape[0], m, h, w):
                raise ValueError(
                    f"codes[{level}] (level {level}, top first) must have shape (B, M, h, w) = "
                    f"{(codes[0].shape[0], m, h, w)} for {resolution}x{resolution} images, got {tuple(c.shape)}"
                )
            low, high = (int(v) for v in torch.aminmax(c)) if values and c.numel() else (0, 0)
            if low < 0 or high >= k:
                raise ValueError(f"codes[{level}] values must lie in [0, {k}), got min {low}, max {high}")
        return resolution
