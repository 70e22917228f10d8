"""Profile one auto-encoder training step (forward + backward + Adam) with torch.profiler: top operators by
self CPU time, for one variant of `benchmarks/train_step.py`.

    .venv/bin/python benchmarks/profile_step.py                          # README preset, fp32 channels_last
    .venv/bin/python benchmarks/profile_step.py --variant bf16 --batch 2
    .venv/bin/python benchmarks/profile_step.py --net demo --top 25

Prints a markdown table: operator, self time share, self ms, calls. One warm-up step is not profiled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import NETS, VARIANTS, Runner, run_with_docs  # noqa: E402


def top_ops(prof: profile, top: int) -> list[tuple[str, float, int]]:
    """(name, self CPU ms, calls) of the `top` operators by self CPU time."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:top]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="readme")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="fp32-cl")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--docs", help="markdown file whose profile section gets this run's output")
    args = parser.parse_args(argv)
    run_with_docs(run, args, "profile")


def run(args: argparse.Namespace) -> None:
    runner = Runner(NETS[args.net], args.variant, args.batch, args.resolution, torch.device("cpu"))
    runner.step()  # warm-up: codebook init, allocator, oneDNN primitive caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step()
    rows = top_ops(prof, args.top)
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    print(f"profile: net {args.net}, variant {args.variant}, batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; total self CPU {total:.0f} ms\n")
    print("| operator | self time | self ms | calls |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms, calls in rows:
        print(f"| `{name}` | {100 * ms / total:.1f}% | {ms:.1f} | {calls} |")


if __name__ == "__main__":
    main()
