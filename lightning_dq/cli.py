"""The `lightning-dq` command: LightningCLI with layered YAML configs and `--key=value` overrides.

    lightning-dq fit --config configs/base.yaml --config configs/cifar10.yaml [--trainer.max_epochs=10]
    lightning-dq fit --config configs/base.yaml --config configs/imagenet64.yaml --config configs/ddp.yaml
    lightning-dq fit ... --ckpt_path last        # resume the run in trainer.default_root_dir
    lightning-dq test --config configs/base.yaml --config configs/prior_cifar10.yaml --ckpt_path <prior.ckpt>
    lightning-dq fit --config configs/base.yaml --print_config

Tests and `experiments/` call `main([...])` (or `build_cli([...])` to get the trainer and model back),
the same code path as `make train-imagenet64`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from lightning_dq.callbacks import CodebookReset, CodebookSyncCheck, ResolutionSchedule
from lightning_dq.reports import EvaluationReport, ImageLogger, MetricCurves


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run directory and sends it to the loggers (W&B config)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


class DQCLI(LightningCLI):
    """LightningCLI whose paper-specific callbacks are top-level config groups (they merge key by key
    across `--config` files, unlike the `trainer.callbacks` list, which a later file replaces)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(CodebookReset, "codebook_reset")
        parser.add_lightning_class_args(CodebookSyncCheck, "codebook_sync_check")
        parser.add_lightning_class_args(ResolutionSchedule, "resolution_schedule")
        parser.add_lightning_class_args(ImageLogger, "image_logger")
        parser.add_lightning_class_args(MetricCurves, "metric_curves")
        parser.add_lightning_class_args(EvaluationReport, "evaluation_report")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "runs/default"
        config.trainer.default_root_dir = root
        # the run directory is the config's `trainer.default_root_dir`; W&B (its offline run and the saved
        # config.yaml, which goes to the logger's directory) writes under it unless told otherwise
        logger = config.trainer.logger
        if hasattr(logger, "class_path") and logger.class_path.endswith("WandbLogger"):
            if logger.init_args.get("save_dir") in (None, "", ".") and not logger.init_args.get("dir"):
                logger.init_args.save_dir = root

    def _place_checkpoints(self) -> None:
        """Checkpoints without a `dirpath` go to <run dir>/checkpoints, so `--ckpt_path last` finds them
        from a fresh process (Lightning's default puts them in a new logger version directory)."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(self.trainer.default_root_dir).resolve() / "checkpoints")

    def before_fit(self) -> None:
        self._place_checkpoints()

    def before_validate(self) -> None:
        self._place_checkpoints()

    def before_test(self) -> None:
        self._place_checkpoints()


def build_cli(args: ArgsType = None) -> DQCLI:
    """Parse `args` (a list of CLI arguments, or None for sys.argv) and run the subcommand; returns the CLI
    object, whose `trainer`, `model` and `datamodule` tests and notebooks can inspect."""
    # W&B stays offline unless the user asks otherwise (runs sync later with `wandb sync`)
    os.environ.setdefault("WANDB_MODE", "offline")
    return DQCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the `lightning-dq` console script."""
    build_cli(args)


if __name__ == "__main__":
    main()
