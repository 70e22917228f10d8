"""Auto-encoder training-step throughput per preset: forward + backward + gradient clipping + Adam step, side by side.

Presets: `readme` (configs/base.yaml + cifar10.yaml, the paper's net, batch 16 on a CPU instead of 128), `demo`
(configs/demo.yaml) and `experiments` (configs/experiments.yaml, the net of experiments/), each with its own
optimizer settings. Variants (each its own copy of the same initial weights), interleaved in one process
(a b c ... a b c ...), median of the repeats after one warm-up step each:

- `fp32`: fp32 eager, contiguous (NCHW) tensors, the paper's plain Adam(lr=2e-4): the reference;
- `fp32-cl`: the same with channels_last;
- `bf16-cl`: bf16 autocast forced on + channels_last (the quantizer and the likelihood stay fp32);
- `default`: the preset's module and optimizer as its config builds them, under the precision policy (bf16 autocast
  only where bf16 is native, `lightning_dq.training.precision`);
- `compile`: `default` with `AutoEncoderModule(compile=True)` (compile time excluded, reported apart);
- `fit`: the real `lightning-dq fit` of the preset (Lightning's loop, the module's metrics and logging, the data
  loader; no validation), timed between consecutive batches; run after the interleaved variants.

Reported per variant: images/s, ms/image, peak memory of a step, the ratio to fp32, FLOPs per image (forward +
backward, torch.utils.flop_counter) and the achieved FLOP/s as a fraction of the reference matrix multiply: the best
of a 1024 and a 2048 square multiply in the machine's fastest native dtype (bf16 where native, else fp32), timed in
the same process between the steps (medians of interleaved repeats). For each preset and resolution one line
`matmul-fraction PRESET RESOLUTION X.XX` gives that fraction for `fit` (else `default`): what a user's run achieves.
Run it on an otherwise idle machine: absolute times move with the load, the ratios of interleaved runs less so.

    .venv/bin/python benchmarks/train_step.py --preset readme demo experiments --variants default fit
    .venv/bin/python benchmarks/train_step.py --preset demo --variants fp32 fp32-cl default --parity-steps 10
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
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_dq.data import ImageDataModule
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.figures import bits_per_dim
from lightning_dq.training.modules import AutoEncoderModule
from lightning_dq.training.precision import fast_bf16

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = {  # name -> (config files layered on configs/base.yaml, batch size on this benchmark: None = the config's)
    "readme": (["cifar10.yaml"], 16),
    "demo": (["demo.yaml"], None),
    "experiments": (["experiments.yaml"], None),
}
VARIANTS = ("fp32", "fp32-cl", "bf16-cl", "default", "compile", "fit")
BETA, CLIP, LR = 0.25, 2.0, 2e-4  # configs/base.yaml: beta, gradient_clip_val; the reference: Adam lr 2e-4
DATA_ROOT: Path | None = None  # --data-root: a folder holding cifar-10-batches-py (else synthetic images)


def preset_config(name: str) -> dict:
    """The preset's settings, merged over configs/base.yaml as `--config` layers merge them: the net's arguments,
    the optimizer's arguments, the module's `channels_last`/`compile`, and the batch size of this benchmark."""
    layers, batch = PRESETS[name]
    merged: dict = {"net": {}, "optimizer": {}, "module": {}, "batch": batch}
    for layer in ["base.yaml", *layers]:
        config = yaml.safe_load((CONFIGS / layer).read_text())
        init = (config.get("model") or {}).get("init_args") or {}
        merged["net"] |= ((init.get("net") or {}).get("init_args")) or {}
        optimizer = init.get("optimizer") or {}
        if optimizer.get("class_path", "torch.optim.Adam") != "torch.optim.Adam":
            raise SystemExit(f"{layer}: this benchmark times Adam, the config uses {optimizer['class_path']}")
        merged["optimizer"] |= optimizer.get("init_args") or {}
        merged["module"] |= {k: v for k, v in init.items() if k in ("channels_last", "compile")}
        data = ((config.get("data") or {}).get("init_args")) or {}
        merged["batch"] = merged["batch"] or data.get("batch_size")
    return merged


NETS = {name: preset_config(name)["net"] for name in PRESETS}  # the presets' nets, for the other benchmarks


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
    """One variant of a preset: its module (same initial weights for every variant), optimizer and fixed batch."""

    preset: str
    variant: str
    batch: int
    resolution: int
    device: torch.device
    seed: int = 0
    preset_optimizer: bool = False  # the preset's optimizer whatever the variant (the parity run: same numerics)
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = preset_config(self.preset)
        shipped = self.variant in ("default", "compile")  # the preset's module and optimizer, as configured
        torch.manual_seed(self.seed)  # identical weights and batch for every variant
        net = HierarchicalAutoEncoder(**config["net"])
        channels_last = config["module"].get("channels_last", True) if shipped else self.variant != "fp32"
        compiled = self.variant == "compile" or (shipped and config["module"].get("compile", False))
        self.module = AutoEncoderModule(net, channels_last=channels_last, compile=compiled).to(self.device).train()
        settings = config["optimizer"] if shipped or self.preset_optimizer else {"lr": LR}
        self.optimizer = torch.optim.Adam(self.module.parameters(), **settings)
        shape = (self.batch, 3, self.resolution, self.resolution)
        self.x = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)
        # "default" is what the precision policy picks for the device (bf16-mixed only where bf16 is native)
        self.autocast = self.variant == "bf16-cl" or (shipped and fast_bf16(self.device.type))

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


class Reference:
    """The reference rate: square matrix multiplies of each size in `sizes`, in the fastest native dtype of the
    device, timed whenever `time()` is called (between the steps being measured); `flops` is the best size's median."""

    def __init__(self, device: torch.device, sizes: tuple[int, ...] = (1024, 2048)) -> None:
        self.device = device
        self.dtype = torch.bfloat16 if fast_bf16(device.type) else torch.float32
        self.operands = {n: [torch.randn(n, n, device=device).to(self.dtype) for _ in range(2)] for n in sizes}
        self.rates: dict[int, list[float]] = {n: [] for n in sizes}
        for a, b in self.operands.values():
            a @ b  # warm-up

    def time(self) -> float:
        """Time one multiply of each size; returns the seconds this took (to leave out of a measured interval)."""
        begin = time.perf_counter()
        for n, (a, b) in self.operands.items():
            sync(self.device)
            start = time.perf_counter()
            a @ b
            sync(self.device)
            self.rates[n].append(2 * n**3 / (time.perf_counter() - start))
        return time.perf_counter() - begin

    @property
    def flops(self) -> float:
        return max(statistics.median(v) for v in self.rates.values() if v)

    def describe(self) -> str:
        sizes = ", ".join(f"{n}^2 {statistics.median(v) / 1e9:.1f}" for n, v in self.rates.items() if v)
        return f"{str(self.dtype).removeprefix('torch.')} matmul GFLOP/s (median of {len(self.rates[1024])}): {sizes}"


class FitTimer(Callback):
    """Seconds between the starts of consecutive training batches of a real fit, after `warmup` batches; the
    reference multiplies run after each batch and are left out of the interval."""

    def __init__(self, warmup: int, reference: Reference) -> None:
        self.warmup = warmup
        self.reference = reference
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._start)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self.warmup:
            self._start += self.reference.time()


def fit_times(
    preset: str, resolution: int, batch: int, steps: int, device: torch.device, reference: Reference, callbacks=()
) -> list[float]:
    """Step times of `lightning-dq fit` with the preset's config (no validation, no logger), `steps` timed after 2;
    `callbacks` join the run (e.g. a profiler)."""
    from lightning_dq.cli import build_cli  # here: the other variants do not need the CLI

    warmup = 2
    layers = [arg for name in ["base.yaml", *PRESETS[preset][0]] for arg in ("--config", str(CONFIGS / name))]
    if DATA_ROOT is not None:
        data = ["--data.init_args.dataset=cifar10", f"--data.init_args.root={DATA_ROOT}"]
    else:
        count = batch * (steps + warmup + 2) * 2
        data = ["--data.init_args.dataset=synthetic", "--data.init_args.fallback=none"]
        data += [f"--data.init_args.synthetic_train={count}"]
        data += [f"--data.init_args.native_resolution={resolution}", "--data.init_args.val_size=0.1"]
    with tempfile.TemporaryDirectory() as root:
        args = [*layers, *data, f"--trainer.default_root_dir={root}", "--trainer.logger=false"]
        args += [
            f"--trainer.accelerator={device.type}",
            "--trainer.devices=1",
            f"--trainer.max_steps={steps + warmup + 1}",
        ]
        args += ["--trainer.max_epochs=-1", "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=0"]
        args += ["--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]
        args += ["--trainer.enable_model_summary=false", "--trainer.val_check_interval=null"]
        args += [f"--data.init_args.batch_size={batch}", f"--data.init_args.resolution={resolution}"]
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = build_cli(args, run=False)
            timer = FitTimer(warmup, reference)
            cli.trainer.callbacks.extend([timer, *callbacks])
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.times


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


def measure(args: argparse.Namespace, preset: str, resolution: int, device: torch.device) -> list[dict]:
    """Interleaved timing of every variant of a preset at one resolution, then `fit`; one row (dict) per variant."""
    batch = args.batch or preset_config(preset)["batch"]
    reference = Reference(device)
    runners = [Runner(preset, v, batch, resolution, device) for v in args.variants if v != "fit"]
    for runner in runners:
        runner.warm_up()
    for _ in range(args.repeats):  # a b c ... a b c ...: machine noise hits every variant alike
        for runner in runners:
            runner.timed_step()
        reference.time()
    timed = {r.variant: (r.times, r.peaks, r.compile_s) for r in runners}
    if "fit" in args.variants:
        timed["fit"] = (fit_times(preset, resolution, batch, args.fit_steps, device, reference), [math.nan], 0.0)
    flops = flops_per_image(preset_config(preset)["net"], resolution, device)
    rows = []
    for variant, (times, peaks, compile_s) in timed.items():
        ips = batch / statistics.median(times)
        row = dict(variant=variant, preset=preset, batch=batch, resolution=resolution, images_s=ips, flops=flops)
        row |= dict(peak_mb=statistics.median(peaks), achieved=flops * ips, reference=reference, compile_s=compile_s)
        rows.append(row)
    base = next((row["images_s"] for row in rows if row["variant"] == "fp32"), None)
    for row in rows:
        row["ratio"] = row["images_s"] / base if base else float("nan")
    return rows


def parity(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Train the demo preset `--parity-steps` steps per variant from the same seed on the same batches; the
    bits/dim of each on a fixed held-out batch, evaluated in fp32."""
    b, r = args.parity_batch, args.parity_resolution
    loader = iter(data_module(b, r, 2 * b * (args.parity_steps + 1)).train_dataloader())  # val takes a share
    data = [next(loader).to(device) for _ in range(args.parity_steps + 1)]  # (b, 3, r, r) uint8 each
    lines = []
    for variant in args.parity_variants:
        runner = Runner("demo", variant, b, r, device, seed=0, preset_optimizer=True)
        losses = []
        for batch in data[:-1]:
            runner.x = batch
            with torch.no_grad():
                losses.append(runner.loss(batch).item())
            runner.step()
        runner.module.eval()
        with torch.no_grad():
            bpd = bits_per_dim(runner.module.net(data[-1]).recon.mean().item())
        lines.append(f"| {variant} | {args.parity_steps} | {losses[-1]:.4f} | {bpd:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["readme"])
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's (readme: 16)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported")
    parser.add_argument("--resolution", type=int, nargs="+", default=[32])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["fp32", "fp32-cl", "default", "fit"])
    parser.add_argument("--fit-steps", type=int, default=10, help="timed steps of the `fit` variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loader-batches", type=int, default=0, help="> 0: time the train loader alone too")
    parser.add_argument("--parity-steps", type=int, default=0, help="> 0: a short training parity run (demo net)")
    parser.add_argument("--parity-batch", type=int, default=8)
    parser.add_argument("--parity-resolution", type=int, default=16)
    parser.add_argument("--parity-variants", nargs="+", choices=VARIANTS[:5], default=["fp32", "default"])
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
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 native: {fast_bf16(device.type)}; median of "
        f"{args.repeats} interleaved repeats after a warm-up step (fit: {args.fit_steps} steps after 2)\n"
    )
    print(
        "| preset | resolution | batch | variant | images/s | ms/image | vs fp32 | peak MB | GFLOP/image "
        "| achieved GFLOP/s | of matmul | compile s |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fractions, references = [], []
    for preset in args.preset:
        for resolution in args.resolution:
            rows = measure(args, preset, resolution, device)
            for r in rows:
                ratio = f"{r['ratio']:.2f}x" if math.isfinite(r["ratio"]) else "n/a"
                peak = f"{r['peak_mb']:.0f}" if math.isfinite(r["peak_mb"]) else "n/a"
                print(
                    f"| {preset} | {resolution}x{resolution} | {r['batch']} | {r['variant']} | {r['images_s']:.2f} "
                    f"| {1e3 / r['images_s']:.1f} | {ratio} | {peak} | {r['flops'] / 1e9:.2f} "
                    f"| {r['achieved'] / 1e9:.1f} | {r['achieved'] / r['reference'].flops:.2f} | {r['compile_s']:.0f} |"
                )
            user = next(r for r in rows if r["variant"] == ("fit" if "fit" in args.variants else rows[-1]["variant"]))
            fractions.append(f"matmul-fraction {preset} {resolution} {user['achieved'] / user['reference'].flops:.2f}")
            references.append(f"{preset} {resolution}x{resolution}: {rows[0]['reference'].describe()}")
    print("\nreference multiplies, timed between the steps:\n" + "\n".join(f"- {line}" for line in references))
    for resolution in args.resolution if args.loader_batches else []:  # the loader runs on the host CPU
        batch = args.batch or preset_config(args.preset[0])["batch"]
        ips, description = loader_images_per_s(batch, resolution, args.loader_batches)
        print(
            f"\ndata loader ({description}), {resolution}x{resolution}, batch {batch}, 0 workers: {ips:,.0f} images/s"
        )
    if args.parity_steps:
        print(
            f"\nparity (demo preset, batch {args.parity_batch} at {args.parity_resolution}x{args.parity_resolution}, "
            "same seed, same batches, the preset's optimizer; the last step's loss, and bits/dim of a held-out "
            "batch in fp32)\n"
        )
        print("| variant | steps | loss | bits/dim |\n| --- | ---: | ---: | ---: |")
        print("\n".join(parity(args, device)))
    print("\n" + "\n".join(fractions))


if __name__ == "__main__":
    main()
