"""Images decoded and resized once: a uint8 store at the model's input size.

No augmentation runs in SLS's recipe, so every epoch and every stage of a run sees the
same pixels. :func:`image_store` decodes and resizes each image of a split once, with
the model transform's own resize (so the pixels are bit for bit the ones the transform
gives), and keeps them as uint8 ``(n, channels, side, side)``: in memory when they fit
(:func:`store_budget`), else in a memory-mapped ``.npy`` file in the cache folder, which
every later command on the same images and size reuses. A batch is then an index
into that array, a float conversion and the normalisation, done once for the whole
batch (:meth:`ModelTransform.normalize`), with results identical to the transform's.

Grayscale sources (the embedded MNIST-type sets) are stored with one channel and
expanded at read time: RGB from grayscale repeats the channel, and so does its resize.

Decoding runs in loader worker processes when the split is large and the machine has
cores to spare (:func:`decode_workers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as F
from tqdm.auto import tqdm

from sls._io import atomic_write, cache_dir, megabytes_from_env
from sls.errors import DataError, SLSError

STORE_FORMAT = 1
DEFAULT_MAX_MEMORY_MB = 4096
DEFAULT_MAX_DISK_MB = 16384
MIN_PARALLEL_DECODE = 512
"""Images below which decoding stays in this process (worker start-up would cost more)."""


class ModelTransform(transforms.Compose):
    """The model's input transform: resize to ``img_size`` square (antialiased), to a
    float tensor in [0, 1], normalise with ``mean`` and ``std``.

    Called on a PIL image it is the plain torchvision ``Compose``; :meth:`resize` and
    :meth:`normalize` split it at the uint8 pixels, so a store of resized pixels gives
    exactly the same tensors, a batch at a time.
    """

    def __init__(self, img_size: int, mean, std, interpolation: str = "bicubic") -> None:
        self.img_size = int(img_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = transforms.InterpolationMode(interpolation)
        super().__init__([
            transforms.Resize((self.img_size, self.img_size), interpolation=self.interpolation, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])  # fmt: skip

    def key(self) -> list:
        return [self.img_size, list(self.mean), list(self.std), self.interpolation.value]

    def resize(self, image) -> np.ndarray:
        """A PIL image resized as :meth:`__call__` does: uint8 ``(side, side)`` for a
        grayscale image, ``(side, side, 3)`` for RGB."""
        size = [self.img_size, self.img_size]
        return np.asarray(F.resize(image, size, interpolation=self.interpolation, antialias=True))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(b, c, h, w)`` (c = 1 is repeated to 3) to the normalised float batch,
        the same operations ``ToTensor`` and ``Normalize`` apply to one image."""
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        batch = pixels.to(dtype=torch.float32).div(255)
        return F.normalize(batch, list(self.mean), list(self.std), inplace=True)


def _available_memory() -> int | None:
    """MemAvailable (what can be allocated without swapping), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_budget() -> int:
    """Bytes this process's in-memory stores may take together: ``$SLS_STORE_MAX_MB``
    (default 4096), at most a quarter of the memory available now, shared among the
    processes of this machine under torchrun (``LOCAL_WORLD_SIZE``); a larger store is
    memory-mapped from the cache."""
    limit = megabytes_from_env("SLS_STORE_MAX_MB", DEFAULT_MAX_MEMORY_MB)
    available = _available_memory()
    if available is not None:
        limit = min(limit, available // 4)
    return limit // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def decode_workers(n_images: int) -> int:
    """Loader processes that decode a split of ``n_images``: none below
    :data:`MIN_PARALLEL_DECODE` images or on one core, else one per core (at most 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_images < MIN_PARALLEL_DECODE or cores < 2:
        return 0
    return min(8, cores)


class _Resized(Dataset):
    """Decode and resize one image per item (what a store is filled from)."""

    def __init__(self, data, indices: np.ndarray, transform: ModelTransform) -> None:
        self.data, self.indices, self.transform = data, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray | DataError:
        try:
            return self.transform.resize(_source_image(self.data, int(self.indices[i])))
        except DataError as err:  # raised in the caller's process, as one line (not a worker's traceback)
            return err


def _as_list(items: list) -> list:
    return items


def _source_image(data, i: int):
    """The image as the source gives it; an in-memory grayscale set stays grayscale
    (its RGB conversion repeats the channel, and so would the resize)."""
    images = getattr(data, "images", None)
    if images is not None and images.ndim == 3:
        from PIL import Image

        return Image.fromarray(images[i])
    return data.image(i)


def _channels(data) -> int:
    images = getattr(data, "images", None)
    return 1 if images is not None and images.ndim == 3 else 3


def store_key(data, indices: np.ndarray, transform: ModelTransform) -> str:
    """What a store holds: the images and labels (the source's ``content_key``), their
    order and the resize."""
    description = {"format": STORE_FORMAT, "data": data.content_key(indices),
                   "indices": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
                   "resize": transform.key()[:1] + transform.key()[3:]}  # fmt: skip
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def images_dir() -> Path:
    """Where memory-mapped stores live (not created here)."""
    return cache_dir() / "images"


def image_store(data, indices: np.ndarray, transform: ModelTransform, *, max_bytes: int | None = None,
                folder: Path | None = None, progress: bool = False, cache: bool = True) -> np.ndarray | None:  # fmt: skip
    """The images ``indices`` of ``data``, resized by ``transform``, as uint8
    ``(n, channels, side, side)``: an array in memory when it fits in ``max_bytes``
    (default :func:`store_budget`), else a read-only memory map of a ``.npy`` file in
    ``folder`` (default: the cache's ``images/``), written once (atomically) and reused;
    the folder keeps at most ``$SLS_STORE_CACHE_MAX_MB`` (default 16384), least recently
    used stores first out.

    None (the caller decodes per item) when the store fits neither in memory nor, with
    ``cache`` False or an unwritable cache, on disk.

    Raises:
        DataError: an image cannot be decoded (as reading it one at a time would).
    """
    indices = np.asarray(indices, dtype=np.int64)
    side, channels = transform.img_size, _channels(data)
    size = len(indices) * channels * side * side
    limit = store_budget() if max_bytes is None else max_bytes
    key = store_key(data, indices, transform)
    if key in _IN_MEMORY and size <= limit:  # the same split in this process (the next stage of `sls run`)
        _IN_MEMORY[key] = _IN_MEMORY.pop(key)
        return _IN_MEMORY[key]
    while _IN_MEMORY and size + sum(p.nbytes for p in _IN_MEMORY.values()) > limit:
        _IN_MEMORY.pop(next(iter(_IN_MEMORY)))  # the least recently used first
    if size + sum(p.nbytes for p in _IN_MEMORY.values()) <= limit:  # every store of the process together
        pixels = np.empty((len(indices), channels, side, side), dtype=np.uint8)
        _fill(pixels, data, indices, transform, progress)
        pixels.flags.writeable = False
        _IN_MEMORY[key] = pixels
        return pixels
    if not cache:
        return None
    folder = folder or images_dir()
    path = folder / f"{key}.npy"
    if path.is_file():
        try:
            stored = np.load(path, mmap_mode="r")
            if stored.shape == (len(indices), channels, side, side) and stored.dtype == np.uint8:
                with suppress(OSError):  # another user's store in a shared cache: read, not touched
                    os.utime(path)
                return stored
        except (OSError, ValueError):
            pass  # unreadable: written again below
        warnings.warn(f"the image store {path} is unreadable; decoding the images again", stacklevel=2)

    def write(tmp: Path) -> None:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), channels, side, side))
        _fill(pixels, data, indices, transform, progress)
        pixels.flush()
        del pixels

    try:
        atomic_write(path, write)
    except (SLSError, OSError) as err:  # a full disk, a read-only cache: decode per item instead
        warnings.warn(f"the {size / 2**20:.0f} MB image store fits neither in memory (SLS_STORE_MAX_MB) nor in "
                      f"{folder} ({' '.join(str(err).split())[:120]}); decoding every image at every use", stacklevel=2)  # fmt: skip
        return None
    from sls.features import evict

    evict(folder, megabytes_from_env("SLS_STORE_CACHE_MAX_MB", DEFAULT_MAX_DISK_MB), keep=path, pattern="*.npy")
    return np.load(path, mmap_mode="r")


_IN_MEMORY: dict[str, np.ndarray] = {}
"""The in-memory stores of this process, least recently used first."""


def forget_stores() -> None:
    """Drop this process's in-memory stores."""
    _IN_MEMORY.clear()


def _fill(pixels: np.ndarray, data, indices: np.ndarray, transform: ModelTransform, progress: bool) -> None:
    # Files are decoded in workers; an in-memory set is cheaper to resize here than to fork for.
    workers = decode_workers(len(indices)) if getattr(data, "paths", None) is not None else 0
    # Its own generator: a loader draws its workers' seed from the global one otherwise.
    loader = DataLoader(_Resized(data, indices, transform), batch_size=64, num_workers=workers, collate_fn=_as_list,
                        generator=torch.Generator())  # fmt: skip
    done = 0
    with tqdm(total=len(indices), desc="decoding images", unit="img", disable=not progress) as bar:
        for items in loader:
            for image in items:
                if isinstance(image, DataError):
                    raise image
                pixels[done] = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
                done += 1
            bar.update(len(items))
