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

from lightning_dq.reporting.wandb import RUN_ID_FILE
from lightning_dq.training.modules import PriorModule


def sample(
    checkpoint: str,
    num_images: int = 36,
    resolution: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    out: str | None = None,
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
        wandb: also log the grid to the run's W&B run (the id in <run dir>/wandb_run_id, job_type "sample";
            offline unless WANDB_MODE=online; `wandb sync` uploads later).
    """
    # the prior checkpoint holds the auto-encoder's config and weights: no other file is read
    module = PriorModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
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

        run_dir = Path(checkpoint).resolve().parents[1]
        id_file = run_dir / RUN_ID_FILE  # attach to the experiment's run when there is one
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
        run = wb.init(
            project="lightning-dq",
            job_type="sample",
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            config={
                "checkpoint": str(checkpoint),
                "resolution": resolution,
                "temperature": temperature,
                "seed": seed,
                "num_images": num_images,
            },
        )
        run.log({"samples": wb.Image(str(path))})
        run.finish()
    return path


if __name__ == "__main__":
    CLI(sample, as_positional=False)
