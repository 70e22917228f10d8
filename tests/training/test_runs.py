"""Runs a researcher can trust (issue 10): progressive keys and checkpoint ranking, one W&B run per
experiment, a metric record that survives resume, standalone prior checkpoints, optimizer overrides and a
saved config that tells the truth. Everything goes through the real CLI (`lightning_dq.cli.main`)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer

from lightning_dq.cli import main
from lightning_dq.data import ImageDataModule
from lightning_dq.reporting.wandb import RUN_ID_FILE, fill_identity
from lightning_dq.training.modules import AutoEncoderModule
from lightning_dq.training.schedules import WarmupCosine
from tests.helpers import CONFIGS, debug_net, wandb_records

BASE = ["--config", str(CONFIGS / "base.yaml")]
DEBUG = ["--config", str(CONFIGS / "debug.yaml")]
SMALL = ["--trainer.enable_model_summary=false", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
PROGRESSIVE = ["--resolution_schedule.milestones={0: 32, 1: 64}", "--checkpoint.monitor=val/loss_64px"]


def fit(root: Path, *extra: str, sub: str = "fit", configs: tuple[str, ...] = ()) -> None:
    """Run the CLI on the debug config (+ `configs`, layered after it) in run directory `root`."""
    layered = [arg for name in configs for arg in ("--config", str(CONFIGS / name))]
    main([sub, *BASE, *DEBUG, *layered, f"--trainer.default_root_dir={root}", *SMALL, *extra])


def rows(root: Path) -> list[dict[str, float]]:
    with (root / "metrics.csv").open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


# -- progressive resolution ---------------------------------------------------------------------------


def test_progressive_fit_names_sizes_ranks_final_size_and_evaluates_at_checkpoint_size(tmp_path):
    fit(tmp_path, *PROGRESSIVE, "--trainer.max_epochs=3", "--checkpoint.save_top_k=1")
    record = rows(tmp_path)
    val = {int(r["epoch"]): r for r in record if "val/resolution" in r}
    assert {e: r["val/resolution"] for e, r in val.items()} == {0: 32, 1: 64, 2: 64}
    assert "val/bpd_decoder_32px" in val[0] and "val/bpd_decoder_64px" not in val[0]
    assert "val/bpd_decoder_64px" in val[1] and "val/bpd_decoder_32px" not in val[1]
    keys = {k for r in record for k in r}
    assert "val/bpd_decoder" not in keys and "train/bpd_decoder_64px_epoch" in keys
    # the size is on every row: step rows carry train/resolution, epoch rows {stage}/resolution
    for r in record:
        if any(k.startswith(("train/", "val/")) for k in r):
            assert any(k.endswith(("resolution", "resolution_epoch")) for k in r), r
    # the best checkpoint is ranked among 64px epochs only (epoch 0 ran at 32px and has a lower loss)
    best = [p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt")]
    assert len(best) == 1 and not best[0].startswith("epoch=0"), best
    assert (tmp_path / "bpd_curve.png").is_file()
    # test on the final checkpoint: 64px; on a mid-schedule checkpoint (epoch 0): its own size, 32px
    fit(tmp_path, *PROGRESSIVE, "--ckpt_path=last", "--trainer.limit_test_batches=1", sub="test")
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["resolution"] == report["all_metrics"]["test/resolution"] == 64  # the batches' size, too
    shutil.copy(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "e2.ckpt")
    epoch0 = torch.load(tmp_path / "e2.ckpt", weights_only=False)
    epoch0["epoch"] = 0  # the same weights, labelled as saved at the end of epoch 0
    torch.save(epoch0, tmp_path / "e0.ckpt")
    fit(tmp_path, *PROGRESSIVE, f"--ckpt_path={tmp_path / 'e0.ckpt'}", "--trainer.limit_test_batches=1", sub="test")
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["resolution"] == report["all_metrics"]["test/resolution"] == 32


def user_error(capsys, *args, **kwargs) -> str:
    """Run `fit(*args)`, expect the CLI's one-message exit (status 2), return the message."""
    with pytest.raises(SystemExit) as exit_info:
        fit(*args, **kwargs)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_resume_with_other_milestones_is_refused(tmp_path, capsys):
    fit(tmp_path, *PROGRESSIVE, "--trainer.max_epochs=1")
    other = ["--resolution_schedule.milestones={0: 32, 2: 64}", "--checkpoint.monitor=val/loss_64px"]
    message = user_error(capsys, tmp_path, *other, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert "milestones={0: 32, 1: 64}" in message and "Traceback" not in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.init_args.resolution=64", "data.init_args.resolution=64"),  # disagrees with milestones[0]
    ],
)
def test_progressive_config_errors_fail_before_training(tmp_path, override, message, capsys):
    assert message in user_error(capsys, tmp_path, *PROGRESSIVE, override)
    assert not (tmp_path / "checkpoints").exists()


def test_a_schedule_on_the_command_line_ranks_checkpoints_on_the_final_size(tmp_path):
    fit(tmp_path, "--resolution_schedule.milestones={0: 32, 1: 64}", "--trainer.max_epochs=2")  # default monitor
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["checkpoint"]["monitor"] == "val/loss_64px"
    best = [p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt")]
    assert best == ["epoch=1-step=4.ckpt"]  # the 64px epoch, not epoch 0 (32px, lower loss)


def test_memory_probe_at_the_largest_size_leaves_no_trace(tmp_path):
    states = []
    for probe in ("true", "false"):
        fit(tmp_path / probe, *PROGRESSIVE, "--trainer.max_epochs=2", f"--resolution_schedule.probe_largest={probe}")
        states.append(torch.load(tmp_path / probe / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


# -- metric record and W&B ------------------------------------------------------------------------------


def test_record_has_train_and_val_values_for_every_epoch_after_resume(tmp_path):
    fit(tmp_path, "--trainer.max_epochs=2")
    header = next(csv.reader((tmp_path / "metrics.csv").open()))
    with (tmp_path / "metrics.csv").open("a", newline="") as f:  # what an attempt killed after its checkpoint leaves
        csv.DictWriter(f, header).writerow({"step": 999, "epoch": 2, "train/loss": 0.5})
    fit(tmp_path, "--trainer.max_epochs=4", "--ckpt_path=last")
    record = rows(tmp_path)
    for key in ("train/bpd_decoder_epoch", "val/bpd_decoder", "train/loss_epoch", "val/loss"):
        assert sorted(int(r["epoch"]) for r in record if key in r) == [0, 1, 2, 3], key
    assert all(r["step"] <= 8 for r in record)  # the killed attempt's row is gone


def test_test_writes_its_own_config_and_saved_config_tells_where_files_went(tmp_path):
    fit(tmp_path, "--trainer.max_epochs=1")
    saved = (tmp_path / "config.yaml").read_bytes()
    config = yaml.safe_load(saved)
    assert config["checkpoint"]["dirpath"] == str(tmp_path / "checkpoints")
    assert (Path(config["checkpoint"]["dirpath"]) / "last.ckpt").is_file()
    assert config["trainer"]["logger"][0]["init_args"]["save_dir"] == str(tmp_path)
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 2e-4
    fit(tmp_path, "--ckpt_path=last", "--trainer.limit_test_batches=1", sub="test")
    assert (tmp_path / "config.yaml").read_bytes() == saved
    assert yaml.safe_load((tmp_path / "config_test.yaml").read_text())["ckpt_path"] == "last"


WANDB = [
    "--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
    "--trainer.logger.project=lightning-dq-test",
    "--trainer.logger.offline=true",
]


@pytest.mark.xdist_group("sockets")  # W&B talks to its service over a local socket
def test_fit_resume_and_test_share_one_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "exp"
    fit(root, *WANDB, "--trainer.max_epochs=1")
    wandb.finish()
    run_id = (root / RUN_ID_FILE).read_text().strip()
    fit(root, *WANDB, "--trainer.max_epochs=2", "--ckpt_path=last")
    wandb.finish()
    fit(root, *WANDB, "--ckpt_path=last", "--trainer.limit_test_batches=1", sub="test")
    wandb.finish()
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}  # one run id, three processes
    assert (root / RUN_ID_FILE).read_text().strip() == run_id
    for name in ("config.yaml", "config_test.yaml"):
        logger = yaml.safe_load((root / name).read_text())["trainer"]["logger"][1]["init_args"]
        assert (logger["id"], logger["name"], logger["group"], logger["offline"]) == (run_id, "exp", "synthetic", True)
    # a fresh fit in the same directory is a new experiment: a new id
    fit(root, *WANDB, "--trainer.max_epochs=1")
    wandb.finish()
    assert (root / RUN_ID_FILE).read_text().strip() != run_id


@pytest.mark.xdist_group("sockets")
def test_wandb_summary_keeps_each_bits_per_dim_minimum(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(tmp_path, *WANDB, "--trainer.max_epochs=4", "--model.init_args.optimizer.init_args.lr=3e-2")
    wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(run)
    (val,) = [r.metric for r in records if r.HasField("metric") and r.metric.glob_name == "val/bpd*"]
    assert val.summary.min and not val.summary.max and val.step_metric == "trainer/global_step"
    logged = [
        json.loads(item.value_json)
        for r in records
        if r.HasField("history")
        for item in r.history.item
        if item.key == "val/bpd_decoder" or list(item.nested_key) == ["val/bpd_decoder"]
    ]
    values = [r["val/bpd_decoder"] for r in rows(tmp_path) if "val/bpd_decoder" in r]
    assert len(values) == 4 and values[-1] != min(values)  # lr 3e-2: the last epoch is not the best
    assert min(logged) == pytest.approx(min(values), rel=1e-6)  # the run table shows this, not the last value


def test_wandb_mode_online_is_a_config_value(tmp_path, monkeypatch):
    args = Namespace(offline=True)
    fill_identity(args, tmp_path / "exp", "fit", "cifar10", new=True)
    assert args.offline is True and (args.name, args.group, args.job_type) == ("exp", "cifar10", "fit")
    assert args.save_dir == str(tmp_path / "exp") and args.id == (tmp_path / "exp" / RUN_ID_FILE).read_text().strip()
    monkeypatch.setenv("WANDB_MODE", "online")
    fill_identity(args, tmp_path / "exp", "test", "cifar10", new=False)
    assert args.offline is False and args.job_type == "fit"  # values already set are kept


# -- standalone prior checkpoints ------------------------------------------------------------------------


def test_prior_checkpoint_stands_alone_from_a_python_made_autoencoder(tmp_path):
    net = debug_net()
    data = ImageDataModule(dataset="synthetic", batch_size=8, num_workers=0, val_size=64, native_resolution=64)
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(AutoEncoderModule(net), data)
    ae_ckpt = tmp_path / "ae" / "ae.ckpt"
    trainer.save_checkpoint(ae_ckpt)
    prior = [
        f"--model.init_args.autoencoder_ckpt={ae_ckpt}",
        "--model.init_args.prior.init_args.dim=32",
        "--trainer.max_epochs=1",
    ]
    fit(tmp_path / "prior", *prior, configs=("prior_demo.yaml",))
    evaluate = [*prior, "--ckpt_path=last", "--trainer.limit_test_batches=2"]
    fit(tmp_path / "prior", *evaluate, sub="test", configs=("prior_demo.yaml",))
    before = json.loads((tmp_path / "prior" / "evaluation.json").read_text())
    assert before["autoencoder"]["path"] == str(ae_ckpt.resolve()) and before["autoencoder"]["global_step"] == 2
    assert before["prior"]["path"].endswith("last.ckpt") and before["prior"]["global_step"] == 2
    shutil.rmtree(ae_ckpt.parent)  # the auto-encoder checkpoint is gone: the prior checkpoint holds the network
    fit(tmp_path / "prior", *evaluate, sub="test", configs=("prior_demo.yaml",))
    after = json.loads((tmp_path / "prior" / "evaluation.json").read_text())
    assert after["figures"] == before["figures"] and after["num_images"] == before["num_images"] == 16
    assert all(math.isfinite(v) for v in after["figures"].values())


# -- optimizer and schedule overrides -------------------------------------------------------------------


def _optimizer(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """The optimizer a one-step fit used: its class in the saved config and its param group in the checkpoint."""
    fit(tmp_path, "--trainer.max_steps=1", "--resume.every_n_train_steps=1", *extra)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    group = torch.load(tmp_path / "checkpoints" / "last-step.ckpt", weights_only=True)["optimizer_states"][0][
        "param_groups"
    ][0]
    return config["model"]["init_args"]["optimizer"]["class_path"], group


@pytest.mark.parametrize(
    "overrides, kind, lr",
    [
        ([], torch.optim.Adam, 2e-4),  # the paper's setting, explicit in base.yaml
        (["--model.init_args.optimizer.init_args.lr=1e-3"], torch.optim.Adam, 1e-3),
        (["--model.init_args.optimizer=Adam"], torch.optim.Adam, 2e-4),  # same class: keeps base.yaml's lr
        (["--model.init_args.optimizer=SGD", "--model.init_args.optimizer.init_args.lr=0.1"], torch.optim.SGD, 0.1),
    ],
)
def test_optimizer_overrides(tmp_path, overrides, kind, lr):
    class_path, group = _optimizer(tmp_path, *overrides)
    assert class_path == f"torch.optim.{kind.__name__}" and group["lr"] == pytest.approx(lr)
    assert ("betas" in group) == (kind is torch.optim.Adam)  # the optimizer that ran, not only the config


def test_warmup_cosine_factors_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(opt, warmup_steps=3, total_steps=7, final_lr_fraction=0.1)
    assert [schedule.factor(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    # cosine over steps 3..7: progress 0, 1/4, 1/2, 3/4, 1
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1.0, 1.0)]
    assert [schedule.factor(s) for s in range(3, 9)] == pytest.approx(expected)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_lr_schedule_is_logged_every_step(tmp_path):
    schedule = [
        "--model.init_args.lr_scheduler=lightning_dq.training.schedules.WarmupCosine",
        "--model.init_args.lr_scheduler.warmup_steps=3",
        "--model.init_args.lr_scheduler.total_steps=8",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
    ]
    fit(tmp_path, *schedule)
    logged = {int(r["step"]): r["train/lr"] for r in rows(tmp_path) if "train/lr" in r}
    assert [logged[s] for s in range(4)] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4])
    assert logged[7] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
