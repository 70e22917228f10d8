"""`lightning-dq encode`, `compress` and `decompress` through the real CLI: code files equal to the auto-encoder's
codes, a prior trained on them (and refused on another auto-encoder's), files that round-trip to the same PNG pixels,
and one-line errors that leave no partial output."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dq.cli import main
from lightning_dq.data import ImageDataModule
from lightning_dq.training.modules import read_autoencoder
from tests.helpers import config_args

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--trainer.enable_model_summary=false", "--trainer.logger=false", "--image_logger.every_n_epochs=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two debug auto-encoders (seeds 0 and 1) and the codes of the first, written by `lightning-dq encode`."""
    root = tmp_path_factory.mktemp("codec")
    for seed in (0, 1):
        args = [*config_args("base", "debug"), *QUIET, f"--trainer.default_root_dir={root / f'ae{seed}'}"]
        main(["fit", *args, f"--seed_everything={seed}", "--trainer.max_epochs=1"])
    main(["encode", "--ckpt", str(root / "ae0" / "checkpoints" / "last.ckpt"), *config_args("base", "debug"),
          "--out", str(root / "codes")])  # fmt: skip
    return root


def test_encode_writes_the_codes_of_every_split_as_the_net_computes_them(trained):
    net = read_autoencoder(trained / "ae0" / "checkpoints" / "last.ckpt")[0].eval()
    dm = ImageDataModule("synthetic", batch_size=8, num_workers=0, val_size=64, native_resolution=64)  # debug.yaml
    dm.setup("fit")
    for split, count in (("train", 448), ("val", 64)):
        record = json.loads((trained / "codes" / f"{split}.json").read_text())
        assert (record["split"], record["images"], record["resolution"]) == (split, count, 32)
        assert record["code_shapes"] == [[2, 2, 5, 32], [4, 4, 5, 32], [8, 8, 5, 32]] and record["global_step"] == 4
        codes = np.load(trained / "codes" / f"{split}.npy")
        assert codes.dtype == np.uint8 and codes.shape == (count, 420)  # K = 32 fits a byte; 84 positions x M=5
        # the split in its own order, in the command's first batch (a convolution's last bits depend on the batch)
        images = getattr(dm, f"{split}_dataloader")().dataset[list(range(min(count, 256)))]
        assert np.array_equal(codes[: len(images)], net.geometry.flatten(net.encode(images)).numpy())


def test_a_prior_trains_on_the_codes_and_refuses_another_auto_encoders(trained, capsys):
    prior = [*config_args("base", "debug", "prior_demo"), *QUIET, "--trainer.max_epochs=1"]
    prior += [
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        f"--data.init_args.codes={trained / 'codes'}",
    ]
    main(["fit", *prior, f"--trainer.default_root_dir={trained / 'prior'}",
          f"--model.init_args.autoencoder_ckpt={trained / 'ae0' / 'checkpoints' / 'last.ckpt'}"])  # fmt: skip
    state = torch.load(trained / "prior" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *prior, f"--trainer.default_root_dir={trained / 'prior1'}",
              f"--model.init_args.autoencoder_ckpt={trained / 'ae1' / 'checkpoints' / 'last.ckpt'}"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(
        r"^lightning-dq: error: the codes in .*codes were written by the auto-encoder of .*ae0.*: encode", err, re.M
    )


def test_compress_decompress_cli_round_trip_and_one_line_errors(trained, tmp_path, capsys):
    ckpt = str(trained / "ae0" / "checkpoints" / "last.ckpt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    main(
        ["compress", "--ckpt", ckpt, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "x.ldq")]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"bits/dim coded ([\d.]+) estimated ([\d.]+) \(2 images\)", last)
    assert match and abs(float(match[1]) - float(match[2])) < 0.1 * float(match[2])
    main(["decompress", str(tmp_path / "x.ldq"), "--out", str(tmp_path / "out")])
    for name in ("a", "b"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), np.asarray(Image.open(tmp_path / f"{name}.png"))
        )
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "damaged.ldq").write_bytes((tmp_path / "x.ldq").read_bytes()[:-1])
    other = str(trained / "ae1" / "checkpoints" / "last.ckpt")
    compress_ = ["compress", "--ckpt", ckpt]
    cases = [
        ([*compress_, str(tmp_path / "grey.png"), "--out", str(tmp_path / "g.ldq")], "grey.png is a L image, not RGB"),
        (
            [*compress_, str(tmp_path / "none.png"), "--out", str(tmp_path / "n.ldq")],
            "cannot read the image .*none.png",
        ),
        (["decompress", str(tmp_path / "damaged.ldq"), "--out", str(tmp_path / "d")], "damaged.ldq is truncated"),
        (["decompress", str(tmp_path / "a.png"), "--out", str(tmp_path / "d")], "a.png is not a lightning-dq"),
        (["decompress", str(tmp_path / "x.ldq"), "--ckpt", other, "--out", str(tmp_path / "d")], "other networks"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and re.search(f"^lightning-dq: error: .*{message}", capsys.readouterr().err, re.M)
    assert not (tmp_path / "g.ldq").exists() and not (tmp_path / "n.ldq").exists() and not (tmp_path / "d").exists()
