"""`DepthwiseQuantizer` (Fostiropoulos & Boehm, CVPR 2022, arXiv 2203.08080): the module an encoder calls."""

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_dq.nn.codebook import Codebook, CodebookStats, code_histogram, perplexity

QuantizerMode = Literal["dq", "vq"]


class QuantizerOutput(NamedTuple):
    """What `DepthwiseQuantizer.forward` returns."""

    quantized: Tensor  # (B, M*D, h, w) float32, straight-through gradient to the projection's input
    codes: Tensor  # (B, M, h, w) int64
    commitment: Tensor  # () mean squared distance to the stop-gradient codes, summed (or averaged) over M
    stats: CodebookStats  # per-codebook health, each (M,)


class DepthwiseQuantizer(nn.Module):
    """Project `(B, C, h, w)` features and quantize them with M codebooks, with a straight-through gradient. Mode "dq":
    a 1x1 conv C -> M*D split along channels into M slices of D, slice m quantized by codebook m: K^M representable
    vectors for M*K stored codes. Mode "vq" (the official baseline): a 1x1 conv C -> D whose vector all M codebooks
    quantize, the results concatenated: the same memory and width (M=1 is plain VQ). The EMA codebooks update in
    training mode only; projection and codebook maths run in fp32, autocast off.

    Args:
        in_channels: C, channels of the features to quantize.
        num_codebooks: M, independent codebooks (one per channel slice in "dq").
        codebook_size: K, codes per codebook.
        code_dim: D, dimension of each code (the slice width in "dq").
        mode: "dq" (depthwise split) or "vq" (shared vector, the official baseline).
        decay: EMA decay of the codebook statistics.
        eps: Laplace smoothing of the EMA counts.
        dead_code_threshold: EMA count below which a code is restarted from the batch (0 disables).
        commitment_reduction: "sum" over the M codebooks (the paper's code) or "mean".
    """

    def __init__(
        self,
        in_channels: int,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        mode: QuantizerMode = "dq",
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        commitment_reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.mode = mode
        self.commitment_reduction = commitment_reduction
        self.codebook = Codebook(num_codebooks, codebook_size, code_dim, decay, eps, dead_code_threshold)
        self.proj = nn.Conv2d(in_channels, num_codebooks * code_dim if mode == "dq" else code_dim, kernel_size=1)

    @property
    def num_codebooks(self) -> int:
        return self.codebook.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.codebook.codebook_size

    @property
    def code_dim(self) -> int:
        return self.codebook.code_dim

    @property
    def out_channels(self) -> int:
        """M*D, the width of `quantized` (the same in "dq" and "vq")."""
        return self.num_codebooks * self.code_dim

    def _to_vectors(self, z: Tensor) -> Tensor:
        """Projected features `(B, M*D or D, h, w)` -> per-codebook vectors `(M, N, D)`, N = B*h*w."""
        b, _, h, w = z.shape
        m, d = self.num_codebooks, self.code_dim
        if self.mode == "vq":  # every codebook sees the same vector: a view, no copy
            return z.permute(0, 2, 3, 1).reshape(1, b * h * w, d).expand(m, -1, -1)  # (M, N, D)
        return z.view(b, m, d, h, w).permute(1, 0, 3, 4, 2).reshape(m, b * h * w, d)  # (M, N, D)

    def _to_image(self, v: Tensor, b: int, h: int, w: int) -> Tensor:
        """Per-codebook vectors `(M, N, D)` -> `(B, M*D, h, w)`."""
        m, d = self.num_codebooks, self.code_dim
        return v.view(m, b, h, w, d).permute(1, 0, 4, 2, 3).reshape(b, m * d, h, w)

    def embed_codes(self, codes: Tensor) -> Tensor:
        """Codes `(B, M, h, w)` -> quantized features `(B, M*D, h, w)` (fp32, no gradient path)."""
        if codes.dim() != 4 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must have shape (B, {self.num_codebooks}, h, w), got {tuple(codes.shape)}")
        b, m, h, w = codes.shape
        flat = codes.permute(1, 0, 2, 3).reshape(m, b * h * w)  # (M, N)
        return self._to_image(self.codebook.lookup(flat), b, h, w)

    def forward(self, x: Tensor) -> QuantizerOutput:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected features (B, {self.in_channels}, h, w), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        cb = self.codebook
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.proj(x.float())  # (B, M*D or D, h, w) fp32
            vectors = self._to_vectors(z)  # (M, N, D)
            if self.training:
                finite = torch.isfinite(vectors.detach()).all()  # () bool, a device flag: no host sync
                if cb.needs_init():
                    cb.initialize(vectors.detach(), finite)
            codes = cb.nearest(vectors.detach())  # (M, N)
            chosen = cb.lookup(codes)  # (M, N, D): the codebook the codes were chosen from, before its update
            per_codebook = (vectors - chosen).pow(2).mean(dim=(1, 2))  # (M,)
            commitment = per_codebook.sum() if self.commitment_reduction == "sum" else per_codebook.mean()
            restarted = torch.zeros(cb.num_codebooks, device=x.device)
            if self.training:
                counts, ok = cb.update(vectors.detach(), codes, finite)  # (M, K) summed over ranks, () bool
                dead_fraction = cb.dead_codes().float().mean(dim=-1)  # (M,), before restarts revive them
                if cb.restart_enabled and cb.dead_code_threshold > 0:
                    restarted = cb.restart_dead_codes(vectors.detach(), ok).float()
            else:
                counts = code_histogram(codes, cb.codebook_size)  # (M, K), this process only
                dead_fraction = cb.dead_codes().float().mean(dim=-1)  # (M,)
            continuous = z if self.mode == "dq" else self._to_image(vectors, b, h, w)  # (B, M*D, h, w)
            # straight-through: the value is exactly the codes' vectors, the gradient is the identity
            straight_through = self._to_image(chosen, b, h, w) + (continuous - continuous.detach())
        codes_bmhw = codes.view(cb.num_codebooks, b, h, w).permute(1, 0, 2, 3).contiguous()  # (B, M, h, w)
        stats = CodebookStats(perplexity(counts), dead_fraction, restarted)
        return QuantizerOutput(straight_through, codes_bmhw, commitment, stats)
