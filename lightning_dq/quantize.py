"""Depthwise Quantization (Fostiropoulos & Boehm, CVPR 2022, arXiv 2203.08080).

`Codebook` holds M independent EMA codebooks of K codes of dimension D and does all of their maths in
one batched computation on a `(M, N, D)` tensor: nearest-code search, EMA update, dead-code restart,
data-dependent initialisation and DDP synchronisation.

`DepthwiseQuantizer` is the `nn.Module` an encoder calls: a learned 1x1 projection, the split of the
projected features along channels into M slices of D (mode "dq"), or the official code's VQ baseline
where one D-vector is shown to all M codebooks (mode "vq"), plus the straight-through estimator and the
commitment term.

Rules (see docs/design.md): codebook maths in fp32 with autocast off; no (N, K) one-hot matrices; no
Python loop over codebooks; collectives decided at call time, never in `__init__`, because Lightning
builds the model before the process group exists.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dq.errors import ConfigError

SCORE_BUDGET = 1 << 22  # max elements of one (M, chunk, K) distance block in `Codebook.nearest`

# ---------------------------------------------------------------------------------------------------
# distributed helpers: no-ops unless a process group with more than one rank exists *at call time*
# ---------------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when `torch.distributed` is initialised with world size > 1 (checked on every call)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all ranks (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_finite(finite: Tensor) -> Tensor:
    """Whether a boolean scalar `finite` is True on every rank (`()` bool tensor, no host sync)."""
    bad = (~finite).float().view(1)  # (1,)
    return all_reduce_sum_(bad)[0] == 0


def broadcast_from_rank0_(tensor: Tensor) -> Tensor:
    """Overwrite `tensor` in place with rank 0's copy (identity in a single process)."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------


def laplace_smoothing(counts: Tensor, eps: float) -> Tensor:
    """Additive smoothing of per-code counts `(M, K)`, keeping each codebook's total n unchanged.

    smoothed_k = (count_k + eps) / (n + K * eps) * n, so no code divides by zero.
    """
    n = counts.sum(dim=-1, keepdim=True)  # (M, 1)
    return (counts + eps) / (n + counts.shape[-1] * eps) * n


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of each codebook's code histogram `(M, K)` -> `(M,)`; K when usage is uniform."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    return entropy.exp()


def sample_rows(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw k vectors per codebook from `x` `(M, N, D)` -> `(M, k, D)`.

    Without replacement when N >= k (so a fresh codebook has no duplicates), with replacement otherwise.
    """
    m, n, d = x.shape
    if n >= k:
        scores = torch.rand(m, n, generator=generator, device=x.device)
        index = scores.topk(k, dim=1).indices  # (M, k)
    else:
        index = torch.randint(n, (m, k), generator=generator, device=x.device)  # (M, k)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(m, k, d))


def kmeans_plus_plus(x: Tensor, k: int) -> Tensor:
    """k-means++ seeding per codebook: k vectors from `x` `(M, N, D)` -> `(M, k, D)`.

    Each next seed is drawn with probability proportional to its squared distance to the nearest seed so
    far, so seeds spread over the clusters instead of piling up in the densest one (a plain random sample
    often puts two codes in one cluster, a local optimum EMA updates never leave). Needs N >= k.
    """
    m, n, d = x.shape
    rows = torch.arange(m, device=x.device)
    first = torch.randint(n, (m,), device=x.device)
    seeds = [x[rows, first]]  # k tensors of (M, D)
    min_d2 = (x - seeds[0].unsqueeze(1)).pow(2).sum(-1)  # (M, N)
    for _ in range(k - 1):
        # the tiny floor makes the draw uniform when all vectors are already covered (duplicates)
        pick = torch.multinomial(min_d2 + 1e-12, 1).squeeze(1)  # (M,)
        seeds.append(x[rows, pick])
        min_d2 = torch.minimum(min_d2, (x - seeds[-1].unsqueeze(1)).pow(2).sum(-1))
    return torch.stack(seeds, dim=1)  # (M, k, D)


# ---------------------------------------------------------------------------------------------------
# the codebook state
# ---------------------------------------------------------------------------------------------------


class CodebookStats(NamedTuple):
    """Per-codebook health of one forward pass (all shape `(M,)`)."""

    perplexity: Tensor  # exp(entropy) of this batch's code histogram (global batch under DDP)
    dead_fraction: Tensor  # fraction of codes whose EMA count is below the dead-code threshold, before restarts
    restarted: Tensor  # number of codes restarted in this pass


class Codebook(nn.Module):
    """M EMA codebooks of K codes of dimension D, updated in one batched computation.

    All state is in fp32 buffers (so it is saved in checkpoints and survives resume):
    `embed` (M, K, D) the code vectors, `cluster_size` (M, K) the EMA assignment counts, `embed_avg`
    (M, K, D) the EMA sums of assigned vectors, `initialized` whether the data-dependent init ran.

    Dead-code restart: a code whose EMA count is below `dead_code_threshold` after an update gets a
    vector sampled from the current batch, and its EMA statistics are reset to count = threshold,
    sum = sample * threshold. Resetting (unlike the official code, which keeps the stale statistics)
    means the next EMA step continues from the new vector instead of being pulled back to the stale
    mean, and a restarted code that wins assignments stays alive; one that wins nothing is dead again
    and is re-sampled, which is what we want. Whether a pass may restart is `restart_enabled` (True by
    default: every training step, as in the paper's code); `lightning_dq.callbacks.CodebookReset`
    schedules it during training.

    Initialisation: the first training pass sets every code as if it had just been restarted, from K
    batch vectors chosen by k-means++ seeding (count = threshold): a data-dependent init that starts
    the codes spread over where the encoder's outputs are.

    DDP: counts and sums are all-reduced before the EMA step, so every rank applies the same update;
    restart and init samples are drawn on rank 0 and broadcast. Every rank therefore holds identical
    codebooks. Whether to communicate is decided on every call.

    Non-finite input: a pass whose vectors hold NaN/inf on *any* rank changes no codebook on any rank.
    Each rank's "my batch is finite" flag rides along in the all-reduce of the counts, and the EMA step,
    restarts and init are gated on the global flag with `torch.where`, so no rank waits on a collective
    another rank skipped and no host sync is needed. The step's loss is then non-finite too, and
    `lightning_dq.faults.NonFiniteGuard` skips the optimizer step on every rank.

    Args:
        num_codebooks: M, the number of independent codebooks.
        codebook_size: K, the number of codes per codebook.
        code_dim: D, the dimension of each code.
        decay: EMA decay of counts and sums (the paper's code uses 0.99).
        eps: Laplace smoothing constant of the counts.
        dead_code_threshold: a code with EMA count below this is dead (1.0 means "about one assignment
            per batch"); 0 disables restarts.
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
        _check_int("num_codebooks", num_codebooks, 1)
        _check_int("codebook_size", codebook_size, 2)
        _check_int("code_dim", code_dim, 1)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got decay={decay!r}")
        if eps <= 0:
            raise ConfigError(f"eps must be > 0, got eps={eps!r}")
        if dead_code_threshold < 0:
            raise ConfigError(f"dead_code_threshold must be >= 0, got dead_code_threshold={dead_code_threshold!r}")
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.restart_enabled = True
        m, k, d = num_codebooks, codebook_size, code_dim
        embed = torch.randn(m, k, d)
        self.register_buffer("embed", embed)  # (M, K, D)
        self.register_buffer("cluster_size", torch.ones(m, k))  # (M, K)
        self.register_buffer("embed_avg", embed.clone())  # (M, K, D)
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side cache of `initialized`, so training passes do not read the buffer (a host sync):
        # True once seen True; reset when a state dict is loaded (which may bring either value)
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
        return (
            f"M={self.num_codebooks}, K={self.codebook_size}, D={self.code_dim}, decay={self.decay}, "
            f"eps={self.eps}, dead_code_threshold={self.dead_code_threshold}"
        )

    # -- lookups -------------------------------------------------------------------------------------

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) for each vector of `x` `(M, N, D)` -> `(M, N)` int64."""
        # argmin_k |x - e_k|^2 = argmin_k (|e_k|^2 - 2 x.e_k): |x|^2 is constant per row, so skip it
        e2 = self.embed.pow(2).sum(dim=-1).unsqueeze(1)  # (M, 1, K)
        embed_t = self.embed.transpose(1, 2)  # (M, D, K)
        # chunk over N so the score matrix stays ~16 MB whatever N and K are (cache-friendly, bounded)
        chunk = max(1, SCORE_BUDGET // (self.num_codebooks * self.codebook_size))
        return torch.cat(
            [torch.baddbmm(e2, xs, embed_t, alpha=-2.0).argmin(dim=-1) for xs in x.split(chunk, dim=1)], dim=1
        )  # (M, N)

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors for indices `(M, N)` -> `(M, N, D)`, by gathering (no one-hot)."""
        m, k = self.num_codebooks, self.codebook_size
        offsets = torch.arange(m, device=codes.device).unsqueeze(1) * k  # (M, 1)
        return F.embedding(codes + offsets, self.embed.reshape(m * k, self.code_dim))

    # -- training-mode updates -----------------------------------------------------------------------

    def code_counts(self, codes: Tensor) -> Tensor:
        """Histogram of `codes` `(M, N)` per codebook -> `(M, K)` float32, by one `index_add_`."""
        m, k = self.num_codebooks, self.codebook_size
        offsets = torch.arange(m, device=codes.device).unsqueeze(1) * k  # (M, 1)
        return _histogram((codes + offsets).flatten(), m * k).view(m, k)

    @torch.no_grad()
    def initialize(self, x: Tensor, finite: Tensor | None = None) -> None:
        """Data-dependent init from the first batch `(M, N, D)`: k-means++ seeds, every code "restarted".

        `finite`: whether this rank's `x` is all finite (computed here if None). If any rank's batch is not,
        nothing changes and the init runs again on the next training pass.
        """
        if finite is None:
            finite = torch.isfinite(x).all()
        k = self.codebook_size
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # k-means++ weights must be finite
        seeds = kmeans_plus_plus(x, k) if x.shape[1] >= k else sample_rows(x, k)  # (M, K, D)
        samples = broadcast_from_rank0_(seeds.contiguous())
        ok = all_finite(finite)  # () bool, the same on every rank
        self._reset_codes(ok.expand_as(self.cluster_size), samples)
        self.initialized.copy_(ok)
        self._known_initialized = bool(ok)  # the one host sync of the init pass

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor, finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One EMA step from vectors `(M, N, D)` and their codes `(M, N)`.

        `finite`: whether this rank's `x` is all finite (computed here if None). Returns the global counts
        `(M, K)` and whether every rank's batch was finite (`()` bool); if not, the codebook is unchanged.
        """
        m, k, d = self.num_codebooks, self.codebook_size, self.code_dim
        if finite is None:
            finite = torch.isfinite(x).all()
        offsets = torch.arange(m, device=codes.device).unsqueeze(1) * k  # (M, 1)
        flat_codes = (codes + offsets).flatten()  # (M*N,)
        counts = _histogram(flat_codes, m * k).view(m, k)  # (M, K)
        sums = x.new_zeros(m * k, d).index_add_(0, flat_codes, x.reshape(-1, d)).view(m, k, d)  # (M, K, D)
        # one collective for counts, sums and the count of ranks with a non-finite batch
        packed = torch.cat([torch.cat([counts.unsqueeze(-1), sums], dim=-1).flatten(), (~finite).float().view(1)])
        packed = all_reduce_sum_(packed)  # (M*K*(1 + D) + 1,)
        ok = packed[-1] == 0  # () bool, the same on every rank
        packed = packed[:-1].view(m, k, 1 + d)
        counts, sums = packed[..., 0], packed[..., 1:]
        cluster_size = torch.add(self.cluster_size * self.decay, counts, alpha=1.0 - self.decay)  # (M, K)
        embed_avg = torch.add(self.embed_avg * self.decay, sums, alpha=1.0 - self.decay)  # (M, K, D)
        embed = embed_avg / laplace_smoothing(cluster_size, self.eps).unsqueeze(-1)  # (M, K, D)
        # torch.where selects, so NaN in the rejected branch never reaches the buffers
        self.cluster_size.copy_(torch.where(ok, cluster_size, self.cluster_size))
        self.embed_avg.copy_(torch.where(ok, embed_avg, self.embed_avg))
        self.embed.copy_(torch.where(ok, embed, self.embed))
        return counts, ok

    def dead_codes(self) -> Tensor:
        """Boolean mask `(M, K)` of codes whose EMA count is below the threshold."""
        return self.cluster_size < self.dead_code_threshold

    @torch.no_grad()
    def restart_dead_codes(self, x: Tensor, ok: Tensor | None = None) -> Tensor:
        """Replace dead codes by vectors sampled from `x` `(M, N, D)`; returns the count per codebook `(M,)`.

        The dead mask is computed from all-reduced statistics, so it is the same on every rank; the
        samples come from rank 0. The broadcast runs unconditionally so no rank can skip a collective.
        `ok` (`()` bool, the same on every rank, from `update`): restart only if True.
        """
        dead = self.dead_codes()  # (M, K)
        if ok is not None:
            dead = dead & ok
        samples = broadcast_from_rank0_(sample_rows(x, self.codebook_size).contiguous())  # (M, K, D)
        self._reset_codes(dead, samples)
        return dead.sum(dim=-1)

    def _reset_codes(self, mask: Tensor, samples: Tensor) -> None:
        """Set the codes under `mask` `(M, K)` to `samples` `(M, K, D)` with count = threshold."""
        count = max(self.dead_code_threshold, 1e-3)  # keep a usable denominator when restarts are off
        mask3 = mask.unsqueeze(-1)  # (M, K, 1)
        self.embed.copy_(torch.where(mask3, samples, self.embed))
        self.embed_avg.copy_(torch.where(mask3, samples * count, self.embed_avg))
        self.cluster_size.copy_(torch.where(mask, torch.full_like(self.cluster_size, count), self.cluster_size))


# ---------------------------------------------------------------------------------------------------
# the quantizer an encoder calls
# ---------------------------------------------------------------------------------------------------


class QuantizerOutput(NamedTuple):
    """What `DepthwiseQuantizer.forward` returns."""

    quantized: Tensor  # (B, M*D, h, w) float32, straight-through gradient to the projection's input
    codes: Tensor  # (B, M, h, w) int64
    commitment: Tensor  # () mean squared distance to the stop-gradient codes, summed (or averaged) over M
    stats: CodebookStats  # per-codebook health, each (M,)


QuantizerMode = Literal["dq", "vq"]


class DepthwiseQuantizer(nn.Module):
    """Project `(B, C, h, w)` features and quantize them with M codebooks.

    mode "dq": a 1x1 conv C -> M*D, split along channels into M slices of D; slice m is quantized by
    codebook m. K^M representable vectors for M*K stored codes.
    mode "vq": the official code's baseline: a 1x1 conv C -> D; the same D-vector is quantized by all M
    codebooks and the M results are concatenated. Same codebook memory and output width as "dq";
    num_codebooks=1 is plain VQ.

    The codebooks are EMA buffers updated inside `forward` in training mode only. The projection and all
    codebook maths run in fp32 with autocast disabled, also inside a bf16/fp16 autocast region.

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
        _check_int("in_channels", in_channels, 1)
        if mode not in ("dq", "vq"):
            raise ConfigError(f"mode must be 'dq' or 'vq', got mode={mode!r}")
        if commitment_reduction not in ("sum", "mean"):
            raise ConfigError(
                f"commitment_reduction must be 'sum' or 'mean', got commitment_reduction={commitment_reduction!r}"
            )
        self.in_channels, self.mode, self.commitment_reduction = in_channels, mode, commitment_reduction
        self.codebook = Codebook(num_codebooks, codebook_size, code_dim, decay, eps, dead_code_threshold)
        projected = num_codebooks * code_dim if mode == "dq" else code_dim
        self.proj = nn.Conv2d(in_channels, projected, kernel_size=1)

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
        """M*D, the width of `quantized` (identical for "dq" and "vq")."""
        return self.num_codebooks * self.code_dim

    @property
    def bits_per_position(self) -> float:
        """Cost of one spatial position's codes under a uniform prior: M * log2 K."""
        return self.num_codebooks * math.log2(self.codebook_size)

    # -- layout: (B, M*D, h, w) <-> (M, N, D) with N = B*h*w ------------------------------------------

    def _to_vectors(self, z: Tensor) -> Tensor:
        """Projected features `(B, M*D or D, h, w)` -> per-codebook vectors `(M, N, D)`."""
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
            raise ValueError(
                f"DepthwiseQuantizer expects features (B, in_channels={self.in_channels}, h, w), "
                f"got shape {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.proj(x.float())  # (B, M*D or D, h, w) fp32
            vectors = self._to_vectors(z)  # (M, N, D)
            cb = self.codebook
            if self.training:
                # a device flag, no host sync; every codebook change below is gated on it (see `Codebook`)
                finite = torch.isfinite(vectors.detach()).all()  # () bool
                if cb.needs_init():
                    cb.initialize(vectors.detach(), finite)
            codes = cb.nearest(vectors.detach())  # (M, N)
            # quantize with the codebook the codes were chosen from, then update it
            chosen = cb.lookup(codes)  # (M, N, D)
            per_codebook = (vectors - chosen).pow(2).mean(dim=(1, 2))  # (M,)
            commitment = per_codebook.sum() if self.commitment_reduction == "sum" else per_codebook.mean()
            if self.training:
                counts, ok = cb.update(vectors.detach(), codes, finite)  # (M, K) summed over ranks, () bool
                dead_fraction = cb.dead_codes().float().mean(dim=-1)  # (M,) measured before restarts revive them
                restarted = (
                    cb.restart_dead_codes(vectors.detach(), ok)
                    if cb.restart_enabled and cb.dead_code_threshold > 0
                    else torch.zeros(cb.num_codebooks, device=x.device)
                )
            else:
                counts = cb.code_counts(codes)  # (M, K), this process only
                dead_fraction = cb.dead_codes().float().mean(dim=-1)  # (M,)
                restarted = torch.zeros(cb.num_codebooks, device=x.device)
            stats = CodebookStats(perplexity(counts), dead_fraction, restarted.float())
            continuous = z if self.mode == "dq" else self._to_image(vectors, b, h, w)  # (B, M*D, h, w)
            # straight-through: the value is exactly the codes' vectors (x - x == 0), the gradient is identity
            straight_through = self._to_image(chosen, b, h, w) + (continuous - continuous.detach())
        codes_bmhw = codes.view(cb.num_codebooks, b, h, w).permute(1, 0, 2, 3).contiguous()  # (B, M, h, w)
        return QuantizerOutput(straight_through, codes_bmhw, commitment, stats)


def _histogram(index: Tensor, size: int) -> Tensor:
    """Counts of each value of `index` `(N,)` in [0, size) -> `(size,)` float32, exact below 2**24 per bin.

    `index_add_` rather than `torch.bincount`, which reads the maximum back to the host (a sync) on GPUs.
    """
    ones = torch.ones(index.shape[0], device=index.device)
    return torch.zeros(size, device=index.device).index_add_(0, index, ones)


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
