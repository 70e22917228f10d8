"""`ImageDataModule`: every dataset of the project as uint8 (B, 3, H, W) batches at a settable resolution.

| dataset | stored side | train / val | test |
| --- | --- | --- | --- |
| cifar10 | 32 | data_batch_1..5, `val_size` held out | test_batch |
| imagenet32, imagenet64 | 32, 64 | train_data_batch_1..10.npz, `val_size` held out | val_data.npz |
| folder | `native_resolution` | `root/train/` (*), `val_size` held out | `root/test/` (*) |
| sample | `native_resolution` | patches of 4 photos / of 1 photo | patches of 1 photo |
| synthetic | `native_resolution` | `synthetic_train` images, `val_size` held out | `synthetic_test` images |

(*) without `train/` and `test/` under `root`, every 10th image (sorted paths) is test. Every split but ImageNet's
is held in RAM as one uint8 (N, 3, S, S) array; ImageNet is read memory-mapped from its cache. Each
`*_dataloader()` call serves the current `resolution` from the stored array, box-averaged exactly.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchvision.datasets.utils import download_and_extract_archive

from lightning_dq.data.arrays import ImageArrayDataset, check_servable
from lightning_dq.data.cifar10 import (
    CIFAR10_ARCHIVE_MD5,
    CIFAR10_DIR,
    CIFAR10_FILES,
    CIFAR10_URL,
    cifar10_other_versions,
    find_cifar10,
    read_cifar10,
)
from lightning_dq.data.images import SAMPLE_PHOTOS, list_images, read_folder, sample_patches, synthetic_images
from lightning_dq.data.imagenet import IMAGENET_COUNTS, open_imagenet, prepare_imagenet
from lightning_dq.data.samplers import EvenShardSampler, ResumableDataLoader, TrainSampler
from lightning_dq.errors import ConfigError, DataError, DataNotFoundError
from lightning_dq.nn.distributed import is_distributed

DatasetName = Literal["cifar10", "imagenet32", "imagenet64", "folder", "sample", "synthetic"]
STORED_SIDE = {"cifar10": 32, "imagenet32": 32, "imagenet64": 64}
TITLES = {
    "cifar10": "cifar10 (official python format)",
    "imagenet32": "imagenet32 (image-net.org downsampled, npz)",
    "imagenet64": "imagenet64 (image-net.org downsampled, npz)",
    "folder": "image folder",
    "sample": "sample: scikit-image photos cut into patches (real photos, not a benchmark dataset)",
    "synthetic": "synthetic shapes and gradients (NOT real images)",
}
_MD5_WARNED: set[Path] = set()  # files already reported as differing from the official md5 (this process)


class ImageDataModule(LightningDataModule):
    """Image batches, uint8 (B, 3, resolution, resolution), for every stage; no labels.

    Train shuffles in an order that is a function of (`seed`, epoch) and resumes mid-epoch; val and test keep
    their order and serve every image exactly once, under DDP too. A new resolution needs a new loader
    (`reload_dataloaders_every_n_epochs: 1`).

    Args:
        dataset: which data to serve (see the module docstring). "synthetic" is not real data.
        root: cifar10: the folder that contains `cifar-10-batches-py/` (or that folder itself); imagenet32/64:
            the folder of the npz files (directly or in the official unzipped subfolders); folder: the image
            tree. Unused by sample and synthetic.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        resolution: served image side; the stored side divided by a power of two.
        native_resolution: stored side of folder, sample and synthetic images (None = `resolution`); fixed by the
            data for cifar10 (32) and imagenet32/64 (32/64).
        download: cifar10 only: download the official archive into `root` when files are missing (ImageNet needs
            a login and is never downloaded).
        hflip: random left-right flips of training images. Off by default: likelihood benchmarks use no
            augmentation. Never applied to val or test.
        val_size: validation images held out of train: a count (int) or a fraction of train (float). Ignored by
            `sample`, whose validation split is a whole held-out photo.
        seed: seeds the validation hold-out, the training order and the synthetic images.
        fallback: cifar10 only: "sample" serves the embedded sample photos (with a loud warning) when `root` holds
            no `cifar-10-batches-py` and none could be downloaded; "none" raises instead.
        synthetic_train: number of synthetic train (+ val) images.
        synthetic_test: number of synthetic test images.
        cache_dir: imagenet32/64: folder of the converted memory-mapped arrays (None = `<root>/lightning_dq_cache`);
            set it when `root` is read-only. Every rank must see the same cache.
    """

    def __init__(
        self,
        dataset: DatasetName = "cifar10",
        root: str = "data/",
        batch_size: int = 128,
        num_workers: int = 4,
        resolution: int = 32,
        native_resolution: int | None = None,
        download: bool = False,
        hflip: bool = False,
        val_size: int | float = 0.1,
        seed: int = 0,
        fallback: Literal["none", "sample"] = "none",
        synthetic_train: int = 512,
        synthetic_test: int = 128,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset in STORED_SIDE and native_resolution not in (None, STORED_SIDE[dataset]):
            raise ConfigError(
                f"data.init_args.native_resolution={native_resolution}: {dataset} is stored at {STORED_SIDE[dataset]}; "
                f"leave it None"
            )
        if fallback == "sample" and dataset != "cifar10":
            raise ConfigError(f"data.init_args.fallback={fallback!r}: 'sample' is only for dataset cifar10")
        counts = [("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("synthetic_train", synthetic_train, 1)]
        counts += [("synthetic_test", synthetic_test, 1), ("native_resolution", 1 if native_resolution is None else native_resolution, 1)]
        if native_resolution is None and dataset not in STORED_SIDE:  # the resolution is the stored side
            counts.append(("resolution", resolution, 1))
        for name, value, low in counts:
            if value < low:
                raise ConfigError(f"data.init_args.{name}={value!r}: must be an integer >= {low}")
        if isinstance(val_size, bool) or val_size < 0 or (isinstance(val_size, float) and val_size >= 1):
            raise ConfigError(
                f"data.init_args.val_size={val_size!r}: must be a count >= 0 (int) or a fraction in [0, 1) (float)"
            )
        self.dataset = dataset
        self.root = Path(root)
        self.download = download
        self.fallback = fallback
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.val_size = val_size
        self.seed = seed
        self.synthetic_train = synthetic_train
        self.synthetic_test = synthetic_test
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "lightning_dq_cache"
        self.native_resolution = STORED_SIDE.get(dataset) or native_resolution or resolution
        self.resolution = resolution
        self._served: str = dataset  # becomes "sample" when cifar10 falls back
        self._splits: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # split -> (stored array, rows)
        self._notes: dict[str, None] = {}  # ordered set of remarks for data_description

    @property
    def resolution(self) -> int:
        """Side of the images the next `*_dataloader()` call serves; settable between epochs."""
        return self._resolution

    @resolution.setter
    def resolution(self, value: int) -> None:
        check_servable(self.native_resolution, value)
        self._resolution = value

    def prepare_data(self) -> None:
        """Download CIFAR-10 (`download=True`) or convert ImageNet's npz files to the memory-mapped cache.

        Lightning runs this once per node before `setup`. Under DDP the ImageNet conversion does not run here (it
        would outlast the barrier the other ranks wait in): `setup` then names the command that makes the cache.
        """
        if self.dataset == "cifar10" and self.download:
            self._download_cifar10()
        elif self.dataset in STORED_SIDE and not self._distributed_run():
            prepare_imagenet(self.root, self.native_resolution, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load (or map) the splits `stage` needs: train and val for fit/validate, test for test."""
        self._choose_source()
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            pool = self._read("train")
            if self._served == "sample":  # whole photos held out: the patches of a photo stay in one split
                self._splits.update(train=(pool, None), val=(self._read("val"), None))
            else:
                train_rows, val_rows = self._hold_out(len(pool))
                self._splits.update(train=(pool, train_rows), val=(pool, val_rows))
        if stage in (None, "test") and "test" not in self._splits:
            self._splits["test"] = (self._read("test"), None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def data_description(self) -> str:
        """Which data is actually served (after any fallback), where from, and how many images per split."""
        sizes = ", ".join(f"{self.split_size(split)} {split}" for split in self._splits) or "not set up yet"
        photos = "; ".join(f"{split}: {', '.join(names)}" for split, names in SAMPLE_PHOTOS.items())
        source = {"sample": f"skimage.data ({photos})", "synthetic": f"seed {self.seed}"}.get(
            self._served, str(find_cifar10(self.root) if self._served == "cifar10" else self.root)
        )
        side = self.native_resolution
        text = f"{TITLES[self._served]} from {source}: {sizes}; stored {side}x{side}"
        return "; ".join([f"{text}, served {self.resolution}x{self.resolution}", *self._notes])

    def split_size(self, split: str) -> int:
        """Images of a split that is set up."""
        images, rows = self._splits[split]
        return len(images) if rows is None else len(rows)

    def _download_cifar10(self) -> None:
        directory = find_cifar10(self.root)
        if directory is not None and all(
            (directory / name).is_file() for names in CIFAR10_FILES.values() for name in names
        ):
            return
        try:
            download_and_extract_archive(CIFAR10_URL, download_root=str(self.root), md5=CIFAR10_ARCHIVE_MD5)
        except (OSError, RuntimeError, tarfile.TarError) as err:  # offline (URLError is an OSError); bad file
            if self.fallback == "none":
                raise DataNotFoundError(
                    f"downloading CIFAR-10 from {CIFAR10_URL} into {self.root} failed ({err}); fetch and extract "
                    f"cifar-10-python.tar.gz yourself, or point root at the folder that contains {CIFAR10_DIR}"
                ) from err
            rank_zero_warn(f"downloading CIFAR-10 from {CIFAR10_URL} failed ({err}); using fallback='sample'")

    def _choose_source(self) -> None:
        """cifar10 with no `cifar-10-batches-py` under root: fall back to `sample`, or explain the fix."""
        if self._served != "cifar10" or find_cifar10(self.root) is not None:
            return
        why = "download failed" if self.download else "download=False"
        expected = f"expected {self.root / CIFAR10_DIR}/data_batch_1..5, test_batch"
        other = cifar10_other_versions(self.root)
        if other:
            raise DataError(
                f"{other[0]} is not the CIFAR-10 python version this dataset reads ({expected}): get "
                f"cifar-10-python.tar.gz from {CIFAR10_URL} and extract it into {self.root}, or set download=True"
            )
        if self.fallback == "none":
            raise DataNotFoundError(
                f"no CIFAR-10 under {self.root} ({expected}; {why}): set download=True to fetch it, or set root to "
                f"the folder that contains {CIFAR10_DIR}"
            )
        self._served = "sample"
        self._notes[f"FALLBACK: no cifar10 under {self.root} ({why}), sample photos served instead"] = None
        rank_zero_warn(
            f"DATA FALLBACK: no CIFAR-10 under {self.root} ({why}); serving the 'sample' dataset instead (scikit-image "
            f"photos cut into {self.native_resolution}x{self.native_resolution} patches; NOT CIFAR-10, numbers are "
            f"not comparable with CIFAR-10 results)"
        )

    def _read(self, split: str) -> np.ndarray:
        """The stored uint8 (N, 3, S, S) images of `split` (train = the pool val is held out of)."""
        side = self.native_resolution
        if self._served == "cifar10":
            directory = find_cifar10(self.root)
            images, not_official = read_cifar10(directory, CIFAR10_FILES[split])
            self._report_md5(directory, not_official)
            return images
        if self._served in STORED_SIDE:
            cache = f" --cache_dir {self.cache_dir}" if self.cache_dir != self.root / "lightning_dq_cache" else ""
            hint = (
                f"convert the npz files once, before training: `lightning-dq prepare --dataset {self.dataset} --root "
                f"{self.root}{cache}` (a single-process run converts in prepare_data())"
            )
            images = open_imagenet(self.root, side, self.cache_dir, split, hint)
            if len(images) != IMAGENET_COUNTS[split]:
                self._notes[f"{len(images)} {split} images, not the full {IMAGENET_COUNTS[split]}"] = None
            return images
        if self._served == "folder":
            return read_folder(self._folder_files(split), side)
        if self._served == "sample":
            return sample_patches(SAMPLE_PHOTOS[split], side)
        count = self.synthetic_test if split == "test" else self.synthetic_train
        return synthetic_images(count, side, seed=(self.seed, int(split == "test")))

    def _folder_files(self, split: str) -> list[Path]:
        """`root/train/` and `root/test/` when either exists; else every 10th file (sorted) is test."""
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            return self._list_images(self.root / split)
        paths = self._list_images(self.root)
        if len(paths) < 10:
            raise DataError(
                f"{self.root} holds {len(paths)} images: every 10th is held out as test, so at least 10 are needed "
                f"(or make {self.root / 'train'} and {self.root / 'test'} subfolders)"
            )
        return paths[9::10] if split == "test" else [p for i, p in enumerate(paths) if i % 10 != 9]

    def _list_images(self, directory: Path) -> list[Path]:
        """The PNG/JPEG files under `directory`; other files are reported (once), never silently dropped."""
        images, others = list_images(directory)
        if others:
            note = f"{len(others)} non-image files under {directory} not used (e.g. {others[0].name})"
            if note not in self._notes:
                rank_zero_warn(f"{note}: only {len(images)} PNG/JPEG files there are images of this dataset")
            self._notes[note] = None
        return images

    def _hold_out(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, val rows) of n images: val is `val_size` rows of a permutation seeded by `seed`."""
        k = round(self.val_size * n) if isinstance(self.val_size, float) else self.val_size
        if k >= n:
            raise ConfigError(f"data.init_args.val_size={self.val_size} holds out {k} of {n} train images; leave some")
        order = np.random.default_rng(self.seed).permutation(n)
        return np.sort(order[k:]), np.sort(order[:k])

    def _report_md5(self, directory: Path, names: list[str]) -> None:
        if not names:
            return
        self._notes["files differ from the official CIFAR-10 md5s: not comparable to published work"] = None
        new = [name for name in names if (directory / name).resolve() not in _MD5_WARNED]
        _MD5_WARNED.update((directory / name).resolve() for name in names)
        if new:
            rank_zero_warn(
                f"{directory}: md5 of {', '.join(new)} differs from the official CIFAR-10 files; reading them anyway "
                f"(the format is valid), but these are not the official pixels: do not compare results with "
                f"published CIFAR-10 numbers"
            )

    def _distributed_run(self) -> bool:
        """Whether this module serves several processes: the Trainer knows before the process group exists."""
        return (self.trainer is not None and self.trainer.world_size > 1) or is_distributed()

    def _loader(self, split: str) -> DataLoader:
        if split not in self._splits:
            raise RuntimeError(f"no {split} split loaded: call setup() with the matching stage first")
        images, rows = self._splits[split]
        source = Path(images.filename) if isinstance(images, np.memmap) else images  # workers map files again
        train = split == "train"
        # train and val are scattered rows of the stored array: random access, no readahead
        dataset = ImageArrayDataset(source, self.resolution, rows, self.hflip and train, rows is not None)
        common = dict(
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0
        )
        world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
        if train:
            sampler = TrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
        if world > 1:  # every image once, equal batch counts on all ranks; batches come whole
            sampler = EvenShardSampler(dataset, self.batch_size, num_replicas=world, rank=rank)
            return DataLoader(dataset, batch_size=None, sampler=sampler, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)
