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
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from sls import distributed
from sls._io import atomic_write, cache_dir
from sls.backbones import BlockFeatures, block_features, fingerprint

CACHE_FORMAT = 1


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
) -> tuple[BlockFeatures, bool]:
    """:func:`sls.backbones.block_features`, read from / written to the feature cache.

    Args:
        key_parts: what the loader's images are (dataset, split, indices hash, transform).
        cache: the cache folder (default: ``<sls cache>/features``).
        use_cache: False computes and stores nothing.

    Returns:
        the features, and whether they came from the cache.
    """
    if not use_cache:
        return block_features(model, loader, progress=progress), False
    path = (cache or cache_dir() / "features") / f"{feature_key(model, **key_parts)}.npz"
    # In a process group the main process alone reads and writes the cache, and the
    # others follow its answer: they all run the pass together or none does.
    stored = distributed.run_on_main(_read_cached, path)
    if stored is not None:
        return stored, True
    result = block_features(model, loader, progress=progress)
    arrays = {f"block_{i}": f for i, f in enumerate(result.features)}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, n_blocks=len(result.features), labels=result.labels, block_input=result.block_input, **arrays)

    distributed.run_on_main(atomic_write, path, write)
    return result, False


def _read_cached(path: Path) -> BlockFeatures | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            n_blocks = int(stored["n_blocks"])
            return BlockFeatures(
                features=[stored[f"block_{i}"] for i in range(n_blocks)],
                labels=stored["labels"],
                block_input=stored["block_input"],
            )
    except (OSError, KeyError, ValueError):
        return None  # an unreadable cache entry is recomputed and replaced
