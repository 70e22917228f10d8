"""`ImageDataModule`: every dataset of the project as uint8 (B, 3, H, W) batches at a settable resolution. Each split is
one uint8 (N, 3, S, S) array (ImageNet's memory-mapped); each `*_dataloader()` call serves the current `resolution`
exactly. (*) without `train/` and `test/` under `root`, every 10th image (sorted paths) is test.

| dataset | stored side | train / val | test |
| --- | --- | --- | --- |
| cifar10 | 32 | data_batch_1..5, `val_size` held out | test_batch |
| imagenet32, imagenet64 | 32, 64 | train_data_batch_1..10.npz, `val_size` held out | val_data.npz |
| folder | `native_resolution` | `root/train/` (*), `val_size` held out | `root/test/` (*) |
| sample | `native_resolution` | patches of 4 photos / of 1 photo | patches of 1 photo |
| synthetic | `native_resolution` | `synthetic_train` images, `val_size` held out | `synthetic_test` images |"""

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_dq.codec.codes import CodeDataset
from lightning_dq.data.arrays import ImageArrayDataset, check_servable
from lightning_dq.data.cifar10 import CIFAR10_FILES, cifar10_fallback, download_cifar10, find_cifar10, read_cifar10
from lightning_dq.data.imagenet import IMAGENET_COUNTS, open_imagenet, prepare_imagenet
from lightning_dq.data.images import SAMPLE_PHOTOS, read_folder, sample_patches, synthetic_images
from lightning_dq.data.samplers import EvenShardSampler, ResumableDataLoader, TrainSampler
from lightning_dq.errors import ConfigError
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


class ImageDataModule(LightningDataModule):
    """Image batches, uint8 (B, 3, resolution, resolution), for every stage; no labels. Train shuffles as a function of
    (`seed`, epoch) and resumes mid-epoch; val and test keep their order and serve every image once, under DDP too. A
    new resolution needs a new loader (`reload_dataloaders_every_n_epochs: 1`).

    Args:
        dataset: which data to serve (see the module docstring). "synthetic" is not real data.
        root: cifar10: the folder holding `cifar-10-batches-py/` (or that folder); imagenet32/64: the folder of the
            npz files (or of the official unzipped subfolders); folder: the image tree. Unused by sample, synthetic.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        resolution: served image side; the stored side divided by a power of two.
        native_resolution: stored side of folder, sample and synthetic (None = `resolution`); fixed for the others.
        download: cifar10 only: download the official archive into `root` when files are missing (ImageNet: never).
        hflip: random left-right flips of training images only; off by default (likelihood benchmarks use none).
        val_size: images held out of train for validation: a count (int) or a fraction (float); `sample` holds out
            a whole photo instead.
        seed: seeds the validation hold-out, the training order and the synthetic images.
        fallback: cifar10 only: "sample" serves the sample photos (with a loud warning) when `root` holds no
            `cifar-10-batches-py` and none could be downloaded; "none" raises instead.
        synthetic_train: number of synthetic train (+ val) images.
        synthetic_test: number of synthetic test images.
        cache_dir: imagenet32/64: folder of the converted arrays (None = `<root>/lightning_dq_cache`), e.g. for a
            read-only `root`. Every rank must see the same cache.
        codes: a folder `lightning-dq encode` wrote: train and val batches are then the flat codes (B, T) int64 of
            those images, for a prior (the test split stays images: figure A needs the decoder).
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
        codes: str | None = None,
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
        counts = {"batch_size": batch_size, "num_workers": num_workers, "synthetic_train": synthetic_train}
        counts |= {"synthetic_test": synthetic_test, "native_resolution": native_resolution}  # None: not checked
        if native_resolution is None and dataset not in STORED_SIDE:  # the resolution is the stored side
            counts["resolution"] = resolution
        for name, value in counts.items():
            low = 0 if name == "num_workers" else 1
            if value is not None and value < low:
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
        self.codes = codes
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
        """Download CIFAR-10 (`download=True`) or convert ImageNet's npz files to the cache, once per node. Under DDP
        (the Trainer knows before the process group does) ImageNet is not converted: it would outlast the other ranks'
        barrier, and `setup` names the command instead."""
        distributed = (self.trainer is not None and self.trainer.world_size > 1) or is_distributed()
        if self.dataset == "cifar10" and self.download:
            download_cifar10(self.root, self.fallback)
        elif self.dataset in ("imagenet32", "imagenet64") and not distributed:
            prepare_imagenet(self.root, self.native_resolution, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load (or map) the splits `stage` needs: train and val for fit/validate, test for test."""
        if self._served == "cifar10" and find_cifar10(self.root) is None:  # raises unless fallback="sample"
            self._notes[cifar10_fallback(self.root, self.download, self.fallback, self.native_resolution)] = None
            self._served = "sample"
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
        counts = {split: len(images if rows is None else rows) for split, (images, rows) in self._splits.items()}
        sizes = ", ".join(f"{n} {split}" for split, n in counts.items()) or "not set up yet"
        photos = "; ".join(f"{split}: {', '.join(names)}" for split, names in SAMPLE_PHOTOS.items())
        path = find_cifar10(self.root) if self._served == "cifar10" else self.root
        source = {"sample": f"skimage.data ({photos})", "synthetic": f"seed {self.seed}"}.get(self._served, str(path))
        sides = f"stored {self.native_resolution}x{self.native_resolution}, served {self.resolution}x{self.resolution}"
        return "; ".join([f"{TITLES[self._served]} from {source}: {sizes}; {sides}", *self._notes])

    def _read(self, split: str) -> np.ndarray:
        """The stored uint8 (N, 3, S, S) images of `split` (train = the pool val is held out of)."""
        side = self.native_resolution
        if self._served == "cifar10":
            return read_cifar10(find_cifar10(self.root), CIFAR10_FILES[split], self._notes)
        if self._served in ("imagenet32", "imagenet64"):
            images = open_imagenet(self.root, side, self.cache_dir, split)
            if len(images) != IMAGENET_COUNTS[split]:
                self._notes[f"{len(images)} {split} images, not the full {IMAGENET_COUNTS[split]}"] = None
            return images
        if self._served == "folder":
            return read_folder(self.root, split, side, self._notes)
        if self._served == "sample":
            return sample_patches(SAMPLE_PHOTOS[split], side)
        count = self.synthetic_test if split == "test" else self.synthetic_train
        return synthetic_images(count, side, seed=(self.seed, int(split == "test")))

    def _hold_out(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, val rows) of n images: val is `val_size` rows of a permutation seeded by `seed`."""
        k = round(self.val_size * n) if isinstance(self.val_size, float) else self.val_size
        if k >= n:
            raise ConfigError(f"data.init_args.val_size={self.val_size} holds out {k} of {n} train images; leave some")
        order = np.random.default_rng(self.seed).permutation(n)
        return np.sort(order[k:]), np.sort(order[:k])

    def _loader(self, split: str) -> DataLoader:
        if split not in self._splits:
            raise RuntimeError(f"no {split} split loaded: call setup() with the matching stage first")
        images, rows = self._splits[split]
        source = Path(images.filename) if isinstance(images, np.memmap) else images  # workers map files again
        # train and val are scattered rows of the stored array: random access, no readahead
        dataset = ImageArrayDataset(source, self.resolution, rows, self.hflip and split == "train", rows is not None)
        if self.codes and split != "test":  # the same images, encoded once
            dataset = CodeDataset(self.codes, split, len(dataset), self.resolution)
        workers = self.num_workers
        common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
        world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
        if split == "train":
            sampler = TrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
        if world > 1:  # every image once, equal batch counts on all ranks; batches come whole
            sampler = EvenShardSampler(dataset, self.batch_size, num_replicas=world, rank=rank)
            return DataLoader(dataset, batch_size=None, sampler=sampler, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)
