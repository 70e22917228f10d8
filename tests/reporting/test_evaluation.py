"""End-to-end likelihood evaluation on real photos: auto-encoder, then prior, then `test` through the real
CLI. Figure C (learned prior) must beat B (uniform codes) and can never beat A (decoder only); every test
image is counted exactly once when the batch size does not divide the split."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_dq.cli import main
from lightning_dq.data import ImageDataModule
from lightning_dq.training.modules import PriorModule
from tests.helpers import CONFIGS, REPO

LAYERS = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "debug.yaml")]
# the embedded real photos (scikit-image), 32x32 patches: test split = every patch of one held-out photo
SAMPLE = [
    "--data.init_args.dataset=sample",
    "--data.init_args.native_resolution=32",
    "--trainer.enable_model_summary=false",
]
TEST_BATCH = 50


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory) -> Path:
    """A debug-size auto-encoder trained on the sample photos, then a small prior on its codes, then `test`."""
    ae_dir, prior_dir = tmp_path_factory.mktemp("ae"), tmp_path_factory.mktemp("prior")
    main(
        [
            "fit",
            *LAYERS,
            *SAMPLE,
            f"--trainer.default_root_dir={ae_dir}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=40",
            "--data.init_args.batch_size=16",
        ]
    )
    prior = [
        *LAYERS,
        "--config",
        str(CONFIGS / "prior_cifar10.yaml"),
        *SAMPLE,
        f"--trainer.default_root_dir={prior_dir}",
        f"--model.init_args.autoencoder_ckpt={ae_dir / 'checkpoints' / 'last.ckpt'}",
        "--model.init_args.prior.init_args.dim=32",
        "--model.init_args.prior.init_args.depth=2",
        "--model.init_args.optimizer=torch.optim.Adam",
        "--model.init_args.optimizer.init_args.lr=3e-3",
        "--image_logger.every_n_epochs=0",
    ]
    main(
        ["fit", *prior, "--trainer.max_epochs=1", "--trainer.limit_train_batches=60", "--data.init_args.batch_size=16"]
    )
    ckpt = prior_dir / "checkpoints" / "last.ckpt"
    main(
        [
            "test",
            *prior,
            f"--ckpt_path={ckpt}",
            "--trainer.limit_test_batches=1.0",
            f"--data.init_args.batch_size={TEST_BATCH}",
        ]
    )
    return prior_dir


def test_every_test_image_is_counted_exactly_once(prior_run):
    data = ImageDataModule(dataset="sample", resolution=32, batch_size=TEST_BATCH, num_workers=0)
    data.setup("test")
    size = len(data.test_dataloader().dataset)
    assert size % TEST_BATCH != 0  # the last batch is partial
    report = json.loads((prior_run / "evaluation.json").read_text())
    assert report["num_images"] == report["split_size"] == size and report["whole_split"]
    assert report["data"].startswith("sample")


def test_learned_prior_beats_uniform_codes_and_never_beats_the_decoder(prior_run):
    figures = json.loads((prior_run / "evaluation.json").read_text())["figures"]
    a, b, c = figures["A bpd_decoder"], figures["B bpd_uniform"], figures["C bpd_prior"]
    assert all(math.isfinite(v) for v in (a, b, c))
    assert a <= c < b
    assert b - a == pytest.approx(0.68359375, abs=1e-5)  # README code structure at 32x32: the uniform cost
    assert (prior_run / "evaluation.md").read_text().count("\n") == 3  # header, rule, one row


def test_a_b_c_recomputed_image_by_image_by_hand(prior_run):
    """evaluation.json against A, B, C recomputed here from the checkpoint, image by image, from the decoder's NLL and
    the prior's log_prob alone: a code cost divided by H*W instead of 3*H*W, or a wrong uniform cost, would show."""
    module = PriorModule.load_from_checkpoint(prior_run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    data = ImageDataModule(dataset="sample", resolution=32, batch_size=TEST_BATCH, num_workers=0)
    data.setup("test")
    a, b, c = [], [], []
    with torch.no_grad():
        for x in data.test_dataloader():  # (B, 3, 32, 32) uint8
            out = module.autoencoder(x)
            dims = 3 * 32 * 32
            nll_bits = out.recon.double() * 3 * 32 * 32 / math.log(2)  # bits per image
            code_bits = module.prior.log_prob(out.codes).double() / math.log(2)  # log2 p(z) per image
            uniform = sum(h * h * 5 * math.log2(32) for h in (2, 4, 8))  # README code structure: M=5, K=32
            a += (nll_bits / dims).tolist()
            b += ((nll_bits + uniform) / dims).tolist()
            c += ((nll_bits - code_bits) / dims).tolist()
    figures = json.loads((prior_run / "evaluation.json").read_text())["figures"]
    assert figures["A bpd_decoder"] == pytest.approx(sum(a) / len(a), abs=2e-5)
    assert figures["B bpd_uniform"] == pytest.approx(sum(b) / len(b), abs=2e-5)
    assert figures["C bpd_prior"] == pytest.approx(sum(c) / len(c), abs=2e-5)


def evaluate_prior(prior_run: Path, out: Path, *extra: str) -> None:
    """`lightning-dq test` of the shared prior run's last checkpoint, written to `out`."""
    args = [*LAYERS, "--config", str(CONFIGS / "prior_cifar10.yaml"), *SAMPLE, f"--trainer.default_root_dir={out}"]
    args += ["--model.init_args.prior.init_args.dim=32", "--model.init_args.prior.init_args.depth=2"]
    main(["test", *args, f"--ckpt_path={prior_run / 'checkpoints' / 'last.ckpt'}", *extra])


def test_an_evaluation_over_part_of_the_split_is_marked_partial(prior_run, tmp_path):
    evaluate_prior(prior_run, tmp_path, "--trainer.limit_test_batches=1", "--data.init_args.batch_size=8")
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert (report["num_images"], report["whole_split"]) == (8, False) and report["split_size"] > 8
    assert f"| 8 of {report['split_size']} (PARTIAL) |" in (tmp_path / "evaluation.md").read_text()


def test_test_can_code_its_images_and_report_the_bits_written(prior_run, tmp_path):
    evaluate_prior(prior_run, tmp_path, "--evaluation_report.coded_images=6", "--trainer.logger=false")
    report = json.loads((tmp_path / "evaluation.json").read_text())
    coded = report["coded"]
    assert coded["images"] == 6 and coded["bytes"] * 8 == pytest.approx(coded["bpd_coded"] * 6 * 3 * 32 * 32)
    assert abs(coded["stream_bits"] / (6 * 3 * 32 * 32) - coded["bpd_estimated"]) < 0.01 * coded["bpd_estimated"]
    assert report["figures"]["C coded"] == coded["bpd_coded"]
    assert "C coded (bits written)" in (tmp_path / "evaluation.md").read_text()
    # the bytes counted are a file on disk, and `lightning-dq decompress` gives the first 6 test images back
    assert Path(coded["file"]).stat().st_size == coded["bytes"]
    main(["decompress", coded["file"], "--out", str(tmp_path / "decoded")])
    data = ImageDataModule(**yaml.safe_load((tmp_path / "config_test.yaml").read_text())["data"]["init_args"])
    data.setup("test")
    for i in range(6):
        decoded = np.asarray(Image.open(tmp_path / "decoded" / f"test_{i:05d}.png")).transpose(2, 0, 1)
        assert torch.equal(torch.from_numpy(decoded.copy()), data.test_dataloader().dataset[i])


def _experiment(name: str):
    """Import a script from experiments/ (a folder of scripts, not a package)."""
    path = REPO / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.xdist_group("sockets")  # W&B talks to its service over a local socket
def test_sample_script_writes_a_png_grid_and_an_offline_wandb_run(prior_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "grid.png"
    runs_before = set((prior_run / "wandb").glob("offline-run-*"))
    (prior_run / "wandb_run_id").write_text("abc12345\n")  # as a fit with W&B leaves it (the debug config has none)
    sample = _experiment("sample").sample
    path = sample(str(prior_run / "checkpoints" / "last.ckpt"), num_images=4, out=str(out), wandb=True)
    assert path == out
    with Image.open(out) as image:  # 2x2 grid of 32x32 images with make_grid's 2-pixel padding
        assert image.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
        assert len(set(image.convert("L").getdata())) > 10  # decoded samples, not a blank image
    # the samples attach to the experiment's W&B run: same run id, in the run directory
    new_runs = set((prior_run / "wandb").glob("offline-run-*")) - runs_before
    assert [r.name.rsplit("-", 1)[1] for r in new_runs] == ["abc12345"]


def test_likelihood_table_lists_our_run_next_to_published_numbers(prior_run, tmp_path):
    out = tmp_path / "table.md"
    _experiment("likelihood_table").main([str(prior_run)], out=str(out))
    text = out.read_text()
    figures = json.loads((prior_run / "evaluation.json").read_text())["figures"]
    assert f"| {figures['C bpd_prior']:.3f} |" in text
    assert "VDVAE" in text and "[SECONDARY]" in text
    assert "arXiv:2203.08080" in text and "shared/docs" not in text  # primary sources, nothing outside the repo
    with pytest.raises(FileNotFoundError, match="evaluation.json"):
        _experiment("likelihood_table").main([str(tmp_path / "missing")], out=str(out))
