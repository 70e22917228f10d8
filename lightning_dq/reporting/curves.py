"""`MetricCurves`: the bits/dim curve of the run directory, W&B's run-summary minima, and a fit's closing summary."""

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from lightning_dq.reporting.record import RunRecord, epoch_series
from lightning_dq.reporting.wandb import wandb_loggers


def is_epoch_bpd(key: str) -> bool:
    """An epoch aggregate of bits/dim: val keys (EMA and raw), train keys ending in `_epoch` (not per-step values)."""
    return key.startswith(("val/bpd", "val_raw/bpd")) or (key.startswith("train/bpd") and key.endswith("_epoch"))


def records(trainer: Trainer) -> list[RunRecord]:
    return [logger for logger in trainer.loggers if isinstance(logger, RunRecord)]


class MetricCurves(Callback):
    """Draws `bpd_curve.png` from the metric record after each validation epoch. A series per key (so per image size);
    W&B's summary keeps each bits/dim minimum; a fit's end prints where results are. The record is its history."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in wandb_loggers(trainer) if trainer.is_global_zero else []:
            for pattern in ("train/bpd*", "val/bpd*", "val_raw/bpd*"):  # the run table shows the best value, per size
                logger.experiment.define_metric(pattern, step_metric="trainer/global_step", summary="min")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fresh fit starts a new record; a resumed one drops what a killed attempt logged after the checkpoint
        for record in records(trainer):
            record.truncate_after(trainer.global_step if trainer.ckpt_path else -1)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._plot(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plot(trainer)
        self._summary(trainer)

    @rank_zero_only
    def _summary(self, trainer: Trainer) -> None:
        """Where the run's results are (the last lines a `make demo` prints)."""
        root = Path(trainer.default_root_dir)
        last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpd")}
        figures = ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
        epoch = trainer.current_epoch - 1
        lines = [f"run directory: {root}", f"  last validation (epoch {epoch}): {figures or 'none'}"]
        latest = {p.stem.rsplit("_e", 1)[0]: p for p in sorted((root / "images").glob("*_e*.png"))}  # per kind
        paths = [root / "metrics.csv", root / "bpd_curve.png", *latest.values()]
        lines += [f"  {path}" for path in paths if path.exists()]
        lines += [f"  checkpoint: {cb.last_model_path}" for cb in trainer.checkpoint_callbacks if cb.last_model_path]
        for logger in wandb_loggers(trainer):
            if getattr(getattr(logger.experiment, "settings", None), "mode", None) in ("offline", "dryrun"):
                run = logger.experiment.id
                sync = f"wandb sync --id {run} {root / 'wandb'}/offline-run-*"
                lines.append(f"  W&B offline run {run}: `{sync}` uploads it")
        print("\n".join(lines))

    @rank_zero_only
    def _plot(self, trainer: Trainer) -> None:
        rows = [r for record in records(trainer) for r in record.read()]
        series = {k: v for k, v in epoch_series(rows).items() if is_epoch_bpd(k)}
        if not series:
            return
        fig = Figure(figsize=(6, 4))  # no pyplot: a notebook user's backend stays as it is
        ax = fig.subplots()
        for key, points in sorted(series.items()):
            style = "--" if key.startswith("train/") else "-"
            ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=key)
        ax.set(xlabel="epoch", ylabel="bits/dim")
        ax.set_title("A = bpd_decoder (not a bound), B = bpd_uniform, C = bpd_prior", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(trainer.default_root_dir) / "bpd_curve.png", dpi=100)
