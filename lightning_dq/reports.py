"""Reporting callbacks: image grids, bits/dim curves and the evaluation table, written as files into the
run directory (`trainer.default_root_dir`) and sent to the logger when there is one (W&B, TensorBoard).

All of them run on rank 0 only and call no collectives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image

from lightning_dq.likelihood import head_reconstruct
from lightning_dq.record import RunRecord, epoch_series


def log_image(trainer: Trainer, key: str, grid: Tensor, path: Path) -> None:
    """Save a uint8/float grid (3, H, W) as PNG at `path` and send it to the run's loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid.float() / 255.0 if grid.dtype == torch.uint8 else grid
    save_image(image, path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=trainer.global_step)


class ImageLogger(Callback):
    """Image grids and code usage of a validation batch, every n-th epoch.

    Originals vs reconstructions, per-level decodes (other levels zeroed) and the codebook-usage histogram
    of the validation epoch (PNG, and a W&B histogram per level); for a `PriorModule`, a grid of samples
    from the prior instead.

    Args:
        every_n_epochs: log every n-th validation epoch (0 disables).
        num_images: images per grid.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self._batch: Tensor | None = None

    def _due(self, trainer: Trainer) -> bool:
        return (
            self.every_n_epochs > 0 and not trainer.sanity_checking and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
        )  # fmt: skip

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
            samples = pl_module.sample(self.num_images, x.shape[-1])
            grid = make_grid(samples, nrow=self.num_images)
            log_image(trainer, "val/samples", grid, folder / f"samples_e{epoch:04d}.png")
            return
        net = pl_module.net
        out = pl_module(x)
        recon = head_reconstruct(net.head, out.params, net.num_mixtures)  # (B, 3, H, W) uint8
        grid = make_grid(torch.cat([x, recon]), nrow=x.shape[0])
        log_image(trainer, "val/reconstructions", grid, folder / f"recon_e{epoch:04d}.png")
        rows = [x] + [
            head_reconstruct(net.head, net.decode(out.codes, keep_levels=[i]), net.num_mixtures)
            for i in range(net.num_levels)
        ]
        grid = make_grid(torch.cat(rows), nrow=x.shape[0])
        log_image(trainer, "val/levels", grid, folder / f"levels_e{epoch:04d}.png")
        self._usage_plot(trainer, pl_module, folder / f"usage_e{epoch:04d}.png")

    def _usage_plot(self, trainer: Trainer, pl_module: LightningModule, path: Path) -> None:
        """Bar chart of code counts per level over this rank's validation epoch (before the module resets them)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        usage = pl_module.stage_metrics("val").usage
        fig, axes = plt.subplots(1, len(usage), figsize=(4 * len(usage), 3), squeeze=False)
        for i, (ax, metric) in enumerate(zip(axes[0], usage, strict=True)):
            hist = metric.hist.cpu()  # (M, K)
            for m in range(hist.shape[0]):  # one step outline per codebook: cheap to draw, unlike a bar per code
                k = hist.shape[1]
                ax.stairs(hist[m].numpy(), torch.arange(k + 1).numpy() + m * k, fill=True)
            ax.set_title(f"level {i} (top first): {hist.shape[0]} codebooks x {hist.shape[1]} codes")
            ax.set_xlabel("codebook * K + code")
        axes[0][0].set_ylabel("assignments (val epoch)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        for logger in wandb_loggers(trainer):
            import wandb

            logger.log_image(key="val/codebook_usage", images=[str(path)])
            for i, metric in enumerate(usage):  # a W&B histogram per level: assignments per (codebook, code)
                counts = metric.hist.flatten().cpu().double().numpy()  # (M*K,)
                edges = list(range(len(counts) + 1))
                hist = wandb.Histogram(np_histogram=(counts, edges), num_bins=min(512, len(counts)))
                logger.experiment.log({f"val/code_usage_l{i}": hist, "trainer/global_step": trainer.global_step})


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class MetricCurves(Callback):
    """The bits/dim curve PNG, W&B run-summary minima and the closing summary of a fit.

    Draws `bpd_curve.png` in the run directory from the run's metric record (`RunRecord`, metrics.csv)
    after every validation epoch, one series per key (so per image size in a progressive run), tells W&B
    to keep the minimum of every bits/dim key in the run summary, and prints where the results are when a
    fit ends. Holds no state: the record is the history, and it survives resume."""

    BPD = re.compile(r"^(train|val)/bpd_[a-z_]+?(_\d+px)?(_epoch)?$")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                for pattern in ("train/bpd*", "val/bpd*"):  # the run table shows the best value, per size
                    logger.experiment.define_metric(pattern, step_metric="trainer/global_step", summary="min")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fresh fit starts a new record; a resumed one drops what the killed attempt logged after the
        # checkpoint (those steps run again)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped if trainer.ckpt_path else -1
        for record in records(trainer):
            record.truncate_after(step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._plot(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plot(trainer)
        self._summary(trainer)

    @rank_zero_only
    def _summary(self, trainer: Trainer) -> None:
        """Tell the user where the run's results are (the last lines a `make demo` prints)."""
        root = Path(trainer.default_root_dir)
        last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpd")}
        figures = ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
        epoch = trainer.current_epoch - 1
        lines = [f"run directory: {root}", f"  last validation (epoch {epoch}): {figures or 'none'}"]
        latest = {p.stem.rsplit("_e", 1)[0]: p for p in sorted((root / "images").glob("*_e*.png"))}  # per kind
        for path in [root / "metrics.csv", root / "bpd_curve.png", *latest.values()]:
            if path.exists():
                lines.append(f"  {path}")
        for callback in trainer.checkpoint_callbacks:
            if callback.last_model_path:
                lines.append(f"  checkpoint: {callback.last_model_path}")
        for logger in wandb_loggers(trainer):
            settings = getattr(logger.experiment, "settings", None)
            if getattr(settings, "mode", None) in ("offline", "dryrun"):  # disabled runs have no settings
                lines.append(f"  W&B offline run {logger.experiment.id}: `wandb sync --id {logger.experiment.id} "
                             f"{root / 'wandb'}/offline-run-*` uploads it")  # fmt: skip
        print("\n".join(lines))

    @rank_zero_only
    def _plot(self, trainer: Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for record in records(trainer) for r in record.read()]
        series = {k: v for k, v in epoch_series(rows).items() if self.BPD.match(k)}
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in sorted(series.items()):
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("bits/dim")
        ax.set_title("A = bpd_decoder (not a bound), B = bpd_uniform, C = bpd_prior", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(trainer.default_root_dir) / "bpd_curve.png", dpi=100)
        plt.close(fig)


def records(trainer: Trainer) -> list[RunRecord]:
    return [logger for logger in trainer.loggers if isinstance(logger, RunRecord)]


class EvaluationReport(Callback):
    """After `test`: writes the test figures as `evaluation.json` and a markdown table row `evaluation.md`
    into the run directory: A (decoder only, not a bound), B (uniform code cost), C (learned prior, when a
    prior is evaluated), reconstruction MSE, the number of test images and what data they were."""

    FIGURES = (("A bpd_decoder", "test/bpd_decoder"), ("B bpd_uniform", "test/bpd_uniform"),
               ("C bpd_prior", "test/bpd_prior"), ("mse", "test/mse"))  # fmt: skip

    def __init__(self) -> None:
        self._loaded: dict = {}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._loaded = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}

    def _provenance(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Which networks were evaluated: the checkpoint passed to `test` (path, epoch, step) and, for a
        prior, the auto-encoder checkpoint it was trained on (stored inside the prior checkpoint)."""
        evaluated = {"path": trainer.ckpt_path, **self._loaded}
        if hasattr(pl_module, "prior"):
            return {"prior": evaluated, "autoencoder": getattr(pl_module, "autoencoder_source", None)}
        return {"autoencoder": evaluated, "prior": None}

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        net = pl_module.code_net
        datamodule = trainer.datamodule
        num_images = int(metrics.get("test/num_images", 0))
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        split_size = sum(len(dl.dataset) for dl in loaders if dl is not None and hasattr(dl.dataset, "__len__"))
        if num_images != split_size:  # e.g. trainer.limit_test_batches < 1.0: not a whole-split figure
            rank_zero_warn(f"evaluated {num_images} of the {split_size} test images: these figures do not cover "
                           f"the whole test split (check trainer.limit_test_batches)")  # fmt: skip
        report = {
            "figures": {name: metrics.get(key) for name, key in self.FIGURES},
            "num_images": num_images,
            "split_size": split_size,
            "whole_split": num_images == split_size,
            "data": getattr(datamodule, "data_description", type(datamodule).__name__),
            "resolution": getattr(datamodule, "resolution", None),
            "autoencoder_parameters": sum(p.numel() for p in net.parameters()),
            "prior_parameters": (
                sum(p.numel() for p in pl_module.prior.parameters()) if hasattr(pl_module, "prior") else None
            ),
            "checkpoint": trainer.ckpt_path,
            **self._provenance(trainer, pl_module),
            "all_metrics": metrics,
        }
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        (root / "evaluation.json").write_text(json.dumps(report, indent=1))
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        f = report["figures"]
        images = f"{num_images}" if report["whole_split"] else f"{num_images} of {split_size} (PARTIAL)"
        row = (f"| {report['data']} | {report['resolution']} | {images} | {fmt(f['A bpd_decoder'])} | "
               f"{fmt(f['B bpd_uniform'])} | {fmt(f['C bpd_prior'])} | {fmt(f['mse'])} |")  # fmt: skip
        header = ("| data | resolution | test images | A decoder-only (not a bound) | B uniform codes | "
                  "C learned prior | MSE |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")  # fmt: skip
        (root / "evaluation.md").write_text(header + row + "\n")
        for logger in wandb_loggers(trainer):
            columns = ["data", "resolution", "test images", "whole split", *[name for name, _ in self.FIGURES]]
            values = [report["data"], report["resolution"], num_images, report["whole_split"], *f.values()]
            logger.log_table(key="test/evaluation", columns=columns, data=[values])
        print(f"evaluation written to {root / 'evaluation.json'}\n{header}{row}")
