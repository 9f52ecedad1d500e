"""Serving the cached pixels to Lightning: one dataset class, one loader factory for every split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from pipeline.data.cache import OFFLINE_IMAGES, OFFLINE_LABELS, Images, Rows
from pipeline.data.prepared import DataError, Prepared


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights ``n / (k * n_c)`` (1 for every class when balanced); absent classes get 0."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


class CachedImageDataset(Dataset):
    """Rows of the pixel cache as (C, H, W) tensors in the cache's dtype, augmented when a transform is given.

    Conversion to float and normalization happen on the device (``model.Classifier``), so the loader
    moves a quarter of the bytes and the workers do only the augmentation.
    """

    def __init__(self, images: Images, labels: np.ndarray, transform: A.BasicTransform | None = None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = np.asarray(self.images[i])
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[i])


class UnlabelledDataset(Dataset):
    """Pool images (``pooled.load_pool(...).images``, or any rows of a cache) as (C, H, W) tensors in the cache's
    dtype, without labels. ``transform``: one albumentations transform (an item is one tensor), or a sequence of
    them (an item is a tuple of views, one per transform: FixMatch's weak and strong view, SimCLR's two)."""

    def __init__(
        self, images: Images, transform: A.BasicTransform | Sequence[A.BasicTransform] | None = None
    ):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def _view(self, image: np.ndarray, transform: A.BasicTransform | None) -> torch.Tensor:
        if transform is not None:
            image = transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        image = np.asarray(self.images[i])
        if isinstance(self.transform, Sequence):
            return tuple(self._view(image, t) for t in self.transform)
        return self._view(image, self.transform)


def load_offline(folder: Path, prepared: Prepared, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """The augment stage's offline copies of the train split; checked against ``prepared`` and ``copies``."""
    if not (folder / OFFLINE_LABELS).is_file():
        raise DataError(
            f"{folder}: offline copies not found; run the augment stage first (dvc repro augment)"
        )
    # Memory-mapped: dataset() reads them per item.
    images, labels = np.load(folder / OFFLINE_IMAGES, mmap_mode="r"), np.load(folder / OFFLINE_LABELS)
    expected = copies * len(prepared.split("train"))
    if len(labels) != expected or images.shape[1:] != prepared.images.shape[1:]:
        raise DataError(
            f"{folder}: {len(labels)} offline copies of {images.shape[1:]} images, expected {expected} "
            f"of {prepared.images.shape[1:]} (augment.offline_copies={copies}); rerun the augment stage"
        )
    return images, labels


def _reseed_worker(worker_id: int) -> None:
    # albumentations 2 keeps its own generator; without this every worker (and every epoch's fresh
    # workers) would replay the same augmentation draws. torch's per-worker seed differs per epoch.
    info = torch.utils.data.get_worker_info()
    assert info is not None, "called in loader workers only"
    transform = getattr(info.dataset, "transform", None)
    # one transform, or several (UnlabelledDataset's views): each its own seed, or two views would be alike
    for k, t in enumerate(transform if isinstance(transform, Sequence) else [transform]):
        if t is not None:
            t.set_random_seed((torch.initial_seed() + k) % 2**32)


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        prepared: Prepared,
        train_transform: A.BasicTransform | None,
        *,
        batch_size: int,
        num_workers: int = 0,
        offline: tuple[np.ndarray, np.ndarray] | None = None,
        balanced: bool = False,
        seed: int = 0,
        pool: Images | None = None,
        pool_ratio: int = 3,
        strong: A.BasicTransform | None = None,
    ):
        """``offline``: (images, label indices) appended to the train split, e.g. from ``load_offline``.
        ``balanced``: training batches drawn class-balanced, with replacement (``train.balance: sampler``).
        ``pool``: unlabelled images (``train.semi: fixmatch``): each training step also gets ``pool_ratio``
        of them per labelled image, as a weak view (``train_transform``) and a ``strong`` one.
        """
        super().__init__()
        self.prepared, self.train_transform, self.offline = prepared, train_transform, offline
        self.batch_size, self.num_workers, self.balanced, self.seed = batch_size, num_workers, balanced, seed
        self.pool, self.pool_ratio, self.strong = pool, pool_ratio, strong

    @property
    def num_classes(self) -> int:
        return len(self.prepared.classes)

    def dataset(self, split: str, transform: A.BasicTransform | None = None) -> CachedImageDataset:
        rows = self.prepared.split(split)
        if rows.empty:
            raise ValueError(f"split '{split}' is empty")
        # Rows of the memory map, read per item: bounded memory however large the split (issue 17); random
        # reads from the page cache keep up with training (python -m pipeline bench scale: dataloader).
        labels = rows["label_index"].to_numpy()
        extra = None
        if split == "train" and self.offline is not None:
            extra, labels = self.offline[0], np.concatenate([labels, self.offline[1]])
        return CachedImageDataset(
            Rows(self.prepared.images, rows["cache_index"].to_numpy(), extra), labels, transform
        )

    def _dataloader(self, split: str) -> DataLoader:
        train = split == "train"
        dataset = self.dataset(split, self.train_transform if train else None)
        sampler: Sampler | None = None
        if train and self.balanced:
            # Each image drawn with its class's inverse frequency: every class equally likely per draw.
            # Under DDP, Lightning wraps this sampler so that each rank draws its own share.
            weights = class_weights(dataset.labels, self.num_classes)[dataset.labels]
            sampler = WeightedRandomSampler(
                weights.tolist(),
                num_samples=len(dataset),
                replacement=True,
                generator=torch.Generator().manual_seed(self.seed),
            )
        elif not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP each rank scores its own share of val: Lightning's DistributedSampler would pad the
            # shares to equal length with repeated images, and with a val split of a few dozen that moves the
            # epoch's metrics (and the checkpoint chosen on them). This one gives every image to exactly one
            # rank; Lightning keeps a DistributedSampler it is given. Validation runs under no_grad, where DDP
            # syncs nothing per batch, so ranks may run one batch more or less.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            # A last training batch of one image would break BatchNorm; drop it.
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_reseed_worker if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        labelled = self._dataloader("train")
        if self.pool is None:
            return labelled
        if self.strong is None:
            raise ValueError("a pool needs the strong view's transform")
        batch = self.batch_size * self.pool_ratio
        pool = DataLoader(
            UnlabelledDataset(self.pool, [self.train_transform, self.strong]),
            batch_size=min(batch, len(self.pool)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_reseed_worker if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )
        # An epoch stays a pass over the labelled images (the schedule's epochs mean what they meant): a larger
        # pool is drawn afresh each epoch, a smaller one cycled.
        if len(pool) >= len(labelled):
            return CombinedLoader({"labelled": labelled, "pool": pool}, mode="min_size")
        return CombinedLoader({"labelled": labelled, "pool": pool}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val")
