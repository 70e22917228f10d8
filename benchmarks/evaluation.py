"""Evaluation speed: figures A, B and C (lightning_dq.nn.figures) on test images, two paths side by side.

- `two-pass` (the evaluation before issue 12, written out here as the reference): encode every image for
  the prior's codes, then a second, full auto-encoder pass for the decoder figure A; fp32, contiguous
  tensors, and a host-synchronising check `C >= A` on every batch.
- `one-pass`: one auto-encoder pass per image gives the codes and the decoder figure together (the codes
  of `C` and of `A` are the same tensors); channels_last, bf16 autocast for the encoder/decoder where the
  precision policy would choose it (`lightning_dq.training.precision`), quantizer, likelihood and prior logits
  in fp32, inference mode, no host synchronisation inside the loop.

Both paths evaluate the same weights on the same images, interleaved (two-pass, one-pass, two-pass, ...),
median of the repeats after a warm-up; the figures of both are printed so they can be compared. The
weights are random (a freshly built net and prior, codebooks initialised from the data): the figures
check agreement, the times are the result.

Images: the first `--images` of the CIFAR-10 test split under `--data-root` when given, else synthetic images.

    .venv/bin/python benchmarks/evaluation.py                      # README preset, ~3 min on 2 busy cores
    .venv/bin/python benchmarks/evaluation.py --net demo --images 256 --batch 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.figures import likelihood_figures
from lightning_dq.nn.prior import CodePrior
from lightning_dq.training.modules import AutoEncoderModule
from lightning_dq.training.precision import fast_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from train_step import NETS, data_module, run_with_docs, sync  # noqa: E402

PRIORS = {"readme": dict(dim=256, depth=4, heads=4), "demo": dict(dim=64, depth=2, heads=4)}  # as the configs


def test_images(count: int, resolution: int) -> tuple[Tensor, str]:
    """The first `count` test images (count, 3, r, r) uint8 and a description of where they come from."""
    dm = data_module(count, resolution, count, stage="test")
    return next(iter(dm.test_dataloader()))[:count], dm.data_description


def figures(net: HierarchicalAutoEncoder, x: Tensor, recon: Tensor, prior_nats: Tensor) -> Tensor:
    """Per-image A, B, C in bits/dim, stacked (B, 3), from the one function that computes them."""
    f = likelihood_figures(recon.float(), net.code_shapes(x.shape[-1]), tuple(x.shape[-2:]), -prior_nats)
    return torch.stack([f["bpd_decoder"], f["bpd_uniform"], f["bpd_prior"]], dim=1)


@torch.no_grad()
def two_pass(module: AutoEncoderModule, prior: CodePrior, x: Tensor) -> Tensor:
    """The reference: codes for the prior from one encoder pass, A from a second full pass, a check per batch."""
    net = module.net
    codes = net.encode(x)  # pass 1: encoder + quantizers
    nats = -prior.log_prob(codes)  # (B,)
    out = net(x)  # pass 2: encoder + quantizers again, then the decoder
    result = figures(net, x, out.recon, nats)
    assert bool((result[:, 2] >= result[:, 0]).all()), "figure C below figure A"  # a host sync per batch
    return result


@torch.inference_mode()
def one_pass(module: AutoEncoderModule, prior: CodePrior, x: Tensor) -> Tensor:
    """One auto-encoder pass: its codes feed the prior, its decoder gives A; autocast as the Trainer sets it."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=fast_bf16(x.device.type)):
        out = module(x)  # channels_last inside; bf16 only where the precision policy would choose it
    nats = -prior.log_prob(out.codes)  # (B,) fp32 logits
    return figures(module.net, x, out.recon, nats)


def build(net_name: str, x: Tensor) -> list[tuple[AutoEncoderModule, CodePrior]]:
    """Two copies of one random net and prior: (fp32 contiguous, channels_last)."""
    torch.manual_seed(0)
    net = HierarchicalAutoEncoder(**NETS[net_name])
    net(x[:16])  # training mode: codebooks initialised from the data (k-means++), one EMA step
    prior = CodePrior(net.geometry, **PRIORS[net_name])
    copies = []
    for channels_last in (False, True):
        twin, twin_prior = HierarchicalAutoEncoder(**NETS[net_name]), copy.deepcopy(prior)
        twin.load_state_dict(net.state_dict())
        copies.append((AutoEncoderModule(twin, channels_last=channels_last).eval(), twin_prior.eval()))
    return copies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="readme")
    parser.add_argument("--images", type=int, default=16, help="test images per evaluation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py (default: synthetic)")
    parser.add_argument("--docs", help="markdown file whose evaluation section gets this run's output")
    args = parser.parse_args(argv)
    run_with_docs(run, args, "evaluation")


def run(args: argparse.Namespace) -> None:
    train_step.DATA_ROOT = Path(args.data_root) if args.data_root else None
    device = torch.device(args.device)
    x_all, description = test_images(args.images, args.resolution)
    (ref, ref_prior), (new, new_prior) = build(args.net, x_all)
    x_all = x_all.to(device)
    ref, ref_prior, new, new_prior = ref.to(device), ref_prior.to(device), new.to(device), new_prior.to(device)
    paths = {"two-pass": (two_pass, ref, ref_prior), "one-pass": (one_pass, new, new_prior)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    results: dict[str, Tensor] = {}

    def evaluate(name: str) -> float:
        fn, module, prior = paths[name]
        sync(device)
        start = time.perf_counter()
        results[name] = torch.cat([fn(module, prior, x) for x in x_all.split(args.batch)]).mean(0)  # (3,)
        sync(device)
        return time.perf_counter() - start

    for name in paths:
        evaluate(name)  # warm-up
    for _ in range(args.repeats):
        for name in paths:
            times[name].append(evaluate(name))
    print(
        f"net {args.net}, device {device}, bf16 fast: {fast_bf16(device.type)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.images} test images ({description}), batch {args.batch}, "
        f"{args.resolution}x{args.resolution}; median of {args.repeats} interleaved repeats; random weights\n"
    )
    print("| path | images/s | s per evaluation | speed-up | A bits/dim | B bits/dim | C bits/dim |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.median(times["two-pass"])
    for name in paths:
        t = statistics.median(times[name])
        a, b, c = results[name].tolist()
        print(f"| {name} | {args.images / t:.2f} | {t:.2f} | {base / t:.2f}x | {a:.4f} | {b:.4f} | {c:.4f} |")
    gap = (results["one-pass"] - results["two-pass"]).abs().max().item()
    print(f"\nlargest |one-pass - two-pass| over A, B, C: {gap:.2e} bits/dim")
    print(f"speed-up: {base / statistics.median(times['one-pass']):.2f}x")


if __name__ == "__main__":
    main()
