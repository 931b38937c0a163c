"""Block features with an on-disk cache, so analyze, compare and repeated runs pay for
the forward pass once.

The cache key covers everything the features depend on: the model's tensors (backbone
weights and PETL state: :func:`sls.backbones.fingerprint` of the adapted model, head
excluded since features never reach it), its architecture and depth, the dataset, the
split and its exact indices, and the transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from sls import distributed
from sls._io import atomic_write, cache_dir, megabytes_from_env
from sls.backbones import BlockFeatures, block_features, fingerprint
from sls.errors import SLSError

CACHE_FORMAT = 1
DEFAULT_MAX_MB = 2048


def features_dir() -> Path:
    """The feature cache folder (not created here)."""
    return cache_dir() / "features"


def max_bytes() -> int:
    """The cache's size cap: ``$SLS_CACHE_MAX_MB`` megabytes (default 2048)."""
    return megabytes_from_env("SLS_CACHE_MAX_MB", DEFAULT_MAX_MB)


def feature_key(model: nn.Module, **parts) -> str:
    """Cache key of the features of ``model`` on the data described by ``parts``."""
    description = {"format": CACHE_FORMAT, "model": type(model).__name__, "tensors": fingerprint(model), **parts}
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def feature_key_parts(data, split: str, indices: np.ndarray, img_size: int, mean, std, interpolation: str) -> dict:
    """The data half of a feature cache key: the images and labels themselves (see
    ``content_key`` of the image sources), their split and order, and the transform."""
    return {
        "data": data.content_key(indices),
        "split": split,
        "indices": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "transform": [int(img_size), [float(v) for v in mean], [float(v) for v in std], interpolation],
    }


def cached_block_features(
    model: nn.Module,
    loader: DataLoader,
    *,
    key_parts: dict,
    cache: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    compute=None,
) -> tuple[BlockFeatures, bool]:
    """:func:`sls.backbones.block_features`, read from / written to the feature cache.

    Args:
        key_parts: what the loader's images are (dataset, split, indices hash, transform).
        cache: the cache folder (default: ``<sls cache>/features``).
        use_cache: False computes and stores nothing.
        compute: ``(model, loader, progress=) -> BlockFeatures``: the task's features
            (default: the pooled token of each block, classification's).

    Returns:
        the features, and whether they came from the cache.
    """
    compute = compute or block_features
    if not use_cache:
        return compute(model, loader, progress=progress), False
    folder = cache or features_dir()
    path = folder / f"{feature_key(model, **key_parts)}.npz"
    # In a process group the main process alone reads and writes the cache, and the
    # others follow its answer: they all run the pass together or none does.
    stored = distributed.run_on_main(_read_cached, path)
    if stored is not None:
        return stored, True
    result = compute(model, loader, progress=progress)
    arrays = {f"block_{i}": f for i, f in enumerate(result.features)}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, n_blocks=len(result.features), labels=result.labels, block_input=result.block_input, **arrays)

    distributed.run_on_main(_store, path, write, folder)
    return result, False


def _store(path: Path, write, folder: Path) -> None:
    try:
        atomic_write(path, write)
    except (SLSError, OSError) as err:  # a cache is never needed for the result
        warnings.warn(f"the block features were not cached: {err}", stacklevel=3)
        return
    evict(folder, max_bytes(), keep=path)


class CacheEntry(NamedTuple):
    path: Path
    bytes: int
    last_used: float


def entries(folder: Path | None = None, pattern: str = "*.npz") -> list[CacheEntry]:
    """The cache's entries (files matching ``pattern``), least recently used first."""
    folder = folder or features_dir()
    found = []
    for path in folder.glob(pattern) if folder.is_dir() else []:
        with suppress(FileNotFoundError):
            stat = path.stat()
            found.append(CacheEntry(path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def evict(folder: Path, limit: int, keep: Path | None = None, pattern: str = "*.npz") -> list[Path]:
    """Remove least recently used entries until the folder holds at most ``limit`` bytes
    (``keep``, the entry just written, stays even alone over the cap). Returns those removed."""
    found = entries(folder, pattern)
    total, removed = sum(e.bytes for e in found), []
    for entry in found:
        if total <= limit:
            break
        if entry.path == keep:
            continue
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # another user's entry in a shared cache
            continue
        total -= entry.bytes
        removed.append(entry.path)
    return removed


def clear(folder: Path | None = None) -> tuple[int, int]:
    """Empty the feature cache. Returns (entries, bytes) removed."""
    removed = []
    for entry in entries(folder):
        with suppress(OSError):
            entry.path.unlink()
            removed.append(entry)
    return len(removed), sum(e.bytes for e in removed)


def _read_cached(path: Path) -> BlockFeatures | None:
    if not path.is_file():
        return None
    with suppress(OSError):
        os.utime(path, (time.time(), time.time()))  # used now: the last to be evicted
    try:
        with np.load(path) as stored:
            n_blocks = int(stored["n_blocks"])
            return BlockFeatures(
                features=[stored[f"block_{i}"] for i in range(n_blocks)],
                labels=stored["labels"],
                block_input=stored["block_input"],
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"the cached features {path} are unreadable ({type(err).__name__}); computing them again",
                      stacklevel=3)  # fmt: skip
        return None
