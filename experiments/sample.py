"""Sample images from a trained prior: codes from the `CodePrior` (cached incremental decoding), pixels from
the auto-encoder's decoder head (mixture sampling). Saves a PNG grid and, with `--wandb`, logs it to W&B.

    make sample PRIOR_CKPT=runs/prior_cifar10/checkpoints/last.ckpt
    .venv/bin/python experiments/sample.py --checkpoint <prior.ckpt> --num_images 64 --temperature 0.9
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from torchvision.utils import make_grid, save_image

from lightning_dq.module import PriorModule


def sample(
    checkpoint: str,
    num_images: int = 36,
    resolution: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    out: str | None = None,
    autoencoder_ckpt: str | None = None,
    wandb: bool = False,
) -> Path:
    """Write a grid of `num_images` samples and return its path.

    Args:
        checkpoint: a `PriorModule` checkpoint (`make train-prior-*` writes <run dir>/checkpoints/last.ckpt).
        num_images: images in the grid (rows of sqrt(num_images)).
        resolution: image side; the prior and the fully convolutional decoder serve 32 and 64.
        temperature: divides the prior's logits and scales the mixture's logistic noise (1 = the model).
        seed: random seed of the draw.
        out: PNG path; default <checkpoint's run dir>/samples_r{resolution}_t{temperature}.png.
        autoencoder_ckpt: the auto-encoder checkpoint, when it has moved since the prior was trained (its
            weights are inside the prior checkpoint; this path only rebuilds the module).
        wandb: also log the grid to W&B (offline unless WANDB_MODE=online; `wandb sync` uploads later).
    """
    overrides = {"autoencoder_ckpt": autoencoder_ckpt} if autoencoder_ckpt else {}
    module = PriorModule.load_from_checkpoint(checkpoint, map_location="cpu", **overrides).eval()
    torch.manual_seed(seed)
    start = time.perf_counter()
    images = module.sample(num_images, resolution, temperature)  # (N, 3, R, R) uint8
    seconds = time.perf_counter() - start
    path = Path(out) if out else Path(checkpoint).resolve().parents[1] / f"samples_r{resolution}_t{temperature}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=max(1, round(num_images**0.5)))
    save_image(grid.float() / 255.0, path)
    print(f"{num_images} samples at {resolution}x{resolution}, temperature {temperature}, in {seconds:.1f} s: {path}")
    if wandb:
        import wandb as wb

        os.environ.setdefault("WANDB_MODE", "offline")
        run = wb.init(project="lightning-dq", job_type="sample", dir=str(path.parent),
                      config={"checkpoint": str(checkpoint), "resolution": resolution, "temperature": temperature,
                              "seed": seed, "num_images": num_images})  # fmt: skip
        run.log({"samples": wb.Image(str(path))})
        run.finish()
    return path


if __name__ == "__main__":
    CLI(sample, as_positional=False)
