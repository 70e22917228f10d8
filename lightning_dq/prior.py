"""`CodePrior`: an autoregressive prior over the integer codes of all levels of a hierarchical DQ autoencoder.

Figure C of the likelihood protocol (docs/design.md) charges each image -log p_prior(z(x)) for its codes.
This module gives that number exactly (`log_prob`, teacher-forced, in nats) and draws codes (`sample`).

Design, chosen for simplicity:

- ONE causal decoder-only Transformer (pre-LayerNorm, `F.scaled_dot_product_attention`) over every code of
  every level, flattened in the order level (top first), row, column, codebook m. Each lower level is thus
  conditioned on all levels above it and on its own earlier codes, with one set of weights and one KV cache.
  The README preset at 64x64 is (16*16 + 8*8 + 4*4) * M=5 = 1680 tokens: full attention is affordable.
- Input at position t = embedding of token t-1 (a learned BOS at t=0) + the learned embeddings of position
  t's level, row, column and codebook. So hidden state t knows WHICH code it predicts but sees only codes
  < t (causal mask). Tokens are embedded per (level, codebook, code): the same integer in another codebook
  is another symbol.
- Output: one linear head per level to its K_l logits, computed in fp32 (bf16 logits would move a bits/dim
  figure in its second decimal). Heads start at ZERO, so a fresh prior is exactly uniform and `log_prob`
  equals the uniform code cost -sum_l h_l*w_l*M*ln K_l (figure B): training starts from B.
- Rows and columns are absolute grid indices (< `max_grid`), so the same weights run on the code grids of
  32x32 and 64x64 images (the auto-encoder is trained progressively at both).
- `sample` decodes incrementally with a KV cache (each step's one new position attends to all cached keys);
  `use_cache=False` recomputes the whole prefix at every step: the reference for tests and benchmarks.

Codes are lists of int64 tensors (B, M, h_l, w_l), TOP LEVEL FIRST, as `HierarchicalAutoEncoder.encode`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dq.errors import ConfigError

Cache = tuple[Tensor, Tensor]  # keys, values of one block, (B, heads, T_max, dim // heads) each


class SelfAttention(nn.Module):
    """Multi-head causal self-attention; with a cache, one new position attends to all cached positions."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: Cache | None = None, pos: int = 0) -> Tensor:
        b, t, d = x.shape  # (B, T, dim)
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads)  # (B, T, 3, heads, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T, dh) each
        if cache is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, heads, T, dh)
        else:
            if t != 1:  # the unmasked attention below is causal only for a single new position
                raise RuntimeError(f"cached attention takes one position at a time, got {t}")
            keys, values = cache  # filled up to `pos` by earlier steps
            keys[:, :, pos], values[:, :, pos] = k[:, :, 0], v[:, :, 0]
            keys, values = keys[:, :, : pos + 1], values[:, :, : pos + 1]  # (B, heads, pos + 1, dh)
            y = F.scaled_dot_product_attention(q, keys, values)  # (B, heads, 1, dh)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, dim)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))  # fmt: skip
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: Cache | None = None, pos: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, pos))  # (B, T, dim)
        return x + self.mlp(self.norm2(x))


class CodePrior(nn.Module):
    """Autoregressive Transformer prior over all levels' codes (the module docstring explains the design).

    Args:
        codebook_sizes: K per level, TOP LEVEL FIRST; must match the auto-encoder's.
        num_codebooks: M, codebooks per level (the same at every level); must match the auto-encoder's.
        downsample: image side / bottom level's grid side (the auto-encoder's `downsample`).
        dim: Transformer width.
        depth: number of Transformer blocks.
        heads: attention heads; must divide `dim`.
        max_grid: largest grid side the row/column embeddings cover; the bottom grid (image side /
            downsample) must not exceed it.
        dropout: dropout on embeddings, attention and residual branches (training only; never in sampling).
    """

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        num_codebooks: int,
        downsample: int,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        max_grid: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes_ok = isinstance(codebook_sizes, Sequence) and len(codebook_sizes) >= 1
        if not sizes_ok or any(not isinstance(k, int) or k < 2 for k in codebook_sizes):
            raise ConfigError(f"codebook_sizes must be a non-empty list of integers >= 2, "
                             f"got {codebook_sizes!r}")  # fmt: skip
        ints = dict(num_codebooks=num_codebooks, downsample=downsample, dim=dim, depth=depth, heads=heads,
                    max_grid=max_grid)  # fmt: skip
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if dim % heads:
            raise ConfigError(f"heads must divide dim, got dim={dim}, heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got dropout={dropout!r}")
        self.codebook_sizes, self.num_levels = list(codebook_sizes), len(codebook_sizes)
        self.num_codebooks, self.downsample, self.dim, self.num_heads = num_codebooks, downsample, dim, heads
        self.max_grid, sizes, m = max_grid, self.codebook_sizes, num_codebooks
        # token id of code 0 of (level, codebook): ids are unique across levels and codebooks; BOS comes last
        offsets = [[m * sum(sizes[:lv]) + j * k for j in range(m)] for lv, k in enumerate(sizes)]
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)  # (L, M)
        self.bos = m * sum(sizes)
        self.token_emb = nn.Embedding(self.bos + 1, dim)
        self.level_emb, self.codebook_emb = nn.Embedding(self.num_levels, dim), nn.Embedding(m, dim)
        self.row_emb, self.col_emb = nn.Embedding(max_grid, dim), nn.Embedding(max_grid, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.level_heads = nn.ModuleList(nn.Linear(dim, k) for k in sizes)
        self.init_weights()

    def init_weights(self) -> None:
        """All init policy: GPT-2 style N(0, 0.02) weights, zero biases, identity LayerNorms; residual output
        projections scaled by 1/sqrt(2*depth) so the residual stream does not grow with depth; output heads
        zero, so a fresh prior is exactly uniform."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
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

    # -- geometry ----------------------------------------------------------------------------------------

    def grid_shapes(self, resolution: int) -> list[tuple[int, int]]:
        """(h, w) of each level's code grid, top first, for square images of side `resolution`."""
        factor = self.downsample * 2 ** (self.num_levels - 1)
        if not isinstance(resolution, int) or resolution < factor or resolution % factor:
            raise ValueError(f"resolution={resolution!r} must be a positive multiple of {factor} "
                             f"(downsample={self.downsample} x 2^{self.num_levels - 1} levels)")  # fmt: skip
        sides = [resolution // (factor >> i) for i in range(self.num_levels)]  # top first
        if sides[-1] > self.max_grid:
            raise ValueError(f"resolution={resolution} gives a {sides[-1]}x{sides[-1]} bottom grid, larger "
                             f"than max_grid={self.max_grid}: build the prior with max_grid >= {sides[-1]}")
        return [(s, s) for s in sides]

    def sequence_length(self, resolution: int) -> int:
        """T, the number of codes of one image of side `resolution` (all levels, all codebooks)."""
        return sum(h * w for h, w in self.grid_shapes(resolution)) * self.num_codebooks

    def flatten(self, levels: Sequence[Tensor]) -> Tensor:
        """Per level (B, M, h, w, *rest) -> (B, sum h*w*M, *rest), in sequence order (row, col, codebook)."""
        return torch.cat([x.movedim(1, 3).flatten(1, 3) for x in levels], 1)

    def unflatten(self, flat: Tensor | Sequence[Tensor], resolution: int) -> list[Tensor]:
        """Inverse of `flatten`: (B, T, *rest), or per level (B, h*w*M, *rest), to per level
        (B, M, h, w, *rest)."""
        shapes, m = self.grid_shapes(resolution), self.num_codebooks
        if isinstance(flat, Tensor):
            if flat.dim() < 2 or flat.shape[1] != self.sequence_length(resolution):
                raise ValueError(f"flat must have shape (B, {self.sequence_length(resolution)}, ...) for "
                                 f"{resolution}x{resolution} images, got {tuple(flat.shape)}")  # fmt: skip
            flat = flat.split([h * w * m for h, w in shapes], 1)
        pairs = zip(flat, shapes, strict=True)
        return [x.reshape(x.shape[0], h, w, m, *x.shape[2:]).movedim(3, 1) for x, (h, w) in pairs]

    def _positions(self, resolution: int) -> tuple[Tensor, Tensor, list[int]]:
        """Position embeddings (T, dim), token-id offsets (T,), and where each level starts (L + 1 values)."""
        dev, idx, starts = self.offsets.device, [], [0]
        for level, (h, w) in enumerate(self.grid_shapes(resolution)):
            r, c, j = torch.meshgrid(*(torch.arange(s, device=dev) for s in (h, w, self.num_codebooks)),
                                     indexing="ij")  # (h, w, M) each  # fmt: skip
            idx.append(torch.stack([torch.full_like(r, level), r, c, j], -1).view(-1, 4))  # (h*w*M, 4)
            starts.append(starts[-1] + idx[-1].shape[0])
        level, row, col, j = torch.cat(idx).unbind(1)  # (T,) each
        pos = self.level_emb(level) + self.row_emb(row) + self.col_emb(col) + self.codebook_emb(j)  # (T, dim)
        return pos, self.offsets[level, j], starts

    # -- teacher-forced pass -----------------------------------------------------------------------------

    def _check_codes(self, codes: Sequence[Tensor]) -> int:
        """Validate codes (number of levels, dtype, shapes, value range); return the image side they imply."""
        if not isinstance(codes, (list, tuple)) or len(codes) != self.num_levels:
            got = f"{len(codes)} items" if isinstance(codes, (list, tuple)) else type(codes).__name__
            raise ValueError(f"codes must be a list of {self.num_levels} tensors, one per level, top first; "
                             f"got {got}")  # fmt: skip
        for level, c in enumerate(codes):
            if not isinstance(c, Tensor) or c.dtype != torch.int64 or c.dim() != 4:
                got = f"{c.dtype} {tuple(c.shape)} tensor" if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"codes[{level}] (level {level}, top first) must be an int64 tensor "
                                 f"(B, M, h, w), got {got}")  # fmt: skip
        resolution = codes[-1].shape[-1] * self.downsample  # the bottom grid fixes the image side
        try:
            shapes = self.grid_shapes(resolution)
        except ValueError as e:
            raise ValueError(f"codes[-1] has shape {tuple(codes[-1].shape)}, which implies "
                             f"{resolution}x{resolution} images: {e}") from None  # fmt: skip
        for level, (c, (h, w), k) in enumerate(zip(codes, shapes, self.codebook_sizes, strict=True)):
            expected = (codes[0].shape[0], self.num_codebooks, h, w)
            if tuple(c.shape) != expected:
                raise ValueError(f"codes[{level}] (level {level}, top first) must have shape (B, M, h, w) = "
                                 f"{expected} for {resolution}x{resolution} images, got {tuple(c.shape)}")
            lo, hi = (int(v) for v in torch.aminmax(c)) if c.numel() else (0, 0)
            if lo < 0 or hi >= k:
                raise ValueError(f"codes[{level}] (level {level}) values must be in [0, {k}), "
                                 f"got min {lo}, max {hi}")  # fmt: skip
        return resolution

    def embed(self, codes: Sequence[Tensor]) -> Tensor:
        """Transformer inputs (B, T, dim) for teacher forcing: position t holds code t-1 (BOS at t=0) and
        position t's embeddings."""
        resolution = self._check_codes(codes)
        pos, offsets, _ = self._positions(resolution)
        tokens = self.flatten(codes) + offsets  # (B, T) token ids
        prev = torch.cat([torch.full_like(tokens[:, :1], self.bos), tokens[:, :-1]], 1)  # (B, T), shifted
        return self.token_emb(prev) + pos  # (B, T, dim)

    def _transform(self, x: Tensor, caches: list[Cache] | None = None, pos: int = 0) -> Tensor:
        x = self.drop(x)  # (B, T, dim)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return self.norm(x)  # (B, T, dim)

    def _head(self, level: int, h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return self.level_heads[level](h.float())  # (..., K_level) fp32

    def logits_from_embeddings(self, x: Tensor, resolution: int) -> list[Tensor]:
        """Per-level logits (B, M, h, w, K_l) from Transformer inputs x (B, T, dim) such as `embed` makes;
        the entry point for gradients with respect to the inputs."""
        starts = self._positions(resolution)[2]
        if x.dim() != 3 or tuple(x.shape[1:]) != (starts[-1], self.dim):
            raise ValueError(f"x must have shape (B, {starts[-1]}, {self.dim}) for {resolution}x{resolution} "
                             f"images, got {tuple(x.shape)}")  # fmt: skip
        h = self._transform(x)  # (B, T, dim)
        per_level = [self._head(lv, h[:, starts[lv] : starts[lv + 1]]) for lv in range(self.num_levels)]
        return self.unflatten(per_level, resolution)  # from (B, h*w*M, K_l) each

    def logits(self, codes: Sequence[Tensor]) -> list[Tensor]:
        """Teacher-forced logits per level (B, M, h, w, K_l); entry [b, m, r, c] predicts codes[l][b, m, r, c]
        from the codes before it in sequence order only."""
        x = self.embed(codes)  # validates codes
        return self.logits_from_embeddings(x, codes[-1].shape[-1] * self.downsample)

    def log_prob(self, codes: Sequence[Tensor]) -> Tensor:
        """Exact log p(codes) per image (B,), in NATS, summed over all codes of all levels."""
        total = 0
        for logits, c in zip(self.logits(codes), codes, strict=True):
            logp = F.log_softmax(logits, -1).gather(-1, c.unsqueeze(-1))  # (B, M, h, w, 1) fp32
            total = total + logp.flatten(1).sum(1)  # (B,)
        return total

    # -- sampling ----------------------------------------------------------------------------------------

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
        """Draw codes one at a time in sequence order. Returns them flat, (n, num_tokens) int64, and the
        logits each was drawn from (one (n, K_level) fp32 tensor per step, before the temperature).

        Args:
            n: number of images.
            resolution: image side; it fixes the code grids.
            temperature: divides the logits; 0 takes the argmax (greedy decoding).
            use_cache: incremental decoding with a KV cache; False recomputes the whole prefix every step.
            num_tokens: stop after this many codes (default: all T of them); for benchmarks.
            generator: random generator (on the prior's device) for reproducible draws.
        """
        total = self.sequence_length(resolution)
        num_tokens = total if num_tokens is None else num_tokens
        if not isinstance(n, int) or n < 1 or not 1 <= num_tokens <= total or not temperature >= 0:
            raise ValueError(f"need an integer n >= 1, 1 <= num_tokens <= {total} (resolution {resolution}) "
                             f"and temperature >= 0; got n={n!r}, num_tokens={num_tokens!r}, "
                             f"temperature={temperature!r}")  # fmt: skip
        pos, offsets, starts = self._positions(resolution)  # (T, dim), (T,), L + 1
        level_of = [lv for lv in range(self.num_levels) for _ in range(starts[lv + 1] - starts[lv])]
        codes = torch.zeros(n, num_tokens, dtype=torch.long, device=pos.device)  # (n, t)
        inputs = pos.new_zeros(n, num_tokens, self.dim)  # (n, t, dim), the prefix for the uncached path
        shape = (n, self.num_heads, num_tokens, self.dim // self.num_heads)
        caches = [(pos.new_zeros(shape), pos.new_zeros(shape)) for _ in self.blocks] if use_cache else None
        prev, step_logits, training = torch.full((n,), self.bos, device=pos.device), [], self.training
        self.eval()  # no dropout while sampling
        try:
            for t in range(num_tokens):
                inputs[:, t] = self.token_emb(prev) + pos[t]  # (n, dim)
                if caches is not None:
                    h = self._transform(inputs[:, t : t + 1], caches, t)[:, 0]  # (n, dim)
                else:
                    h = self._transform(inputs[:, : t + 1])[:, -1]  # (n, dim): whole prefix recomputed
                logits = self._head(level_of[t], h)  # (n, K_level)
                if temperature == 0:
                    codes[:, t] = logits.argmax(-1)
                else:
                    probs = F.softmax(logits / temperature, -1)  # (n, K_level)
                    codes[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
                prev = codes[:, t] + offsets[t]  # (n,) token ids
                step_logits.append(logits)
        finally:
            self.train(training)
        return codes, step_logits

    def sample(self, n: int, resolution: int, temperature: float = 1.0, use_cache: bool = True,
               generator: torch.Generator | None = None) -> list[Tensor]:  # fmt: skip
        """Codes of n images, per level (n, M, h, w) int64, top first; `generate` explains the arguments."""
        codes, _ = self.generate(n, resolution, temperature, use_cache, generator=generator)
        return self.unflatten(codes, resolution)
