"""Prior sampling speed: incremental decoding with a KV cache vs recomputing the whole prefix every step.

The README preset's code grids (codebook_sizes [32, 32, 32], M=5, downsample=4): 2x2, 4x4, 8x8 codes at
32x32 images (T = 420 tokens) and 4x4, 8x8, 16x16 at 64x64 (T = 1680 tokens), with the default `CodePrior`
(dim 256, depth 4, heads 4), fp32, timed side by side in one process, interleaved, median of repeats.

Without a cache, step t re-runs the Transformer over all t + 1 positions, so a whole 64x64 sequence takes
minutes on a CPU. The uncached path is therefore timed on a PREFIX of the sequence (`--prefix`, the first
codes in sampling order) and the cached path on the same prefix, for a like-for-like ratio. The uncached
cost per token grows with the position while the cached cost hardly does, so a ratio measured on a prefix
UNDERSTATES the full-sequence speed-up. The cached path is also timed on the whole sequence.

    .venv/bin/python benchmarks/prior_sampling.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/prior_sampling.py --quick    # shorter prefixes, one repeat
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_dq.nn.prior import CodePrior


def seconds(prior: CodePrior, batch: int, resolution: int, tokens: int, use_cache: bool) -> float:
    """Wall time of drawing the first `tokens` codes of `batch` images."""
    g = torch.Generator(prior.offsets.device).manual_seed(0)
    if prior.offsets.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    prior.generate(batch, resolution, use_cache=use_cache, num_tokens=tokens, generator=g)
    if prior.offsets.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch", type=int, default=2, help="images sampled at once")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument(
        "--prefix",
        type=int,
        nargs=2,
        default=[420, 420],
        metavar=("T32", "T64"),
        help="tokens timed on both paths at 32x32 and 64x64 (420 = all of 32x32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; 1 by default: sampling is many tiny ops, and on a shared CPU extra threads mostly spin",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="prefixes of 105 tokens, one repeat")
    args = parser.parse_args(argv)
    prefixes, repeats = ([105, 105], 1) if args.quick else (args.prefix, args.repeats)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = CodePrior([32, 32, 32], num_codebooks=5, downsample=4).to(args.device).eval()
    with torch.no_grad():  # random, non-uniform heads: the sampled codes then depend on the logits
        for head in prior.level_heads:
            head.weight.normal_(std=0.02)
    params = sum(p.numel() for p in prior.parameters())
    print(
        f"CodePrior dim {prior.dim}, depth {len(prior.blocks)}, heads {prior.num_heads} "
        f"({params / 1e6:.2f} M parameters), fp32 on {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, median of {repeats} interleaved repeats\n"
    )
    print(
        "| images | code grids (top first) | T tokens | timed tokens | cached tok/s (timed) | "
        "uncached tok/s (timed) | speed-up (timed) | cached tok/s (all T) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for resolution, prefix in zip((32, 64), prefixes, strict=True):
        total = prior.sequence_length(resolution)
        prefix = min(prefix, total)
        seconds(prior, args.batch, resolution, 8, True)  # warm-up
        runs: dict[str, list[float]] = {"cached": [], "uncached": [], "cached_all": []}
        for _ in range(repeats):
            runs["cached"].append(seconds(prior, args.batch, resolution, prefix, True))
            runs["uncached"].append(seconds(prior, args.batch, resolution, prefix, False))
            runs["cached_all"].append(seconds(prior, args.batch, resolution, total, True))
        med = {k: statistics.median(v) for k, v in runs.items()}
        rate = {k: args.batch * (total if k == "cached_all" else prefix) / s for k, s in med.items()}
        grids = ", ".join(f"{h}x{w}" for h, w in prior.grid_shapes(resolution))
        timed = f"{prefix} (all)" if prefix == total else f"{prefix} (first {100 * prefix / total:.0f}%)"
        print(
            f"| {resolution}x{resolution} | {grids} | {total} | {timed} | {rate['cached']:.0f} | "
            f"{rate['uncached']:.0f} | {med['uncached'] / med['cached']:.1f}x | {rate['cached_all']:.0f} |"
        )
    if any(p < prior.sequence_length(r) for r, p in zip((32, 64), prefixes, strict=True)):
        print(
            "\nOn a prefix the uncached path skips the longest recomputations, so the speed-up there is a "
            "lower bound on the full-sequence speed-up."
        )


if __name__ == "__main__":
    main()
