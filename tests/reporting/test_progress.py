"""lightning_dq.reporting.progress and summary: plain progress lines when stdout is a file (the rich bar kept for a
terminal), `enable_progress_bar=false`, and the model size without Lightning's always-zero FLOPs column."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar

from lightning_dq.cli import build_cli, trainer_callbacks
from lightning_dq.reporting.progress import PlainProgressBar, stdout_is_terminal
from lightning_dq.reporting.summary import ModelSize
from tests.helpers import config_args

DEBUG_FIT = ["fit", *config_args("base", "debug")]
LINE = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<last>\d+)(?P<done> done)?  batch (?P<batch>\d+)/4  step (?P<step>\d+)/8  "
    r"(?P<rate>[\d.]+) img/s  train/loss (?P<loss>[\d.]+)(  val bits/dim A (?P<A>[\d.]+) B (?P<B>[\d.]+))?"
    r"  ETA (?P<eta>\d+:\d\d:\d\d)$"
)


def test_fit_with_stdout_to_a_file_prints_a_progress_line_every_n_steps_and_every_epoch(tmp_path):
    log = tmp_path / "stdout.log"
    with open(log, "w") as out, contextlib.redirect_stdout(out):  # a real file: not a terminal
        cli = build_cli(
            [
                *DEBUG_FIT,
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_epochs=2",
                "--trainer.log_every_n_steps=2",
            ]
        )
    text = log.read_text()
    lines = [m.groupdict() for m in map(LINE.match, text.splitlines()) if m]
    # 4 batches per epoch, a line every 2: one mid-epoch line, then the epoch-end line (which covers batch 4)
    assert [(int(r["epoch"]), int(r["batch"]), int(r["step"]), bool(r["done"])) for r in lines] == [
        (0, 2, 2, False),
        (0, 4, 4, True),
        (1, 2, 6, False),
        (1, 4, 8, True),
    ]
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
    assert isinstance(cli.trainer.progress_bar_callback, PlainProgressBar)
    with open(log, "w") as out, contextlib.redirect_stdout(out):  # `test`: a line every 2 batches and at the end
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert re.search(r"^test  batch 2/2  [\d.]+ img/s  done$", log.read_text(), re.M)


def test_enable_progress_bar_false_prints_no_progress(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = build_cli(
            [
                *DEBUG_FIT,
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
            ]
        )
    assert cli.trainer.progress_bar_callback is None
    assert cli.trainer.global_step == 4  # it trained
    assert not re.search(r"^(epoch|model:) ", out.getvalue(), re.M)


def _trainer(stream, **config) -> Trainer:
    """A Trainer built the way the CLI builds it, for stdout going to `stream`."""
    config = {"logger": False, "accelerator": "cpu", "enable_checkpointing": False, **config}
    return Trainer(**{**config, **trainer_callbacks(config, stream)})


def test_terminal_keeps_the_rich_bar_files_get_plain_lines_and_a_listed_bar_is_kept(tmp_path):
    parent, child = os.openpty()  # a real pseudo-terminal
    with os.fdopen(child, "w") as tty, open(tmp_path / "log", "w") as file:
        assert stdout_is_terminal(tty) and not stdout_is_terminal(file)
        assert isinstance(_trainer(tty).progress_bar_callback, RichProgressBar)
        assert isinstance(_trainer(file).progress_bar_callback, PlainProgressBar)
        assert _trainer(file, enable_progress_bar=False).progress_bar_callback is None
        listed = TQDMProgressBar()
        assert _trainer(file, callbacks=[listed]).progress_bar_callback is listed
    os.close(parent)
    summaries = [type(c) for c in _trainer(io.StringIO()).callbacks if isinstance(c, ModelSummary)]
    assert summaries == [ModelSize]  # ours only, not Lightning's as well
    assert not [c for c in _trainer(io.StringIO(), enable_model_summary=False).callbacks if isinstance(c, ModelSummary)]
