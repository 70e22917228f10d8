"""Epoch aggregates as torchmetrics, exact under DDP; every state is a sum (`ResumeCheckpoint` relies on it)."""

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from lightning_dq.nn.codebook import code_histogram, perplexity


class CodeUsage(Metric):
    """Histogram of the codes of one level over an epoch (no host sync): unlike a batch's perplexity it does not
    depend on the batch size, and it shows the codes never used at all (bshall/VectorQuantizedVAE#3).

    Args:
        num_codebooks: M.
        codebook_size: K.
    """

    full_state_update = False

    def __init__(self, num_codebooks: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("hist", torch.zeros(num_codebooks, codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """codes: (B, M, h, w) int64."""
        # a batch's counts are exact in float32 (< 2**24); the epoch's are summed in int64
        self.hist += code_histogram(codes.transpose(0, 1).flatten(1), self.codebook_size).long()  # (M, K)

    def compute(self) -> dict[str, Tensor]:
        """used: fraction of codes used at least once (mean over M); perplexity: of the epoch histogram."""
        return {"used": (self.hist > 0).float().mean(), "perplexity": perplexity(self.hist.double()).mean()}


class StageMetrics(nn.Module):
    """Epoch aggregates of one stage: per-image means, the number of images and of those with a non-finite value
    (NaNs are kept in the means and counted, never dropped), and per-level code usage.

    Args:
        names: the per-image values averaged over the epoch.
        code_specs: (M, K) per level, top first.
    """

    def __init__(self, names: list[str], code_specs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.means = nn.ModuleDict({n: MeanMetric(nan_strategy="disable") for n in names})
        # no NaN check in the sums: it would sync the host every step, and they are counts
        self.images = SumMetric(nan_strategy="disable")
        self.nonfinite = SumMetric(nan_strategy="disable")
        self.usage = nn.ModuleList(CodeUsage(m, k) for m, k in code_specs)

    def update(self, values: dict[str, Tensor], codes: list[Tensor]) -> None:
        """values: per-image tensors (B,); codes: per level (B, M, h, w)."""
        finite = torch.stack([torch.isfinite(v) for v in values.values()]).all(dim=0)  # (B,)
        for name, v in values.items():
            self.means[name].update(v)
        self.images.update(torch.tensor(float(finite.shape[0]), device=finite.device))
        self.nonfinite.update((~finite).sum().float())
        for usage, c in zip(self.usage, codes, strict=True):
            usage.update(c)

    def reset(self) -> None:
        for metric in [*self.means.values(), self.images, self.nonfinite, *self.usage]:
            metric.reset()
