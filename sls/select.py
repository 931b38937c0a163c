"""Depth selection: from per-block scores to the number of blocks to keep.

:class:`DepthSelector` is a scikit-learn-style estimator over plain numpy arrays
(no torch): ``DepthSelector(alpha=0.3).fit(features, labels)`` scores every block
with a registered criterion and applies the SLS stop rule (:func:`select_depth`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import numpy as np

from sls.criteria import criterion_class
from sls.errors import ConfigError


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
        margin: for ``"rule"``, how close the decision came to going another way: the
            smaller of T - SC of the block that stopped the walk and SC_k - T of the
            lowest kept block of the passing run (None otherwise). A margin small
            against the scores' spread over t-SNE starts means another start may
            move k.
        passing_below: blocks under the one that stopped the walk that pass T again (a
            non-monotone curve). The rule, as in the paper, keeps 1..k regardless; a
            non-empty tuple says a deeper cut was not the only reading of the curve.
    """

    depth: int
    threshold: float
    reason: str
    margin: float | None = None
    passing_below: tuple[int, ...] = ()


def select_depth(scores: np.ndarray, alpha: float, kind: str = "quality") -> DepthDecision:
    """Turn per-block scores (bottom-up, block 1 first) into k.

    ``kind="quality"`` (SLS's rule): T = alpha * SC_N. Walk from the top block down;
    the first block i with SC_i < T stops the walk and k = i + 1, the lowest block of
    the contiguous run of passing blocks at the top. If no block fails, k = 1. If
    SC_N <= 0 the rule is undefined: a warning is issued and all N blocks are kept.
    If block N itself fails (alpha > 1), all N blocks are kept.

    ``kind="importance"``: T = alpha * max_i SC_i; the tail blocks below T are
    dropped, so k is the highest block with SC_k >= T (a non-positive maximum keeps
    all blocks, with a warning).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ConfigError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
    n_blocks = scores.size
    if kind == "importance":
        peak = scores.max()
        threshold = float(alpha * peak)
        if peak <= 0:
            warnings.warn(f"no block has a positive score (max {peak:.4f}); keeping all blocks", stacklevel=2)
            return DepthDecision(n_blocks, threshold, "top-nonpositive")
        depth = int(np.nonzero(scores >= threshold)[0].max()) + 1
        return DepthDecision(depth, threshold, "rule")
    if kind != "quality":
        raise ConfigError(f"unknown criterion kind {kind!r}")
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
            margin = min(threshold - scores[block - 1], scores[block] - threshold)
            passing = tuple(b for b in range(1, block) if scores[b - 1] >= threshold)
            return DepthDecision(block + 1, threshold, "rule", float(margin), passing)
    return DepthDecision(1, threshold, "all-pass")


def most_frequent_depth(depths: list[int]) -> int:
    """The most frequent k; a tie goes to the larger k (pruning less is the safe side)."""
    values, counts = np.unique(np.asarray(depths), return_counts=True)
    return int(values[counts == counts.max()].max())


class DepthSelector:
    """Choose how many bottom blocks of a network to keep.

    Hyper-parameters are stored untouched; :meth:`fit` validates and works.

    Args:
        alpha: threshold factor; see :func:`select_depth`. 0.3 is the paper's ViT value
            and our default for every family (the paper's Swin value is unknown: the
            published code's -1 is a bug).
        criterion: name of a registered criterion (see :mod:`sls.criteria`).
        tsne: t-SNE backend for the ``sls`` criterion: ``"sklearn"`` or ``"opentsne"``.
        perplexity: t-SNE perplexity.
        pca_dims: project features on this many principal components before t-SNE.
        random_state: seed of the first run of a stochastic criterion.
        n_seeds: runs of a stochastic criterion, with seeds ``random_state``,
            ``random_state + 1``, ...; k is the most frequent per-seed k (ties: the larger).
            For ``sls`` the first run is the paper's exact t-SNE and the others start
            from its PCA layout jittered by their seed (see :mod:`sls.criteria.silhouette`).
        n_jobs: worker processes for scoring blocks (default: one per core).
        progress: show a progress bar.

    Attributes:
        scores_: ``(n_blocks,)`` score per block, bottom-up (mean over seeds).
        scores_std_: ``(n_blocks,)`` standard deviation over seeds (zeros for one seed).
        scores_per_seed_: ``(n_seeds, n_blocks)`` scores of each seed.
        depths_per_seed_: k of each seed.
        threshold_: T of the first seed that chose ``depth_``.
        depth_: k, the 1-based number of kept blocks.
        reason_: why the walk stopped (see :class:`DepthDecision`).
        margin_: distance of the decision to T (see :class:`DepthDecision`); None
            unless the rule fired.
        passing_below_: blocks under the stop that pass T again (non-monotone scores).
        embeddings_: scaled 2-D t-SNE points per block of the first seed (``sls`` only).
        n_blocks_: number of blocks scored.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        criterion: str = "sls",
        tsne: str = "sklearn",
        perplexity: float = 30.0,
        pca_dims: int | None = None,
        random_state: int = 0,
        n_seeds: int = 1,
        n_jobs: int | None = None,
        progress: bool = False,
    ) -> None:
        self.alpha = alpha
        self.criterion = criterion
        self.tsne = tsne
        self.perplexity = perplexity
        self.pca_dims = pca_dims
        self.random_state = random_state
        self.n_seeds = n_seeds
        self.n_jobs = n_jobs
        self.progress = progress

    def _make_criterion(self):
        offered = dict(backend=self.tsne, perplexity=self.perplexity, pca_dims=self.pca_dims,
                       n_jobs=self.n_jobs, progress=self.progress)  # fmt: skip
        cls = criterion_class(self.criterion)
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in offered.items() if k in accepted})

    def fit(
        self,
        features: list[np.ndarray],
        labels: np.ndarray,
        block_input: np.ndarray | None = None,
    ) -> DepthSelector:
        """Score every block and choose the depth.

        Args:
            features: one ``(n, d)`` array per block, bottom-up.
            labels: ``(n,)`` integer class labels.
            block_input: ``(n, d)`` pooled input of block 1 (needed by ``block-influence``).

        Returns:
            self
        """
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be >= 1, got {self.n_seeds}")
        criterion = self._make_criterion()
        seeds = [self.random_state + i for i in range(self.n_seeds if criterion.stochastic else 1)]
        # A criterion whose score takes ``run`` learns which run this is (sls: the
        # first is the paper's exact t-SNE, the others jitter its start).
        takes_run = "run" in inspect.signature(criterion.score).parameters
        runs, self.embeddings_ = [], None
        try:
            for run, seed in enumerate(seeds):
                extra = {"run": run} if takes_run else {}
                scores = criterion.score(features, labels, block_input=block_input, random_state=seed, **extra)
                runs.append(np.asarray(scores, dtype=np.float64))
                if self.embeddings_ is None:
                    self.embeddings_ = getattr(criterion, "embeddings_", None)
        finally:
            _stop_idle_workers()
        self.scores_per_seed_ = np.stack(runs)
        self.scores_ = self.scores_per_seed_.mean(axis=0)
        self.scores_std_ = self.scores_per_seed_.std(axis=0)
        self.n_blocks_ = len(self.scores_)
        self.kind_ = criterion.kind
        decisions = [select_depth(run, self.alpha, self.kind_) for run in runs]
        self.depths_per_seed_ = [d.depth for d in decisions]
        chosen = _most_frequent_decision(decisions)
        self.depth_ = chosen.depth
        self.threshold_ = chosen.threshold
        self.reason_ = chosen.reason
        self.margin_ = chosen.margin
        self.passing_below_ = list(chosen.passing_below)
        return self

    def decide(self, alpha: float) -> DepthDecision:
        """The stop rule at ``alpha`` on the scores :meth:`fit` computed, without scoring
        again: k is the most frequent per-seed k (ties: the larger), and the threshold
        and reason those of the first seed that chose it."""
        return _most_frequent_decision([select_depth(run, alpha, self.kind_) for run in self.scores_per_seed_])


def _most_frequent_decision(decisions: list[DepthDecision]) -> DepthDecision:
    depth = most_frequent_depth([d.depth for d in decisions])
    return next(d for d in decisions if d.depth == depth)


def _stop_idle_workers() -> None:
    # Idle joblib workers' OpenMP threads keep spinning for a while and would slow
    # the training and timing that follow: stop them now.
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
