"""Auto-encoder training-step throughput: forward + backward + gradient clipping + Adam step, side by side.

Variants (each its own copy of the same initial weights, its own Adam), interleaved in one process
(a b c ... a b c ...), median of the repeats after one warm-up step each:

- `fp32`: fp32 eager, contiguous (NCHW) tensors: the reference;
- `fp32-cl`: fp32 eager, channels_last;
- `bf16-cl`: bf16 autocast forced on + channels_last (the quantizer and the likelihood stay fp32);
- `default`: what `AutoEncoderModule` runs under the shipped config (the precision policy, `channels_last: true`):
  bf16 autocast where bf16 is fast on the device, fp32 elsewhere (`lightning_dq.training.precision`);
  Its Adam takes configs/base.yaml's arguments (the other variants: the paper's Adam(lr=2e-4));
- `compile`: `default` with `AutoEncoderModule(compile=True)` (compile time excluded, reported apart).

Reported per variant: images/s, ms/image, peak memory of a step (CUDA: allocator peak; CPU: growth of the
resident set during the step), the ratio to fp32, the model's FLOPs per image (forward + backward, counted
by torch.utils.flop_counter.FlopCounterMode) and the achieved FLOP/s as a fraction of a large matrix
multiply timed in the same run, in bf16 and in fp32. Then the data loader's images/s at the same batch
size, and optionally (`--parity-steps`) a short training run per precision from the same seed.

The machine this was written on is shared: absolute times move with its load; the ratios of interleaved
runs are the result. The last line is `speed-up: X.XXx` (default / fp32 at 32x32).

    .venv/bin/python benchmarks/train_step.py                              # ~4 min on 2 busy cores
    .venv/bin/python benchmarks/train_step.py --batch 2 --repeats 2 --resolution 32
    .venv/bin/python benchmarks/train_step.py --variants fp32 bf16-cl --resolution 32 --repeats 1
    .venv/bin/python benchmarks/train_step.py --device cuda --batch 128 --variants fp32 default compile
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_dq.data import ImageDataModule
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder, count_parameters
from lightning_dq.nn.figures import bits_per_dim
from lightning_dq.training.modules import AutoEncoderModule
from lightning_dq.training.precision import fast_bf16

NETS = {  # README preset = configs/base.yaml's model; demo = configs/demo.yaml's net
    "readme": dict(channels=256, res_blocks=3, res_channels=256, coder_blocks=2, code_dim=64, num_codebooks=5),
    "demo": dict(channels=64, res_blocks=2, res_channels=32, coder_blocks=2, code_dim=16, num_codebooks=5),
}
VARIANTS = ("fp32", "fp32-cl", "bf16-cl", "default", "compile")
BETA, CLIP, LR = 0.25, 2.0, 2e-4  # configs/base.yaml: beta, gradient_clip_val; default optimizer: Adam lr 2e-4
DATA_ROOT: Path | None = None  # --data-root: a folder holding cifar-10-batches-py (else synthetic images)
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def shipped_adam() -> dict:
    """The Adam arguments of configs/base.yaml (lr, and e.g. fused), used by the `default` and `compile` variants;
    the fp32 reference keeps the paper's plain Adam(lr=2e-4)."""
    optimizer = yaml.safe_load(BASE_CONFIG.read_text())["model"]["init_args"].get("optimizer") or {}
    if optimizer.get("class_path", "torch.optim.Adam") != "torch.optim.Adam":
        raise SystemExit(f"{BASE_CONFIG}: this benchmark times Adam, the config uses {optimizer['class_path']}")
    return optimizer.get("init_args") or {"lr": LR}


class Tee(io.StringIO):
    """stdout that is also kept, to be written into the docs."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        return super().write(text)


def write_section(path: str, name: str, command: str, text: str) -> None:
    """Replace what lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in the markdown file `path`
    by the command and its output (the markers must already be there, each on its own line)."""
    doc = Path(path).read_text()
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"{path}: expected one '{begin}' line followed by one '{end}' line")
    head, rest = doc.split(begin)
    tail = rest.split(end)[1]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = f"{begin}\n`{command}` ({stamp}):\n\n{text.strip()}\n{end}"
    Path(path).write_text(head + body + tail)


def run_with_docs(main_body, args: argparse.Namespace, name: str) -> None:
    """Run `main_body(args)`; with `--docs FILE`, write its output into FILE's `name` section."""
    if not args.docs:
        return main_body(args)
    tee = Tee()
    with contextlib.redirect_stdout(tee):
        main_body(args)
    command = " ".join([".venv/bin/python", *sys.argv]).replace(f" --docs {args.docs}", "")
    write_section(args.docs, name, command, tee.getvalue())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exact_rss() -> None:
    """Make glibc return every large block to the OS when it is freed (fixed 64 KiB mmap threshold instead of
    the adaptive one), so the resident set follows live memory and its high-water mark is a step's peak."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass  # not glibc: the CPU peak is then an upper bound


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


class PeakMemory:
    """Peak memory of a block in MB: CUDA allocator peak, or on Linux CPUs the resident-set high-water mark
    growth (reset through /proc/self/clear_refs; freed-and-reused allocator memory is not counted twice)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mb = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current VmRSS
                self.base = _status_kb("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            self.mb = (_status_kb("VmHWM") * 1024 - self.base) / 2**20


@dataclass
class Runner:
    """One variant: its module (same initial weights for every variant), optimizer and fixed batch."""

    net_kwargs: dict
    variant: str
    batch: int
    resolution: int
    device: torch.device
    seed: int = 0
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)  # identical weights and batch for every variant
        net = HierarchicalAutoEncoder(**self.net_kwargs)
        module = AutoEncoderModule(net, channels_last=self.variant != "fp32", compile=self.variant == "compile")
        self.module = module.to(self.device).train()
        adam = shipped_adam() if self.variant in ("default", "compile") else {"lr": LR}
        self.optimizer = torch.optim.Adam(self.module.parameters(), **adam)
        self.x = torch.randint(
            0, 256, (self.batch, 3, self.resolution, self.resolution), dtype=torch.uint8, device=self.device
        )
        # "default" is what the precision policy picks for the device (bf16-mixed only where bf16 is fast)
        self.autocast = self.variant == "bf16-cl" or (
            self.variant in ("default", "compile") and fast_bf16(self.device.type)
        )

    def loss(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.module(x)
        return out.loss(BETA)  # () nats/dim + beta * commitment, fp32

    def step(self) -> float:
        """One optimizer step on the fixed batch; returns its wall time in seconds."""
        sync(self.device)
        start = time.perf_counter()
        loss = self.loss(self.x)
        loss.backward()
        nn.utils.clip_grad_norm_(self.module.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start

    def warm_up(self) -> None:
        start = time.perf_counter()
        self.step()  # codebook init, oneDNN/cuDNN primitive caches; compiles for "compile"
        if self.variant == "compile":
            self.compile_s = time.perf_counter() - start
            self.step()

    def timed_step(self) -> None:
        with PeakMemory(self.device) as peak:
            self.times.append(self.step())
        self.peaks.append(peak.mb)


def flops_per_image(net_kwargs: dict, resolution: int, device: torch.device) -> float:
    """FLOPs of forward + backward per image, counted by torch's flop counter on an fp32 batch of 2."""
    torch.manual_seed(0)
    module = AutoEncoderModule(HierarchicalAutoEncoder(**net_kwargs), channels_last=False).to(device).train()
    x = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        out.loss(BETA).backward()
    return counter.get_total_flops() / 2


def matmul_flops(dtype: torch.dtype, size: int, device: torch.device) -> float:
    """FLOP/s of one (size x size) @ (size x size) multiply (the best of 3 after a warm-up)."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def data_module(batch: int, resolution: int, synthetic: int, stage: str = "fit") -> ImageDataModule:
    """ImageDataModule (0 workers, as configs/cifar10.yaml) set up for `stage` ("fit" or "test"): CIFAR-10
    from --data-root when given, else `synthetic` synthetic images in that split."""
    if DATA_ROOT is not None:
        dm = ImageDataModule("cifar10", root=str(DATA_ROOT), batch_size=batch, num_workers=0, resolution=resolution)
    else:
        count = {"synthetic_train" if stage == "fit" else "synthetic_test": synthetic}
        dm = ImageDataModule("synthetic", batch_size=batch, num_workers=0, resolution=resolution, **count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the JPEG copy's "not the official md5" warning
        dm.setup(stage)
    return dm


def loader_images_per_s(batch: int, resolution: int, batches: int) -> tuple[float, str]:
    """Images/s of the train loader over `batches` batches."""
    dm = data_module(batch, resolution, batch * batches)
    start, seen = time.perf_counter(), 0
    for i, images in enumerate(dm.train_dataloader()):  # (B, 3, r, r) uint8
        seen += images.shape[0]
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start), dm.data_description


def measure(args: argparse.Namespace, resolution: int, device: torch.device) -> list[dict]:
    """Interleaved timing of every variant at one resolution; one row (dict) per variant."""
    runners = [Runner(NETS[args.net], v, args.batch, resolution, device) for v in args.variants]
    for runner in runners:
        runner.warm_up()
    matmul: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for _ in range(args.repeats):  # a b c ... a b c ...: machine noise hits every variant alike
        for runner in runners:
            runner.timed_step()
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            matmul[name].append(matmul_flops(dtype, args.matmul_size, device))
    flops = flops_per_image(NETS[args.net], resolution, device)
    mm = {k: statistics.median(v) for k, v in matmul.items()}
    rows = []
    for r in runners:
        ips = args.batch / statistics.median(r.times)
        rows.append(
            dict(
                variant=r.variant,
                resolution=resolution,
                images_s=ips,
                peak_mb=statistics.median(r.peaks),
                flops=flops,
                achieved=flops * ips,
                mm_bf16=mm["bf16"],
                mm_fp32=mm["fp32"],
                compile_s=r.compile_s,
                spread=(min(r.times), max(r.times)),
            )
        )
    base = next((row["images_s"] for row in rows if row["variant"] == "fp32"), None)
    for row in rows:
        row["ratio"] = row["images_s"] / base if base else float("nan")
    return rows


def parity(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Train the demo net `--parity-steps` steps per variant from the same seed on the same batches; the
    bits/dim of each on a fixed held-out batch, evaluated in fp32."""
    b, r = args.parity_batch, args.parity_resolution
    loader = iter(data_module(b, r, b * (args.parity_steps + 1)).train_dataloader())
    data = [next(loader).to(device) for _ in range(args.parity_steps + 1)]  # (b, 3, r, r) uint8 each
    lines = []
    for variant in args.parity_variants:
        runner = Runner(NETS["demo"], variant, b, r, device, seed=0)
        for batch in data[:-1]:
            runner.x = batch
            runner.step()
        runner.module.eval()
        with torch.no_grad():
            bpd = bits_per_dim(runner.module.net(data[-1]).recon.mean().item())
        lines.append(f"| {variant} | {args.parity_steps} | {bpd:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="readme")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="default: fp32 fp32-cl default (+ bf16-cl where bf16 is native)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the reference matmul")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--parity-steps", type=int, default=0, help="> 0: a short training parity run (demo net)")
    parser.add_argument("--parity-batch", type=int, default=8)
    parser.add_argument("--parity-resolution", type=int, default=16)
    parser.add_argument("--parity-variants", nargs="+", choices=VARIANTS, default=["fp32", "default", "bf16-cl"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py (default: synthetic)")
    parser.add_argument("--docs", help="markdown file whose train_step section gets this run's output")
    args = parser.parse_args(argv)
    run_with_docs(run, args, "train_step")


def run(args: argparse.Namespace) -> None:
    global DATA_ROOT
    DATA_ROOT = Path(args.data_root) if args.data_root else None
    device = torch.device(args.device)
    exact_rss()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = fast_bf16(device.type)
    if args.variants is None:
        args.variants = ["fp32", "fp32-cl", "default"] + (["bf16-cl"] if native else [])
    if args.matmul_size is None:  # emulated bf16 runs at ~1/20 of fp32: keep its reference multiply short
        args.matmul_size = 8192 if device.type == "cuda" else (2048 if native else 512)
    params = count_parameters(HierarchicalAutoEncoder(**NETS[args.net]))
    print(
        f"net {args.net} ({params:,} parameters), device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, bf16 fast: {native}, batch {args.batch}, "
        f"median of {args.repeats} interleaved repeats after a warm-up step; matmul {args.matmul_size}^2\n"
    )
    print(
        "| resolution | variant | images/s | ms/image | vs fp32 | peak MB | GFLOP/image | achieved GFLOP/s "
        "| of bf16 matmul | of fp32 matmul | compile s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    speedup = None
    for resolution in args.resolution:
        rows = measure(args, resolution, device)
        for r in rows:
            ratio = f"{r['ratio']:.2f}x" if math.isfinite(r["ratio"]) else "n/a"
            print(
                f"| {resolution}x{resolution} | {r['variant']} | {r['images_s']:.2f} | {1e3 / r['images_s']:.0f} "
                f"| {ratio} | {r['peak_mb']:.0f} | {r['flops'] / 1e9:.1f} | {r['achieved'] / 1e9:.1f} "
                f"| {r['achieved'] / r['mm_bf16']:.0%} | {r['achieved'] / r['mm_fp32']:.0%} "
                f"| {r['compile_s']:.0f} |"
            )
            if resolution == 32 and r["variant"] == "default" and math.isfinite(r["ratio"]):
                speedup = r["ratio"]
        mm = rows[0]
        print(
            f"| {resolution}x{resolution} | matmul {args.matmul_size}^2 | bf16 {mm['mm_bf16'] / 1e9:.1f} GFLOP/s "
            f"| fp32 {mm['mm_fp32'] / 1e9:.1f} GFLOP/s | | | | | | | |"
        )
    for resolution in args.resolution:  # the loader runs on the host CPU whatever the device
        if args.loader_batches:
            ips, description = loader_images_per_s(args.batch, resolution, args.loader_batches)
            print(
                f"\ndata loader ({description}), {resolution}x{resolution}, batch {args.batch}, 0 workers: "
                f"{ips:,.0f} images/s"
            )
    if args.parity_steps:
        print(
            f"\nparity (demo net, batch {args.parity_batch} at {args.parity_resolution}x{args.parity_resolution}, "
            "same seed, same training batches; bits/dim of a held-out batch, evaluated in fp32)\n"
        )
        print("| variant | steps | bits/dim |\n| --- | ---: | ---: |")
        print("\n".join(parity(args, device)))
    if speedup is not None:
        print(f"\nspeed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
