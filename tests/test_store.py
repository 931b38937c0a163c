"""The uint8 image store: decoded once, the transform's tensors bit for bit, memory-mapped when large."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import sls.data.store as store
from sls.data import ImageDataset, load_dataset, make_transform
from sls.data.files import read_files
from sls.errors import DataError
from sls.tasks import get_task, loader_settings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _fresh_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("SLS_CACHE", str(tmp_path / "cache"))
    store.forget_stores()
    yield
    store.forget_stores()


def _folder(root, n_per_class=6, size=(37, 29)):
    """An image-folder tree of RGB PNG and JPEG files of random pixels."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'png' if i % 2 else 'jpg'}")
    return read_files(str(root))


def _count_decodes(monkeypatch, data):
    calls = []
    if hasattr(data, "images"):  # in-memory grayscale: the store reads the array
        original = store._source_image
        monkeypatch.setattr(store, "_source_image", lambda d, i: calls.append(i) or original(d, i))
    else:
        original = type(data).image
        monkeypatch.setattr(type(data), "image", lambda self, i: calls.append(i) or original(self, i))
    return calls


@pytest.mark.parametrize("source", ["digits", "folder"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_stored_items_and_batches_are_the_transforms_bit_for_bit(tmp_path, source, interpolation):
    data = load_dataset("digits") if source == "digits" else _folder(tmp_path / "images")
    indices = np.arange(0, len(data), 3)[:12]
    transform = make_transform(24, MEAN, STD, interpolation)
    plain = ImageDataset(data, indices, transform)
    stored = ImageDataset(data, indices, transform, store=True)
    for i in range(len(indices)):
        image, label = stored[i]
        expected, expected_label = plain[i]
        assert label == expected_label
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
    for (a, la), (b, lb) in zip(DataLoader(stored, batch_size=5), DataLoader(plain, batch_size=5)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert stored.pixels.dtype == np.uint8
    assert stored.pixels.shape == (len(indices), 1 if source == "digits" else 3, 24, 24)


def test_images_are_decoded_once_for_every_epoch_and_every_dataset_of_the_same_split(monkeypatch):
    data = load_dataset("digits")
    calls = _count_decodes(monkeypatch, data)
    indices = np.arange(40)
    transform = make_transform(16, MEAN, STD)
    loader = DataLoader(ImageDataset(data, indices, transform, store=True), batch_size=8, shuffle=True)
    for _ in range(3):
        assert sum(len(labels) for _, labels in loader) == 40
    again = ImageDataset(data, indices, transform, store=True)  # the next stage of the same process
    next(iter(DataLoader(again, batch_size=8)))
    assert sorted(calls) == list(range(40))
    ImageDataset(data, indices, make_transform(20, MEAN, STD), store=True)[0]  # another size: decoded again
    assert len(calls) == 80


def test_a_store_over_the_memory_budget_is_memory_mapped_from_the_cache_and_reused(tmp_path, monkeypatch):
    data = _folder(tmp_path / "images")
    indices = np.arange(len(data))
    transform = make_transform(16, MEAN, STD)
    in_memory = store.image_store(data, indices, transform)
    folder = tmp_path / "stores"
    mapped = store.image_store(data, indices, transform, max_bytes=0, folder=folder)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, in_memory)
    [path] = folder.glob("*.npy")
    calls = _count_decodes(monkeypatch, data)
    np.testing.assert_array_equal(store.image_store(data, indices, transform, max_bytes=0, folder=folder), in_memory)
    assert calls == []  # read from the file, nothing decoded
    path.write_bytes(b"not an npy file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = store.image_store(data, indices, transform, max_bytes=0, folder=folder)
    np.testing.assert_array_equal(again, in_memory)
    assert len(calls) == len(indices)
    # Another file's images (a changed file) are another store.
    (tmp_path / "images" / "cat" / "0.jpg").write_bytes((tmp_path / "images" / "dog" / "1.png").read_bytes())
    store.image_store(data, indices, transform, max_bytes=0, folder=folder)
    assert len(list(folder.glob("*.npy"))) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_an_undecodable_image_is_one_line_naming_the_file(tmp_path, monkeypatch, workers):
    data = _folder(tmp_path / "images")
    (tmp_path / "images" / "dog" / "2.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setattr(store, "decode_workers", lambda n: workers)
    dataset = ImageDataset(data, np.arange(len(data)), make_transform(16, MEAN, STD), store=True)
    with pytest.raises(DataError) as caught:
        dataset[0]
    assert "2.jpg" in str(caught.value) and "\n" not in str(caught.value)


def test_decoding_workers_follow_the_split_and_the_cores(monkeypatch):
    monkeypatch.setattr(store.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert store.decode_workers(100) == 0  # too few images to pay for the workers' start
    assert store.decode_workers(5000) == 8
    monkeypatch.setattr(store.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert store.decode_workers(5000) == 0


def test_loaders_pin_memory_for_a_gpu_and_use_workers_only_where_items_are_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "decode_workers", lambda n: 4)
    data = load_dataset("digits")
    transform = make_transform(16, MEAN, STD)
    stored = ImageDataset(data, np.arange(8), transform, store=True)
    decoded = ImageDataset(data, np.arange(8), transform)
    assert loader_settings(stored, "cuda") == {"num_workers": 0, "pin_memory": True}
    assert loader_settings(decoded, torch.device("cuda", 0)) == {"num_workers": 4, "pin_memory": True}
    for device in ("cpu", None):  # on the CPU the cores are the model's
        assert loader_settings(decoded, device) == {"num_workers": 0, "pin_memory": False}
    loader = get_task("classification").loader(stored, device="cpu")
    assert loader.num_workers == 0 and not loader.pin_memory


def test_the_experiments_loaders_read_from_stores():
    from sls.config import RunConfig
    from sls.experiment import Experiment

    exp = Experiment.from_config(RunConfig(model="test_vit", weights="random", data="digits", img_size=16,
                                           train_samples=200, test_samples=30, epochs=1, progress=False))  # fmt: skip
    for loader in (exp.train_loader, exp.test_loader, exp.analysis_loader, exp.val_loader):
        assert loader.dataset.store and loader.num_workers == 0
    images, _ = next(iter(exp.test_loader))
    plain = ImageDataset(exp.data, exp.test_loader.dataset.indices, exp.test_loader.dataset.transform)
    torch.testing.assert_close(images, torch.stack([plain[i][0] for i in range(len(images))]), rtol=0, atol=0)


def test_a_store_that_fits_nowhere_leaves_the_dataset_decoding_per_item(tmp_path, monkeypatch):
    data = _folder(tmp_path / "images")
    transform = make_transform(16, MEAN, STD)
    plain = ImageDataset(data, np.arange(6), transform)
    monkeypatch.setenv("SLS_STORE_MAX_MB", "0")
    # --no-cache: nothing written to the cache, the images decoded at each use.
    no_cache = ImageDataset(data, np.arange(6), transform, store=True, cache=False)
    for i in range(6):
        torch.testing.assert_close(no_cache[i][0], plain[i][0], rtol=0, atol=0)
    assert not no_cache.store and not (tmp_path / "cache").exists()
    # A cache that cannot be written (a file where its folder would be): one warning, then per item.
    (tmp_path / "cache").write_text("not a folder")
    with pytest.warns(UserWarning, match="fits neither in memory"):
        unwritable = ImageDataset(data, np.arange(6), transform, store=True)
        batch, _ = next(iter(DataLoader(unwritable, batch_size=6)))
    torch.testing.assert_close(batch, torch.stack([plain[i][0] for i in range(6)]), rtol=0, atol=0)


def test_the_in_memory_budget_counts_every_store_of_the_process(tmp_path, monkeypatch):
    data = load_dataset("digits")
    transform = make_transform(16, MEAN, STD)
    one = 100 * 16 * 16  # 100 grayscale images
    first = store.image_store(data, np.arange(100), transform, max_bytes=int(1.5 * one))
    assert not isinstance(first, np.memmap)
    second = store.image_store(data, np.arange(100, 200), transform, max_bytes=int(1.5 * one),
                               folder=tmp_path / "stores")  # fmt: skip
    assert not isinstance(second, np.memmap)  # the first one, least recently used, was let go to make room
    assert list(store._IN_MEMORY.values())[-1] is second and len(store._IN_MEMORY) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("SLS_STORE_MAX_MB", "400")
    assert store.store_budget() <= 100 * 1024 * 1024  # shared among the processes of the machine


def test_filling_a_store_leaves_the_global_generators_alone(tmp_path):
    data = _folder(tmp_path / "images")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    ImageDataset(data, np.arange(len(data)), make_transform(16, MEAN, STD), store=True)[0]
    assert torch.equal(torch.get_rng_state(), before)
