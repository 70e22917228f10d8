"""Data layer: exact box reduction, pixel-exact round trips through every on-disk format (fixtures are
written here in the real formats), the real CIFAR-10 files in ../shared/data when present, memory-mapped
ImageNet and its cache, resolution switching under a Trainer, sample data and fallback. Bad input:
tests/test_data_errors.py; evaluation sharding under DDP: tests/test_data_ddp.py."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from lightning_dq.data import ImageDataModule
from lightning_dq.datasets import ImageArrayDataset, box_reduce, check_resolution, servable_resolutions
from lightning_dq.errors import DataError
from lightning_dq.formats import (
    SAMPLE_PHOTOS,
    cache_is_current,
    default_cache_dir,
    imagenet_cache,
    sample_patches,
    sample_photo,
)

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LOSSLESS20 = SHARED / "cifar10-lossless20"
JPEG75 = SHARED / "cifar10-jpeg75"


# --- fixtures in the real formats ------------------------------------------------------------------


def images(n: int, side: int, seed: int) -> np.ndarray:
    """Random uint8 (n, 3, side, side): asymmetric, so any transposition or channel mix-up changes them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch pickled as Python 2's cPickle did: keys and pixel bytes as Python-2 `str` opcodes."""

    def pystr(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: decoded with pickle.load's `encoding`
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def int4(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    dtype = b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R"  # numpy.dtype("u1", False, True)
    dtype += b"(K\x03X\x01\x00\x00\x00|NNN" + int4(-1) * 2 + b"K\x00tb"  # its state, then BUILD
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + pystr(b"b") + b"\x87R"
    array += b"(K\x01" + int4(data.shape[0]) + int4(data.shape[1]) + b"\x86" + dtype + b"\x89"
    array += pystr(data.tobytes()) + b"tb"
    listing = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + pystr(b"labels") + listing + pystr(b"data") + array + b"u."


def write_cifar_batch(path: Path, batch: np.ndarray, keys: str = "bytes") -> None:
    """One CIFAR-10 batch file; keys: "bytes" (Python 3, bytes keys), "str" (Python 3) or "py2"."""
    data = batch.reshape(len(batch), 3072)  # planar rows: R plane, G plane, B plane
    labels = [i % 10 for i in range(len(batch))]
    if keys == "py2":
        path.write_bytes(py2_pickle(data, labels))
        return
    names = [f"{i}.png" for i in labels]
    record = {"batch_label": "fixture", "labels": labels, "data": data, "filenames": names}
    if keys == "bytes":
        record = {k.encode(): v for k, v in record.items()}
    path.write_bytes(pickle.dumps(record, protocol=2))


def write_cifar(root: Path, train: list[np.ndarray], test: np.ndarray, keys: str = "bytes") -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, batch in enumerate(train, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", batch, keys)
    write_cifar_batch(folder / "test_batch", test, keys)
    return folder


def write_imagenet(root: Path, side: int, train: list[np.ndarray], val: np.ndarray, official: bool) -> None:
    """Chrabaszcz npz files, flat in root or in the official unzipped subfolders (64: part1/part2)."""
    mean = np.concatenate(train).reshape(-1, 3 * side * side).mean(0)
    for i, batch in enumerate(train, start=1):
        folder = root / (f"Imagenet{side}_train_part{1 + (i > 5)}_npz" if official else "")
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.arange(1, len(batch) + 1)  # 1-based, as in the real files
        data = batch.reshape(len(batch), -1)
        np.savez(folder / f"train_data_batch_{i}.npz", data=data, labels=labels, mean=mean)
    folder = root / (f"Imagenet{side}_val_npz" if official else "")
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "val_data.npz", data=val.reshape(len(val), -1), labels=np.ones(len(val), int))


@pytest.fixture
def data_imagenet64(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """ImageNet-64 npz fixture in the official subfolders: (root, train images, val images)."""
    train = [images(3, 64, seed) for seed in range(10)]
    val = images(5, 64, 99)
    write_imagenet(tmp_path, 64, train, val, official=True)
    return tmp_path, np.concatenate(train), val


def served(dm: ImageDataModule, split: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """All images of a split in dataset order (no shuffle) and the rows of the stored array they are."""
    dataset = getattr(dm, f"{split}_dataloader")().dataset
    return torch.stack([dataset[i] for i in range(len(dataset))]), dataset.indices


# --- box reduction and resolution checks ------------------------------------------------------------


def test_box_reduce_2x2_hand_computed_with_half_to_even_ties():
    x = np.array(
        [
            [[0, 1, 1, 2, 3, 4, 0, 0, 0, 1], [1, 0, 1, 2, 3, 4, 0, 1, 1, 1]],
        ],
        dtype=np.uint8,
    )  # (C=1, 2, 10): five 2x2 blocks
    # sums 2, 6, 14, 1, 3 -> means 0.5, 1.5, 3.5, 0.25, 0.75 -> ties to even 0, 2, 4; then 0, 1
    np.testing.assert_array_equal(box_reduce(x, 2), [[[0, 2, 4, 0, 1]]])
    top = np.array([[[255, 255], [255, 254]]], dtype=np.uint8)  # mean 254.75 -> 255, no uint8 overflow
    np.testing.assert_array_equal(box_reduce(top, 2), [[[255]]])
    odd_tie = np.array([[[2, 3], [2, 3]]], dtype=np.uint8)  # mean 2.5 -> 2 (even)
    np.testing.assert_array_equal(box_reduce(odd_tie, 2), [[[2]]])


def test_box_reduce_4x4_is_one_rounding_not_two():
    # 2x2 sub-block means 0.5, 0.5, 0.5, 1.5: two rounded 2x2 steps give (0+0+0+2)/4 = 0.5 -> 0, while the
    # 16-pixel mean is 12/16 = 0.75 -> 1. The single 4x4 box is the correctly rounded mean.
    x = np.array([[[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 2], [1, 0, 1, 2]]], dtype=np.uint8)  # (1, 4, 4)
    assert box_reduce(x, 4).item() == 1
    assert box_reduce(box_reduce(x, 2), 2).item() == 0
    batch = images(2, 8, 0)  # (N, 3, 8, 8): leading dims and channels reduce independently
    np.testing.assert_array_equal(box_reduce(batch, 2)[1, 2], box_reduce(batch[1, 2:3], 2)[0])


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_box_reduce_matches_the_definition_on_random_images(factor):
    x = images(2, 16, factor)  # (2, 3, 16, 16)
    r = 16 // factor
    blocks = x.reshape(2, 3, r, factor, r, factor).astype(int)
    # Python's round() is round-half-to-even, and sum / factor^2 is an exact binary fraction
    expected = [[[[round(blocks[n, c, i, :, j, :].sum() / factor**2) for j in range(r)] for i in range(r)]
                 for c in range(3)] for n in range(2)]  # fmt: skip
    np.testing.assert_array_equal(box_reduce(x, factor), expected)
    with pytest.raises(ValueError, match=r"factor must be a power of two, got 3"):
        box_reduce(x, 3)


def test_batched_fetch_equals_single_fetch():
    stored = images(6, 16, 4)
    for rows in (None, np.array([5, 0, 3])):
        dataset = ImageArrayDataset(stored, 4, rows)
        picks = [2, 0, 1]
        single = torch.stack([dataset[i] for i in picks])  # (3, 3, 4, 4)
        np.testing.assert_array_equal(torch.stack(dataset.__getitems__(picks)).numpy(), single.numpy())
        kept = picks if rows is None else rows[picks]
        np.testing.assert_array_equal(single.numpy(), box_reduce(stored[kept], 4))


def test_check_resolution_names_the_value_and_the_choices():
    assert servable_resolutions(64) == [64, 32, 16, 8, 4, 2, 1]
    check_resolution(64, 16)
    for bad in (48, 128, 0, 33):
        with pytest.raises(ValueError, match=rf"resolution {bad} .*stored at 64x64.*\[64, 32, 16"):
            check_resolution(64, bad)


# --- CIFAR-10 -----------------------------------------------------------------------------------------


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


# --- ImageNet (npz, memory-mapped) --------------------------------------------------------------------


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
    assert isinstance(dm.train_dataloader().dataset.images, np.memmap)


def test_imagenet64_memmap_resolution_switch_and_workers(data_imagenet64):
    root, train, val = data_imagenet64
    dm = ImageDataModule("imagenet64", root=str(root), batch_size=5, num_workers=0, resolution=64, val_size=6)
    dm.prepare_data()
    cache = imagenet_cache(default_cache_dir(root), 64, "train")
    stamp = cache.stat().st_mtime_ns
    dm.prepare_data()  # already converted: not rewritten
    assert cache.stat().st_mtime_ns == stamp and np.load(cache, mmap_mode="r").shape == (30, 3, 64, 64)
    dm.setup()
    assert isinstance(dm.test_dataloader().dataset.images, np.memmap) and dm.native_resolution == 64
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
    assert not cache_is_current(imagenet_cache(default_cache_dir(root), 64, "test"), files, root)
    with pytest.raises(DataError, match=r"imagenet64_test.npy was converted from other npz files \(changed since: "
                       r"Imagenet64_val_npz/val_data.npz \(\d+ bytes\)\).*make prepare-imagenet64 DATA_ROOT="):
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
    fd = os.open(imagenet_cache(default_cache_dir(tmp_path), 64, "train"), os.O_RDONLY)
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


# --- progressive resolution under a Trainer -------------------------------------------------------------


class ShapeRecorder(LightningModule):
    """Records what each step receives; the loss is a dummy so the Trainer has something to optimise."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[str, int, torch.Tensor]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(("train", self.current_epoch, batch.clone()))
        return self.w * batch.float().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen.append(("val", self.current_epoch, batch.clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resolution_follows_the_epoch_under_a_trainer():
    dm = ImageDataModule("synthetic", batch_size=8, num_workers=0, synthetic_train=40, val_size=8)
    dm.resolution_for_epoch = lambda epoch: 8 if epoch == 0 else 16
    model = ShapeRecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    sizes = {(stage, epoch, x.shape[-1]) for stage, epoch, x in model.seen}
    stages = ("train", "val")
    assert sizes == {(s, 0, 8) for s in stages} | {(s, e, 16) for s in stages for e in (1, 2)}
    assert all(x.dtype == torch.uint8 and x.shape[:2] == (8, 3) for _, _, x in model.seen)
    first = {epoch: x for stage, epoch, x in model.seen if stage == "train" and x.shape[0] == 8}
    assert not torch.equal(first[1], first[2])  # a reloaded train loader reshuffles: epochs differ


def test_resolution_errors_and_fixed_native_sizes():
    with pytest.raises(ValueError, match=r"resolution 48 cannot be served .*stored at 64x64"):
        ImageDataModule("synthetic", resolution=48, native_resolution=64)
    dm = ImageDataModule("synthetic", resolution=32, native_resolution=64)
    with pytest.raises(ValueError, match=r"resolution 128 cannot be served"):
        dm.resolution = 128
    with pytest.raises(ValueError, match=r"resolution 24"):
        dm.check_resolution(24)
    assert dm.resolution == 32 and dm.native_resolution == 64
    with pytest.raises(ValueError, match=r"native_resolution=64: cifar10 is stored at 32"):
        ImageDataModule("cifar10", native_resolution=64)
    assert ImageDataModule("imagenet64", resolution=16).native_resolution == 64


def test_hflip_only_flips_training_images():
    dm = ImageDataModule(
        "synthetic", batch_size=64, num_workers=0, hflip=True, synthetic_train=64, val_size=0
    )
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


# --- image folders ------------------------------------------------------------------------------------


def test_folder_png_and_jpeg_round_trip(tmp_path):
    (tmp_path / "train/sub").mkdir(parents=True)
    a = images(1, 16, 0)[0]  # stored size exactly: PNG is lossless, pixel-exact
    Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / "train/a.png")
    Image.fromarray(images(1, 16, 1)[0].transpose(1, 2, 0)).save(tmp_path / "train/sub/b.jpg", quality=90)
    wide = np.repeat(np.repeat(images(1, 16, 2)[0], 2, axis=1), 2, axis=2)  # (3, 32, 32), constant 2x2 blocks
    canvas = np.zeros((3, 32, 48), np.uint8)
    canvas[:, :, 8:40] = wide  # 32x48: the centre square is the block image, exactly halved by a 2x2 box
    (tmp_path / "test").mkdir()
    Image.fromarray(canvas.transpose(1, 2, 0)).save(tmp_path / "test/c.PNG")
    dm = ImageDataModule("folder", root=str(tmp_path), batch_size=8, num_workers=0, resolution=16, val_size=0)
    dm.setup()
    x_train, _ = served(dm, "train")
    np.testing.assert_array_equal(x_train[0].numpy(), a)  # sorted order: a.png, sub/b.jpg
    with Image.open(tmp_path / "train/sub/b.jpg") as im:
        np.testing.assert_array_equal(x_train[1].numpy(), np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    (test,) = list(dm.test_dataloader())
    np.testing.assert_array_equal(test[0].numpy(), wide[:, ::2, ::2])


def test_folder_without_subfolders_holds_out_every_tenth(tmp_path):
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"img{i:02d}.png")
    dm = ImageDataModule("folder", root=str(tmp_path), batch_size=16, num_workers=0, resolution=8, val_size=2)
    dm.setup()
    (test,) = list(dm.test_dataloader())
    assert test[:, 0, 0, 0].tolist() == [9]
    x_train, _ = served(dm, "train")
    x_val, _ = served(dm, "val")
    assert sorted(torch.cat([x_train, x_val])[:, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]


# --- sample photos ------------------------------------------------------------------------------------


def test_sample_is_offline_real_photos_with_photo_level_splits():
    photos = [set(names) for names in SAMPLE_PHOTOS.values()]
    assert not (photos[0] & photos[1] or photos[0] & photos[2] or photos[1] & photos[2])
    assert {"motorcycle_left", "motorcycle_right"} <= photos[0]  # the stereo pair never straddles splits
    dm = ImageDataModule("sample", batch_size=8, num_workers=0, resolution=32)
    dm.setup()
    x_train, _ = served(dm, "train")
    x_val, _ = served(dm, "val")
    x_test, _ = served(dm, "test")
    assert x_train.dtype == torch.uint8 and x_train.shape[1:] == (3, 32, 32)
    assert (len(x_train), len(x_val), len(x_test)) == (16 * 16 + 16 * 16 + 2 * 15 * 23, 9 * 14, 12 * 18)
    astronaut = sample_photo("astronaut")  # (3, 512, 512)
    np.testing.assert_array_equal(x_train[0].numpy(), astronaut[:, :32, :32])
    np.testing.assert_array_equal(x_train[1].numpy(), astronaut[:, :32, 32:64])
    np.testing.assert_array_equal(x_val.numpy(), sample_patches(["chelsea"], 32))
    train_bytes = {bytes(p.numpy()) for p in x_train}
    assert not any(bytes(p.numpy()) in train_bytes for p in torch.cat([x_val, x_test]))
