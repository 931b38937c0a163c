"""Depth selection: from per-block scores to the number of blocks to keep.

:class:`DepthSelector` is a scikit-learn-style estimator over plain numpy arrays
(no torch): ``DepthSelector(alpha=0.3).fit(features, labels)`` scores every block
with a registered criterion and applies the SLS stop rule (:func:`select_depth`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from sls.criteria import get_criterion
from sls.errors import ConfigError

DEFAULT_ALPHA = {"vit": 0.3, "swin": 0.3}
"""Default ``alpha`` per backbone family. 0.3 is the paper's ViT value; its Swin
value is unknown (the published code's -1 is a bug), so Swin uses 0.3 as well
until measured otherwise."""


@dataclass(frozen=True)
class DepthDecision:
    """Outcome of the stop rule.

    Attributes:
        depth: k, the 1-based number of bottom blocks to keep.
        threshold: T = alpha * SC_N.
        reason: ``"rule"`` (a block below T stopped the walk), ``"all-pass"`` (no
            block fell below T, k = 1), ``"top-fails"`` (block N itself is below T,
            which only happens for alpha > 1: nothing is pruned) or
            ``"top-nonpositive"`` (SC_N <= 0: the rule is undefined, nothing is pruned).
    """

    depth: int
    threshold: float
    reason: str


def select_depth(scores: np.ndarray, alpha: float) -> DepthDecision:
    """Apply the SLS stop rule to per-block scores (bottom-up, block 1 first).

    T = alpha * SC_N. Walk from the top block down; the first block i with
    SC_i < T stops the walk and k = i + 1, the lowest block of the contiguous run
    of passing blocks at the top. If no block fails, k = 1. If SC_N <= 0 the rule
    is undefined: a warning is issued and all N blocks are kept. If block N itself
    fails (alpha > 1), all N blocks are kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ConfigError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
    n_blocks = scores.size
    top = scores[-1]
    threshold = float(alpha * top)
    if top <= 0:
        warnings.warn(
            f"the top block's score is {top:.4f} <= 0, so the threshold alpha * SC_N is "
            "meaningless; keeping all blocks",
            stacklevel=2,
        )
        return DepthDecision(n_blocks, threshold, "top-nonpositive")
    for block in range(n_blocks, 0, -1):
        if scores[block - 1] < threshold:
            if block == n_blocks:
                return DepthDecision(n_blocks, threshold, "top-fails")
            return DepthDecision(block + 1, threshold, "rule")
    return DepthDecision(1, threshold, "all-pass")


class DepthSelector:
    """Choose how many bottom blocks of a network to keep.

    Hyper-parameters are stored untouched; :meth:`fit` validates and works.

    Args:
        alpha: threshold factor, T = alpha * SC_N (paper: 0.3 for ViT).
        criterion: name of a registered criterion (see :mod:`sls.criteria`).
        tsne: t-SNE backend for the ``sls`` criterion: ``"sklearn"`` or ``"opentsne"``.
        perplexity: t-SNE perplexity.
        random_state: t-SNE seed.
        n_jobs: worker processes for scoring blocks (default: one per core).
        progress: show a progress bar.

    Attributes:
        scores_: ``(n_blocks,)`` score per block, bottom-up.
        threshold_: T = alpha * SC_N.
        depth_: k, the 1-based number of kept blocks.
        reason_: why the walk stopped (see :class:`DepthDecision`).
        embeddings_: per-block scaled 2-D t-SNE points (``sls`` criterion only).
        n_blocks_: number of blocks scored.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        criterion: str = "sls",
        tsne: str = "sklearn",
        perplexity: float = 30.0,
        random_state: int = 0,
        n_jobs: int | None = None,
        progress: bool = False,
    ) -> None:
        self.alpha = alpha
        self.criterion = criterion
        self.tsne = tsne
        self.perplexity = perplexity
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.progress = progress

    def fit(self, features: list[np.ndarray], labels: np.ndarray) -> DepthSelector:
        """Score every block and choose the depth.

        Args:
            features: one ``(n, d)`` array per block, bottom-up.
            labels: ``(n,)`` integer class labels.

        Returns:
            self
        """
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha}")
        score = get_criterion(self.criterion)
        self.embeddings_ = None
        if self.criterion == "sls":
            self.scores_, self.embeddings_ = score(
                features,
                labels,
                backend=self.tsne,
                perplexity=self.perplexity,
                random_state=self.random_state,
                n_jobs=self.n_jobs,
                progress=self.progress,
                return_embeddings=True,
            )
        else:
            self.scores_ = np.asarray(score(features, labels), dtype=np.float64)
        self.n_blocks_ = len(self.scores_)
        decision = select_depth(self.scores_, self.alpha)
        self.threshold_ = decision.threshold
        self.depth_ = decision.depth
        self.reason_ = decision.reason
        return self
