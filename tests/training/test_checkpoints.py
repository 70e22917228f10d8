"""Checkpoint IO: a save killed mid-write leaves the previous file intact; a truncated, corrupt, unsafe or
mismatched `--ckpt_path` stops the real CLI with one message naming the file (and the mismatched keys)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from lightning_dq.cli import main
from lightning_dq.data.samplers import ResumableDataLoader, TrainSampler
from lightning_dq.errors import CheckpointError
from lightning_dq.training.checkpoints import AtomicCheckpointIO, load_checkpoint_file
from tests.helpers import CONFIGS

DEBUG = [
    "--config",
    str(CONFIGS / "base.yaml"),
    "--config",
    str(CONFIGS / "debug.yaml"),
    "--trainer.enable_model_summary=false",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.max_epochs=1",
]


def _save_then_die_mid_write(path: str, marker: str) -> None:
    """Child: one complete save, then a second save that stops after writing the new bytes and before they are
    synced and renamed into place (a slow disk) until killed."""
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"step": 1, "w": torch.ones(50_000)}, path)

    def slow_fsync(fd: int) -> None:
        Path(marker).touch()  # the new checkpoint's bytes are in the temporary file, not yet renamed
        time.sleep(600)

    os.fsync = slow_fsync
    checkpoint_io.save_checkpoint({"step": 2, "w": torch.zeros(50_000)}, path)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "half-written"
    child = multiprocessing.get_context("fork").Process(target=_save_then_die_mid_write, args=(str(path), str(marker)))
    child.start()
    while not marker.exists() and child.is_alive():
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the second save"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    checkpoint = load_checkpoint_file(path)  # the complete first save, not a torn second one
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(50_000))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the torn bytes went to the temporary name


def test_load_errors_name_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, good)
    assert torch.equal(load_checkpoint_file(good)["state_dict"]["w"], torch.ones(3))
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.ckpt").write_bytes(b"\x00" * 100)
    (tmp_path / "evil.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "obj": Path("x")}, tmp_path / "evil.ckpt")  # a pickled object, not plain data
    for name, message in [
        ("cut.ckpt", "truncated"),
        ("noise.ckpt", "truncated"),
        ("evil.ckpt", "pickled Python"),
        ("missing.ckpt", "does not exist"),
    ]:
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint_file(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_continues_where_its_state_says(workers):
    data = torch.arange(40)

    def loader() -> ResumableDataLoader:  # the order is a function of (seed, epoch), not of the global RNG
        sampler = TrainSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)

    full = [b.tolist() for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"batches_yielded": 3} and seen == full[:3]
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # Lightning counts the epoch from the full length
    assert [b.tolist() for b in resumed] == full[3:]  # the rest of the epoch, nothing repeated
    assert resumed.state_dict() == {"batches_yielded": 10}
    resumed.sampler.set_epoch(1)  # what Lightning does each epoch: a new order, a whole epoch
    again = [x for b in resumed for x in b.tolist()]
    assert sorted(again) == list(range(40)) and again != [x for b in full for x in b]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with `checkpoints/last.ckpt` from one short debug fit through the real CLI."""
    root = tmp_path_factory.mktemp("run")
    main(["fit", *DEBUG, f"--trainer.default_root_dir={root}"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_truncated_ckpt_path_is_one_clear_error(trained, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    last = root / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    for ckpt_path in (str(last), "last"):
        err = _cli_error(capsys, "fit", *DEBUG, f"--trainer.default_root_dir={root}", f"--ckpt_path={ckpt_path}")
        assert str(last) in err and "truncated" in err


def test_ckpt_from_another_model_config_lists_the_mismatches(trained, tmp_path, capsys):
    # `--ckpt_path last` on a run directory whose config was changed since (an explicit file path would
    # not mismatch: LightningCLI then rebuilds the model from the checkpoint's own hyperparameters)
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    ckpt = root / "checkpoints" / "last.ckpt"
    args = [*DEBUG, f"--trainer.default_root_dir={root}", "--ckpt_path=last"]
    err = _cli_error(capsys, "fit", *args, "--model.init_args.net.init_args.code_dim=2")
    assert str(ckpt) in err and "different model configuration" in err
    assert "codebook.embed: checkpoint (5, 32, 4) vs model (5, 32, 2)" in err
    err = _cli_error(capsys, "test", *args, "--model.init_args.net.init_args.res_blocks=2")
    assert "missing in checkpoint" in err and str(ckpt) in err
