"""`ImageDataModule`: every dataset of the project as uint8 (B, 3, H, W) batches at a settable resolution.

Datasets, their splits and storage (validation is always held out of train; `test` is only for testing):

| dataset | stored side | train / val | test |
| --- | --- | --- | --- |
| cifar10 | 32 | data_batch_1..5, `val_size` held out | test_batch |
| imagenet32, imagenet64 | 32, 64 | train_data_batch_1..10.npz, `val_size` held out | val_data.npz |
| folder | `native_resolution` | `root/train/` (*), `val_size` held out | `root/test/` (*) |
| sample | `native_resolution` | patches of 4 photos / patches of 1 photo | patches of 1 photo |
| synthetic | `native_resolution` | `synthetic_train` images, `val_size` held out | `synthetic_test` images |

(*) folder: with neither `train/` nor `test/` under `root`, every 10th image (sorted paths) is test. Its
PNG/JPEG files are centre-cropped square and resized with Pillow's BOX filter (never upscaled). sample:
non-overlapping patches of astronaut, immunohistochemistry, motorcycle_left/right (train), chelsea
(val), coffee (test) from `skimage.data`, read offline.

CIFAR-10, folder, sample and synthetic images are held in RAM as one uint8 (N, 3, S, S) array; ImageNet is
converted once to a `.npy` file per split under `cache_dir` (default `<root>/lightning_dq_cache/`) that
every process reads memory-mapped, so no rank holds the 15.7 GB of ImageNet-64 train pixels in RAM. The
conversion takes long (about 16 GB written for ImageNet-64), longer than a DDP barrier waits: run it once
with `make prepare-imagenet64 DATA_ROOT=... [CACHE_DIR=...]` (`python -m lightning_dq.prepare`). In a
single process `prepare_data` converts by itself; under DDP every rank that finds no (or a stale) cache
stops with a `DataError` naming the command.

Evaluation under DDP (val and test, during `fit` too) shards each split with `EvenShardSampler`: every
image counted exactly once, the same number of batches on every rank (an empty batch on the ranks that
have no image when a split is smaller than the world size).

Progressive resolution: `resolution` may change between epochs (set it, or let `resolution_for_epoch`
map the trainer's epoch to a size). Each `*_dataloader()` call serves the current size from the stored
array, box-averaged exactly (`lightning_dq.datasets.box_reduce`); nothing is re-read from disk.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchvision.datasets.utils import download_and_extract_archive

from lightning_dq.checkpoints import ResumableDataLoader
from lightning_dq.datasets import EvenShardSampler, ImageArrayDataset, check_image_array, check_resolution
from lightning_dq.errors import ConfigError, DataError, DataNotFoundError
from lightning_dq.formats import (
    CIFAR10_ARCHIVE_MD5,
    CIFAR10_DIR,
    CIFAR10_FILES,
    CIFAR10_MD5,
    CIFAR10_URL,
    SAMPLE_PHOTOS,
    cache_problem,
    cifar10_other_versions,
    convert_npz,
    default_cache_dir,
    find_cifar10,
    imagenet_cache,
    imagenet_files,
    list_images,
    read_cifar10,
    read_folder,
    sample_patches,
    synthetic_images,
)

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
IMAGENET_COUNTS = {"train": 1_281_167, "test": 50_000}  # the full ILSVRC-2012 train and val sets
_MD5_WARNED: set[Path] = set()  # files already reported as differing from the official md5 (this process)


class ImageDataModule(LightningDataModule):
    """Image batches, uint8 (B, 3, resolution, resolution), for every stage; no labels.

    Loaders: train shuffles with a generator seeded by (`seed`, epoch) and is a `ResumableDataLoader` (a
    run resumed mid-epoch skips the batches it had trained on); val and test keep their order and drop
    nothing (every image exactly once, under DDP too: `EvenShardSampler`); `pin_memory` when CUDA is
    available. Workers persist within a loader; a new resolution means a new loader
    (`reload_dataloaders_every_n_epochs: 1`).

    Args:
        dataset: which data to serve (see the module docstring). "synthetic" is not real data.
        root: cifar10: the folder that contains `cifar-10-batches-py/` (or that folder itself);
            imagenet32/64: the folder with the npz files (directly or in the official unzipped
            subfolders); folder: the image tree. Unused by sample and synthetic.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        resolution: served image side; the stored side divided by a power of two.
        native_resolution: stored side of folder, sample and synthetic images (None = `resolution`);
            fixed by the data for cifar10 (32) and imagenet32/64 (32/64), where it must be None or equal.
        download: cifar10 only: download the official archive into `root` when files are missing.
            ImageNet needs a login and is never downloaded.
        hflip: random left-right flips of training images. Off by default: likelihood benchmarks use
            no augmentation. Never applied to val or test.
        val_size: validation images held out of train: a count (int) or a fraction of train (float).
            Ignored by `sample`, whose validation split is a whole held-out photo.
        seed: seeds the validation hold-out, the training shuffle and the synthetic images.
        fallback: cifar10 only: "sample" serves the embedded sample photos (with a loud warning) when
            `root` holds no `cifar-10-batches-py` and none could be downloaded; "none" raises instead.
        synthetic_train: number of synthetic train (+ val) images.
        synthetic_test: number of synthetic test images.
        cache_dir: imagenet32/64: folder of the converted memory-mapped arrays (None = `<root>/lightning_dq_cache`).
            Set it when `root` is read-only; every rank must see the same cache.
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
        if dataset not in TITLES:
            raise ConfigError(f"data.init_args.dataset={dataset!r} is not a dataset: use one of {', '.join(TITLES)}")
        if dataset in STORED_SIDE and native_resolution not in (None, STORED_SIDE[dataset]):
            raise ConfigError(
                f"data.init_args.native_resolution={native_resolution}: {dataset} is stored at "
                f"{STORED_SIDE[dataset]}; leave it None"
            )
        if fallback not in ("none", "sample") or (fallback == "sample" and dataset != "cifar10"):
            raise ConfigError(
                f"data.init_args.fallback={fallback!r}: 'sample' is only for dataset cifar10, else use 'none'"
            )
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("synthetic_train", synthetic_train, 1),
            ("synthetic_test", synthetic_test, 1),
            ("native_resolution", 1 if native_resolution is None else native_resolution, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.init_args.{name}={value!r}: must be an integer >= {low}")
        if isinstance(val_size, bool) or val_size < 0 or (isinstance(val_size, float) and val_size >= 1):
            raise ConfigError(
                f"data.init_args.val_size={val_size!r}: must be a count >= 0 (int) or a fraction in [0, 1) (float)"
            )
        self.dataset, self.root, self.download, self.fallback = dataset, Path(root), download, fallback
        self.batch_size, self.num_workers, self.hflip = batch_size, num_workers, hflip
        self.val_size, self.seed = val_size, seed
        self.synthetic_train, self.synthetic_test = synthetic_train, synthetic_test
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root)
        self._native = STORED_SIDE.get(dataset) or native_resolution or resolution
        if isinstance(self._native, bool) or not isinstance(self._native, int) or self._native < 1:
            raise ConfigError(f"data.init_args.resolution={resolution!r}: must be a positive integer")
        self.resolution = resolution
        self.resolution_for_epoch: Callable[[int], int] | None = None
        self._served: str = dataset  # becomes "sample" when cifar10 falls back
        self._splits: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # split -> (stored array, rows)
        self._notes: dict[str, None] = {}  # ordered set of remarks for data_description

    # --- resolution -------------------------------------------------------------------------------

    @property
    def native_resolution(self) -> int:
        """Side of the stored images; every served resolution is this divided by a power of two."""
        return self._native

    @property
    def resolution(self) -> int:
        """Side of the images the next `*_dataloader()` call serves; settable between epochs."""
        return self._resolution

    @resolution.setter
    def resolution(self, value: int) -> None:
        self.check_resolution(value)
        self._resolution = value

    def check_resolution(self, resolution: int) -> None:
        """Raise ConfigError unless this data can serve `resolution` (native / 2^k)."""
        check_resolution(self._native, resolution)

    # --- Lightning hooks --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download CIFAR-10 (`download=True`) or convert ImageNet npz batches to the memory-mapped cache.

        Lightning runs this once per node before `setup`; outside a Trainer call it yourself. Under DDP the
        ImageNet conversion is not run here (it would outlast the barrier the other ranks wait in): `setup`
        then checks the cache on every rank and names the command that makes it.
        """
        if self.dataset == "cifar10" and self.download:
            self._download_cifar10()
        elif self.dataset in ("imagenet32", "imagenet64") and not self._distributed_run():
            self.prepare_imagenet()

    def prepare_imagenet(self) -> list[Path]:
        """Convert every split's npz files whose cache is missing or stale; returns the cache files."""
        caches = []
        for split, files in imagenet_files(self.root, self._native).items():
            cache = imagenet_cache(self.cache_dir, self._native, split)
            problem = cache_problem(cache, files, self.root)
            if problem is not None:
                rank_zero_info(f"converting {self.dataset} {split} ({len(files)} npz files) to {cache} ({problem})")
                convert_npz(files, self._native, cache, self.root)
            caches.append(cache)
        return caches

    def setup(self, stage: str | None = None) -> None:
        """Load (or map) the splits `stage` needs: train and val for fit/validate, test for test/predict."""
        self._choose_source()
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            pool = self._read("train")
            if self._served == "sample":  # whole photos held out: the patches of a photo stay in one split
                self._splits.update(train=(pool, None), val=(self._read("val"), None))
            else:
                train_rows, val_rows = self._hold_out(len(pool))
                self._splits.update(train=(pool, train_rows), val=(pool, val_rows))
        if stage in (None, "test", "predict") and "test" not in self._splits:
            self._splits["test"] = (self._read("test"), None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def data_description(self) -> str:
        """Which data is actually served (after any fallback), where from, and how many images per split."""
        sizes = ", ".join(f"{self._count(split)} {split}" for split in self._splits) or "not set up yet"
        photos = "; ".join(f"{split}: {', '.join(names)}" for split, names in SAMPLE_PHOTOS.items())
        source = {"sample": f"skimage.data ({photos})", "synthetic": f"seed {self.seed}"}.get(
            self._served, str(find_cifar10(self.root) if self._served == "cifar10" else self.root)
        )
        text = f"{TITLES[self._served]} from {source}: {sizes}; stored {self._native}x{self._native}"
        return "; ".join([f"{text}, served {self.resolution}x{self.resolution}", *self._notes])

    def _count(self, split: str) -> int:
        images, rows = self._splits[split]
        return len(images) if rows is None else len(rows)

    # --- internals --------------------------------------------------------------------------------

    def _download_cifar10(self) -> None:
        directory = find_cifar10(self.root)
        if directory is not None and all((directory / name).is_file() for name in CIFAR10_MD5):
            return
        try:
            download_and_extract_archive(CIFAR10_URL, download_root=str(self.root), md5=CIFAR10_ARCHIVE_MD5)
        except (OSError, RuntimeError, tarfile.TarError) as err:  # offline (URLError is an OSError); bad file
            if self.fallback == "none":
                raise DataNotFoundError(
                    f"downloading CIFAR-10 from {CIFAR10_URL} into {self.root} failed ({err}); fetch and "
                    f"extract cifar-10-python.tar.gz yourself, or point root at the folder that contains "
                    f"{CIFAR10_DIR}"
                ) from err
            rank_zero_warn(f"downloading CIFAR-10 from {CIFAR10_URL} failed ({err}); using fallback='sample'")

    def _choose_source(self) -> None:
        """cifar10 with no `cifar-10-batches-py` under root: fall back to `sample`, or explain the fix."""
        if self._served != "cifar10" or find_cifar10(self.root) is not None:
            return
        why = "download failed" if self.download else "download=False"
        other = cifar10_other_versions(self.root)
        if other:
            raise DataError(
                f"{other[0]} is not the CIFAR-10 python version this dataset reads (expected "
                f"{self.root / CIFAR10_DIR}/data_batch_1..5, test_batch): get cifar-10-python.tar.gz from "
                f"{CIFAR10_URL} and extract it into {self.root}, or set download=True"
            )
        if self.fallback == "none":
            raise DataNotFoundError(
                f"no CIFAR-10 under {self.root} (expected {self.root / CIFAR10_DIR}/data_batch_1..5, "
                f"test_batch; {why}): set download=True to fetch it, or set root to the folder that contains "
                f"{CIFAR10_DIR}"
            )
        self._served = "sample"
        self._notes[f"FALLBACK: no cifar10 under {self.root} ({why}), sample photos served instead"] = None
        rank_zero_warn(
            f"DATA FALLBACK: no CIFAR-10 under {self.root} ({why}); serving the 'sample' dataset instead "
            f"(scikit-image photos cut into {self._native}x{self._native} patches; NOT CIFAR-10, numbers are "
            f"not comparable with CIFAR-10 results)"
        )

    def _read(self, split: str) -> np.ndarray:
        """The stored uint8 (N, 3, S, S) images of `split` (train = the pool val is held out of)."""
        side = self._native
        if self._served == "cifar10":
            directory = find_cifar10(self.root)
            images, not_official = read_cifar10(directory, CIFAR10_FILES[split])
            self._report_md5(directory, not_official)
            return images
        if self._served in ("imagenet32", "imagenet64"):
            cache = imagenet_cache(self.cache_dir, side, split)
            problem = cache_problem(cache, imagenet_files(self.root, side)[split], self.root)
            if problem is not None:
                cache_arg = "" if self.cache_dir == default_cache_dir(self.root) else f" CACHE_DIR={self.cache_dir}"
                raise DataError(
                    f"no usable {self.dataset} cache for the {split} split ({problem}). Convert the npz files "
                    f"once, before training: `make prepare-{self.dataset} DATA_ROOT={self.root}{cache_arg}` "
                    f"(python -m lightning_dq.prepare --dataset {self.dataset} --root {self.root}"
                    f"{f' --cache_dir {self.cache_dir}' if cache_arg else ''}); a single-process run converts "
                    f"in prepare_data()"
                )
            try:
                images = np.load(cache, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                fix = f"run make prepare-{self.dataset} again"
                raise DataError(f"{cache} is not a readable .npy file ({err}): {fix}") from err
            check_image_array(images, cache)
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
                f"{self.root} holds {len(paths)} images: every 10th is held out as test, so at least 10 are "
                f"needed (or make {self.root / 'train'} and {self.root / 'test'} subfolders)"
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
                f"{directory}: md5 of {', '.join(new)} differs from the official CIFAR-10 files; reading "
                f"them anyway (the format is valid), but these are not the official pixels: do not compare "
                f"results with published CIFAR-10 numbers"
            )

    def _distributed_run(self) -> bool:
        """Whether this module serves a Trainer running several processes (known before the process group
        exists, so `prepare_data` can tell), or a process group of more than one rank is up."""
        if self.trainer is not None and self.trainer.world_size > 1:
            return True
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _loader(self, split: str) -> DataLoader:
        if self.resolution_for_epoch is not None and self.trainer is not None:
            self.resolution = self.resolution_for_epoch(self.trainer.current_epoch)
        if split not in self._splits:
            raise RuntimeError(f"no {split} split loaded: call setup() with the matching stage first")
        images, rows = self._splits[split]
        source = Path(images.filename) if isinstance(images, np.memmap) else images  # workers re-map files
        train = split == "train"
        # train and val are scattered rows of the stored array: random access, no kernel readahead
        dataset = ImageArrayDataset(source, self.resolution, rows, self.hflip and train, rows is not None)
        common = dict(num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=self.num_workers > 0)  # fmt: skip
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not train and distributed:
            rank, world = dist.get_rank(), dist.get_world_size()
            if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:  # nothing counted
                sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
                return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
            # every image once, equal batch counts on all ranks (see EvenShardSampler); batches come whole
            sampler = EvenShardSampler(dataset, self.batch_size, num_replicas=world, rank=rank)
            return DataLoader(dataset, batch_size=None, sampler=sampler, **common)
        if not train:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)
        # a fresh loader each epoch must not repeat the previous epoch's order; the order is a function of
        # (seed, epoch), so a run resumed mid-epoch skips exactly the batches it had trained on
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=generator, **common)
