"""`Codebook`: M EMA codebooks of K codes of dimension D, all their maths in one batched computation: fp32, no one-hot
matrices, no loop over codebooks, statistics all-reduced and restarts broadcast (identical on every rank)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dq.errors import ConfigError
from lightning_dq.nn.distributed import all_finite, all_reduce_sum_, broadcast_from_rank0_

SCORE_BUDGET = 1 << 22  # max elements of one (M, chunk, K) distance block in `Codebook.nearest`


def stacked_index(codes: Tensor, codebook_size: int) -> Tensor:
    """Codes `(M, N)` of M codebooks -> indices `(M, N)` into the M*K codes stacked codebook after codebook."""
    offsets = torch.arange(codes.shape[0], device=codes.device).unsqueeze(1) * codebook_size  # (M, 1)
    return codes + offsets


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code per codebook `(M, N)` -> `(M, K)` float32 (exact below 2**24), by one `index_add_`: torch's
    bin count reads its maximum back to the host, a sync per call on GPUs."""
    m = codes.shape[0]
    index = stacked_index(codes, codebook_size).flatten()  # (M*N,)
    counts = torch.zeros(m * codebook_size, device=codes.device)
    return counts.index_add_(0, index, torch.ones(index.shape[0], device=codes.device)).view(m, codebook_size)


def laplace_smoothing(counts: Tensor, eps: float) -> Tensor:
    """(count_k + eps) / (n + K * eps) * n per codebook `(M, K)`: the total n is kept, no code divides by 0."""
    n = counts.sum(dim=-1, keepdim=True)  # (M, 1)
    return (counts + eps) / (n + counts.shape[-1] * eps) * n


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of each codebook's code histogram `(M, K)` -> `(M,)`; K when usage is uniform."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (M, K)
    return torch.special.entr(probs).sum(dim=-1).exp()


def sample_rows(x: Tensor, k: int) -> Tensor:
    """k vectors per codebook from `x` `(M, N, D)` -> `(M, k, D)`: without replacement when N >= k."""
    m, n, d = x.shape
    if n >= k:
        index = torch.rand(m, n, device=x.device).topk(k, dim=1).indices  # (M, k)
    else:
        index = torch.randint(n, (m, k), device=x.device)  # (M, k)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(m, k, d))


def kmeans_plus_plus(x: Tensor, k: int) -> Tensor:
    """k-means++ seeds per codebook: k vectors of `x` `(M, N, D)` -> `(M, k, D)`, N >= k. A plain random sample
    often puts two codes in one cluster, a local optimum the EMA updates never leave."""
    m, n, d = x.shape
    rows = torch.arange(m, device=x.device)
    seeds = [x[rows, torch.randint(n, (m,), device=x.device)]]  # k tensors of (M, D)
    min_d2 = (x - seeds[0].unsqueeze(1)).pow(2).sum(-1)  # (M, N)
    for _ in range(k - 1):
        # the tiny floor makes the draw uniform when every vector is already covered (duplicates)
        pick = torch.multinomial(min_d2 + 1e-12, 1).squeeze(1)  # (M,)
        seeds.append(x[rows, pick])
        min_d2 = torch.minimum(min_d2, (x - seeds[-1].unsqueeze(1)).pow(2).sum(-1))
    return torch.stack(seeds, dim=1)  # (M, k, D)


class CodebookStats(NamedTuple):
    """Per-codebook health of one forward pass (all shape `(M,)`)."""

    perplexity: Tensor  # exp(entropy) of this batch's code histogram (the global batch under DDP)
    dead_fraction: Tensor  # fraction of codes whose EMA count is below the dead-code threshold, before restarts
    restarted: Tensor  # number of codes restarted in this pass


class Codebook(nn.Module):
    """M EMA codebooks of K codes of dimension D, updated in one batched computation. Buffers (fp32, in checkpoints):
    `embed` (M, K, D), the EMA counts `cluster_size` (M, K) and sums `embed_avg`. A code whose EMA count falls below
    `dead_code_threshold` is restarted from a batch vector with its statistics reset to count = threshold (the official
    code keeps the stale ones, which pull the code back); `restart_enabled` gates this per pass (`CodebookReset`). The
    first training pass sets every code that way from k-means++ seeds. A pass with NaN/inf vectors on any rank changes
    no codebook on any rank (gated with `torch.where`, no sync).

    Args:
        num_codebooks: M, the number of independent codebooks.
        codebook_size: K, the number of codes per codebook.
        code_dim: D, the dimension of each code.
        decay: EMA decay of counts and sums (the paper's code uses 0.99).
        eps: Laplace smoothing constant of the counts.
        dead_code_threshold: EMA count below which a code is dead (1.0: about one use per batch; 0 disables restarts).
    """

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if not (0.0 <= decay < 1.0 and eps > 0 and dead_code_threshold >= 0):
            raise ConfigError(
                f"need 0 <= decay < 1, eps > 0 and dead_code_threshold >= 0, got decay={decay!r}, eps={eps!r}, "
                f"dead_code_threshold={dead_code_threshold!r}"
            )
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.eps = eps
        self.dead_code_threshold = dead_code_threshold
        self.restart_enabled = True
        embed = torch.randn(num_codebooks, codebook_size, code_dim)
        self.register_buffer("embed", embed)  # (M, K, D)
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))  # (M, K)
        self.register_buffer("embed_avg", embed.clone())  # (M, K, D)
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side cache of `initialized` (reading the buffer syncs the host); forgotten on load_state_dict
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    def needs_init(self) -> bool:
        """Whether the data-dependent init must still run; reads the buffer (one host sync) only until it ran."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return not self._known_initialized

    def extra_repr(self) -> str:
        return f"M={self.num_codebooks}, K={self.codebook_size}, D={self.code_dim}, decay={self.decay}"

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) of each vector of `x` `(M, N, D)` -> `(M, N)` int64."""
        # argmin_k |x - e_k|^2 = argmin_k (|e_k|^2 - 2 x.e_k): |x|^2 is the same for every k
        e2 = self.embed.pow(2).sum(dim=-1).unsqueeze(1)  # (M, 1, K)
        embed_t = self.embed.transpose(1, 2)  # (M, D, K)
        chunk = max(1, SCORE_BUDGET // (self.num_codebooks * self.codebook_size))  # ~16 MB blocks, whatever N, K
        scores = (torch.baddbmm(e2, xs, embed_t, alpha=-2.0) for xs in x.split(chunk, dim=1))  # (M, chunk, K)
        return torch.cat([s.argmin(dim=-1) for s in scores], dim=1)  # (M, N)

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors of indices `(M, N)` -> `(M, N, D)`, gathered (no one-hot)."""
        flat = self.embed.reshape(self.num_codebooks * self.codebook_size, self.code_dim)  # (M*K, D)
        return F.embedding(stacked_index(codes, self.codebook_size), flat)

    @torch.no_grad()
    def initialize(self, x: Tensor, finite: Tensor) -> None:
        """Data-dependent init from `x` `(M, N, D)`: k-means++ seeds, every code "restarted"; if any rank's batch is
        not `finite`, nothing changes and the next training pass tries again."""
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # k-means++ weights must be finite
        k = self.codebook_size
        seeds = kmeans_plus_plus(x, k) if x.shape[1] >= k else sample_rows(x, k)  # (M, K, D)
        samples = broadcast_from_rank0_(seeds.contiguous())
        ok = all_finite(finite)  # () bool, the same on every rank
        self._reset_codes(ok.expand_as(self.cluster_size), samples)
        self.initialized.copy_(ok)
        self._known_initialized = bool(ok)  # the one host sync of the init pass

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        """One EMA step from vectors `(M, N, D)` and their codes `(M, N)`, gated on `finite` (this rank's batch);
        returns the counts `(M, K)` summed over ranks and whether every rank's batch was finite (`()` bool)."""
        m, k, d = self.num_codebooks, self.codebook_size, self.code_dim
        index = stacked_index(codes, k).flatten()  # (M*N,)
        counts = code_histogram(codes, k)  # (M, K)
        sums = x.new_zeros(m * k, d).index_add_(0, index, x.reshape(-1, d)).view(m, k, d)  # (M, K, D)
        # one collective for counts, sums and the number of ranks whose batch is not finite
        packed = torch.cat([torch.cat([counts.unsqueeze(-1), sums], dim=-1).flatten(), (~finite).float().view(1)])
        packed = all_reduce_sum_(packed)  # (M*K*(1 + D) + 1,)
        ok = packed[-1] == 0  # () bool, the same on every rank
        counts = packed[:-1].view(m, k, 1 + d)[..., 0]  # (M, K)
        sums = packed[:-1].view(m, k, 1 + d)[..., 1:]  # (M, K, D)
        cluster_size = torch.add(self.cluster_size * self.decay, counts, alpha=1.0 - self.decay)  # (M, K)
        embed_avg = torch.add(self.embed_avg * self.decay, sums, alpha=1.0 - self.decay)  # (M, K, D)
        embed = embed_avg / laplace_smoothing(cluster_size, self.eps).unsqueeze(-1)  # (M, K, D)
        # torch.where selects, so a NaN in the rejected branch never reaches the buffers
        self.cluster_size.copy_(torch.where(ok, cluster_size, self.cluster_size))
        self.embed_avg.copy_(torch.where(ok, embed_avg, self.embed_avg))
        self.embed.copy_(torch.where(ok, embed, self.embed))
        return counts, ok

    def dead_codes(self) -> Tensor:
        """Boolean mask `(M, K)` of the codes whose EMA count is below the threshold."""
        return self.cluster_size < self.dead_code_threshold

    @torch.no_grad()
    def restart_dead_codes(self, x: Tensor, ok: Tensor) -> Tensor:
        """Replace dead codes by vectors sampled from `x` `(M, N, D)` if `ok`; returns the count per codebook `(M,)`.
        The mask comes from all-reduced counts, the samples from rank 0 (always broadcast: no rank skips it)."""
        dead = self.dead_codes() & ok  # (M, K)
        samples = broadcast_from_rank0_(sample_rows(x, self.codebook_size).contiguous())  # (M, K, D)
        self._reset_codes(dead, samples)
        return dead.sum(dim=-1)

    def _reset_codes(self, mask: Tensor, samples: Tensor) -> None:
        """Set the codes under `mask` `(M, K)` to `samples` `(M, K, D)` with count = threshold."""
        count = max(self.dead_code_threshold, 1e-3)  # a usable denominator when restarts are off
        mask3 = mask.unsqueeze(-1)  # (M, K, 1)
        self.embed.copy_(torch.where(mask3, samples, self.embed))
        self.embed_avg.copy_(torch.where(mask3, samples * count, self.embed_avg))
        self.cluster_size.copy_(torch.where(mask, torch.full_like(self.cluster_size, count), self.cluster_size))
