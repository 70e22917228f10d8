"""lightning_dq.data.imagenet: npz round trips (flat and official folders), the memory-mapped cache (redone when
the npz files change, small resident memory), `lightning-dq prepare`, and bad or foreign files named in the error."""

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
import torch
from lightning.pytorch import Trainer
from PIL import Image

from lightning_dq.cli import main
from lightning_dq.data import ImageDataModule
from lightning_dq.data.arrays import box_reduce
from lightning_dq.data.imagenet import cache_problem, imagenet_cache
from lightning_dq.errors import DataError, DataNotFoundError
from tests.helpers import REPO, SHARED_DATA, images, served, truncate, write_imagenet

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


LOSSLESS20 = SHARED_DATA / "cifar10-lossless20"


JPEG75 = SHARED_DATA / "cifar10-jpeg75"


@pytest.fixture
def data_imagenet64(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """ImageNet-64 npz fixture in the official subfolders: (root, train images, val images)."""
    train = [images(3, 64, seed) for seed in range(10)]
    val = images(5, 64, 99)
    write_imagenet(tmp_path, 64, train, val, official=True)
    return tmp_path, np.concatenate(train), val


@pytest.mark.parametrize("official", [False, True])
def test_imagenet32_round_trip_flat_or_official_folders(tmp_path, official):
    train = [images(2, 32, seed) for seed in range(10)]
    val = images(3, 32, 50)
    write_imagenet(tmp_path, 32, train, val, official)
    (tmp_path / "Imagenet32_train_npz").mkdir(exist_ok=True)  # the folder name for 32 also works
    dm = ImageDataModule("imagenet32", root=str(tmp_path), batch_size=4, num_workers=0, val_size=4)
    dm.prepare_data()
    dm.setup()
    pool = np.concatenate(train)
    x_train, rows_train = served(dm, "train")
    np.testing.assert_array_equal(x_train.numpy(), pool[rows_train])
    assert len(rows_train) == 16
    np.testing.assert_array_equal(torch.cat(list(dm.test_dataloader())).numpy(), val)
    dataset = dm.train_dataloader().dataset  # mapped per process (never pickled with its pixels), read-only
    assert dataset.path is not None and not dataset.images.flags.writeable


def test_imagenet64_memmap_resolution_switch_and_workers(data_imagenet64):
    root, train, val = data_imagenet64
    dm = ImageDataModule("imagenet64", root=str(root), batch_size=5, num_workers=0, resolution=64, val_size=6)
    dm.prepare_data()
    cache = imagenet_cache((root / "lightning_dq_cache"), 64, "train")
    stamp = cache.stat().st_mtime_ns
    dm.prepare_data()  # already converted: not rewritten
    assert cache.stat().st_mtime_ns == stamp and np.load(cache, mmap_mode="r").shape == (30, 3, 64, 64)
    dm.setup()
    assert dm.test_dataloader().dataset.path is not None and dm.native_resolution == 64
    for size, expected in ((64, val), (32, box_reduce(val, 2)), (64, val), (16, box_reduce(val, 4))):
        dm.resolution = size
        (batch,) = list(dm.test_dataloader())
        np.testing.assert_array_equal(batch.numpy(), expected)
    dm.resolution = 32
    x_val, rows_val = served(dm, "val")
    assert x_val.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(x_val.numpy(), box_reduce(train[rows_val], 2))
    dataset = dm.train_dataloader().dataset
    assert len(pickle.dumps(dataset)) < 10_000  # workers receive the file path, not the pixels
    workers = ImageDataModule("imagenet64", root=str(root), batch_size=5, num_workers=2, resolution=64)
    workers.setup("test")
    np.testing.assert_array_equal(torch.cat(list(workers.test_dataloader())).numpy(), val)


def test_imagenet_cache_is_redone_when_the_npz_files_change(data_imagenet64):
    root, _, _ = data_imagenet64
    dm = ImageDataModule("imagenet64", root=str(root), num_workers=0, resolution=64)
    dm.prepare_data()
    files = sorted((root / "Imagenet64_val_npz").glob("*.npz"))
    np.savez(files[0], data=images(2, 64, 5).reshape(2, -1), labels=np.ones(2, int))
    assert cache_problem(imagenet_cache((root / "lightning_dq_cache"), 64, "test"), files, root)
    with pytest.raises(
        DataError,
        match=r"imagenet64_test.npy was converted from other npz files \(changed since: "
        r"Imagenet64_val_npz/val_data.npz \(\d+ bytes\)\).*lightning-dq prepare --dataset imagenet64 --root ",
    ):
        dm.setup("test")
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 2


@pytest.mark.slow
def test_imagenet_memmap_keeps_resident_memory_small(tmp_path):
    psutil = pytest.importorskip("psutil")
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 256, (2400, 3, 64, 64), dtype=np.uint8) for _ in range(10)]  # 295 MB in all
    write_imagenet(tmp_path, 64, train, train[0][:10], official=False)
    total = sum(t.nbytes for t in train)
    del train
    # conversion in a fresh process: its peak resident memory must stay near one batch (29.5 MB)
    script = (
        "import resource, sys; from lightning_dq.data import ImageDataModule\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ImageDataModule('imagenet64', root=sys.argv[1], resolution=64).prepare_data()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, tmp_path], capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) * 1024 < total / 4  # ru_maxrss is in KiB on Linux
    # The fresh cache is fully in the page cache, and the kernel maps cached pages around each touched one
    # into the process (counted as resident, though shared and reclaimable). Drop its clean cached pages so
    # the measurement sees what setup and reading actually bring in, as with a dataset larger than RAM.
    fd = os.open(imagenet_cache((tmp_path / "lightning_dq_cache"), 64, "train"), os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    dm = ImageDataModule("imagenet64", root=str(tmp_path), num_workers=0, resolution=32, val_size=100)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    picks = [dataset[i] for i in range(0, len(dataset), 97)]  # ~250 images from all over the array
    assert len(picks) > 200 and picks[0].shape == (3, 32, 32)
    assert process.memory_info().rss - before < total / 4


pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


def flip_npz_pixels(path: Path) -> None:
    """Invert 16 bytes inside the pixels of the npz member data.npy (stored uncompressed, as np.savez does)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("data.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + 128 + info.compress_size // 2  # past the npy header
    raw[start : start + 16] = bytes(255 - b for b in raw[start : start + 16])
    path.write_bytes(bytes(raw))


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
    assert not list((imagenet32 / "lightning_dq_cache").glob("imagenet32_train*"))  # nothing half-written is left


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
    with pytest.raises(
        DataError,
        match=r"imgnet_32x32.npz looks like the van den Oord et al. \(2016, PixelRNN\)"
        r".*not comparable.*Downsampled ImageNet 32x32",
    ):
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


def test_run_without_cache_names_the_prepare_command(imagenet32, tmp_path):
    # what every DDP rank sees (prepare_data does not convert under DDP) and a run that skipped prepare_data
    command = rf"`lightning-dq prepare --dataset imagenet32 --root {imagenet32}`"
    with pytest.raises(
        DataError,
        match=rf"no usable imagenet32 cache for the train split \(.*imagenet32_train.npy does not exist\): .*{command}",
    ):
        ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0).setup("fit")
    cache_dir = tmp_path / "elsewhere"
    with pytest.raises(DataError, match=rf"{command[:-1]} --cache_dir {cache_dir}`"):
        ImageDataModule("imagenet32", root=str(imagenet32), cache_dir=str(cache_dir), num_workers=0).setup("test")


def test_ddp_prepare_data_does_not_convert(imagenet32):
    # under a 2-process Trainer, prepare_data (local rank 0, before a barrier) must not start a conversion that
    # can outlast the barrier: every rank then meets the missing cache in setup, with the command to run
    dm = ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0)
    dm.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # built, not launched
    dm.prepare_data()
    assert not (imagenet32 / "lightning_dq_cache").exists()
    with pytest.raises(
        DataError, match=r"imagenet32_train.npy does not exist\): .*lightning-dq prepare --dataset imagenet32"
    ):
        dm.setup("fit")


def test_stale_or_damaged_cache_is_named(imagenet32):
    prepare32(imagenet32)
    dm = ImageDataModule("imagenet32", root=str(imagenet32), num_workers=0)
    dm.setup("test")  # current: no error
    cache = imagenet_cache((imagenet32 / "lightning_dq_cache"), 32, "test")
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
    with pytest.raises(
        DataError,
        match=r"cannot write the ImageNet-32 cache .*a_file/sub/imagenet32_train.npy "
        r"\((FileExistsError|NotADirectoryError).*set cache_dir",
    ):
        prepare32(imagenet32, blocker / "sub")


def test_prepare_entry_converts_once_and_reports(imagenet32, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    main(["prepare", "--dataset", "imagenet32", "--root", str(imagenet32), "--cache_dir", str(cache_dir)])
    out = capsys.readouterr().out
    assert f"{cache_dir / 'imagenet32_train.npy'}: 20 images 32x32" in out
    assert f"--data.init_args.cache_dir={cache_dir}" in out
    stamp = (cache_dir / "imagenet32_train.npy").stat().st_mtime_ns
    main(["prepare", "--dataset", "imagenet32", "--root", str(imagenet32), "--cache_dir", str(cache_dir)])
    assert (cache_dir / "imagenet32_train.npy").stat().st_mtime_ns == stamp  # current: not rewritten
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--dataset", "imagenet64", "--root", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-dq: error: ImageNet-64 files missing under") and "Traceback" not in err


def test_make_prepare_target(imagenet32, tmp_path):
    cache_dir = tmp_path / "made"
    run = subprocess.run(
        ["make", "-s", "prepare-imagenet32", f"DATA_ROOT={imagenet32}", f"CACHE_DIR={cache_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert np.load(cache_dir / "imagenet32_test.npy", mmap_mode="r").shape == (2, 3, 32, 32)
