"""Auto-encoder training-step speed: forward + backward (+ EMA codebook update) per image at 32x32.

Timed side by side in one process, interleaved, median of repeats, for each network:
- fp32 eager, channels-first (the reference);
- bf16 autocast + channels_last (the quantizer and the likelihood stay in fp32 inside autocast).

Networks: the official README preset (C=256, 44.6M parameters) and the `make demo` net (C=64).

    .venv/bin/python benchmarks/autoencoder.py               # ~3 min on 2 cores
    .venv/bin/python benchmarks/autoencoder.py --quick       # demo net only, one repeat
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder, count_parameters

NETS = {
    "README preset": dict(channels=256, res_blocks=3, res_channels=256, code_dim=64),
    "demo (configs/demo.yaml)": dict(channels=64, res_blocks=2, res_channels=32, code_dim=16),
}


def step_seconds(net: HierarchicalAutoEncoder, x: torch.Tensor, fast: bool) -> float:
    """Wall time of one forward + backward on batch x (gradients discarded)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with autocast:
        out = net(x)
        loss = out.recon.mean() + 0.25 * out.commitment
    loss.backward()
    net.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    nets = {k: v for k, v in NETS.items() if not args.quick or k.startswith("demo")}
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} of 32x32 images, "
          f"median of {repeats} interleaved repeats after one warm-up\n")  # fmt: skip
    print("| network | parameters | fp32 eager ms/image | bf16 autocast + channels_last ms/image | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, kwargs in nets.items():
        torch.manual_seed(0)
        ref = HierarchicalAutoEncoder(**kwargs).train()
        fast = HierarchicalAutoEncoder(**kwargs).train()
        fast.load_state_dict(ref.state_dict())
        fast.to(memory_format=torch.channels_last)
        x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        step_seconds(ref, x, False), step_seconds(fast, x_cl, True)  # warm-up (and codebook init)
        times: dict[str, list[float]] = {"fp32": [], "fast": []}
        for _ in range(repeats):
            times["fp32"].append(step_seconds(ref, x, False))
            times["fast"].append(step_seconds(fast, x_cl, True))
        ms = {k: 1e3 * statistics.median(v) / args.batch for k, v in times.items()}
        print(
            f"| {name} | {count_parameters(ref):,} | {ms['fp32']:.1f} | {ms['fast']:.1f} | "
            f"{ms['fp32'] / ms['fast']:.2f}x |"
        )


if __name__ == "__main__":
    main()
