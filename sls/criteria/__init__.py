"""Layer criteria: one score per block, computed from pooled block features.

A criterion is a :class:`Criterion` subclass registered with :func:`register_criterion`
(one file, one decorator). Its :meth:`Criterion.score` takes the per-block features
(a list of ``(n, d)`` arrays, bottom-up), the ``(n,)`` integer labels, the pooled
input of block 1 and a seed, and returns one float per block. Its ``kind`` says how
:func:`sls.select.select_depth` turns the scores into k:

- ``"quality"``: how well block i's output already serves the task (higher is better,
  typically rising with depth). The SLS rule applies: T = alpha * score_N, walk down
  from the top, the first block below T stops the walk.
- ``"importance"``: how much block i changes the representation. Tail blocks below
  T = alpha * max(score) are dropped: k is the highest block at or above T.

Criteria are pure numpy / scikit-learn: no torch.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from sls._registry import Registry
from sls.errors import ScoreError

KINDS = ("quality", "importance")


class Criterion:
    """Base class of layer criteria; subclasses set ``name`` and ``kind``.

    Attributes:
        name: registry name.
        kind: ``"quality"`` or ``"importance"`` (see the module docstring).
        needs_input: whether :meth:`score` needs the input of block 1.
        stochastic: whether the score depends on ``random_state``.
        label: axis label for plots.
        per_block: whether a block's score depends on that block's features alone, so a
            subset of the blocks can be scored (:class:`~sls.select.DepthSelector`'s
            ``blocks="needed"`` scores only those the stop rule reads).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    needs_input: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    label: ClassVar[str] = "score"
    per_block: ClassVar[bool] = False

    def parallel_blocks(self, n_blocks: int) -> int:
        """How many of ``n_blocks`` blocks :meth:`score` works on at once (1: one after
        the other); the lazy walk scores that many at a time."""
        return 1

    def score(
        self,
        features: list[np.ndarray],
        labels: np.ndarray,
        *,
        block_input: np.ndarray | None = None,
        random_state: int = 0,
    ) -> np.ndarray:
        """``(n_blocks,)`` scores, bottom-up."""
        raise NotImplementedError


def _check_kind(cls: type[Criterion]) -> None:
    if cls.kind not in KINDS:
        raise ValueError(f"criterion {cls.name!r} has kind {cls.kind!r}; expected one of {KINDS}")


_CRITERIA: Registry[type[Criterion]] = Registry("criterion", check=_check_kind)

register_criterion = _CRITERIA.register
"""Class decorator registering a criterion under ``cls.name``."""

criterion_class = _CRITERIA.get
"""The criterion class registered as ``name``."""


def get_criterion(name: str, **options) -> Criterion:
    """An instance of the criterion registered as ``name``, built with ``options``."""
    return criterion_class(name)(**options)


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return _CRITERIA.names()


def check_features(features: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Validate per-block features and labels; return them as float64 arrays and the
    labels as class indices 0..C-1 (int64).

    Labels may be any discrete class labels (integers, integral floats, strings);
    continuous values are refused.

    Raises:
        ScoreError: with a message naming the block or the field at fault.
    """
    from sklearn.utils.multiclass import type_of_target

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ScoreError(f"labels must be a 1-D array, got shape {labels.shape}")
    if np.iscomplexobj(labels) or any(np.iscomplexobj(feats) for feats in features):
        raise ScoreError("Complex data not supported: features and labels must be real")
    if len(features) == 0:
        raise ScoreError("no blocks to score: the feature list is empty")
    if labels.size:
        target = type_of_target(labels)
        if target not in ("binary", "multiclass"):
            raise ScoreError(f"Unknown label type {target!r}: labels must be discrete class labels (integers or "
                             "strings), one per sample")  # fmt: skip
    _, labels = np.unique(labels, return_inverse=True)
    n_classes = int(labels.max()) + 1 if labels.size else 0
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
        if feats.shape[1] == 0:
            raise ScoreError(f"block {block}: 0 feature(s) (shape={feats.shape}) while a minimum of 1 is required.")
        if not np.isfinite(feats).all():
            raise ScoreError(
                f"block {block}: features hold NaN or infinite values; check the model and inputs"
            )
        checked.append(feats)
    return checked, labels.astype(np.int64)


def _register_all() -> None:
    # Every module of this package registers its criteria on import, so a new
    # criterion is one file with one decorator.
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
