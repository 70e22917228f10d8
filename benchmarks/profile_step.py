"""Profile auto-encoder training steps with torch.profiler: top operators by self CPU time, for one variant of
`benchmarks/train_step.py` (`fit`: the real `lightning-dq fit` step of the preset, Lightning and metrics included).

    .venv/bin/python benchmarks/profile_step.py --preset demo --variant fit          # what a demo run spends
    .venv/bin/python benchmarks/profile_step.py --preset experiments --variant fit --steps 5
    .venv/bin/python benchmarks/profile_step.py --variant default --batch 2          # README preset, module only

Prints a markdown table: operator, self time share, self ms, calls. Warm-up steps are not profiled.

`--kernels` instead times, interleaved, the two things the profile points at: one 3x3 convolution
(256 -> 256 channels on (4, 256, 16, 16), the README preset's commonest) in fp32 and bf16, NCHW and
channels_last; and one Adam step over the README preset's parameters as a for-loop (PyTorch's CPU default),
foreach, and fused, with the largest difference of the fused result from the for-loop one.

    .venv/bin/python benchmarks/profile_step.py --kernels
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning.pytorch import Callback  # noqa: E402
from train_step import NETS, VARIANTS, Reference, Runner, fit_times, preset_config, run_with_docs  # noqa: E402

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, called round-robin `repeats` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def conv_table(repeats: int) -> None:
    x, w = torch.randn(4, 256, 16, 16), torch.randn(256, 256, 3, 3)  # (B, C, h, w), (C, C, 3, 3)
    flops = 2 * x.shape[0] * 16 * 16 * 256 * 256 * 9
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            xx, ww = (t.to(dtype).contiguous(memory_format=layout) for t in (x, w))
            name = f"{str(dtype).split('.')[-1]} {'channels_last' if layout == torch.channels_last else 'NCHW'}"
            cases[name] = lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1)
    med = interleaved(cases, repeats)
    base = med["float32 NCHW"]
    print("| 3x3 conv 256->256, (4, 256, 16, 16), forward | GFLOP/s | time vs fp32 NCHW |\n| --- | ---: | ---: |")
    for name, t in med.items():
        print(f"| {name} | {flops / t / 1e9:.2f} | {t / base:.2f}x |")


def adam_table(repeats: int) -> None:
    torch.manual_seed(0)
    params = [p.detach() for p in HierarchicalAutoEncoder(**NETS["readme"]).parameters()]
    grads = [1e-3 * torch.randn_like(p) for p in params]
    kinds = {"for-loop (CPU default)": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    optimizers, copies = {}, {}
    for name, kw in kinds.items():
        copies[name] = [p.clone().requires_grad_() for p in params]
        for p, g in zip(copies[name], grads, strict=True):
            p.grad = g
        optimizers[name] = torch.optim.Adam(copies[name], lr=2e-4, **kw).step
    med = interleaved(optimizers, repeats)
    pairs = zip(copies["fused"], copies["for-loop (CPU default)"], strict=True)
    gap = max((a - b).abs().max().item() for a, b in pairs)
    print(f"\n| Adam step, README preset ({sum(p.numel() for p in params):,} parameters) | s/step | vs for-loop |")
    print("| --- | ---: | ---: |")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {t / med['for-loop (CPU default)']:.2f}x |")
    print(f"\nlargest |fused - for-loop| parameter difference after {repeats + 1} identical steps: {gap:.1e}")


class Profiled(Callback):
    """Runs `prof` over `steps` training steps of a fit, after its 3 warm-up steps."""

    def __init__(self, prof: profile, steps: int) -> None:
        self.prof = prof
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 3:
            self.prof.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == 3 + self.steps:
            self.prof.stop()


def top_ops(prof: profile, top: int) -> list[tuple[str, float, int]]:
    """(name, self CPU ms, calls) of the `top` operators by self CPU time."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:top]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(NETS), default="readme")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="fp32-cl")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's (readme: 16)")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--kernels", action="store_true", help="time conv dtypes/layouts and Adam variants instead")
    parser.add_argument("--repeats", type=int, default=3, help="--kernels: interleaved repeats")
    parser.add_argument("--docs", help="markdown file whose profile section gets this run's output")
    args = parser.parse_args(argv)
    run_with_docs(run, args, "profile")


def run(args: argparse.Namespace) -> None:
    if args.kernels:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; median of {args.repeats} interleaved repeats\n"
        )
        conv_table(args.repeats)
        return adam_table(args.repeats)
    batch = args.batch or preset_config(args.preset)["batch"]
    if args.variant == "fit":  # the real `lightning-dq fit` step: Lightning's loop, metrics, logging, data
        prof = profile(activities=[ProfilerActivity.CPU])
        fit_times(
            args.preset,
            args.resolution,
            batch,
            args.steps,
            torch.device("cpu"),
            Reference(torch.device("cpu"), ()),
            [Profiled(prof, args.steps)],
        )
    else:
        runner = Runner(args.preset, args.variant, batch, args.resolution, torch.device("cpu"))
        runner.step()  # warm-up: codebook init, allocator, oneDNN primitive caches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                runner.step()
    rows = top_ops(prof, args.top)
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    print(
        f"profile: preset {args.preset}, variant {args.variant}, batch {batch}, {args.steps} steps, "
        f"{args.resolution}x{args.resolution}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"total self CPU {total:.0f} ms\n"
    )
    print("| operator | self time | self ms | calls |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms, calls in rows:
        print(f"| `{name}` | {100 * ms / total:.1f}% | {ms:.1f} | {calls} |")


if __name__ == "__main__":
    main()
