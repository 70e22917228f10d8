"""lightning_dq.data.cifar10: pixel-exact round trips of the official python format (Python 2 and 3 pickles),
the real files in ../shared/data when present, md5 of non-official files, and bad files named in the error."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dq.data import ImageDataModule
from lightning_dq.errors import DataError, DataNotFoundError
from tests.helpers import SHARED_DATA, flip_bytes, images, py2_pickle, served, truncate, write_cifar

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


LOSSLESS20 = SHARED_DATA / "cifar10-lossless20"


JPEG75 = SHARED_DATA / "cifar10-jpeg75"


@pytest.mark.parametrize("keys", ["bytes", "str", "py2"])
def test_cifar10_round_trip_is_pixel_exact(tmp_path, keys):
    train = [images(3, 32, seed) for seed in range(5)]
    test = images(4, 32, 7)
    write_cifar(tmp_path, train, test, keys)
    dm = ImageDataModule("cifar10", root=str(tmp_path), batch_size=3, num_workers=0, val_size=5)
    dm.setup()
    pool = np.concatenate(train)  # (15, 3, 32, 32)
    x_train, rows_train = served(dm, "train")
    x_val, rows_val = served(dm, "val")
    assert len(rows_val) == 5 and sorted([*rows_train, *rows_val]) == list(range(15))
    np.testing.assert_array_equal(x_train.numpy(), pool[rows_train])
    np.testing.assert_array_equal(x_val.numpy(), pool[rows_val])
    batches = list(dm.test_dataloader())  # every test image once, in order: 3 + 1
    assert [b.shape for b in batches] == [(3, 3, 32, 32), (1, 3, 32, 32)] and batches[0].dtype == torch.uint8
    np.testing.assert_array_equal(torch.cat(batches).numpy(), test)
    assert "cifar10 (official python format)" in dm.data_description and "12 test" not in dm.data_description


def test_py2_fixture_needs_the_encoding_argument(tmp_path):
    data = images(2, 32, 3).reshape(2, 3072)
    raw = py2_pickle(data, [1, 2])
    with pytest.raises(UnicodeDecodeError):  # what a reader that forgets `encoding=` hits on the real files
        pickle.loads(raw)
    assert pickle.loads(raw, encoding="latin1")["labels"] == [1, 2]


@pytest.mark.skipif(not LOSSLESS20.is_dir(), reason="../shared/data/cifar10-lossless20 not present")
def test_real_cifar10_test_images_load_pixel_exactly():
    dm = ImageDataModule("cifar10", root=str(LOSSLESS20), batch_size=64, num_workers=0)
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())  # (20, 3, 32, 32)
    with open(LOSSLESS20 / "cifar-10-batches-py" / "test_batch", "rb") as f:
        record = pickle.load(f, encoding="latin1")
    expected = np.frombuffer(record["data"].tobytes(), np.uint8).reshape(20, 3, 32, 32)
    np.testing.assert_array_equal(batch.numpy(), expected)
    assert batch[0, 0, 0, :9].tolist() == [158, 159, 165, 166, 160, 156, 162, 159, 158]  # image 0, red row 0
    assert record["labels"][:8] == [3, 8, 8, 0, 6, 6, 1, 6]


@pytest.mark.skipif(not JPEG75.is_dir(), reason="../shared/data/cifar10-jpeg75 not present")
def test_non_official_md5_warns_once_and_still_loads(tmp_path):
    # a private copy of the real test_batch: no earlier test in this process can have warned about it yet
    (tmp_path / "cifar-10-batches-py").mkdir()
    shutil.copy(JPEG75 / "cifar-10-batches-py" / "test_batch", tmp_path / "cifar-10-batches-py")
    dm = ImageDataModule("cifar10", root=str(tmp_path), num_workers=0)
    with pytest.warns(UserWarning, match=r"md5 of test_batch differs from the official"):
        dm.setup("test")
    assert "10000 test" in dm.data_description and "md5" in dm.data_description
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageDataModule("cifar10", root=str(tmp_path), num_workers=0).setup("test")
    assert not [w for w in caught if "md5" in str(w.message)]


def test_fallback_to_sample_when_cifar10_is_missing(tmp_path):
    dm = ImageDataModule("cifar10", root=str(tmp_path / "no"), batch_size=4, num_workers=0, fallback="sample")
    with pytest.warns(UserWarning, match=r"DATA FALLBACK: no CIFAR-10 under .*no \(download=False\).*sample"):
        dm.setup("fit")
    assert dm.data_description.startswith("sample: scikit-image photos") and "FALLBACK" in dm.data_description
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8


pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


def cifar_test_split(root: Path) -> None:
    ImageDataModule("cifar10", root=str(root), num_workers=0).setup("test")


def test_cifar10_missing_folder_or_file(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no CIFAR-10 under .*set download=True .*batches-py"):
        ImageDataModule("cifar10", root=str(tmp_path), num_workers=0).setup("fit")
    folder = write_cifar(tmp_path, [images(1, 32, i) for i in range(5)], images(1, 32, 9))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match=r"data_batch_3 is missing \(1 of data_batch_1.*extract the official"):
        ImageDataModule("cifar10", root=str(tmp_path), num_workers=0).setup("fit")


def test_cifar10_binary_version_is_named(tmp_path):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(bytes(3073))  # 1 label + 3072 pixels
    with pytest.raises(DataError, match=r"cifar-10-batches-bin is not the CIFAR-10 python version.*cifar-10-python"):
        cifar_test_split(tmp_path)


def binary_record_file(path: Path) -> None:
    """The binary version's record layout (label byte + 3072 pixels) under the python version's file name."""
    path.write_bytes(b"".join(bytes([3]) + images(1, 32, i).tobytes() for i in range(2)))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (truncate, r"test_batch is not a readable CIFAR-10 python batch \(.*\); extract the official"),
        (lambda p: flip_bytes(p, 0.0, 4), r"test_batch is not a readable CIFAR-10 python batch \(UnpicklingError"),
        (binary_record_file, r"test_batch is not a readable CIFAR-10 python batch"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3071), "u1")})), r"uint8 \(2, 3071\)"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), "f4")})), r"float32 \(2, 3072\)"),
        (lambda p: p.write_bytes(pickle.dumps({b"labels": [1]})), r"test_batch: no key 'data' \(keys: labels\)"),
        (lambda p: p.write_bytes(pickle.dumps([1, 2])), r"test_batch: expected a pickled dict"),
    ],
    ids=["truncated", "corrupt-header", "binary-format", "short-rows", "float-pixels", "no-data-key", "not-a-dict"],
)
def test_bad_cifar10_batch_names_the_file(tmp_path, damage, match):
    folder = write_cifar(tmp_path, [], images(2, 32, 0))
    damage(folder / "test_batch")
    with pytest.raises(DataError, match=match):
        cifar_test_split(tmp_path)


class RunsCode:
    """Unpickling this calls os.mkdir(path): what a malicious 'dataset file' could do with any function."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_pickle_cannot_run_code(tmp_path, protocol):
    folder = write_cifar(tmp_path, [], images(2, 32, 0))
    marker = tmp_path / "code_ran"
    record = {b"data": np.zeros((2, 3072), np.uint8), b"labels": RunsCode(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(record, protocol=protocol))
    with pytest.raises(DataError, match=r"test_batch is not a readable .*refused to load posix.mkdir"):
        cifar_test_split(tmp_path)
    assert not marker.exists()
    pickle.loads((folder / "test_batch").read_bytes())  # what a plain pickle.load would have done
    assert marker.is_dir()


def test_cifar10_python3_pickles_of_every_protocol_still_load(tmp_path):
    folder = write_cifar(tmp_path, [], images(2, 32, 0))
    batch = images(3, 32, 1)
    for protocol in (2, 3, 4, 5):  # numpy array globals differ by protocol: _reconstruct, _frombuffer
        record = {b"data": batch.reshape(3, 3072), b"labels": [np.int64(1), 2, 3], "batch_label": "x"}
        (folder / "test_batch").write_bytes(pickle.dumps(record, protocol=protocol))
        dm = ImageDataModule("cifar10", root=str(tmp_path), num_workers=0)
        dm.setup("test")
        np.testing.assert_array_equal(dm.test_dataloader().dataset.images, batch)


def test_prepare_data_without_download_reads_and_writes_nothing(tmp_path):
    """What every fit runs first: CIFAR-10 present and download=False needs no preparation (and is no ImageNet)."""
    write_cifar(tmp_path, [images(2, 32, seed) for seed in range(5)], images(2, 32, 9))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    dm = ImageDataModule("cifar10", root=str(tmp_path), num_workers=0, val_size=2)
    dm.prepare_data()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    dm.setup("fit")
    assert dm.data_description.startswith("cifar10 (official python format)")
