"""The console (lightning_dq.console): plain progress lines when stdout is a file, the rich bar kept for a
terminal, `enable_progress_bar=false`, the model summary, the noise filters (each drops exactly its message),
`--help` listing the project's groups, and user errors as one line with exit status 2."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar

from lightning_dq import console
from lightning_dq.callbacks import CodebookReset, ResolutionSchedule
from lightning_dq.cli import build_cli, main
from lightning_dq.errors import ConfigError, DataError, UserError
from lightning_dq.reports import ImageLogger

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG_FIT = ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
LINE = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<last>\d+)(?P<done> done)?  batch (?P<batch>\d+)/4  step (?P<step>\d+)/8  "
    r"(?P<rate>[\d.]+) img/s  train/loss (?P<loss>[\d.]+)(  val bits/dim A (?P<A>[\d.]+) B (?P<B>[\d.]+))?"
    r"  ETA (?P<eta>\d+:\d\d:\d\d)$"
)


def test_fit_with_stdout_to_a_file_prints_a_progress_line_every_n_steps_and_every_epoch(tmp_path):
    log = tmp_path / "stdout.log"
    with open(log, "w") as out, contextlib.redirect_stdout(out):  # a real file: not a terminal
        cli = build_cli([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2",
                         "--trainer.log_every_n_steps=2"])  # fmt: skip
    text = log.read_text()
    lines = [m.groupdict() for m in map(LINE.match, text.splitlines()) if m]
    # 4 batches per epoch, a line every 2: one mid-epoch line, then the epoch-end line (which covers batch 4)
    assert [(int(r["epoch"]), int(r["batch"]), int(r["step"]), bool(r["done"])) for r in lines] == [
        (0, 2, 2, False), (0, 4, 4, True), (1, 2, 6, False), (1, 4, 8, True)]  # fmt: skip
    assert all(r["last"] == "1" and float(r["rate"]) > 0 for r in lines)  # img/s of training, validation excluded
    assert lines[-1]["eta"] == "0:00:00"
    # the epoch-end lines carry that epoch's validation figures (mid-epoch lines of epoch 1: epoch 0's)
    assert [r["A"] is not None for r in lines] == [False, True, True, True]
    assert lines[2]["A"] == lines[1]["A"]
    metrics = cli.trainer.callback_metrics
    assert float(lines[-1]["A"]) == pytest.approx(float(metrics["val/bpd_decoder"]), abs=5e-5)
    assert float(lines[-1]["B"]) == pytest.approx(float(metrics["val/bpd_uniform"]), abs=5e-5)
    assert float(lines[-1]["loss"]) == pytest.approx(float(metrics["train/loss"]), abs=5e-5)
    # the model size, without Lightning's always-zero FLOPs column
    assert re.search(r"^model: [\d.]+ K parameters \([\d.]+ K trainable, 0 frozen\), [\d.]+ MB$", text, re.M)
    assert re.search(r"^  net: HierarchicalAutoEncoder, [\d.]+ K$", text, re.M)
    assert "FLOPs" not in text and "StageMetrics" not in text
    assert isinstance(cli.trainer.progress_bar_callback, console.PlainProgressBar)
    with open(log, "w") as out, contextlib.redirect_stdout(out):  # `test`: a line every 2 batches and at the end
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert re.search(r"^test  batch 2/2  [\d.]+ img/s  done$", log.read_text(), re.M)


def test_enable_progress_bar_false_prints_no_progress(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = build_cli([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
                         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    assert cli.trainer.progress_bar_callback is None
    assert cli.trainer.global_step == 4  # it trained
    assert not re.search(r"^(epoch|model:) ", out.getvalue(), re.M)


def _trainer(stream, **config) -> Trainer:
    """A Trainer built the way the CLI builds it, for stdout going to `stream`."""
    config = {"logger": False, "accelerator": "cpu", "enable_checkpointing": False, **config}
    return Trainer(**{**config, **console.trainer_overrides(config, stream)})


def test_terminal_keeps_the_rich_bar_files_get_plain_lines_and_a_listed_bar_is_kept(tmp_path):
    parent, child = os.openpty()  # a real pseudo-terminal
    with os.fdopen(child, "w") as tty, open(tmp_path / "log", "w") as file:
        assert console.stdout_is_terminal(tty) and not console.stdout_is_terminal(file)
        assert isinstance(_trainer(tty).progress_bar_callback, RichProgressBar)
        assert isinstance(_trainer(file).progress_bar_callback, console.PlainProgressBar)
        assert _trainer(file, enable_progress_bar=False).progress_bar_callback is None
        listed = TQDMProgressBar()
        assert _trainer(file, callbacks=[listed]).progress_bar_callback is listed
    os.close(parent)
    summaries = [type(c) for c in _trainer(io.StringIO()).callbacks if isinstance(c, ModelSummary)]
    assert summaries == [console.ModelSize]  # ours only, not Lightning's as well
    assert not [c for c in _trainer(io.StringIO(), enable_model_summary=False).callbacks if isinstance(c, ModelSummary)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_lightning_tips_are_dropped_and_its_other_messages_kept():
    records = _Records()
    logging.getLogger("lightning.pytorch").addHandler(records)
    try:
        console.install_filters()
        console.install_filters()  # idempotent: one filter per logger
        Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)  # Lightning shows its tips here
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(records)
    assert not [m for m in records.messages if "Tip:" in m], records.messages
    assert any(m.startswith("GPU available:") for m in records.messages)  # the same logger, a useful message
    filters = logging.getLogger(console.LIGHTNING_INFO_LOGGERS[0]).filters
    assert sum(isinstance(f, console._DropMessages) for f in filters) == 1


def test_pytree_deprecation_from_lightning_is_filtered_and_other_future_warnings_are_not():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)  # Lightning's helper builds a (deprecated) LeafSpec
        assert len(caught) == 1 and str(caught[0].message).startswith("`isinstance(treespec, LeafSpec)` is deprecated")
        console.install_filters()
        _tree_flatten(1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught[1:]] == ["another deprecation"]


@pytest.mark.xdist_group("sockets")  # W&B
def test_wandb_logger_dir_exists_and_only_the_anonymous_warning_is_silenced(tmp_path, capfd, monkeypatch):
    import wandb
    from wandb.errors import term

    # an earlier W&B run in this process (WANDB_SILENT=true) leaves W&B's terminal output silenced globally
    monkeypatch.setattr(term, "_silent", False)
    monkeypatch.setattr(term, "_show_warnings", True)
    from lightning.pytorch.loggers import WandbLogger
    from wandb.sdk.lib.gitlib import GitRepo
    from wandb.sdk.wandb_settings import Settings

    logger = WandbLogger(save_dir=str(tmp_path / "run"), offline=True)
    console.prepare_wandb(logger)
    assert (tmp_path / "run").is_dir()
    _ = GitRepo(root=str(tmp_path / "run")).root_dir  # W&B's git lookup from the run dir (None: not in a repo)
    Settings(anonymous=None)  # what Lightning's WandbLogger passes to wandb.init
    wandb.termwarn("a warning that must stay")
    err = capfd.readouterr().err
    assert "anonymous" not in err and "does not exist" not in err
    assert "a warning that must stay" in err


def test_one_line_doc_is_the_first_sentence_on_one_line():
    class Doc:
        """Decides *when* codes restart; `Codebook` decides *how*: all ranks hold identical codebooks,
        and stop (e.g. a custom quantizer). More text.

        Args: ..."""

    assert console.one_line_doc(Doc, width=200) == (
        "Decides *when* codes restart; `Codebook` decides *how*: all ranks hold identical codebooks, and stop "
        "(e.g. a custom quantizer)"
    )
    assert console.one_line_doc(Doc, width=60) == "Decides *when* codes restart; `Codebook` decides *how*..."


def test_help_lists_the_project_groups_with_their_one_line_docs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    fit_help = capsys.readouterr().out
    for key, cls in [("codebook_reset", CodebookReset), ("resolution_schedule", ResolutionSchedule),
                     ("image_logger", ImageLogger)]:  # fmt: skip
        assert f"\n{key} ({cls.__module__}.{cls.__name__}): {console.one_line_doc(cls)}:\n  --{key} CONFIG" in fit_help
    assert re.search(r"\nmetric_curves \(lightning_dq\.reports\.MetricCurves\): .*:\n  \(no options\)", fit_help)
    with pytest.raises(SystemExit):
        main(["--help"])
    main_help = capsys.readouterr().out
    assert "where to find every option:" in main_help
    for key, cls in [("codebook_reset", CodebookReset), ("resolution_schedule", ResolutionSchedule)]:
        assert re.search(rf"\n  --{key}\.\* +{cls.__name__}: {re.escape(console.one_line_doc(cls))}\n", main_help)


def test_user_error_in_a_hook_is_one_line_on_stderr_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--resolution_schedule.milestones={0: 32, 1: 64}",
              "--trainer.reload_dataloaders_every_n_epochs=0"])  # fmt: skip  # ConfigError in setup()
    assert exit_.value.code == 2 and exit_.value.__cause__ is None and exit_.value.__suppress_context__
    err = capsys.readouterr().err
    assert re.search(r"^lightning-dq: error: resolution_schedule\.milestones=.* set trainer\.reload_dataloaders_every"
                     r"_n_epochs=1 \(it is 0\)$", err, re.M)  # fmt: skip
    assert "Traceback" not in err


def test_user_error_in_a_constructor_exits_2_and_a_bug_keeps_its_exception(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--resolution_schedule.milestones={1: 32}"])
    assert exit_.value.code == 2
    assert "must start at epoch 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):  # not a UserError: a traceback, not exit 2
        main([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--codebook_reset.every_n_steps=0"])


def test_find_user_error_unwraps_causes_and_contexts():
    inner = DataError("data_batch_1 is truncated")
    try:
        try:
            raise inner
        except DataError:
            raise RuntimeError("hook failed")  # noqa: B904 -- implicit context, as a wrapper may do
    except RuntimeError as wrapped:
        assert console.find_user_error(wrapped) is inner
    caused = RuntimeError("wrapped")
    caused.__cause__ = ConfigError("bad")
    assert isinstance(console.find_user_error(caused), UserError)
    assert console.find_user_error(ValueError("a bug")) is None
    hidden = RuntimeError("a bug while handling it")
    hidden.__context__, hidden.__suppress_context__ = ConfigError("bad"), True  # `raise ... from None`
    assert console.find_user_error(hidden) is None
