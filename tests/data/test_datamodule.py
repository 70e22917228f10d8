"""lightning_dq.data.datamodule: config errors, hflip on train only, resolutions and fixed native sizes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lightning_dq.data import ImageDataModule
from lightning_dq.errors import ConfigError, UserError
from tests.helpers import SHARED_DATA, served

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


LOSSLESS20 = SHARED_DATA / "cifar10-lossless20"


JPEG75 = SHARED_DATA / "cifar10-jpeg75"


def test_resolution_errors_and_fixed_native_sizes():
    with pytest.raises(ValueError, match=r"resolution 48 cannot be served .*stored at 64x64"):
        ImageDataModule("synthetic", resolution=48, native_resolution=64)
    dm = ImageDataModule("synthetic", resolution=32, native_resolution=64)
    with pytest.raises(ValueError, match=r"resolution 128 cannot be served"):
        dm.resolution = 128
    assert dm.resolution == 32 and dm.native_resolution == 64
    with pytest.raises(ValueError, match=r"native_resolution=64: cifar10 is stored at 32"):
        ImageDataModule("cifar10", native_resolution=64)
    assert ImageDataModule("imagenet64", resolution=16).native_resolution == 64


def test_hflip_only_flips_training_images():
    dm = ImageDataModule("synthetic", batch_size=64, num_workers=0, hflip=True, synthetic_train=64, val_size=0)
    dm.setup()
    torch.manual_seed(0)
    x, rows = served(dm, "train")
    stored = torch.from_numpy(dm.train_dataloader().dataset.images[rows])
    flipped = (x == stored.flip(-1)).flatten(1).all(1)
    assert ((x == stored).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 64
    batch = torch.stack(dm.train_dataloader().dataset.__getitems__(list(range(64))))  # the batched path
    flipped = (batch == stored.flip(-1)).flatten(1).all(1)
    assert ((batch == stored).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 64
    test = torch.cat(list(dm.test_dataloader()))
    np.testing.assert_array_equal(test.numpy(), dm.test_dataloader().dataset.images)


pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"data.init_args.batch_size=0: must be an integer >= 1"),
        ({"batch_size": -8}, r"data.init_args.batch_size=-8: must be an integer >= 1"),
        ({"dataset": "cifar10", "resolution": 0}, r"resolution 0 cannot be served from .*32x32.*\[32, 16, 8, 4, 2"),
        ({"dataset": "imagenet64", "resolution": -32}, r"resolution -32 cannot be served from images stored at 64x64"),
        ({"resolution": 0}, r"data.init_args.resolution=0: must be an integer >= 1"),
        ({"resolution": -32}, r"data.init_args.resolution=-32: must be an integer >= 1"),
        ({"native_resolution": 0}, r"data.init_args.native_resolution=0: must be an integer >= 1"),
        ({"native_resolution": -64}, r"data.init_args.native_resolution=-64: must be an integer >= 1"),
        ({"val_size": -1}, r"data.init_args.val_size=-1: must be a count >= 0 \(int\) or a fraction in \[0, 1\)"),
        ({"val_size": 1.0}, r"data.init_args.val_size=1.0: must be a count"),
        ({"num_workers": -1}, r"data.init_args.num_workers=-1: must be an integer >= 0"),
        ({"synthetic_train": 0}, r"data.init_args.synthetic_train=0: must be an integer >= 1"),
        ({"synthetic_test": -3}, r"data.init_args.synthetic_test=-3: must be an integer >= 1"),
        ({"dataset": "cifar10", "native_resolution": 64}, r"native_resolution=64: cifar10 is stored at 32"),
        ({"dataset": "folder", "fallback": "sample"}, r"fallback='sample': 'sample' is only for dataset cifar10"),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        ImageDataModule(**{"dataset": "synthetic", **kwargs})
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_val_size_larger_than_the_pool():
    with pytest.raises(ConfigError, match=r"val_size=5 holds out 5 of 5 train images; leave some"):
        ImageDataModule("synthetic", synthetic_train=5, val_size=5, num_workers=0).setup("fit")
    dm = ImageDataModule("synthetic", resolution=32, native_resolution=64)
    with pytest.raises(ConfigError, match=r"resolution 128 cannot be served"):
        dm.resolution = 128


def test_errors_are_the_builtin_types_callers_catch(tmp_path):
    with pytest.raises(FileNotFoundError):  # DataNotFoundError
        ImageDataModule("cifar10", root=str(tmp_path), num_workers=0).setup("test")
    with pytest.raises(ValueError):  # ConfigError
        ImageDataModule("synthetic", batch_size=0)
    assert sys.modules["lightning_dq.errors"].DataError.__mro__[1:3] == (UserError, ValueError)
