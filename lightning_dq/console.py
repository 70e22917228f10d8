"""What a `lightning-dq` run prints: progress in a terminal and in a log file, the model size, and no noise.

- Progress: in a terminal, Lightning's `RichProgressBar` (the Trainer's own default). When stdout is a file
  or a pipe (a SLURM log, CI, `make demo > demo.log`), a rich bar only renders when the run exits, so
  `PlainProgressBar` prints a line every N training steps and one at each epoch end instead.
  `--trainer.enable_progress_bar=false` turns both off; a progress bar listed in `trainer.callbacks` is used as is.
- Model summary: `ModelSize`, the parameter count of each top-level module. Lightning's summary adds a FLOPs
  column that is always 0 here: it counts FLOPs only by running an `example_input_array` forward, and a
  forward pass would initialise our codebooks from that dummy input, so our modules have none.
- Noise: Lightning's advertising tips for its cloud loggers, a deprecation warning torch raises inside
  Lightning's own pytree helper, and W&B's warning about the `anonymous` argument Lightning always passes
  are filtered by exact message and source (`install_filters`); W&B's "git root does not exist" is fixed at
  its cause (the run directory is created before W&B looks for a git repository in it). Any other warning stays.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.loggers import WandbLogger

from lightning_dq.errors import UserError

# bits/dim figures of the likelihood protocol, in the order a progress line shows them (docs/design.md)
VAL_FIGURES = (("A", "val/bpd_decoder"), ("B", "val/bpd_uniform"), ("C", "val/bpd_prior"))
TRAIN_LOSS = "train/loss"


def stdout_is_terminal(stream: IO | None = None) -> bool:
    """Whether `stream` (default: the current `sys.stdout`) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _batch_size(batch: Any) -> int:
    """Images in a batch: the first dimension of its first tensor (our batches are uint8 (B, 3, H, W))."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def _count(value: float) -> str:
    return "?" if math.isinf(value) else str(int(value))


class PlainProgressBar(ProgressBar):
    """Plain-text progress for logs: one line every `every_n_steps` training batches and one at each epoch end
    (epoch, step, images/s, current train loss, last validation bits/dim A/B/C, ETA), flushed at once; during
    `test`/`validate` runs, one line every `every_n_steps` batches and one at the end.

    Chosen automatically when stdout is not a terminal; list it in `trainer.callbacks` to use it everywhere or
    to set `every_n_steps`.

    Args:
        every_n_steps: batches between two lines (None = the Trainer's `log_every_n_steps`).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PlainProgressBar every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._fit_start = self._window_start = 0.0
        self._fit_step0 = self._window_images = self._batches_done = 0
        self._paused_at: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _every(self) -> int:
        return self.every_n_steps or max(1, int(self.trainer.log_every_n_steps))

    def _emit(self, line: str) -> None:
        if self._enabled:
            print(line, flush=True)  # sys.stdout as it is now; flushed so a log file shows it immediately

    # -- training --------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start, self._fit_step0 = time.monotonic(), trainer.global_step

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the images/s window restarts after validation, so it measures training only
        self._window_start, self._window_images, self._batches_done = time.monotonic(), 0, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._window_images += _batch_size(batch) * trainer.world_size  # every rank trains on its own batch
        self._batches_done = batch_idx + 1
        if self._batches_done % self._every() == 0 and self._batches_done < self.total_train_batches:
            self._emit(self._train_line(trainer, done=False))  # the epoch-end line covers the last batch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation of this epoch (if any) has run by now, so the line carries its bits/dim
        self._emit(self._train_line(trainer, done=True))

    def _train_line(self, trainer: Trainer, done: bool) -> str:
        now = time.monotonic()
        last_epoch = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else "?"
        total_steps = trainer.estimated_stepping_batches
        parts = [
            f"epoch {trainer.current_epoch}/{last_epoch}" + (" done" if done else ""),
            f"batch {self._batches_done}/{_count(self.total_train_batches)}",
            f"step {trainer.global_step}/{_count(total_steps)}",
        ]
        if self._window_images and now > self._window_start:
            parts.append(f"{self._window_images / (now - self._window_start):.1f} img/s")
        self._window_start, self._window_images = now, 0
        metrics = trainer.callback_metrics
        if TRAIN_LOSS in metrics:
            parts.append(f"train/loss {float(metrics[TRAIN_LOSS]):.4f}")
        figures = " ".join(f"{name} {float(metrics[key]):.4f}" for name, key in VAL_FIGURES if key in metrics)
        if figures:
            parts.append(f"val bits/dim {figures}")
        elif "val/loss" in metrics:
            parts.append(f"val/loss {float(metrics['val/loss']):.4f}")
        steps_done = trainer.global_step - self._fit_step0
        if steps_done > 0 and math.isfinite(total_steps):
            eta = (now - self._fit_start) / steps_done * max(0, total_steps - trainer.global_step)
            parts.append(f"ETA {timedelta(seconds=round(eta))}")
        return "  ".join(parts)

    # -- test / validate outside fit ---------------------------------------------------------------------------
    def _eval_start(self) -> None:
        self._window_start, self._window_images = time.monotonic(), 0

    def _eval_batch(self, trainer: Trainer, stage: str, batch, batch_idx: int, total: float, end: bool) -> None:
        self._window_images += _batch_size(batch) * trainer.world_size
        if end or (batch_idx + 1) % self._every() == 0:
            rate = self._window_images / max(time.monotonic() - self._window_start, 1e-9)
            self._emit(f"{stage}  batch {batch_idx + 1}/{_count(total)}  {rate:.1f} img/s" + ("  done" if end else ""))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        total = trainer.num_test_batches[dataloader_idx]
        self._eval_batch(trainer, "test", batch, batch_idx, total, end=batch_idx + 1 == total)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._eval_start()
        else:  # validation inside fit: keep it out of the training images/s
            self._paused_at = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "validate" and self._paused_at is not None:
            self._window_start += time.monotonic() - self._paused_at
            self._paused_at = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if trainer.state.fn == "validate":  # during fit, the epoch-end line reports validation
            total = trainer.num_val_batches[dataloader_idx]
            self._eval_batch(trainer, "validate", batch, batch_idx, total, end=batch_idx + 1 == total)


class ModelSize(ModelSummary):
    """The model summary a user needs: total, trainable and frozen parameters, size in MB, and the parameter
    count of each top-level module that has any (Lightning's table also lists FLOPs, always 0 here).

    Args:
        max_depth: module nesting shown (1 = the LightningModule's direct children; 0 = no summary).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:  # fmt: skip
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        def count(n: int | str) -> str:  # Lightning's counts are padded ("0  ", "1.8 M")
            return get_human_readable_count(int(n)).strip() if isinstance(n, int) else n.strip()

        columns = dict(summary_data)
        lines = [f"model: {count(total_parameters)} parameters ({count(trainable_parameters)} trainable,"
                 f" {count(total_parameters - trainable_parameters)} frozen), {model_size:.1f} MB"]  # fmt: skip
        for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"], strict=True):
            if count(params) != "0":  # skip the metric containers
                lines.append(f"  {name}: {kind}, {count(params)}")
        print("\n".join(lines), flush=True)


def trainer_overrides(config: dict[str, Any], stream: IO | None = None) -> dict[str, Any]:
    """Trainer arguments to replace in `config` (the instantiated `trainer` config): the progress display and
    the model summary for where stdout goes (`stream`, default `sys.stdout`); also readies W&B loggers."""
    callbacks = config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    out: dict[str, Any] = {"callbacks": callbacks}
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        if not stdout_is_terminal(stream):
            callbacks.append(PlainProgressBar())
        # in a terminal the Trainer adds its RichProgressBar
    if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.append(ModelSize())
        out["enable_model_summary"] = False  # ours replaces Lightning's default (which would log that it skipped)
    loggers = config.get("logger")
    for logger in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if isinstance(logger, WandbLogger):
            prepare_wandb(logger)
    return out


def prepare_wandb(logger: WandbLogger) -> None:
    """Ready a W&B logger before its run starts: create its directory (W&B looks for the git repository, to
    record the commit, from there, and warns "git root ... does not exist" when it has not been created yet),
    and silence its warning about Lightning's `anonymous` argument (only here: importing W&B takes seconds)."""
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
    _silence_wandb_anonymous()


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Lightning's tips advertising its cloud logger and model registry (printed on every run that does not use them)
LIGHTNING_TIPS = ("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
                  "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")  # fmt: skip
# the loggers Lightning's `rank_zero_info` writes through (fabric's and pytorch's both replace the shared one)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
WANDB_ANONYMOUS = "The anonymous setting has no effect and will be removed in a future version."


def install_filters() -> None:
    """Silence the known noise from our dependencies, each by exact message and source (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(LIGHTNING_TIPS))
    # torch 2.14 deprecates `LeafSpec`; Lightning's own pytree helper (combined data loaders) still builds one
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")  # fmt: skip
    # mixed precision keeps fp32 parameters, so the summary's 32-bit size estimate is exact, not "inaccurate"
    warnings.filterwarnings("ignore", message=r"Precision (bf16|16)-mixed is not supported by the model summary",
                            category=UserWarning)  # fmt: skip


def _silence_wandb_anonymous() -> None:
    """Lightning's `WandbLogger` always passes `anonymous` to `wandb.init` (None unless set), and W&B >= 0.22
    warns that the setting has no effect whatever its value. W&B prints that warning only once per process
    (`repeat=False`), so marking it as already printed silences exactly this message and nothing else."""
    try:
        from wandb.errors import term
    except ImportError:  # W&B not installed: nothing to silence
        return
    printed = getattr(term, "_printed_messages", None)
    warn_string = getattr(term, "WARN_STRING", None)
    if isinstance(printed, set) and isinstance(warn_string, str):
        printed.add(f"{warn_string} {WANDB_ANONYMOUS}")


# -- user errors ---------------------------------------------------------------------------------------------------
def find_user_error(err: BaseException) -> UserError | None:
    """`err` itself if it is a `UserError`, else the first `UserError` it was raised from or while handling
    (a library may re-raise an error from a hook or a constructor as another exception); a context hidden with
    `raise ... from None` is not searched."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def print_user_error(err: UserError) -> None:
    """One message on stderr, no traceback: the message already names the file/key/value and what to do."""
    print(f"lightning-dq: error: {err}", file=sys.stderr, flush=True)


# -- `--help` ------------------------------------------------------------------------------------------------------
def one_line_doc(cls: type, width: int = 100) -> str:
    """The first sentence of a class docstring's first paragraph, on one line, cut at a word to `width` characters."""
    paragraph = (inspect.getdoc(cls) or "").split("\n\n")[0]
    text = re.split(r"(?<=\.)\s+(?=[A-Z`])", " ".join(paragraph.split()), maxsplit=1)[0].rstrip(".")
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def describe_groups(parsers: Iterable) -> list[str]:
    """Title each top-level callback group of `parsers` (LightningCLI's subcommand parsers) with its key and its
    class's one-line doc; returns the lines listing the groups (key, class, doc) for the main `--help`."""
    listing: dict[str, str] = {}
    for parser in parsers:
        for key in getattr(parser, "callback_keys", []):
            group = parser.groups.get(key)
            cls = getattr(group, "group_class", None)
            if cls is None:
                continue
            group.title = f"{key} ({cls.__module__}.{cls.__name__}): {one_line_doc(cls)}"
            if not any(a.option_strings and a.option_strings[0] != f"--{key}" for a in group._group_actions):
                group.description = "(no options)"  # argparse hides a group with neither options nor text
            listing.setdefault(key, f"  --{key + '.*':<22} {cls.__name__}: {one_line_doc(cls)}")
    return list(listing.values())


MAIN_EPILOG = """\
where to find every option:
  lightning-dq fit --help                 all groups, every key with its type, default and doc
  lightning-dq fit --print_config ...     the merged config of your --config files, ready to edit
  lightning-dq fit --model.help lightning_dq.module.AutoEncoderModule   a model class's options (or PriorModule)
  lightning-dq fit --data.help lightning_dq.data.ImageDataModule       the data options
  groups: trainer (Lightning Trainer), model, data, and the project's own:
"""


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs (the group listing)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))
