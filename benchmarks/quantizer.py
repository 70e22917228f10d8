"""Quantizer speed and memory: the batched `Codebook` vs per-codebook Python loops.

One training step = nearest-code search + EMA update (+ dead-code check), at M=5, K=512, D=64 and
N=8192 vectors per codebook, fp32 on CPU. Variants, timed side by side in one process, interleaved:

- batched: `lightning_dq.nn.codebook.Codebook` with all M codebooks in one computation;
- loop (same maths): M separate single-codebook `Codebook`s called in a Python loop;
- loop (one-hot): the official code's style, per codebook: full squared distances, an (N, K) one-hot
  matrix for the EMA statistics (what our rules forbid).

Peak memory is the peak resident-set growth of a fresh subprocess running one variant (Linux VmHWM).
A second size, N=512, is the README preset's top level (2x2 codes at batch 128), where per-call
overhead rather than arithmetic dominates.

    .venv/bin/python benchmarks/quantizer.py            # full run (~1 min on 2 cores)
    .venv/bin/python benchmarks/quantizer.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lightning_dq.nn.codebook import Codebook

M, K, D, N = 5, 512, 64, 8192


def batched_step(cbs: list[Codebook], x: torch.Tensor) -> None:
    cb = cbs[0]
    codes = cb.nearest(x)  # (M, N)
    cb.update(x, codes, torch.isfinite(x).all())
    cb.dead_codes()


def loop_step(cbs: list[Codebook], x: torch.Tensor) -> None:
    for m, cb in enumerate(cbs):
        xm = x[m : m + 1]  # (1, N, D)
        cb.update(xm, cb.nearest(xm), torch.isfinite(xm).all())
        cb.dead_codes()


@torch.no_grad()
def onehot_step(state: list[dict[str, torch.Tensor]], x: torch.Tensor, decay: float = 0.99) -> None:
    for m, s in enumerate(state):
        xm = x[m]  # (N, D)
        dist2 = xm.pow(2).sum(1, keepdim=True) - 2 * xm @ s["embed"].T + s["embed"].pow(2).sum(1)  # (N, K)
        onehot = F.one_hot(dist2.argmin(1), K).type(xm.dtype)  # (N, K)
        s["size"].mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        s["avg"].mul_(decay).add_(onehot.T @ xm, alpha=1 - decay)
        n = s["size"].sum()
        s["embed"] = s["avg"] / ((s["size"] + 1e-5) / (n + K * 1e-5) * n).unsqueeze(1)


def make(variant: str):
    """(step function, state) for one variant."""
    torch.manual_seed(0)
    if variant == "batched":
        cb = Codebook(M, K, D)
        cb.initialized.fill_(True)
        return batched_step, [cb]
    if variant == "loop":
        cbs = [Codebook(1, K, D) for _ in range(M)]
        return loop_step, cbs
    state = [{"embed": torch.randn(K, D), "size": torch.ones(K), "avg": torch.randn(K, D)} for _ in range(M)]
    return onehot_step, state


VARIANTS = ("batched", "loop", "onehot")


def peak_rss_mb(variant: str, n: int) -> float:
    """Run one variant in a fresh process and return its peak resident-set growth in MB."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", variant, "--n", str(n)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(variant: str, n: int) -> None:
    """Peak resident-set growth of one variant's steps (Linux: VmHWM after resetting it)."""
    x = torch.randn(M, n, D)
    step, state = make(variant)
    step(state, x[:, :64])  # warm up allocator and kernels on a tiny batch
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kb("VmRSS")
    for _ in range(3):
        step(state, x)
    print((_status_kb("VmHWM") - base) / 1024)


def time_variants(n: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant on N=n vectors per codebook, interleaved repeats."""
    x = torch.randn(M, n, D)
    runs = {v: make(v) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        for step, state in runs.values():  # warm-up
            step(state, x)
        for _ in range(repeats):  # interleaved so machine noise hits every variant alike
            for v, (step, state) in runs.items():
                t0 = time.perf_counter()
                step(state, x)
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=N, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        return memory_child(args.memory_of, args.n)
    repeats = 8 if args.quick else args.repeats
    print(
        f"M={M} K={K} D={D} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {repeats} interleaved repeats\n"
    )
    print("| N vectors / codebook | variant | ms / step | time vs batched | peak RSS growth (MB) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    # N=8192: the size; N=512: the README preset's top level (2x2 codes at batch 128)
    for n in (N, 512):
        med = time_variants(n, repeats if n == N else 10 * repeats)
        for v in VARIANTS:
            print(f"| {n} | {v} | {1e3 * med[v]:.2f} | {med[v] / med['batched']:.2f}x | {peak_rss_mb(v, n):.1f} |")


if __name__ == "__main__":
    main()
