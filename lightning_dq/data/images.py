"""Image files and generated images as uint8 (N, 3, S, S) arrays: folders of PNG/JPEG files, the lossless
photographs shipped inside scikit-image (`sample`), and seeded synthetic shapes (NOT real images)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from lightning_dq.errors import DataError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLE_PHOTOS = {  # held-out photos (a whole photo is never split across train/val/test); the stereo pair together
    "train": ("astronaut", "immunohistochemistry", "motorcycle_left", "motorcycle_right"),
    "val": ("chelsea",),
    "test": ("coffee",),
}


def list_images(directory: Path, notes: dict[str, None]) -> list[Path]:
    """PNG/JPEG files under `directory`, sorted; other image formats raise, other files are warned of once (`notes`)."""
    if not directory.is_dir():
        raise DataNotFoundError(f"image folder {directory} does not exist: set root to the folder of PNG/JPEG files")
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).as_posix())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    other_image_types = set(Image.registered_extensions()) - set(IMAGE_SUFFIXES)
    unsupported = [p for p in files if p.suffix.lower() in other_image_types]
    if unsupported:
        raise DataError(
            f"{unsupported[0]} ({len(unsupported)} such files under {directory}) is not PNG/JPEG: convert these "
            f"images to PNG (lossless) or remove them; only {', '.join(IMAGE_SUFFIXES)} are read"
        )
    if not images:
        raise DataNotFoundError(
            f"no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) found under {directory}: set root to the image folder"
        )
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        note = f"{len(others)} non-image files under {directory} not used (e.g. {others[0].name})"
        if note not in notes:
            rank_zero_warn(f"{note}: only {len(images)} PNG/JPEG files there are images of this dataset")
        notes[note] = None
    return images


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 (3, size, size): the centred square crop, box-resized (an area average, like
    `box_reduce`; never upscaled). Grey and palette images become RGB; an alpha channel is dropped."""
    try:
        with Image.open(path) as im:
            im.verify()  # PNG chunk CRCs and structure: load() alone accepts some truncated PNGs
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"):
                raise ValueError(f"unsupported pixel mode {im.mode!r}, expected 8-bit RGB or grey")
            rgb = im.convert("RGB")
    except Exception as err:  # Pillow reports corrupt or truncated files with several exception types
        raise DataError(
            f"{path} is not a readable 8-bit PNG/JPEG ({type(err).__name__}: {err}): replace or remove the file"
        ) from err
    w, h = rgb.size
    side = min(w, h)
    if side < size:
        raise DataError(
            f"{path} is {w}x{h}, smaller than the stored size {size}x{size}; images are never upscaled: "
            f"lower native_resolution or remove the file"
        )
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.BOX)
    return np.asarray(rgb).transpose(2, 0, 1).copy()  # (3, S, S)


def read_folder(root: Path, split: str, size: int, notes: dict[str, None]) -> np.ndarray:
    """The images of `split` as one uint8 (N, 3, size, size) array: those of `root/train/` or `root/test/` when
    either exists, else every 10th image of `root` (sorted) is test. `notes` as for `list_images`."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        paths = list_images(root / split, notes)
    else:
        paths = list_images(root, notes)
        if len(paths) < 10:
            raise DataError(
                f"{root} holds {len(paths)} images: every 10th is held out as test, so at least 10 are needed "
                f"(or make {root / 'train'} and {root / 'test'} subfolders)"
            )
        paths = paths[9::10] if split == "test" else [p for i, p in enumerate(paths) if i % 10 != 9]
    images = np.empty((len(paths), 3, size, size), np.uint8)
    for i, path in enumerate(paths):
        images[i] = read_image(path, size)
    return images


def sample_photo(name: str) -> np.ndarray:
    """One scikit-image photo (shipped in its wheel, read offline) as uint8 (3, H, W)."""
    import skimage.data  # imported here: slow to import, and only this dataset needs it

    if name.startswith("motorcycle_"):
        photo = skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1]  # (H, W, 3)
    else:
        photo = getattr(skimage.data, name)()  # (H, W, 3)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise DataError(f"skimage.data.{name}: expected a uint8 RGB photo, got {photo.dtype} {photo.shape}")
    return photo.transpose(2, 0, 1)


def sample_patches(names: Sequence[str], size: int) -> np.ndarray:
    """Non-overlapping size x size patches (N, 3, S, S) of the named photos, row-major; narrower edge strips unused."""
    patches = []
    for name in names:
        photo = sample_photo(name)
        rows, cols = photo.shape[1] // size, photo.shape[2] // size
        grid = photo[:, : rows * size, : cols * size].reshape(3, rows, size, cols, size)
        patches.append(grid.transpose(1, 3, 0, 2, 4).reshape(-1, 3, size, size))
    return np.ascontiguousarray(np.concatenate(patches))


def synthetic_images(count: int, size: int, seed: int | Sequence[int]) -> np.ndarray:
    """`count` seeded (N, 3, S, S) images, a gradient under a rectangle, disc or stripes: for tests and smoke runs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (S, S) each, in [0, 1]
    images = np.empty((count, 3, size, size), np.uint8)
    for i in range(count):
        c0, c1, fg = rng.uniform(0, 255, (3, 3, 1, 1))
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        image = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-9)  # (3, S, S) gradient
        x0, y0 = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.15, 0.4)
        kind = rng.integers(3)
        if kind == 0:
            mask = (abs(xx - x0) < r) & (abs(yy - y0) < r * rng.uniform(0.5, 1.5))
        elif kind == 1:
            mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r**2
        else:
            mask = np.sin(2 * np.pi * rng.uniform(2, 6) * (np.cos(2 * a) * xx + np.sin(2 * a) * yy)) > 0
        images[i] = np.rint(np.where(mask, fg, image))
    return images
