"""The `lightning-dq` command: LightningCLI with layered YAML configs (jsonargparse's `omegaconf+` mode: `${trainer...}`
resolves against the merged config) and `--key=value` overrides, plus the project's own commands (`prepare`, the
codec's). `lightning-dq fit --config configs/base.yaml --config configs/cifar10.yaml [--ckpt_path last]`."""

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_dq.errors import UserError
from lightning_dq.reporting.curves import MetricCurves
from lightning_dq.reporting.evaluation import EvaluationReport
from lightning_dq.reporting.filters import install_filters
from lightning_dq.reporting.images import ImageLogger
from lightning_dq.reporting.progress import PlainProgressBar, stdout_is_terminal
from lightning_dq.reporting.summary import ModelSize
from lightning_dq.reporting.wandb import fill_identity, prepare_wandb
from lightning_dq.training.callbacks import CodebookReset, CodebookSyncCheck, NonFiniteGuard
from lightning_dq.training.checkpoints import ResumeCheckpoint, RunCheckpoint, load_checkpoint_file, validate_ckpt_path
from lightning_dq.training.ema import EMA
from lightning_dq.training.precision import resolve_precision
from lightning_dq.training.resolution import ResolutionSchedule

GROUPS = {  # the project's callbacks as top-level config groups: they merge key by key across --config files
    "checkpoint": RunCheckpoint,
    "resume": ResumeCheckpoint,
    "ema": EMA,
    "non_finite_guard": NonFiniteGuard,
    "codebook_reset": CodebookReset,
    "codebook_sync_check": CodebookSyncCheck,
    "resolution_schedule": ResolutionSchedule,
    "image_logger": ImageLogger,
    "metric_curves": MetricCurves,
    "evaluation_report": EvaluationReport,
}
MAIN_EPILOG = """\
where to find every option:
  lightning-dq fit --help                 all groups, every key with its type, default and doc
  lightning-dq fit --print_config ...     the merged config of your --config files, ready to edit
  lightning-dq fit --model.help lightning_dq.training.modules.AutoEncoderModule   a model class's options
  lightning-dq fit --data.help lightning_dq.data.ImageDataModule                 the data options
  lightning-dq prepare --help             convert downsampled ImageNet's npz files to the memory-mapped cache
  lightning-dq encode|compress|decompress --help   codes of a dataset; lossless files of images (docs/codec.md)
  groups: trainer (Lightning Trainer), model, data, and the project's own:
"""


def one_line_doc(cls: type, width: int = 100) -> str:
    """The first sentence of a class docstring on one line, cut at a word to `width` characters."""
    paragraph = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    text = re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph, maxsplit=1)[0].rstrip(".")
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs (the group listing)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run directory and sends it to the loggers (the W&B run's config)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


def trainer_callbacks(config: dict[str, Any], stream=None) -> dict[str, Any]:
    """Trainer arguments over `config`'s: plain progress lines off a terminal, our model summary, W&B folders made."""
    callbacks = config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    out: dict[str, Any] = {"callbacks": callbacks}
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        if not stdout_is_terminal(stream):
            callbacks.append(PlainProgressBar())
    if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.append(ModelSize())
        out["enable_model_summary"] = False  # ours replaces Lightning's default (which would log that it skipped)
    loggers = config.get("logger")
    for logger in loggers if isinstance(loggers, list | tuple) else [loggers]:
        if isinstance(logger, WandbLogger):
            prepare_wandb(logger)
    return out


class DQCLI(LightningCLI):
    """LightningCLI with the project's callbacks as top-level config groups (merged key by key across files), a run's
    precision, checkpoint key and W&B identity resolved into its saved config, and `--ckpt_path` checked first."""

    group_listing: dict[str, str] = {}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, {"formatter_class": HelpFormatter, **main_kwargs}, subparser_kwargs)
        self.parser.epilog = MAIN_EPILOG + "\n".join(self.group_listing.values())

    def add_arguments_to_parser(self, parser) -> None:
        for key, cls in GROUPS.items():
            parser.add_lightning_class_args(cls, key)
            group = parser.groups[key]  # `--help` names each group with its one-line doc
            group.title = f"{key} ({cls.__module__}.{cls.__name__})"
            group.description = one_line_doc(cls)
            self.group_listing[key] = f"  --{key + '.*':<22} {cls.__name__}: {one_line_doc(cls)}"

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        return super().instantiate_trainer(**{**kwargs, **trainer_callbacks(trainer_config)})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand and self.subcommand != "fit":  # test/validate: the fit's config.yaml stays as it was
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"
        precision, why = resolve_precision(config.trainer.precision, config.trainer.accelerator)
        config.trainer.precision = precision
        if rank_zero_only.rank == 0:
            print(f"precision: {precision} ({why}; set trainer.precision to choose)", flush=True)
        schedule = ResolutionSchedule(**config.resolution_schedule)  # the key checkpoints rank by, shown in config.yaml
        config.checkpoint.monitor = schedule.monitor_key(config.checkpoint.monitor)
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        root = Path(config.trainer.default_root_dir or ".")
        dataset = config.get("data") and config.data.get("init_args", {}).get("dataset")
        fresh = self.subcommand == "fit" and not config.get("ckpt_path")
        for logger in loggers:
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                fill_identity(logger.init_args, root, self.subcommand, dataset, new=fresh)

    def _check_ckpt_path(self) -> None:
        """A truncated, corrupt or mismatched `--ckpt_path` fails here as a `CheckpointError` naming the file."""
        validate_ckpt_path(self.trainer, self.model, self.config[self.subcommand].get("ckpt_path"))

    before_fit = before_validate = before_test = _check_ckpt_path


def build_cli(args: ArgsType = None, run: bool = True) -> DQCLI:
    """Parse `args` (a list of CLI arguments, or None for sys.argv) and run the subcommand; returns the CLI object,
    whose `config`, `trainer`, `model` and `datamodule` one can inspect (`run=False`: no subcommand, nothing run)."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # `${trainer...}` means the top-level key
    install_filters()
    argv = list(sys.argv[1:] if args is None else args)
    # LightningCLI reads `--ckpt_path`'s hyperparameters before any hook runs: a truncated or corrupt file must be
    # a CheckpointError naming it, not a traceback
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")]
    paths += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--ckpt_path"]
    for path in paths:
        if Path(path).is_file():
            load_checkpoint_file(path, mmap=True)
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


def prepare(argv: list[str]) -> None:
    """`lightning-dq prepare`: convert downsampled ImageNet's npz files to the memory-mapped cache once, in one
    process (ImageNet-64's 16 GB take longer than a DDP barrier waits); a current cache is left as it is."""
    from lightning_dq.data.imagenet import prepare_imagenet  # here: `lightning-dq fit` does not need it

    parser = argparse.ArgumentParser(prog="lightning-dq prepare", description="the ImageNet cache, once per dataset")
    parser.add_argument("--dataset", choices=["imagenet32", "imagenet64"], required=True)
    parser.add_argument("--root", required=True, help="folder of the npz files (or of their official subfolders)")
    parser.add_argument("--cache_dir", default=None, help="where the cache goes (default <root>/lightning_dq_cache)")
    ns = parser.parse_args(argv)
    root = Path(ns.root)
    cache_dir = Path(ns.cache_dir) if ns.cache_dir else root / "lightning_dq_cache"
    for cache in prepare_imagenet(root, int(ns.dataset[-2:]), cache_dir):
        n, _, s, _ = np.load(cache, mmap_mode="r", allow_pickle=False).shape
        print(f"{cache}: {n} images {s}x{s}, {cache.stat().st_size / 1e9:.2f} GB")
    cache_arg = f" --data.init_args.cache_dir={ns.cache_dir}" if ns.cache_dir else ""
    print(f"ready: train with --data.init_args.root={ns.root}{cache_arg}")


CODEC_COMMANDS = ("encode", "compress", "decompress")  # lightning_dq.codec.commands, imported for them only


def find_user_error(err: BaseException | None) -> UserError | None:
    """`err` if it is a `UserError`, else the first one it was raised from or while handling (a library may wrap an
    error of a hook); a context hidden by `from None` is not searched."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def main(args: ArgsType = None) -> None:
    """The `lightning-dq` script: a `UserError` is one line on stderr and exit status 2; others keep their traceback."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "prepare":
            prepare(argv[1:])
        elif argv and argv[0] in CODEC_COMMANDS:
            from lightning_dq.codec.commands import COMMANDS

            COMMANDS[argv[0]](argv[1:])
        else:
            build_cli(args)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"lightning-dq: error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
