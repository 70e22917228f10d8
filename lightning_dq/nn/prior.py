"""`CodePrior`: an autoregressive Transformer prior over the codes of every level (figure C's code cost). One causal
pre-LayerNorm Transformer over every code in sequence order (level top first, row, column, codebook): each level is
conditioned on those above. The input at t: the embedding of token t-1 (BOS at t=0; a token per level, codebook and
code) plus learned level, row, column and codebook embeddings of t. One fp32 linear head per level, zero at init: a
fresh prior is exactly uniform (figure B). Rows, columns are absolute (< `max_grid`): the same weights, any size."""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dq.errors import ConfigError
from lightning_dq.nn.codes import CodeGeometry

Cache = tuple[Tensor, Tensor]  # keys, values of one block, (B, heads, T_max, dim // heads) each


class SelfAttention(nn.Module):
    """Multi-head causal self-attention; with a cache, one new position attends to all cached positions."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: Cache | None = None, pos: int = 0) -> Tensor:
        b, t, d = x.shape  # (B, T, dim)
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads)  # (B, T, 3, heads, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T, dh) each
        if cache is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, heads, T, dh)
        else:  # one new position: attending to every cached position is causal
            keys, values = cache  # filled up to `pos` by the earlier steps
            keys[:, :, pos] = k[:, :, 0]
            values[:, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, keys[:, :, : pos + 1], values[:, :, : pos + 1])  # (B, heads, 1, dh)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, dim)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: Cache | None = None, pos: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, pos))  # (B, T, dim)
        return x + self.mlp(self.norm2(x))


class CodePrior(nn.Module):
    """Autoregressive Transformer prior over all levels' codes (the module docstring explains the design).

    Args:
        geometry: the auto-encoder's code structure, which `PriorModule` passes (a config gives the other arguments).
        dim: Transformer width.
        depth: number of Transformer blocks.
        heads: attention heads; must divide `dim`.
        max_grid: largest grid side the row/column embeddings cover (the bottom grid must fit).
        dropout: dropout on embeddings, attention and residual branches (training only; never when sampling).
    """

    def __init__(
        self,
        geometry: CodeGeometry,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        max_grid: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"need heads dividing dim and 0 <= dropout < 1, got {dim=}, {heads=}, {dropout=}")
        self.config = dict(dim=dim, depth=depth, heads=heads, max_grid=max_grid, dropout=dropout)  # in checkpoints
        self.geometry = geometry
        self.dim = dim
        self.num_heads = heads
        self.max_grid = max_grid
        sizes, m = geometry.codebook_sizes, geometry.num_codebooks
        # token id of code 0 of (level, codebook): unique across levels and codebooks; BOS comes last
        offsets = [[m * sum(sizes[:level]) + j * k for j in range(m)] for level, k in enumerate(sizes)]
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)  # (L, M)
        self.bos = m * sum(sizes)
        self.token_emb = nn.Embedding(self.bos + 1, dim)
        self.level_emb = nn.Embedding(geometry.num_levels, dim)
        self.codebook_emb = nn.Embedding(m, dim)
        self.row_emb = nn.Embedding(max_grid, dim)
        self.col_emb = nn.Embedding(max_grid, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.level_heads = nn.ModuleList(nn.Linear(dim, k) for k in sizes)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, residual output projections / sqrt(2 * depth); zero heads (uniform)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
        for head in self.level_heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def positions(self, resolution: int) -> tuple[Tensor, Tensor, Tensor]:
        """Position embeddings (T, dim), token-id offsets (T,) and the level (T,) of each position."""
        dev, index = self.offsets.device, []
        for level, (h, w, m, _) in enumerate(self.geometry.shapes(resolution)):
            if h > self.max_grid:
                raise ValueError(
                    f"resolution={resolution} gives a {h}x{w} grid, larger than max_grid={self.max_grid}: build the "
                    f"prior with max_grid >= {h}"
                )
            grid = torch.meshgrid(*(torch.arange(s, device=dev) for s in (h, w, m)), indexing="ij")  # (h, w, M) each
            index.append(torch.stack([torch.full_like(grid[0], level), *grid], -1).view(-1, 4))  # (h*w*M, 4)
        level, row, col, j = torch.cat(index).unbind(1)  # (T,) each
        pos = self.level_emb(level) + self.row_emb(row) + self.col_emb(col) + self.codebook_emb(j)  # (T, dim)
        return pos, self.offsets[level, j], level

    def transform(self, x: Tensor, caches: list[Cache] | None = None, pos: int = 0) -> Tensor:
        """The Transformer on inputs (B, T, dim); with caches, T is 1 and `pos` its position."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return self.norm(x)  # (B, T, dim)

    def head(self, level: int, h: Tensor) -> Tensor:
        """Logits (..., K_level) in fp32 of hidden states h (..., dim)."""
        with torch.autocast(h.device.type, enabled=False):
            return self.level_heads[level](h.float())

    def embed(self, codes: Sequence[Tensor]) -> Tensor:
        """Teacher-forcing inputs (B, T, dim): position t holds code t-1 (BOS at t=0) and position t's embeddings."""
        pos, offsets, _ = self.positions(self.geometry.check_codes(codes))  # shapes checked, no host sync
        tokens = self.geometry.flatten(codes) + offsets  # (B, T) token ids
        prev = torch.cat([torch.full_like(tokens[:, :1], self.bos), tokens[:, :-1]], 1)  # (B, T), shifted
        return self.token_emb(prev) + pos  # (B, T, dim)

    def logits_from_embeddings(self, x: Tensor, resolution: int) -> list[Tensor]:
        """Per-level logits (B, M, h, w, K_l) of inputs x (B, T, dim) as `embed` makes them (gradients w.r.t. x)."""
        lengths = [h * w * m for h, w, m, _ in self.geometry.shapes(resolution)]
        if x.dim() != 3 or tuple(x.shape[1:]) != (sum(lengths), self.dim):
            raise ValueError(f"x must have shape (B, {sum(lengths)}, {self.dim}), got {tuple(x.shape)}")
        per_level = self.transform(x).split(lengths, 1)  # (B, h*w*M, dim) each
        return self.geometry.unflatten([self.head(lv, h) for lv, h in enumerate(per_level)], resolution)

    def logits(self, codes: Sequence[Tensor]) -> list[Tensor]:
        """Teacher-forced logits per level (B, M, h, w, K_l): entry [b, m, r, c] predicts codes[l][b, m, r, c] from
        the codes before it in sequence order."""
        return self.logits_from_embeddings(self.embed(codes), codes[-1].shape[-1] * self.geometry.downsample)

    def log_prob(self, codes: Sequence[Tensor]) -> Tensor:
        """Exact log p(codes) per image (B,), in NATS, summed over all codes of all levels."""
        total = 0
        for logits, c in zip(self.logits(codes), codes, strict=True):
            logp = F.log_softmax(logits, -1).gather(-1, c.unsqueeze(-1))  # (B, M, h, w, 1) fp32
            total = total + logp.flatten(1).sum(1)  # (B,)
        return total

    @torch.no_grad()
    def generate(
        self,
        n: int,
        resolution: int,
        temperature: float = 1.0,
        use_cache: bool = True,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Draw the codes of n images of side `resolution` one at a time: flat (n, num_tokens) int64, and the logits
        each was drawn from (n, K_level) per step. `temperature` divides the logits (0: argmax); `use_cache=False`
        recomputes the whole prefix every step (the reference); `num_tokens` stops early (benchmarks)."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        training = self.training
        self.eval()  # no dropout while sampling
        try:
            stream = PriorStream(self, n, resolution, use_cache, num_tokens)
            codes, step_logits = [], []
            for _ in range(stream.num_tokens):
                step_logits.append(stream.logits())  # (n, K_level)
                if temperature == 0:
                    codes.append(step_logits[-1].argmax(-1))
                else:
                    probs = F.softmax(step_logits[-1] / temperature, -1)
                    codes.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
                stream.push(codes[-1])
        finally:
            self.train(training)
        return torch.stack(codes, 1), step_logits

    def sample(
        self,
        n: int,
        resolution: int,
        temperature: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Codes of n images, per level (n, M, h, w) int64, top first; `generate` explains the arguments."""
        codes, _ = self.generate(n, resolution, temperature, use_cache, generator=generator)
        return self.geometry.unflatten(codes, resolution)


class PriorStream:
    """One code at a time through a prior, in sequence order: `logits()` of the next position, then `push` of its
    codes (n images side by side). Sampling pushes what it draws; the codec pushes the true codes, so encoder and
    decoder run one code path. Call inside `torch.no_grad()` with the prior in eval mode."""

    def __init__(
        self, prior: CodePrior, n: int, resolution: int, use_cache: bool = True, num_tokens: int | None = None
    ) -> None:
        total = prior.geometry.sequence_length(resolution)
        self.num_tokens = total if num_tokens is None else num_tokens
        if not isinstance(n, int) or n < 1 or not 1 <= self.num_tokens <= total:
            raise ValueError(f"need an integer n >= 1 and 1 <= num_tokens <= {total}, got n={n!r}, {num_tokens=}")
        self.prior = prior
        self.t = 0
        self.pos, self.offsets, levels = prior.positions(resolution)  # (T, dim), (T,), (T,)
        self.level_of = levels.tolist()  # read once: a host sync per step would stall a GPU
        self.inputs = self.pos.new_zeros(n, self.num_tokens, prior.dim)  # (n, t, dim): the uncached path's prefix
        shape = (n, prior.num_heads, self.num_tokens, prior.dim // prior.num_heads)
        self.caches = (
            [(self.pos.new_zeros(shape), self.pos.new_zeros(shape)) for _ in prior.blocks] if use_cache else None
        )
        self.prev = torch.full((n,), prior.bos, device=self.pos.device)  # (n,) token ids of the previous position

    def logits(self) -> Tensor:
        """Logits (n, K_level) fp32 of position t given the codes pushed so far."""
        t = self.t
        self.inputs[:, t] = self.prior.token_emb(self.prev) + self.pos[t]  # (n, dim)
        if self.caches is not None:
            h = self.prior.transform(self.inputs[:, t : t + 1], self.caches, t)[:, 0]  # (n, dim)
        else:
            h = self.prior.transform(self.inputs[:, : t + 1])[:, -1]  # (n, dim): the whole prefix recomputed
        return self.prior.head(self.level_of[t], h)

    def push(self, codes: Tensor) -> None:
        """The codes (n,) int64 at position t; the stream moves to t + 1."""
        self.prev = codes + self.offsets[self.t]
        self.t += 1


PriorFactory = Callable[[CodeGeometry], CodePrior]  # a config's `prior`: every argument but the geometry
