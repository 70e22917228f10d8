"""The dataset configs as `make train-*` runs them (base.yaml + cifar10/imagenet32/imagenet64.yaml, their data
sections untouched) on small files in the real on-disk formats, with only the network shrunk to the debug
net; a bf16-mixed CPU fit through the CLI; the package's public API and version."""

from __future__ import annotations

import configparser
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

import lightning_dq
from lightning_dq.cli import build_cli, main
from lightning_dq.data.datamodule import TITLES
from lightning_dq.nn.codebook import Codebook
from lightning_dq.reporting.record import RunRecord
from tests.helpers import REPO, config_args, debug_net_args, images, write_cifar, write_imagenet

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the fixture files are not the official CIFAR-10 files: their md5 warning is expected
    pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files"),
]


def run_args(run: Path, data: Path) -> list[str]:
    """What a test changes in a dataset config: where the run and the data are, the debug net, CPU, no worker
    processes, the metric record as the only logger (no W&B), no image grids (tests/test_callbacks.py)."""
    return [
        f"--trainer.default_root_dir={run}",
        f"--data.init_args.root={data}",
        *debug_net_args(),
        "--trainer.accelerator=cpu",
        "--data.init_args.num_workers=0",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning_dq.reporting.record.RunRecord",
        f"--trainer.logger.init_args.save_dir={run}",
        "--image_logger.every_n_epochs=0",
    ]


def evaluation(run: Path) -> dict:
    return json.loads((run / "evaluation.json").read_text())


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet32"])
def test_32px_dataset_configs_fit_and_test_on_real_format_files(dataset, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    test = images(6, 32, 99)
    if dataset == "cifar10":
        pool = [images(4, 32, seed) for seed in range(5)]
        write_cifar(data, pool, test)  # data_batch_1..5 + test_batch
    else:
        pool = [images(2, 32, seed) for seed in range(10)]
        write_imagenet(data, 32, pool, test, official=False)  # train_data_batch_1..10.npz, val_data.npz
    pool = np.concatenate(pool)
    args = [*config_args("base", dataset), *run_args(run, data), "--data.init_args.val_size=4"]
    cli = build_cli(["fit", *args, "--trainer.fast_dev_run=1"])
    dm = cli.datamodule
    # the data section of the dataset config is what ran
    assert (dm.dataset, dm.batch_size, dm.resolution) == (dataset, 128, 32)
    assert dm.data_description.startswith(f"{TITLES[dataset]} from {data}")
    assert f"{len(pool) - 4} train, 4 val" in dm.data_description
    assert cli.trainer.global_step == 1 and math.isfinite(float(cli.trainer.callback_metrics["val/bpd_decoder"]))
    main(["test", *args, "--trainer.fast_dev_run=1"])  # one batch of 128: the whole test split of the fixture
    report = evaluation(run)
    assert (report["num_images"], report["split_size"], report["whole_split"]) == (len(test), len(test), True)
    assert report["data"].startswith(TITLES[dataset]) and report["resolution"] == 32
    assert all(math.isfinite(report["figures"][k]) for k in ("A bpd_decoder", "B bpd_uniform", "mse"))


def test_imagenet64_config_trains_at_32_then_64_and_tests_at_64(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    val = images(3, 64, 99)
    write_imagenet(
        data, 64, [images(2, 64, seed) for seed in range(10)], val, official=True
    )  # Imagenet64_train_part1_npz/...
    # the config's schedule {0: 32, 10: 64}, with the 64x64 stage from epoch 1
    args = [
        *config_args("base", "imagenet64"),
        *run_args(run, data),
        "--data.init_args.val_size=4",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--resolution_schedule.milestones={0: 32, 1: 64}",
    ]
    main(["fit", *args, "--trainer.max_epochs=2"])
    rows = RunRecord(str(run)).read()
    trained = {int(r["epoch"]): int(r["train/resolution_epoch"]) for r in rows if "train/resolution_epoch" in r}
    validated = {int(r["epoch"]): int(r["val/resolution"]) for r in rows if "val/resolution" in r}
    assert trained == validated == {0: 32, 1: 64}
    sized = {int(r["epoch"]): k for r in rows for k in r if k.startswith("val/bpd_decoder")}
    assert sized == {0: "val/bpd_decoder_32px", 1: "val/bpd_decoder_64px"}  # one curve per size
    best = [p.name for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1 and best[0].startswith("epoch=1-")  # ranked among 64x64 epochs only
    main(["test", *args, "--ckpt_path=last"])
    report = evaluation(run)
    assert report["resolution"] == 64 and report["num_images"] == len(val) and report["whole_split"]


def test_bf16_mixed_cpu_fit_through_the_cli(tmp_path):
    cli = build_cli(
        [
            "fit",
            *config_args("base", "debug"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_model_summary=false",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--image_logger.every_n_epochs=0",
        ]
    )
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed" and plugin.device == "cpu"
    rows = RunRecord(str(tmp_path)).read()
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    val = [r["val/bpd_decoder"] for r in rows if "val/bpd_decoder" in r]
    assert len(val) == 1 and math.isfinite(val[0]) and 0 < val[0] < 16
    # the quantizer keeps fp32 state under autocast; weights stay fp32 (mixed precision)
    codebooks = [m for m in cli.model.modules() if isinstance(m, Codebook)]
    assert len(codebooks) == 3 and all(cb.embed.dtype == torch.float32 for cb in codebooks)
    assert all(cb.initialized for cb in codebooks) and all(p.dtype == torch.float32 for p in cli.model.parameters())


# --- the package ---------------------------------------------------------------------------------------------


def test_public_api_and_version():
    expected = {"DepthwiseQuantizer", "Codebook", "CodeGeometry", "HierarchicalAutoEncoder", "CodePrior"}
    expected |= {"AutoEncoderModule", "PriorModule", "ImageDataModule", "__version__"}
    assert set(lightning_dq.__all__) == expected
    for name in expected - {"__version__"}:  # every name resolves, to the class of that name
        assert getattr(lightning_dq, name).__name__ == name
    from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder
    from lightning_dq.nn.quantizer import DepthwiseQuantizer

    assert lightning_dq.DepthwiseQuantizer is DepthwiseQuantizer
    assert lightning_dq.HierarchicalAutoEncoder is HierarchicalAutoEncoder
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert lightning_dq.__version__ == setup["metadata"]["version"]
    with pytest.raises(AttributeError, match="lightning_dq.*NoSuchThing"):
        lightning_dq.NoSuchThing  # noqa: B018


def test_quantizer_is_a_one_line_import_without_lightning():
    script = (
        "import sys\nfrom lightning_dq import DepthwiseQuantizer\nimport torch\n"
        "q = DepthwiseQuantizer(in_channels=8, num_codebooks=2, codebook_size=4, code_dim=3)\n"
        "out = q(torch.randn(2, 8, 3, 3))\n"
        "print(tuple(out.codes.shape), 'lightning' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[-2] == "(2, 2, 3, 3) False"  # networks need no Lightning
