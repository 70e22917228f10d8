"""Codes as an artifact, timed: the prior's training step from code files vs from images, and the codec's speed.

- `prior-step`: the computation of `PriorModule`'s training step on one batch, from images (the frozen auto-encoder's
  `encode`, then the prior's loss, backward and Adam step) against from a code file's flat codes (`unflatten`, then
  the same): images/s of each and their ratio, interleaved (a b a b ...), medians after one warm-up step each. Presets:
  `demo` (configs/demo.yaml + prior_demo.yaml) and `readme` (configs/cifar10.yaml + prior_cifar10.yaml, batch 16 on a
  CPU), both at 32x32, the networks freshly initialised (the step's cost does not depend on the weights' values).
- `codec`: `lightning_dq.codec.compress` and `decompress` images/s at the demo preset on `--images` images (tiles of
  32x32 coded `--group` at a time), and the file's bits/dim against figure C of the same images. With fresh networks
  the sizes are those of untrained models; the speed is that of the coding loop either way.

One process, `--threads` intra-op threads. Run it on an otherwise idle machine (docs/benchmarks.md says the load):

    .venv/bin/python benchmarks/codec.py --preset demo readme --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from lightning_dq.codec import compress, decompress
from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
from lightning_dq.nn.prior import CodePrior

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = {  # name -> (auto-encoder config layered on base.yaml, prior config, batch size: None = the config's)
    "demo": ("demo.yaml", "prior_demo.yaml", None),
    "readme": ("cifar10.yaml", "prior_cifar10.yaml", 16),
}


def _init_args(config: dict, *keys: str) -> dict:
    for key in keys:
        config = (config or {}).get(key) or {}
    return dict(config.get("init_args") or {})


def build(preset: str) -> tuple[HierarchicalAutoEncoder, CodePrior, int, float]:
    """The preset's auto-encoder (eval, frozen) and prior, its batch size and the prior's learning rate."""
    autoencoder_layer, prior_layer, batch = PRESETS[preset]
    net, prior, lr = {}, {}, 2e-4
    for layer in ["base.yaml", autoencoder_layer, prior_layer]:
        config = yaml.safe_load((CONFIGS / layer).read_text())
        if layer != prior_layer:
            net |= _init_args(config, "model", "init_args", "net")
            batch = batch or (_init_args(config, "data") or {}).get("batch_size") or batch
        else:
            prior |= _init_args(config, "model", "init_args", "prior")
            lr = _init_args(config, "model", "init_args", "optimizer").get("lr", lr)
    autoencoder = HierarchicalAutoEncoder(**net).requires_grad_(False).eval()
    return autoencoder, CodePrior(autoencoder.geometry, **prior), int(batch or 16), float(lr)


def prior_step(preset: str, repeats: int, seed: int = 0) -> dict:
    """Interleaved training steps of the prior from images and from flat codes; images/s medians and the ratio."""
    torch.manual_seed(seed)
    autoencoder, prior, batch, lr = build(preset)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    flat = autoencoder.geometry.flatten(autoencoder.encode(images))  # what a code file holds, (B, T)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr, foreach=True)

    def step(source: str) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            codes = autoencoder.encode(images) if source == "images" else autoencoder.geometry.unflatten(flat, 32)
        tokens = sum(c.shape[1:].numel() for c in codes)
        loss = -prior.log_prob(codes).mean() / tokens  # nats per code, as PriorModule's loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"images": [], "codes": []}
    for source in times:
        step(source)  # warm-up
    for _ in range(repeats):
        for source, values in times.items():
            values.append(step(source))
    rates = {source: batch / statistics.median(values) for source, values in times.items()}
    params = sum(p.numel() for p in prior.parameters()) / 1e6
    return {
        "preset": preset,
        "batch": batch,
        "prior_params_m": params,
        **rates,
        "ratio": rates["codes"] / rates["images"],
    }


def codec_speed(images: int, group: int, seed: int = 0) -> dict:
    """compress/decompress images/s at the demo preset and the coded bits/dim against figure C."""
    torch.manual_seed(seed)
    autoencoder, prior, _, _ = build("demo")
    prior.eval()
    batch = list(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8))
    start = time.perf_counter()
    coded = compress(batch, autoencoder, prior, resolution=32, group=group)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded, _ = decompress(coded.data, autoencoder, prior)
    decompress_s = time.perf_counter() - start
    if not all(torch.equal(a, b) for a, b in zip(batch, decoded, strict=True)):
        raise SystemExit("decompress did not return the compressed pixels")
    return {
        "images": images,
        "group": group,
        "compress_images_per_s": images / compress_s,
        "decompress_images_per_s": images / decompress_s,
        "bpd_coded": coded.bits_per_dim,
        "bpd_estimated": coded.estimated_bits_per_dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["demo", "readme"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each prior step")
    parser.add_argument("--images", type=int, default=64, help="images the codec compresses and decompresses")
    parser.add_argument("--group", type=int, default=64, help="tiles coded side by side (compress --group)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"load average (1 min) at start: {load:.2f}" + ("  (busy machine: times are not comparable)" * (load > 2.5)))
    print("| preset | batch | prior params (M) | from images (img/s) | from codes (img/s) | codes / images |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for preset in args.preset:
        r = prior_step(preset, args.repeats)
        print(
            f"| {preset} | {r['batch']} | {r['prior_params_m']:.2f} | {r['images']:.1f} | {r['codes']:.1f} | "
            f"{r['ratio']:.2f}x |",
            flush=True,
        )
    r = codec_speed(args.images, args.group)
    print("\n| codec (demo preset) | images | compress (img/s) | decompress (img/s) | coded bits/dim | figure C |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| group {r['group']} | {r['images']} | {r['compress_images_per_s']:.1f} | "
        f"{r['decompress_images_per_s']:.1f} | {r['bpd_coded']:.4f} | {r['bpd_estimated']:.4f} |"
    )
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
