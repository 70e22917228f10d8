"""A full disk (simulated by `tests.helpers.FullDisk`: writes fail with ENOSPC as on a full device) is one line
naming the file and the free space, exit status 2, and the previous file intact: for checkpoints, the metric
record, the ImageNet cache and the code files of `lightning-dq encode`."""

from __future__ import annotations

import csv
import errno
import json
import re

import numpy as np
import pytest

from lightning_dq.cli import main
from lightning_dq.training.checkpoints import load_checkpoint_file
from tests.helpers import CONFIGS, FillDiskAt, FullDisk, write_imagenet

FIT = ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
FIT += ["--trainer.enable_model_summary=false", "--trainer.max_epochs=2", "--resume.every_n_train_steps=0"]


def run_out_of_space(args: list[str], capsys) -> str:
    """Run the CLI, expect exit status 2, return its one stderr line."""
    try:
        with pytest.raises(SystemExit) as exit_:
            main(args)
    finally:
        if FillDiskAt.patch is not None:
            FillDiskAt.patch.undo()
            FillDiskAt.patch = None
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines[-20:]
    return lines[0]


def fill_at(epoch: int, folder: str = "") -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "tests.helpers.FillDiskAt", "init_args": {"epoch": epoch, "folder": folder}}
    )


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, capsys):
    line = run_out_of_space([*FIT, f"--trainer.default_root_dir={tmp_path}", fill_at(1, "checkpoints")], capsys)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert re.fullmatch(
        rf"lightning-dq: error: no space left on the device writing the checkpoint {re.escape(str(ckpt.parent))}/\S+ "
        rf"\(0\.0 MB free in .*checkpoints\): free some space or write elsewhere, then resume with --ckpt_path last",
        line,
    )
    assert load_checkpoint_file(ckpt)["epoch"] == 0  # epoch 0's checkpoint, whole and loadable
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # no partial file


def test_metric_record_on_a_full_disk_keeps_its_rows(tmp_path, capsys):
    line = run_out_of_space([*FIT, f"--trainer.default_root_dir={tmp_path}", fill_at(1)], capsys)
    record = tmp_path / "metrics.csv"
    assert line.startswith(f"lightning-dq: error: no space left on the device writing the metric record {record} ")
    with record.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {float(r["epoch"]) for r in rows if r.get("epoch")} == {0.0}  # epoch 0's rows, readable
    assert not list(tmp_path.glob(".metrics.csv.tmp*"))


def test_imagenet_cache_on_a_full_disk(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8) for _ in range(10)]
    write_imagenet(tmp_path / "npz", 32, train, rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), official=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    prepare = ["prepare", "--dataset", "imagenet32", "--root", str(tmp_path / "npz"), "--cache_dir", str(cache)]
    FullDisk(monkeypatch, cache, free=10_000)  # the free-space check sees it: nothing is written
    line = run_out_of_space(prepare, capsys)
    assert re.match(
        rf"lightning-dq: error: {re.escape(str(cache))} has 0\.0 MB free, the ImageNet-32 cache needs", line
    )
    FullDisk(monkeypatch, cache, free=10_000, report=10**9)  # the disk fills while the cache is written
    line = run_out_of_space(prepare, capsys)
    target = cache / "imagenet32_train.npy"
    assert line.startswith(f"lightning-dq: error: no space left on the device writing the ImageNet-32 cache {target}")
    assert line.endswith("then run it again") and list(cache.iterdir()) == []


def test_encode_on_a_full_disk(tmp_path, monkeypatch, capsys):
    main([*FIT, f"--trainer.default_root_dir={tmp_path / 'ae'}", "--trainer.max_epochs=1"])
    out = tmp_path / "codes"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_space)
    ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    data = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    line = run_out_of_space(["encode", "--ckpt", str(ckpt), "--out", str(out), *data], capsys)
    assert line.startswith(f"lightning-dq: error: no space left on the device writing the code file {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]  # no code folder, no partial one
