"""The `lightning-dq` command: LightningCLI with layered YAML configs and `--key=value` overrides.

    lightning-dq fit --config configs/base.yaml --config configs/cifar10.yaml [--trainer.max_epochs=10]
    lightning-dq fit --config configs/base.yaml --config configs/imagenet64.yaml --config configs/ddp.yaml
    lightning-dq fit ... --ckpt_path last        # resume the run in trainer.default_root_dir
    lightning-dq test --config configs/base.yaml --config configs/prior_cifar10.yaml --ckpt_path <prior.ckpt>
    lightning-dq fit --config configs/base.yaml --print_config

Configs are parsed in jsonargparse's `omegaconf+` mode: `${trainer.default_root_dir}/checkpoints` in one
file resolves against the merged config, command-line overrides included, so the saved `config.yaml`
shows where every file went. Tests and `experiments/` call `main([...])` (or `build_cli([...])` to get
the trainer and model back), the same code path as `make train-imagenet64`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from lightning_dq import console
from lightning_dq.callbacks import CodebookReset, CodebookSyncCheck, ResolutionSchedule, RunCheckpoint
from lightning_dq.checkpoints import ResumeCheckpoint, load_checkpoint_file, validate_ckpt_path
from lightning_dq.faults import NonFiniteGuard
from lightning_dq.reports import EvaluationReport, ImageLogger, MetricCurves

RUN_ID_FILE = "wandb_run_id"


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run directory and sends it to the loggers (W&B config)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


def wandb_run_id(root: Path, new: bool) -> str:
    """The W&B run id of the experiment in run directory `root`, kept in `root/wandb_run_id`: a new one
    for a fresh fit (written by rank 0), the stored one for a resume, `test`, `validate` and sampling."""
    path = root / RUN_ID_FILE
    if path.is_file() and (not new or rank_zero_only.rank != 0):  # other ranks read what rank 0 wrote
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [0-9a-z]
    if rank_zero_only.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class DQCLI(LightningCLI):
    """LightningCLI whose paper-specific callbacks and the checkpointing are top-level config groups (they
    merge key by key across `--config` files, unlike the `trainer.callbacks` list, which a later file
    replaces)."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        main_kwargs = {"formatter_class": console.HelpFormatter, **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # `--help` names each project group with its one-line doc; the main `--help` lists them all
        groups = console.describe_groups(self._subcommand_parsers.values() if add_subcommands else [self.parser])
        self.parser.epilog = console.MAIN_EPILOG + "\n".join(groups)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # progress display and model summary for where stdout goes (terminal or log file): lightning_dq.console
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return super().instantiate_trainer(**{**kwargs, **console.trainer_overrides(config)})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ResumeCheckpoint, "resume")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        parser.add_lightning_class_args(CodebookReset, "codebook_reset")
        parser.add_lightning_class_args(CodebookSyncCheck, "codebook_sync_check")
        parser.add_lightning_class_args(ResolutionSchedule, "resolution_schedule")
        parser.add_lightning_class_args(ImageLogger, "image_logger")
        parser.add_lightning_class_args(MetricCurves, "metric_curves")
        parser.add_lightning_class_args(EvaluationReport, "evaluation_report")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # `test`/`validate` write their own config file: the training run's config.yaml stays as it was
        if self.subcommand and self.subcommand != "fit":
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"
        self._wandb_identity(config)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads `--ckpt_path`'s hyperparameters first: a bad file fails here as a CheckpointError
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            load_checkpoint_file(ckpt_path, mmap=True)
        super()._parse_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """A truncated, corrupt or mismatched `--ckpt_path` fails here as a `CheckpointError` naming the file."""
        validate_ckpt_path(self.trainer, self.model, self.config[self.subcommand].get("ckpt_path"))

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def _wandb_identity(self, config) -> None:
        """One W&B run per experiment (run directory): a stable id kept in the run directory, so a resumed
        fit continues the run and `test` attaches to it; name = the run directory's name, group = the
        dataset, job_type = the subcommand. Values the config sets are kept. Everything set here is part of
        the parsed config, so the saved config.yaml shows it."""
        loggers = config.trainer.logger
        loggers = loggers if isinstance(loggers, list) else [loggers]
        root = Path(config.trainer.default_root_dir or ".")
        for logger in loggers:
            if not (hasattr(logger, "class_path") and logger.class_path.endswith("WandbLogger")):
                continue
            args = logger.init_args
            if args.get("save_dir") in (None, "", ".") and not args.get("dir"):  # W&B files go to the run directory
                args.save_dir = str(root)
            if not args.get("id") and not args.get("version"):
                args.id = wandb_run_id(root, new=self.subcommand == "fit" and not config.get("ckpt_path"))
            args.name = args.get("name") or root.name
            dataset = config.get("data") and config.data.get("init_args", {}).get("dataset")
            args.group = args.get("group") or dataset
            args.job_type = args.get("job_type") or self.subcommand
            if os.environ.get("WANDB_MODE") == "online":  # the documented way to stream a run live
                args.offline = False


def build_cli(args: ArgsType = None, run: bool = True) -> DQCLI:
    """Parse `args` (a list of CLI arguments, or None for sys.argv) and run the subcommand; returns the CLI
    object, whose `config`, `trainer`, `model` and `datamodule` tests and notebooks can inspect. With
    `run=False`, `args` has no subcommand and the classes are only instantiated."""
    # `${trainer.default_root_dir}` in a config file means the top-level key, also under a subcommand
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    console.install_filters()
    return DQCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the `lightning-dq` console script. A `UserError` (bad data, config value or checkpoint)
    is printed as one message on stderr and exits with status 2; any other exception keeps its traceback."""
    try:
        build_cli(args)
    except Exception as err:
        user_error = console.find_user_error(err)
        if user_error is None:
            raise
        console.print_user_error(user_error)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
