"""The real CLI (`lightning_dq.cli.main`): every config, W&B offline, checkpoint reload, progressive
resolution and its resume, and config errors that fail before training."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest
import torch

from lightning_dq.cli import build_cli, main
from lightning_dq.module import AutoEncoderModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = ["--config", str(CONFIGS / "base.yaml")]
DEBUG = ["--config", str(CONFIGS / "debug.yaml")]
QUIET = ["--trainer.enable_model_summary=false"]


def run_args(tmp: Path, *extra: str) -> list[str]:
    return [f"--trainer.default_root_dir={tmp}", *QUIET, *extra]


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    """A tiny auto-encoder (debug net: README code structure) trained for a few steps on synthetic data."""
    root = tmp_path_factory.mktemp("ae")
    main(["fit", *BASE, *DEBUG, *run_args(root), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    return root / "checkpoints" / "last.ckpt"


AUTOENCODER_CONFIGS = ["base", "cifar10", "imagenet32", "imagenet64", "ddp", "debug", "demo"]
PRIOR_CONFIGS = ["prior_cifar10", "prior_imagenet32", "prior_imagenet64", "prior_demo"]


def test_every_config_is_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(AUTOENCODER_CONFIGS + PRIOR_CONFIGS)


@pytest.mark.parametrize("name", AUTOENCODER_CONFIGS)
def test_autoencoder_configs_fit_and_test(name, tmp_path):
    layered = [*BASE, "--config", str(CONFIGS / f"{name}.yaml"), *DEBUG]
    for sub in ("fit", "test"):
        main([sub, *layered, *run_args(tmp_path), "--trainer.fast_dev_run=1"])


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_prior_configs_fit_and_test(name, tmp_path, autoencoder_ckpt):
    # debug first (synthetic data, CPU), then the prior config replaces the model
    layered = [*BASE, *DEBUG, "--config", str(CONFIGS / f"{name}.yaml")]
    extra = [f"--model.init_args.autoencoder_ckpt={autoencoder_ckpt}", "--model.init_args.prior.init_args.dim=32"]
    one = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    main(["fit", *layered, *run_args(tmp_path), *extra, *one])
    # a prior is evaluated from its checkpoint, which holds the auto-encoder too
    main(["test", *layered, *run_args(tmp_path), *extra, *one, "--ckpt_path=last"])
    assert (tmp_path / "evaluation.json").is_file()


@pytest.mark.xdist_group("sockets")  # W&B talks to its service over a local socket
def test_wandb_offline_run_has_bits_per_dim_history(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is a config value, not an environment default
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path), "--trainer.max_epochs=1",
          "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project=lightning-dq-test",
          "--trainer.logger.offline=true"])
    wandb.finish()  # flush the run's transaction log (a CLI process does this at exit)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))  # inside the run directory, not the cwd
    assert len(runs) == 1, "expected exactly one offline W&B run directory"
    assert (tmp_path / "config.yaml").is_file()  # the resolved config is saved with the run
    records = list(_wandb_records(next(runs[0].glob("*.wandb"))))
    history = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    expected = {"val/bpd_decoder", "val/bpd_uniform", "train/bpd_decoder", "train/perplexity_l0"}
    assert expected <= history, sorted(history)
    config = {i.key for r in records if r.HasField("config") for i in r.config.update}
    assert "config" in config  # the resolved CLI config is sent to W&B


def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB
    holding protobuf `Record`s, possibly split into FIRST/MIDDLE/LAST fragments."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in this block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record W&B's service is still writing: stop at the last whole one
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a complete record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_checkpoint_reloads_with_identical_outputs(tmp_path):
    cli = build_cli(["fit", *BASE, *DEBUG, *run_args(tmp_path), "--trainer.max_epochs=1"])
    model = cli.model.eval()
    reloaded = AutoEncoderModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt").eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    a, b = model(x), reloaded(x)
    assert torch.equal(a.params, b.params)
    assert all(torch.equal(p, q) for p, q in zip(a.codes, b.codes, strict=True))


def _resolutions(root: Path) -> dict[int, set[int]]:
    """epoch -> image sizes seen in training, from the run's metric record (`train/resolution` per step)."""
    seen: dict[int, set[int]] = {}
    for row in csv.DictReader(open(root / "metrics.csv")):
        if row.get("train/resolution"):
            seen.setdefault(int(float(row["epoch"])), set()).add(int(float(row["train/resolution"])))
    return seen


def test_resolution_schedule_switches_within_one_fit_and_survives_resume(tmp_path):
    schedule = ["--resolution_schedule.milestones={0: 32, 2: 64}", "--checkpoint.monitor=val/loss_64px",
                "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]  # fmt: skip
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path), *schedule, "--trainer.max_epochs=3"])
    assert _resolutions(tmp_path) == {0: {32}, 1: {32}, 2: {64}}
    # resume from last.ckpt (end of epoch 2) for 2 more epochs: still 64, appended to the same record
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path), *schedule, "--trainer.max_epochs=5", "--ckpt_path=last"])
    assert _resolutions(tmp_path) == {0: {32}, 1: {32}, 2: {64}, 3: {64}, 4: {64}}


def test_resolution_schedule_needs_dataloader_reload(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a config error: one message, no traceback, status 2
        main(["fit", *BASE, *DEBUG, *run_args(tmp_path), "--resolution_schedule.milestones={0: 32, 1: 64}",
              "--trainer.reload_dataloaders_every_n_epochs=0", "--checkpoint.monitor=val/loss_64px"])  # fmt: skip
    assert exit_info.value.code == 2 and "reload_dataloaders_every_n_epochs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.init_args.net.init_args.chanels=8", "chanels"),  # unknown key
        ("--model.init_args.net.init_args.channels=wide", "channels"),  # wrong type
        ("--data.init_args.dataset=cifar100", "dataset"),  # not one of the choices
    ],
)
def test_bad_config_values_fail_before_training_naming_the_key(override, key, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *BASE, *DEBUG, *run_args(tmp_path), override])
    assert key in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_resolution_not_divisible_by_model_downsampling_fails_before_training(tmp_path, capsys):
    # synthetic data can serve 40 (stored at 40) but the model needs multiples of 16
    with pytest.raises(SystemExit):
        main(["fit", *BASE, *DEBUG, *run_args(tmp_path), "--data.init_args.resolution=40",
              "--data.init_args.native_resolution=40"])  # fmt: skip
    assert "data.init_args.resolution=40 does not fit the model" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_runs_without_logger_and_with_csv_logger(tmp_path, capsys):
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path / "a"), "--trainer.max_epochs=1", "--trainer.logger=false"])
    printed = capsys.readouterr().out  # the closing summary tells the user where the results are
    assert f"run directory: {tmp_path / 'a'}" in printed and "val/bpd_uniform" in printed
    assert f"checkpoint: {tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}" in printed
    assert not (tmp_path / "a" / "metrics.csv").exists()  # no logger, no record
    csv_logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'b'}"]
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path / "b"), "--trainer.max_epochs=1", *csv_logger])
    assert "val/bpd_uniform" in next((tmp_path / "b").rglob("metrics.csv")).read_text()
