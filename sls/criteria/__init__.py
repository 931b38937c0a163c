"""Layer criteria: one score per block, computed from pooled block features.

A criterion is a function ``score(features, labels, **options) -> np.ndarray`` that
takes the per-block features (a list of ``(n, d)`` arrays, bottom-up) and the
``(n,)`` integer labels and returns one float per block, higher meaning "this block
already separates the task". Register one with :func:`register_criterion`; look one
up with :func:`get_criterion`. Criteria are pure numpy / scikit-learn: no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sls.errors import ConfigError, ScoreError

Criterion = Callable[..., np.ndarray]

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator that registers a criterion under ``name``."""

    def add(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is registered twice")
        _CRITERIA[name] = fn
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    """Return the criterion registered as ``name``."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(
            f"unknown criterion {name!r}; choose one of: {', '.join(list_criteria())}"
        ) from None


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return sorted(_CRITERIA)


def check_features(features: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Validate per-block features and labels; return them as float64 / int64 arrays.

    Raises:
        ScoreError: with a message naming the block or the field at fault.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ScoreError(f"labels must be a 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ScoreError(f"labels must be integers, got dtype {labels.dtype}")
    if len(features) == 0:
        raise ScoreError("no blocks to score: the feature list is empty")
    n_classes = len(np.unique(labels))
    if n_classes < 2:
        raise ScoreError(
            f"the labels hold {n_classes} class(es); scoring separability needs at least 2"
        )
    if n_classes >= len(labels):
        raise ScoreError(
            f"{len(labels)} samples for {n_classes} classes; a silhouette needs more samples than classes"
        )
    checked = []
    for block, feats in enumerate(features, start=1):
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != len(labels):
            raise ScoreError(
                f"block {block}: features must be (n_samples={len(labels)}, dim), got {feats.shape}"
            )
        if not np.isfinite(feats).all():
            raise ScoreError(
                f"block {block}: features hold NaN or infinite values; check the model and inputs"
            )
        checked.append(feats)
    return checked, labels.astype(np.int64)


# Importing the modules registers their criteria.
from sls.criteria import silhouette as _silhouette  # noqa: E402,F401
