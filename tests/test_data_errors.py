"""Bad data input: every case ends in one `DataError`, `DataNotFoundError` or `ConfigError` naming the file or
key and what to do. Each test writes files in the real on-disk format, then damages them. Also: ImageNet
preparation (the cache in `cache_dir`, the `prepare` entry and its make target, the message on a run that
finds no or a stale cache). docs/reliability.md lists these cases with their messages."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer
from PIL import Image
from test_data import images, write_cifar, write_imagenet

from lightning_dq import prepare
from lightning_dq.data import ImageDataModule
from lightning_dq.errors import ConfigError, DataError, DataNotFoundError, UserError
from lightning_dq.formats import default_cache_dir, imagenet_cache

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")
REPO = Path(__file__).resolve().parents[1]


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def flip_bytes(path: Path, at: float, count: int = 16) -> None:
    """Invert `count` bytes starting at fraction `at` of the file (a damaged sector, a bad copy)."""
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    raw[start : start + count] = bytes(255 - b for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def flip_npz_pixels(path: Path) -> None:
    """Invert 16 bytes inside the pixels of the npz member data.npy (stored uncompressed, as np.savez does)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("data.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + 128 + info.compress_size // 2  # past the npy header
    raw[start : start + 16] = bytes(255 - b for b in raw[start : start + 16])
    path.write_bytes(bytes(raw))


# --- CIFAR-10 -------------------------------------------------------------------------------------------


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


# --- ImageNet npz -------------------------------------------------------------------------------------


@pytest.fixture
def imagenet32(tmp_path: Path) -> Path:
    """A flat ImageNet-32 npz fixture (10 train batches of 2, val of 2) in tmp_path."""
    write_imagenet(tmp_path, 32, [images(2, 32, i) for i in range(10)], images(2, 32, 10), official=False)
    return tmp_path


def prepare32(root: Path, cache_dir: Path | None = None) -> None:
    ImageDataModule("imagenet32", root=str(root), cache_dir=cache_dir and str(cache_dir)).prepare_data()


def test_imagenet_missing_files(tmp_path):
    expected = r"missing under .*nothing: all of them\. .*image-net.org/download-images.php.*data_batch_1\.\.10"
    with pytest.raises(DataNotFoundError, match=expected):
        prepare32(tmp_path / "nothing")
    write_imagenet(tmp_path, 32, [images(2, 32, i) for i in range(10)], images(2, 32, 10), official=False)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(DataNotFoundError, match=r"ImageNet-32 files missing under .*: train_data_batch_7.npz\. "):
        prepare32(tmp_path)


def object_array(path: Path) -> None:
    np.savez(path, data=np.array([images(1, 32, 0).reshape(-1)], dtype=object), labels=np.ones(1, int))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (truncate, r"train_data_batch_2.npz is not a readable npz file \(BadZipFile.*unzip it again"),
        (flip_npz_pixels, r"train_data_batch_2.npz is not a readable npz file \(BadZipFile: Bad CRC-32 for file 'data"),
        (lambda p: np.savez(p, pixels=images(2, 32, 0).reshape(2, -1)), r"no 'data' array .*keys: pixels"),
        (lambda p: np.savez(p, data=images(2, 64, 0).reshape(2, -1)), r"'data' must be uint8 of shape \(N, 3072\)"),
        (lambda p: np.savez(p, data=np.zeros((2, 3072), np.int64)), r"train_data_batch_2.npz: .*got int64"),
        (lambda p: np.savez(p, data=np.zeros((2, 3072), np.float32) + 0.5), r"got float32 \(2, 3072\)"),
        (object_array, r"train_data_batch_2.npz: 'data' must be uint8 .*got object"),
    ],
    ids=["truncated", "corrupt-pixels", "wrong-keys", "wrong-size", "int64", "float", "pickled-objects"],
)
def test_bad_imagenet_npz_names_the_file(imagenet32, damage, match):
    damage(imagenet32 / "train_data_batch_2.npz")
    with pytest.raises(DataError, match=match):
        prepare32(imagenet32)
    assert not list(default_cache_dir(imagenet32).glob("imagenet32_train*"))  # nothing half-written is left


def test_imagenet_found_twice(imagenet32):
    (imagenet32 / "Imagenet32_val_npz").mkdir()
    shutil.copy(imagenet32 / "val_data.npz", imagenet32 / "Imagenet32_val_npz")
    with pytest.raises(DataError, match=r"val_data.npz found twice .*; keep one"):
        prepare32(imagenet32)


def oord_images(n: int, side: int) -> np.ndarray:
    """(n, S, S, 3) interleaved RGB, as the van den Oord PNGs decode and as their conversions store them."""
    return images(n, side, 3).transpose(0, 2, 3, 1).copy()


def test_imagenet_van_den_oord_version_is_recognised(tmp_path):
    # PixelCNN++'s conversion of the 2016 PNG folders: one npz, keys trainx/testx, (N, 32, 32, 3), no labels
    np.savez(tmp_path / "imgnet_32x32.npz", trainx=oord_images(4, 32), testx=oord_images(2, 32))
    with pytest.raises(DataError, match=r"imgnet_32x32.npz looks like the van den Oord et al. \(2016, PixelRNN\)"
                                        r".*not comparable.*Downsampled ImageNet 32x32"):  # fmt: skip
        prepare32(tmp_path)
    # the same arrays under the npz version's file names: recognised by their keys, then by their layout
    write_imagenet(tmp_path, 32, [images(2, 32, i) for i in range(10)], images(2, 32, 10), official=False)
    np.savez(tmp_path / "val_data.npz", trainx=oord_images(2, 32))
    with pytest.raises(DataError, match=r"val_data.npz \(keys trainx\) looks like the van den Oord"):
        prepare32(tmp_path)
    np.savez(tmp_path / "val_data.npz", data=oord_images(2, 32), labels=np.ones(2, int))
    with pytest.raises(DataError, match=r"val_data.npz \('data' is uint8 \(2, 32, 32, 3\)\) looks like the van den"):
        prepare32(tmp_path)


def test_imagenet_van_den_oord_png_folders_are_recognised(tmp_path):
    (tmp_path / "train_64x64").mkdir()
    Image.fromarray(oord_images(1, 64)[0]).save(tmp_path / "train_64x64" / "00001.png")
    with pytest.raises(DataError, match=r"train_64x64 looks like the van den Oord .*dataset 'folder'"):
        ImageDataModule("imagenet64", root=str(tmp_path)).prepare_data()


# --- ImageNet preparation: the cache ----------------------------------------------------------------------


def test_run_without_cache_names_the_prepare_command(imagenet32, tmp_path):
    # what every DDP rank sees (prepare_data does not convert under DDP) and a run that skipped prepare_data
    command = rf"`make prepare-imagenet32 DATA_ROOT={imagenet32}`"
    with pytest.raises(DataError, match=r"no usable imagenet32 cache for the train split \(.*imagenet32_train.npy "
                                        rf"does not exist\)\. .*{command}"):  # fmt: skip
        ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0).setup("fit")
    cache_dir = tmp_path / "elsewhere"
    with pytest.raises(DataError, match=rf"make prepare-imagenet32 DATA_ROOT={imagenet32} CACHE_DIR={cache_dir}`"):
        ImageDataModule("imagenet32", root=str(imagenet32), cache_dir=str(cache_dir), num_workers=0).setup("test")


def test_ddp_prepare_data_does_not_convert(imagenet32):
    # under a 2-process Trainer, prepare_data (local rank 0, before a barrier) must not start a conversion that
    # can outlast the barrier: every rank then meets the missing cache in setup, with the command to run
    dm = ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0)
    dm.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # built, not launched
    dm.prepare_data()
    assert not default_cache_dir(imagenet32).exists()
    with pytest.raises(DataError, match=r"imagenet32_train.npy does not exist\). .*make prepare-imagenet32"):
        dm.setup("fit")


def test_stale_or_damaged_cache_is_named(imagenet32):
    prepare32(imagenet32)
    dm = ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0)
    dm.setup("test")  # current: no error
    cache = imagenet_cache(default_cache_dir(imagenet32), 32, "test")
    truncate(cache)
    with pytest.raises(DataError, match=r"imagenet32_test.npy is \d+ bytes, \d+ when written: truncated or damaged"):
        ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0).setup("test")
    cache.with_suffix(".json").write_text("{not json")
    with pytest.raises(DataError, match=r"its record .*imagenet32_test.json is missing or unreadable"):
        ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0).setup("test")
    prepare32(imagenet32)  # prepare_data redoes exactly what is stale
    ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0).setup("test")


def test_read_only_root_with_cache_dir(imagenet32, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    before = sorted(p.relative_to(imagenet32) for p in imagenet32.rglob("*"))
    imagenet32.chmod(0o555)  # read-only for ordinary users (root ignores it: the listing check below holds anyway)
    try:
        prepare32(imagenet32, cache_dir)
        dm = ImageDataModule("imagenet32", root=str(imagenet32), cache_dir=str(cache_dir), num_workers=0, val_size=2)
        dm.setup()
    finally:
        imagenet32.chmod(0o755)
    assert sorted(p.relative_to(imagenet32) for p in imagenet32.rglob("*")) == before  # nothing written in root
    assert np.load(imagenet_cache(cache_dir, 32, "train"), mmap_mode="r").shape == (20, 3, 32, 32)
    assert len(dm.val_dataloader().dataset) == 2
    assert "20 train images, not the full 1281167" in dm.data_description  # a partial copy is never hidden


def test_unwritable_cache_dir_says_to_set_cache_dir(imagenet32, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # mkdir under a file fails as a read-only mount does (root ignores chmod)
    with pytest.raises(DataError, match=r"cannot write the ImageNet-32 cache .*a_file/sub/imagenet32_train.npy "
                                        r"\((FileExistsError|NotADirectoryError).*set cache_dir"):  # fmt: skip
        prepare32(imagenet32, blocker / "sub")


def test_prepare_entry_converts_once_and_reports(imagenet32, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    prepare.main(["--dataset", "imagenet32", "--root", str(imagenet32), "--cache_dir", str(cache_dir)])
    out = capsys.readouterr().out
    assert f"{cache_dir / 'imagenet32_train.npy'}: 20 images 32x32" in out
    assert f"--data.init_args.cache_dir={cache_dir}" in out
    stamp = (cache_dir / "imagenet32_train.npy").stat().st_mtime_ns
    prepare.main(["--dataset", "imagenet32", "--root", str(imagenet32), "--cache_dir", str(cache_dir)])
    assert (cache_dir / "imagenet32_train.npy").stat().st_mtime_ns == stamp  # current: not rewritten
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "imagenet64", "--root", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ImageNet-64 files missing under") and "Traceback" not in err


def test_make_prepare_target(imagenet32, tmp_path):
    cache_dir = tmp_path / "made"
    run = subprocess.run(["make", "-s", "prepare-imagenet32", f"DATA_ROOT={imagenet32}", f"CACHE_DIR={cache_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert np.load(cache_dir / "imagenet32_test.npy", mmap_mode="r").shape == (2, 3, 32, 32)


# --- image folders ----------------------------------------------------------------------------------------


def folder_of_pngs(path: Path, n: int = 10, side: int = 8) -> Path:
    path.mkdir()
    for i in range(n):
        Image.fromarray(np.full((side, side, 3), i, np.uint8)).save(path / f"{i}.png")
    return path


def folder_setup(root: Path, resolution: int = 8, stage: str | None = None) -> ImageDataModule:
    dm = ImageDataModule("folder", root=str(root), resolution=resolution, val_size=1, num_workers=0)
    dm.setup(stage)
    return dm


def test_folder_truncated_image(tmp_path):
    bad = folder_of_pngs(tmp_path / "bad")
    raw = (bad / "3.png").read_bytes()
    (bad / "3.png").write_bytes(raw[: len(raw) - 20])  # truncated: IDAT end and IEND missing
    with pytest.raises(DataError, match=r"3.png is not a readable 8-bit PNG/JPEG .*replace or remove the file"):
        folder_setup(bad)


def test_folder_corrupt_image(tmp_path):
    bad = folder_of_pngs(tmp_path / "bad")
    Image.fromarray(images(1, 64, 0)[0].transpose(1, 2, 0)).save(bad / "4.png")  # mostly IDAT (pixel) bytes
    flip_bytes(bad / "4.png", 0.5, 8)  # inside the compressed pixel data: the chunk CRC no longer matches
    with pytest.raises(DataError, match=r"4.png is not a readable 8-bit PNG/JPEG \(SyntaxError: broken PNG file"):
        folder_setup(bad)


def test_folder_non_image_with_an_image_name(tmp_path):
    bad = folder_of_pngs(tmp_path / "bad")
    (bad / "5.png").write_text("this is a text file")
    with pytest.raises(DataError, match=r"5.png is not a readable 8-bit PNG/JPEG \(UnidentifiedImageError"):
        folder_setup(bad)


def test_folder_unsupported_image_format(tmp_path):
    bad = folder_of_pngs(tmp_path / "bad")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "extra.gif")
    with pytest.raises(DataError, match=r"extra.gif \(1 such files under .*\) is not PNG/JPEG: convert these"):
        folder_setup(bad)


def test_folder_other_files_are_reported_not_hidden(tmp_path):
    root = folder_of_pngs(tmp_path / "ok")
    (root / "README.txt").write_text("notes")
    with pytest.warns(UserWarning, match=r"1 non-image files under .*ok not used \(e.g. README.txt\)"):
        dm = folder_setup(root)
    assert "1 non-image files" in dm.data_description


def test_folder_missing_or_short(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no PNG/JPEG images .* found under .*empty"):
        folder_setup(tmp_path / "empty")
    with pytest.raises(DataNotFoundError, match=r"image folder .*absent does not exist"):
        folder_setup(tmp_path / "absent")
    (tmp_path / "split" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "split" / "train" / "0.png")
    with pytest.raises(DataNotFoundError, match=r"image folder .*split/test does not exist"):
        folder_setup(tmp_path / "split", stage="test")
    few = tmp_path / "few"
    few.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(few / "0.png")
    with pytest.raises(DataError, match=r"holds 1 images: every 10th is held out"):
        folder_setup(few)
    with pytest.raises(DataError, match=r"0.png is 8x8, smaller than the stored size 16x16"):
        folder_setup(folder_of_pngs(tmp_path / "small"), resolution=16)


# --- config values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "imagenet128"}, r"dataset='imagenet128' is not a dataset: use one of cifar10, imagenet32"),
        ({"batch_size": 0}, r"data.init_args.batch_size=0: must be an integer >= 1"),
        ({"batch_size": -8}, r"data.init_args.batch_size=-8: must be an integer >= 1"),
        ({"dataset": "cifar10", "resolution": 0}, r"resolution 0 cannot be served from .*32x32.*\[32, 16, 8, 4, 2"),
        ({"dataset": "imagenet64", "resolution": -32}, r"resolution -32 cannot be served from images stored at 64x64"),
        ({"resolution": 0}, r"data.init_args.resolution=0: must be a positive integer"),
        ({"resolution": -32}, r"data.init_args.resolution=-32: must be a positive integer"),
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
