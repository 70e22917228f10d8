"""Epoch-level codebook usage as a torchmetrics `Metric` (exact under DDP: histograms are summed)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class CodeUsage(Metric):
    """Histogram of the codes of one level over an epoch.

    Per-batch perplexity depends on the batch size; the epoch histogram does not, and it shows codes
    that are never used at all (bshall/VectorQuantizedVAE#3).

    Args:
        num_codebooks: M.
        codebook_size: K.
    """

    full_state_update = False

    def __init__(self, num_codebooks: int, codebook_size: int) -> None:
        super().__init__()
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.add_state("hist", torch.zeros(num_codebooks, codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """codes: (B, M, h, w) int64."""
        m, k = self.num_codebooks, self.codebook_size
        flat = codes.transpose(0, 1).reshape(m, -1)  # (M, B*h*w)
        offsets = torch.arange(m, device=codes.device).unsqueeze(1) * k  # (M, 1)
        self.hist += torch.bincount((flat + offsets).flatten(), minlength=m * k).view(m, k)

    def compute(self) -> dict[str, Tensor]:
        """used: fraction of codes used at least once (mean over M); perplexity: of the epoch histogram."""
        probs = self.hist.float() / self.hist.sum(dim=1, keepdim=True).clamp_min(1)  # (M, K)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)  # (M,)
        return {"used": (self.hist > 0).float().mean(), "perplexity": entropy.exp().mean()}
