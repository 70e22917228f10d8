"""The real CLI (`lightning_dq.cli.main`): every config, W&B offline, checkpoint reload, progressive resolution and
its resume, config errors that fail before training, `--help` listing the project's groups, and user errors as one
line with exit status 2."""

from __future__ import annotations

import csv
import re
import struct
import time
from pathlib import Path

import pytest
import torch

from lightning_dq.cli import build_cli, find_user_error, main, one_line_doc
from lightning_dq.errors import ConfigError, DataError, UserError
from lightning_dq.reporting.images import ImageLogger
from lightning_dq.training.callbacks import CodebookReset
from lightning_dq.training.modules import AutoEncoderModule
from lightning_dq.training.resolution import ResolutionSchedule
from tests.helpers import CONFIGS

BASE = ["--config", str(CONFIGS / "base.yaml")]
DEBUG = ["--config", str(CONFIGS / "debug.yaml")]
DEBUG_FIT = ["fit", *BASE, *DEBUG]
QUIET = ["--trainer.enable_model_summary=false"]


def run_args(tmp: Path, *extra: str) -> list[str]:
    return [f"--trainer.default_root_dir={tmp}", *QUIET, *extra]


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    """A tiny auto-encoder (debug net: README code structure) trained for a few steps on synthetic data."""
    root = tmp_path_factory.mktemp("ae")
    main(["fit", *BASE, *DEBUG, *run_args(root), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    return root / "checkpoints" / "last.ckpt"


AUTOENCODER_CONFIGS = ["base", "cifar10", "imagenet32", "imagenet64", "ddp", "debug", "demo", "experiments"]
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
    main(
        [
            "fit",
            *BASE,
            *DEBUG,
            *run_args(tmp_path),
            "--trainer.max_epochs=1",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.project=lightning-dq-test",
            "--trainer.logger.offline=true",
        ]
    )
    wandb.finish()  # flush the run's transaction log (a CLI process does this at exit)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))  # inside the run directory, not the cwd
    assert len(runs) == 1, "expected exactly one offline W&B run directory"
    assert (tmp_path / "config.yaml").is_file()  # the resolved config is saved with the run
    expected = {"val/bpd_decoder", "val/bpd_uniform", "train/bpd_decoder", "train/perplexity_l0"}
    for _ in range(60):  # W&B's service process may still be writing the log after finish() returned
        records = list(_wandb_records(next(runs[0].glob("*.wandb"))))
        history = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
        if expected <= history:
            break
        time.sleep(0.5)
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
    schedule = [
        "--resolution_schedule.milestones={0: 32, 2: 64}",
        "--checkpoint.monitor=val/loss_64px",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
    ]
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path), *schedule, "--trainer.max_epochs=3"])
    assert _resolutions(tmp_path) == {0: {32}, 1: {32}, 2: {64}}
    # resume from last.ckpt (end of epoch 2) for 2 more epochs: still 64, appended to the same record
    main(["fit", *BASE, *DEBUG, *run_args(tmp_path), *schedule, "--trainer.max_epochs=5", "--ckpt_path=last"])
    assert _resolutions(tmp_path) == {0: {32}, 1: {32}, 2: {64}, 3: {64}, 4: {64}}


def test_resolution_schedule_needs_dataloader_reload(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a config error: one message, no traceback, status 2
        main(
            [
                "fit",
                *BASE,
                *DEBUG,
                *run_args(tmp_path),
                "--resolution_schedule.milestones={0: 32, 1: 64}",
                "--trainer.reload_dataloaders_every_n_epochs=0",
                "--checkpoint.monitor=val/loss_64px",
            ]
        )
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
        main(
            [
                "fit",
                *BASE,
                *DEBUG,
                *run_args(tmp_path),
                "--data.init_args.resolution=40",
                "--data.init_args.native_resolution=40",
            ]
        )
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


def test_one_line_doc_is_the_first_sentence_on_one_line():
    class Doc:
        """Decides *when* codes restart; `Codebook` decides *how*: all ranks hold identical codebooks,
        and stop (e.g. a custom quantizer). More text.

        Args: ..."""

    assert one_line_doc(Doc, width=200) == (
        "Decides *when* codes restart; `Codebook` decides *how*: all ranks hold identical codebooks, and stop "
        "(e.g. a custom quantizer)"
    )
    assert one_line_doc(Doc, width=60) == "Decides *when* codes restart; `Codebook` decides *how*..."


def test_help_lists_the_project_groups_with_their_one_line_docs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    fit_help = capsys.readouterr().out
    groups = [
        ("codebook_reset", CodebookReset),
        ("resolution_schedule", ResolutionSchedule),
        ("image_logger", ImageLogger),
    ]
    for key, cls in groups:
        assert f"\n{key} ({cls.__module__}.{cls.__name__}):\n  {one_line_doc(cls)}\n\n  --{key} CONFIG" in fit_help
    # a group without options still shows, with its doc
    assert re.search(
        r"\nmetric_curves \(lightning_dq\.reporting\.curves\.MetricCurves\):\n  Draws `bpd_curve.png`", fit_help
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    main_help = capsys.readouterr().out
    assert "where to find every option:" in main_help
    for key, cls in [("codebook_reset", CodebookReset), ("resolution_schedule", ResolutionSchedule)]:
        assert re.search(rf"\n  --{key}\.\* +{cls.__name__}: {re.escape(one_line_doc(cls))}\n", main_help)


def test_user_error_in_a_hook_is_one_line_on_stderr_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                *DEBUG_FIT,
                f"--trainer.default_root_dir={tmp_path}",
                "--resolution_schedule.milestones={0: 32, 1: 64}",
                "--trainer.reload_dataloaders_every_n_epochs=0",
            ]
        )  # a ConfigError in setup()
    assert exit_.value.code == 2 and exit_.value.__cause__ is None and exit_.value.__suppress_context__
    err = capsys.readouterr().err
    assert re.search(
        r"^lightning-dq: error: resolution_schedule\.milestones=.* set trainer\.reload_dataloaders_every"
        r"_n_epochs=1 \(it is 0\)$",
        err,
        re.M,
    )
    assert "Traceback" not in err


def test_user_error_in_a_constructor_exits_2_and_a_bug_keeps_its_exception(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--resolution_schedule.milestones={1: 32}"])
    assert exit_.value.code == 2
    assert "needs epoch 0" in capsys.readouterr().err
    monkeypatch.setattr(CodebookReset, "enabled_at", lambda self, step: 1 / 0)  # a bug in a hook
    with pytest.raises(ZeroDivisionError):  # not a UserError: a traceback, not exit 2
        main([*DEBUG_FIT, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])


def test_find_user_error_unwraps_causes_and_contexts():
    inner = DataError("data_batch_1 is truncated")
    try:
        try:
            raise inner
        except DataError:
            raise RuntimeError("hook failed")  # noqa: B904 -- implicit context, as a wrapper may do
    except RuntimeError as wrapped:
        assert find_user_error(wrapped) is inner
    caused = RuntimeError("wrapped")
    caused.__cause__ = ConfigError("bad")
    assert isinstance(find_user_error(caused), UserError)
    assert find_user_error(ValueError("a bug")) is None
    hidden = RuntimeError("a bug while handling it")
    hidden.__context__, hidden.__suppress_context__ = ConfigError("bad"), True  # `raise ... from None`
    assert find_user_error(hidden) is None
