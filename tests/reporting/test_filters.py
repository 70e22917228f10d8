"""lightning_dq.reporting.filters and wandb: each noise filter drops exactly its message; W&B's folder exists before
its run starts (no "git root does not exist" warning)."""

from __future__ import annotations

import logging
import warnings

import pytest
from lightning.pytorch import Trainer

from lightning_dq.reporting import filters as noise
from lightning_dq.reporting.wandb import prepare_wandb


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
        noise.install_filters()
        noise.install_filters()  # idempotent: one filter per logger
        Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)  # Lightning shows its tips here
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(records)
    assert not [m for m in records.messages if "Tip:" in m], records.messages
    assert any(m.startswith("GPU available:") for m in records.messages)  # the same logger, a useful message
    filters = logging.getLogger(noise.LIGHTNING_INFO_LOGGERS[0]).filters
    assert sum(isinstance(f, noise._DropMessages) for f in filters) == 1


def test_pytree_deprecation_from_lightning_is_filtered_and_other_future_warnings_are_not():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)  # Lightning's helper builds a (deprecated) LeafSpec
        assert len(caught) == 1 and str(caught[0].message).startswith("`isinstance(treespec, LeafSpec)` is deprecated")
        noise.install_filters()
        _tree_flatten(1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught[1:]] == ["another deprecation"]


@pytest.mark.xdist_group("sockets")  # W&B
def test_wandb_logger_dir_exists_before_its_run(tmp_path, capfd, monkeypatch):
    import wandb
    from wandb.errors import term

    # an earlier W&B run in this process (WANDB_SILENT=true) leaves W&B's terminal output silenced globally
    monkeypatch.setattr(term, "_silent", False)
    monkeypatch.setattr(term, "_show_warnings", True)
    from lightning.pytorch.loggers import WandbLogger
    from wandb.sdk.lib.gitlib import GitRepo

    logger = WandbLogger(save_dir=str(tmp_path / "run"), offline=True)
    prepare_wandb(logger)
    assert (tmp_path / "run").is_dir()
    _ = GitRepo(root=str(tmp_path / "run")).root_dir  # W&B's git lookup from the run dir (None: not in a repo)
    wandb.termwarn("a warning that must stay")
    err = capfd.readouterr().err
    assert "does not exist" not in err
    assert "a warning that must stay" in err
