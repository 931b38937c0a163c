"""Depth selection: from per-block scores to the number of blocks to keep.

:class:`DepthSelector` is a scikit-learn estimator over plain numpy arrays (no
torch): ``DepthSelector(alpha=0.3).fit(features, labels)`` scores every block with a
registered criterion and applies the SLS stop rule (:func:`select_depth`).
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from sls.criteria import criterion_class, list_criteria
from sls.criteria.silhouette import TSNE_BACKENDS
from sls.errors import ConfigError, ScoreError


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
    If block N itself fails (alpha > 1), all N blocks are kept. A NaN score marks a block
    that was not scored (``blocks="needed"``): the walk never reads one below its stop,
    and reaching one is an error; ``passing_below`` counts scored blocks only.

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
        if np.isnan(scores).any():
            raise ScoreError("an importance criterion's rule needs every block's score")
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
    if np.isnan(top):
        raise ScoreError("the top block was not scored; the rule starts from it")
    threshold = float(alpha * top)
    if top <= 0:
        warnings.warn(
            f"the top block's score is {top:.4f} <= 0, so the threshold alpha * SC_N is "
            "meaningless; keeping all blocks",
            stacklevel=2,
        )
        return DepthDecision(n_blocks, threshold, "top-nonpositive")
    for block in range(n_blocks, 0, -1):
        if np.isnan(scores[block - 1]):
            raise ScoreError(f"block {block} was not scored, and the rule at alpha = {alpha:g} needs it; "
                             "score every block (DepthSelector(blocks='all'), --score-all)")  # fmt: skip
        if scores[block - 1] < threshold:
            if block == n_blocks:
                return DepthDecision(n_blocks, threshold, "top-fails")
            margin = min(threshold - scores[block - 1], scores[block] - threshold)
            passing = tuple(b for b in range(1, block) if scores[b - 1] >= threshold)
            return DepthDecision(block + 1, threshold, "rule", float(margin), passing)
    return DepthDecision(1, threshold, "all-pass")


# DepthSelector options a criterion may take, by the name its constructor uses. Options
# that shape the scores are refused by a criterion that does not take them (unless left
# at their default); execution settings go to the criteria that take them.
_SCORE_OPTIONS = {"tsne": "backend", "perplexity": "perplexity", "pca_dims": "pca_dims"}
_EXECUTION_OPTIONS = {"n_jobs": "n_jobs", "progress": "progress"}


def criterion_options(criterion: str) -> set[str]:
    """The :class:`DepthSelector` options ``criterion`` takes, e.g. ``{"tsne", "perplexity",
    "pca_dims", "n_jobs", "progress"}`` for ``"sls"`` and ``set()`` for ``"cka"``; a caller
    that scores several criteria with one set of options passes each only these."""
    accepted = inspect.signature(criterion_class(criterion).__init__).parameters
    return {option for option, arg in (_SCORE_OPTIONS | _EXECUTION_OPTIONS).items() if arg in accepted}


class DepthSelector(BaseEstimator):
    """Choose how many bottom blocks of a network to keep.

    A scikit-learn estimator (``get_params``, ``set_params``, ``clone``, ``repr``):
    hyper-parameters are stored untouched; :meth:`fit` validates them and works.

    Args:
        alpha: threshold factor; see :func:`select_depth`. 0.3 is the paper's ViT value
            and our default for every family (the paper's Swin value is unknown: the
            published code's -1 is a bug).
        criterion: name of a registered criterion (see :mod:`sls.criteria`).
        tsne: t-SNE backend of the ``sls`` criterion, one of
            :data:`sls.criteria.silhouette.TSNE_BACKENDS`.
        perplexity: t-SNE perplexity (``sls``).
        pca_dims: project features on this many principal components before t-SNE (``sls``).
        random_state: integer seed of the first run of a stochastic criterion.
        n_seeds: runs of a stochastic criterion, with seeds ``random_state``,
            ``random_state + 1``, ...; the scores are their mean and the rule applies to
            that mean (see Attributes). For ``sls`` the first run is the paper's exact
            t-SNE and the others start from scikit-learn's PCA start jittered by their
            seed (see :mod:`sls.criteria.silhouette`). A deterministic criterion runs once.
        n_jobs: worker processes for scoring blocks, as in scikit-learn: None means 1
            (unless inside a ``joblib.parallel_config`` context), -1 one per core.
        progress: show a progress bar.
        blocks: ``"all"`` scores every block; ``"needed"`` only those the stop rule
            reads: block N, then down to the first block below T (top-down, as many
            at a time as there are workers, so at most ``n_jobs - 1`` more). The others
            are NaN in ``scores_`` and ``scored_blocks_`` lists those scored. It applies
            to a quality criterion that scores each block on its own
            (``Criterion.per_block``: ``sls``, ``silhouette``, ``probe``) with one seed;
            any other scores every block.

    ``tsne``, ``perplexity`` and ``pca_dims`` shape the scores: :meth:`fit` refuses a
    value other than the default for a criterion that does not take them
    (:func:`criterion_options` says which do). ``n_jobs`` and ``progress`` change no
    score and go to the criteria that take them.

    Attributes:
        scores_: ``(n_blocks,)`` score per block, bottom-up: the mean over seeds. The
            threshold, k and everything the record and the plots show derive from it.
        scores_std_: ``(n_blocks,)`` standard deviation over seeds (zeros for one seed).
        scores_per_seed_: ``(n_seeds, n_blocks)`` scores of each seed.
        depths_per_seed_: the k each seed's own scores give (the spread of k over t-SNE
            starts); ``depth_`` is not their vote but the rule on ``scores_``.
        threshold_: T of the rule on ``scores_`` (``alpha * scores_[-1]`` for a quality
            criterion).
        depth_: k, the 1-based number of kept blocks: ``select_depth(scores_, alpha).depth``.
        reason_: why the walk stopped (see :class:`DepthDecision`).
        margin_: distance of the decision to T (see :class:`DepthDecision`); None
            unless the rule fired.
        passing_below_: blocks under the stop that pass T again (non-monotone scores);
            None when ``blocks="needed"`` left blocks under the stop unscored.
        kind_: the criterion's kind (``"quality"`` or ``"importance"``).
        embeddings_: scaled 2-D t-SNE points per block of the first seed (``sls`` only,
            else None; None for a block not scored).
        scored_blocks_: the 1-based blocks scored, ascending (all of them unless
            ``blocks="needed"`` left some out).
        n_blocks_: number of blocks scored.
        n_features_in_: width of the blocks' features (of the last block when the
            widths differ, e.g. across Swin stages).
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
        blocks: str = "all",
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
        self.blocks = blocks

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # the class labels
        return tags

    def fit(
        self, X: list[np.ndarray] | np.ndarray, y: np.ndarray, block_input: np.ndarray | None = None
    ) -> DepthSelector:
        """Score every block and choose the depth.

        Args:
            X: the per-block features, bottom-up: a list of ``(n, d)`` arrays (one per
                block; the widths may differ), an ``(n_blocks, n, d)`` array, or one
                ``(n, d)`` array scored as a single block.
            y: ``(n,)`` class labels (integers, integral floats or strings).
            block_input: ``(n, d)`` pooled input of block 1 (needed by ``block-influence``).

        Returns:
            self

        Raises:
            ConfigError: a hyper-parameter out of range, an unknown criterion or backend,
                or a score-shaping option the criterion does not take.
            ScoreError: features or labels the criterion cannot score.
        """
        criterion = self._make_criterion()
        if y is None:
            raise ScoreError("DepthSelector requires y to be passed, but the target y is None: give the (n,) class "
                             "labels the blocks' separability is scored against")  # fmt: skip
        features = _as_blocks(X)
        seeds = [self.random_state + i for i in range(self.n_seeds if criterion.stochastic else 1)]
        # A criterion whose score takes ``run`` learns which run this is (sls: the
        # first is the paper's exact t-SNE, the others jitter its start).
        takes_run = "run" in inspect.signature(criterion.score).parameters
        runs, embeddings = [], None
        lazy = self.blocks == "needed" and criterion.kind == "quality" and criterion.per_block and len(seeds) == 1
        try:
            if lazy:
                scores, embeddings = self._score_needed(criterion, features, y, block_input, seeds[0], takes_run)
                runs.append(scores)
            for run, seed in enumerate(seeds if not lazy else []):
                extra = {"run": run} if takes_run else {}
                scores = criterion.score(features, y, block_input=block_input, random_state=seed, **extra)
                runs.append(np.asarray(scores, dtype=np.float64))
                if run == 0:
                    embeddings = getattr(criterion, "embeddings_", None)
        finally:
            _stop_idle_workers()
        for run_scores in runs if not lazy else []:
            if np.isnan(run_scores).any():
                block = int(np.flatnonzero(np.isnan(run_scores))[0]) + 1
                raise ScoreError(f"criterion {self.criterion!r} gave block {block} a NaN score; check its features")
        self.kind_ = criterion.kind
        self.scores_per_seed_ = np.stack(runs)
        self.scores_ = self.scores_per_seed_.mean(axis=0)
        self.scores_std_ = self.scores_per_seed_.std(axis=0)
        self.n_blocks_ = len(self.scores_)
        self.scored_blocks_ = [int(b) for b in np.flatnonzero(~np.isnan(self.scores_)) + 1]
        self.n_features_in_ = int(np.shape(features[-1])[1])
        self.embeddings_ = embeddings
        with warnings.catch_warnings():  # the rule on the mean warns below, once
            warnings.simplefilter("ignore")
            self.depths_per_seed_ = [select_depth(run, self.alpha, self.kind_).depth for run in runs]
        decision = select_depth(self.scores_, self.alpha, self.kind_)
        self.depth_ = decision.depth
        self.threshold_ = decision.threshold
        self.reason_ = decision.reason
        self.margin_ = decision.margin
        self.passing_below_ = list(decision.passing_below)
        stop = decision.depth - 1 if decision.reason == "rule" else 0
        if stop > 1 and np.isnan(self.scores_[: stop - 1]).any():
            self.passing_below_ = None  # not checked: the blocks under the stop were not all scored
        return self

    def _score_needed(self, criterion, features, y, block_input, seed, takes_run) -> tuple[np.ndarray, list | None]:
        """The blocks the stop rule reads, top-down, ``chunk`` at a time (one per worker):
        scores with NaN for the others, and the embeddings of those scored (if any)."""
        n_blocks = len(features)
        chunk = max(1, criterion.parallel_blocks(n_blocks))
        scores, embeddings = np.full(n_blocks, np.nan), [None] * n_blocks
        extra = {"run": 0} if takes_run else {}
        following = n_blocks - 1  # the next block to score (0-based), walking down
        while following >= 0:
            batch = list(range(following, max(following - chunk, -1), -1))
            got = criterion.score([features[i] for i in batch], y, block_input=block_input, random_state=seed,
                                  **extra)  # fmt: skip
            points = getattr(criterion, "embeddings_", None)
            if np.isnan(np.asarray(got, dtype=np.float64)).any():
                raise ScoreError(f"criterion {self.criterion!r} gave a block a NaN score; check its features")
            for j, i in enumerate(batch):
                scores[i] = float(got[j])
                if points is not None:
                    embeddings[i] = points[j]
            following = batch[-1] - 1
            threshold = self.alpha * scores[-1]
            if scores[-1] <= 0 or (scores[following + 1:] < threshold).any():
                break  # the rule stops at a scored block (or is undefined: SC_N <= 0)
        return scores, (embeddings if any(e is not None for e in embeddings) else None)

    def decide(self, alpha: float) -> DepthDecision:
        """The stop rule at ``alpha`` on ``scores_`` (the mean over seeds), without
        scoring again: ``decide(self.alpha)`` gives ``depth_`` and ``threshold_``."""
        check_is_fitted(self, "scores_")
        return select_depth(self.scores_, alpha, self.kind_)

    def _make_criterion(self):
        """Validate the hyper-parameters and build the criterion with the options it
        takes (the criterion validates their values)."""
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, Real) or not math.isfinite(self.alpha) \
                or self.alpha < 0:  # fmt: skip
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not _is_int(self.n_seeds) or self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be an integer >= 1, got {self.n_seeds!r}")
        if not _is_int(self.random_state):
            raise ConfigError(f"random_state must be an integer seed, got {self.random_state!r}")
        if self.blocks not in ("all", "needed"):
            raise ConfigError(f"blocks must be 'all' or 'needed', got {self.blocks!r}")
        if self.n_jobs is not None and (not _is_int(self.n_jobs) or self.n_jobs == 0):
            raise ConfigError(f"n_jobs must be None, -1 (all cores) or a non-zero integer, got {self.n_jobs!r}")
        cls = criterion_class(self.criterion)
        accepted = criterion_options(self.criterion)
        defaults = {name: p.default for name, p in inspect.signature(DepthSelector.__init__).parameters.items()}
        for option in _SCORE_OPTIONS:
            value = getattr(self, option)
            if option not in accepted and value != defaults[option]:
                takers = [name for name in list_criteria() if option in criterion_options(name)]
                raise ConfigError(
                    f"criterion {self.criterion!r} takes no option {option!r} (got {value!r}); leave it at its "
                    f"default {defaults[option]!r}, or use a criterion that takes it: {', '.join(takers)}"
                )
        arguments = _SCORE_OPTIONS | _EXECUTION_OPTIONS
        return cls(**{arguments[option]: getattr(self, option) for option in accepted})


def tsne_agreement(
    features: list[np.ndarray],
    labels: np.ndarray,
    *,
    backends: tuple[str, ...] = TSNE_BACKENDS,
    alpha: float = 0.3,
    perplexity: float = 30.0,
    random_state: int = 0,
    n_jobs: int | None = None,
) -> dict:
    """Score the same blocks with each t-SNE backend and compare with the first
    (scikit-learn's, the paper's, by default).

    Returns:
        ``{"reference": name, "alpha": alpha, "n_blocks": N, "n_samples": n,
        "backends": {name: {"scores", "threshold", "depth", "max_abs_diff", "seconds"}}}``:
        per backend its per-block SLS scores, T and k at ``alpha``, the largest
        absolute score difference to the reference's, and the wall time of scoring
        every block (``n_jobs`` workers).
    """
    if not backends:
        raise ConfigError("tsne_agreement needs at least one t-SNE backend")
    rows, reference = {}, None
    for backend in backends:
        started = time.perf_counter()
        selector = DepthSelector(alpha=alpha, tsne=backend, perplexity=perplexity, random_state=random_state,
                                 n_jobs=n_jobs).fit(features, labels)  # fmt: skip
        seconds = time.perf_counter() - started
        if reference is None:
            reference = selector.scores_
        rows[backend] = {
            "scores": selector.scores_.tolist(),
            "threshold": float(selector.threshold_),
            "depth": int(selector.depth_),
            "max_abs_diff": float(np.max(np.abs(selector.scores_ - reference))),
            "seconds": seconds,
        }
    return {"reference": backends[0], "alpha": alpha, "n_blocks": len(reference), "n_samples": len(labels),
            "backends": rows}  # fmt: skip


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _as_blocks(X) -> list[np.ndarray]:
    """The per-block feature list of :meth:`DepthSelector.fit`'s ``X``."""
    if isinstance(X, np.ndarray) and X.ndim == 3:
        return list(X)
    if isinstance(X, (list, tuple)) and len(X) > 0 and all(np.ndim(block) == 2 for block in X):
        return list(X)
    if sp.issparse(X):
        raise ScoreError("X is a sparse matrix; the criteria need dense (n, d) features: use X.toarray()")
    array = np.asarray(X)
    if array.ndim != 2:
        raise ScoreError(
            f"X must be a list of (n, d) feature arrays, one per block, or one (n, d) array; got shape {array.shape}"
        )
    return [array]


def _stop_idle_workers() -> None:
    # Idle joblib workers' OpenMP threads keep spinning for a while and would slow
    # the training and timing that follow: stop them now.
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
