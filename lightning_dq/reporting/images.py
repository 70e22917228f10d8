"""`ImageLogger`: image grids and code usage, written into the run directory's `images/` and sent to the loggers."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from lightning_dq.nn.heads import head_reconstruct
from lightning_dq.reporting.wandb import wandb_loggers


def log_image(trainer: Trainer, key: str, grid: torch.Tensor, path: Path) -> None:
    """Save a uint8 or float grid (3, H, W) as a PNG at `path` and send it to the run's loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid.float() / 255.0 if grid.dtype == torch.uint8 else grid
    save_image(image, path)
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)])
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=trainer.global_step)


class ImageLogger(Callback):
    """Image grids and code usage of a validation batch, every n-th epoch (rank 0, no collectives). Originals vs
    reconstructions, per-level decodes, codebook usage (PNG, W&B histogram per level); samples for a `PriorModule`.

    Args:
        every_n_epochs: log every n-th validation epoch (0 disables).
        num_images: images per grid.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._batch: torch.Tensor | None = None

    def _due(self, trainer: Trainer) -> bool:
        n = self.every_n_epochs
        return n > 0 and trainer.current_epoch % n == 0 and trainer.is_global_zero and not trainer.sanity_checking

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._due(trainer):
            self._batch = batch[: self.num_images]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._batch is None or not self._due(trainer):
            return
        x, self._batch = self._batch, None
        folder, epoch = Path(trainer.default_root_dir) / "images", trainer.current_epoch
        if hasattr(pl_module, "prior"):  # PriorModule: samples
            grid = make_grid(pl_module.sample(self.num_images, trainer.datamodule.resolution), nrow=self.num_images)
            log_image(trainer, "val/samples", grid, folder / f"samples_e{epoch:04d}.png")
            return
        net = pl_module.net
        out = pl_module(x)
        recon = head_reconstruct(net.head, out.params, net.num_mixtures)  # (B, 3, H, W) uint8
        grid = make_grid(torch.cat([x, recon]), nrow=len(x))
        log_image(trainer, "val/reconstructions", grid, folder / f"recon_e{epoch:04d}.png")
        decoded = [net.decode(out.codes, keep_levels=[i]) for i in range(net.num_levels)]  # other levels zeroed
        levels = [head_reconstruct(net.head, params, net.num_mixtures) for params in decoded]
        grid = make_grid(torch.cat([x, *levels]), nrow=len(x))
        log_image(trainer, "val/levels", grid, folder / f"levels_e{epoch:04d}.png")
        self._usage_plot(trainer, pl_module, folder / f"usage_e{epoch:04d}.png")

    def _usage_plot(self, trainer: Trainer, pl_module: LightningModule, path: Path) -> None:
        """Code counts per level over this rank's validation epoch (before the module resets them)."""
        usage = pl_module.stage_metrics("val").usage
        fig = Figure(figsize=(4 * len(usage), 3))  # no pyplot: a notebook user's backend stays as it is
        axes = fig.subplots(1, len(usage), squeeze=False)[0]
        for i, (ax, metric) in enumerate(zip(axes, usage, strict=True)):
            hist = metric.hist.cpu()  # (M, K)
            m, k = hist.shape
            for j in range(m):  # one step outline per codebook: cheap to draw, unlike a bar per code
                ax.stairs(hist[j].numpy(), torch.arange(k + 1).numpy() + j * k, fill=True)
            ax.set_title(f"level {i} (top first): {m} codebooks x {k} codes")
            ax.set_xlabel("codebook * K + code")
        axes[0].set_ylabel("assignments (val epoch)")
        fig.tight_layout()
        fig.savefig(path, dpi=80)  # into the folder log_image made
        for logger in wandb_loggers(trainer):
            import wandb  # here: importing W&B takes seconds

            logger.log_image(key="val/codebook_usage", images=[str(path)])
            for i, metric in enumerate(usage):  # a W&B histogram per level: assignments per (codebook, code)
                counts = metric.hist.flatten().cpu().double().numpy()  # (M*K,)
                bins = list(range(len(counts) + 1))
                hist = wandb.Histogram(np_histogram=(counts, bins), num_bins=min(512, len(counts)))
                logger.experiment.log({f"val/code_usage_l{i}": hist, "trainer/global_step": trainer.global_step})
