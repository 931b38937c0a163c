"""Datasets, deterministic splits and the model-driven image transform."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from sls.data.embedded import EMBEDDED_DATASETS, ImageArrays
from sls.data.files import LabelledFiles, find_bad_images, read_files
from sls.data.store import ModelTransform, image_store
from sls.errors import ConfigError, DataError

__all__ = [
    "EMBEDDED_DATASETS",
    "ImageArrays",
    "ImageDataset",
    "ImageSource",
    "LabelledFiles",
    "Splits",
    "load_dataset",
    "make_splits",
    "make_transform",
    "split_dataset",
    "stratified_subset",
]

SPLIT_SEED = 0
"""Seed of the embedded sets' train / val / test split: fixed, so every run of every
command sees the same split whatever its own ``--seed``."""


ImageSource = ImageArrays | LabelledFiles
"""A labelled image set: ``labels``, ``classes``, ``source``, ``splits`` (predefined
split indices or None) and ``image(i)`` (an RGB PIL image)."""


def load_dataset(spec: str) -> ImageSource:
    """An embedded set by name (``mnist5k``, ``fashion-mnist``, ``digits``), a VTAB-1k
    folder, an image-folder tree or a ``path,label[,split]`` CSV file."""
    if spec in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[spec]()
    path = Path(spec).expanduser()
    if path.exists():
        return read_files(spec)
    raise ConfigError(
        f"unknown dataset {spec!r}: not an embedded set ({', '.join(EMBEDDED_DATASETS)}) "
        "nor an existing folder or .csv file"
    )


@dataclass(frozen=True)
class Splits:
    """Sorted sample indices of each split of one dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def describe(self) -> dict:
        """Sizes and a fingerprint of each split, for the task record."""
        return {
            name: {"size": int(len(idx)), "sha256": hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:16]}
            for name, idx in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def stratified_subset(indices: np.ndarray, labels: np.ndarray, size: int | None, seed: int = SPLIT_SEED) -> np.ndarray:
    """``size`` of ``indices`` drawn with the class proportions kept (seeded), sorted;
    all of them when ``size`` is None or not smaller."""
    if size is None or size >= len(indices):
        return np.sort(indices)
    n_classes = len(np.unique(labels[indices]))
    if size < n_classes:
        raise ConfigError(f"a subset of {size} samples cannot hold all {n_classes} classes")
    subset, _ = train_test_split(indices, train_size=size, stratify=labels[indices], random_state=seed)
    return np.sort(subset)


def split_dataset(
    labels: np.ndarray,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = SPLIT_SEED,
) -> Splits:
    """Deterministic stratified train / val / test split.

    First ``test_fraction`` and ``val_fraction`` of the data are set aside (stratified
    by class, seeded); then the train and test splits are optionally cut to
    ``train_size`` / ``test_size`` samples by a stratified subset. The same labels and
    arguments always give the same indices.
    """
    labels = np.asarray(labels)
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ConfigError(f"bad split fractions: test {test_fraction}, val {val_fraction}")
    if len(np.unique(labels)) < 2:
        raise DataError("the dataset holds a single class; a classifier needs at least 2")
    everything = np.arange(len(labels))
    try:
        rest, test = train_test_split(everything, test_size=test_fraction, stratify=labels, random_state=seed)
        if val_fraction > 0:
            val_share = val_fraction / (1 - test_fraction)
            train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
        else:
            train, val = rest, np.array([], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"cannot split {len(labels)} samples by class: {err}") from None
    return Splits(
        train=stratified_subset(train, labels, train_size, seed),
        val=np.sort(val),
        test=stratified_subset(test, labels, test_size, seed),
    )


def make_transform(
    img_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: str = "bicubic",
) -> ModelTransform:
    """Resize to ``img_size`` square, to tensor, normalise with the model's statistics.

    Mean, std and interpolation come from the model's pretrained config (see
    :func:`sls.backbones.data_config`); no augmentation, as in the paper's recipe. The
    transform is a torchvision ``Compose`` that can also split at the resized uint8
    pixels (:class:`~sls.data.store.ModelTransform`), which :class:`ImageDataset` stores once.
    """
    return ModelTransform(img_size, mean, std, interpolation)


def make_splits(data: ImageSource, *, train_size: int | None = None, test_size: int | None = None) -> Splits:
    """The dataset's own splits when it has them (VTAB-1k lists, train/ and test/
    folders, a CSV split column), else :func:`split_dataset`; then the train and
    test splits cut to ``train_size`` / ``test_size`` by stratified subsets."""
    if data.splits is None:
        return split_dataset(data.labels, train_size=train_size, test_size=test_size)
    given = data.splits
    return Splits(
        train=stratified_subset(given["train"], data.labels, train_size),
        val=np.sort(given.get("val", np.array([], dtype=np.int64))),
        test=stratified_subset(given["test"], data.labels, test_size),
    )


class ImageDataset(Dataset):
    """Torch view of some samples of an image source, transformed to tensors.

    With ``store`` and the model's transform (:func:`make_transform`), the images are
    decoded and resized once, at the first item asked for, into a uint8 store
    (:func:`sls.data.store.image_store`), and every item after that, in this epoch or
    the next or in a later stage of the same process, is read from it; a batch asked
    for at once (``__getitems__``, what a ``DataLoader`` does) is normalised in one
    operation. The tensors are identical to the transform's.

    Args:
        data: the image source.
        indices: the samples, in the order they are served.
        transform: PIL image -> tensor.
        skip_bad: check every image first and leave out the ones that cannot be
            read (reported in ``skipped``) instead of failing on the first.
        store: keep the resized images (needs a :class:`~sls.data.store.ModelTransform`).
        progress: a progress bar while the store is filled.
    """

    def __init__(self, data: ImageSource, indices: np.ndarray, transform, *, skip_bad: bool = False,
                 store: bool = False, progress: bool = False, cache: bool = True) -> None:  # fmt: skip
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.store = store and isinstance(transform, ModelTransform)
        self.progress, self.cache = progress, cache
        self._pixels: np.ndarray | None = None
        self.skipped: list[tuple[int, str]] = []
        if skip_bad and isinstance(data, LabelledFiles):
            self.skipped = find_bad_images(data, self.indices)
            bad = {i for i, _ in self.skipped}
            self.indices = np.array([i for i in self.indices if i not in bad], dtype=np.int64)
        if len(self.indices) == 0:
            raise DataError(f"{data.source}: no readable images left in this split")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels[self.indices]

    @property
    def pixels(self) -> np.ndarray | None:
        """The resized uint8 images ``(n, c, side, side)`` (filled on first use), or None without a store."""
        if self.store and self._pixels is None:
            self._pixels = image_store(self.data, self.indices, self.transform, progress=self.progress,
                                       cache=self.cache)  # fmt: skip
            if self._pixels is None:  # too large for memory, and no cache to map it from
                self.store = False
        return self._pixels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.store and self.pixels is not None:
            return self.__getitems__([i])[0]
        j = self.indices[i]
        return self.transform(self.data.image(j)), int(self.data.labels[j])

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Items at ``positions``: from the store, normalised as one batch."""
        if not self.store or self.pixels is None:
            return [self[i] for i in positions]
        positions = np.asarray(positions, dtype=np.int64)
        batch = self.transform.normalize(torch.from_numpy(np.ascontiguousarray(self.pixels[positions])))
        labels = self.data.labels[self.indices[positions]]
        return list(zip(batch.unbind(0), (int(v) for v in labels)))
