"""lightning_dq.data.images: image folders (PNG/JPEG round trips, every 10th held out, bad files named) and the
embedded sample photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dq.data import ImageDataModule
from lightning_dq.data.images import SAMPLE_PHOTOS, sample_patches, sample_photo
from lightning_dq.errors import DataError, DataNotFoundError
from tests.helpers import SHARED_DATA, flip_bytes, images, served

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


LOSSLESS20 = SHARED_DATA / "cifar10-lossless20"


JPEG75 = SHARED_DATA / "cifar10-jpeg75"


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


pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


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
