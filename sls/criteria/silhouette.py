"""Silhouette criteria: the paper's t-SNE silhouette (``sls``) and the raw-feature one.

SLS (Han & Tang, ECCV 2024): scikit-learn t-SNE with two components, PCA
initialisation, perplexity 30 and ``random_state=0``; each axis of the embedding
min-max scaled to [0, 1]; the silhouette (Euclidean) of that embedding with the true
labels as clusters. Every t-SNE argument is passed explicitly so the scores do not
move when a library changes a default.

Seeds. With PCA initialisation, current scikit-learn's t-SNE is deterministic: the PCA
is solved exactly and the Barnes-Hut descent draws nothing, so ``random_state`` alone
changes nothing. To measure how t-SNE's sensitivity to its start moves the scores (and
k), the further runs of ``--seeds N`` (``jitter=True``) start from the same PCA layout
with Gaussian jitter of 1% of its first axis' spread, drawn from their seed: the scheme
openTSNE's PCA initialisation always applies. The first run is the paper's exact call.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from sls.criteria import Criterion, check_features, register_criterion
from sls.errors import ConfigError, ScoreError

TSNE_BACKENDS = ("sklearn", "opentsne")


def tsne_embedding(
    features: np.ndarray,
    *,
    backend: str = "sklearn",
    perplexity: float = 30.0,
    random_state: int = 0,
    pca_dims: int | None = None,
    jitter: bool = False,
) -> np.ndarray:
    """2-D t-SNE of ``features`` (n, d), each axis min-max scaled to [0, 1].

    ``pca_dims`` first projects the features on their top principal components
    (deterministic full SVD), which speeds up the neighbour search on wide features.
    ``jitter`` starts scikit-learn's t-SNE from the PCA layout plus seeded jitter (see
    the module docstring); openTSNE always jitters its PCA start with ``random_state``.
    """
    n = features.shape[0]
    if n <= 3 * perplexity:
        raise ScoreError(
            f"t-SNE with perplexity {perplexity:g} needs more than {3 * perplexity:g} samples, "
            f"got {n}; use more images or a smaller perplexity"
        )
    if pca_dims is not None and pca_dims < min(features.shape):
        features = PCA(n_components=pca_dims, svd_solver="full").fit_transform(features)
    if backend == "sklearn":
        features = features.astype(np.float32)
        init = jittered_pca_layout(features, random_state) if jitter else "pca"
        embedding = TSNE(
            n_components=2,
            perplexity=perplexity,
            early_exaggeration=12.0,
            learning_rate="auto",
            max_iter=1000,
            n_iter_without_progress=300,
            min_grad_norm=1e-7,
            metric="euclidean",
            init=init,
            verbose=0,
            random_state=random_state,
            method="barnes_hut",
            angle=0.5,
            n_jobs=1,
        ).fit_transform(features)
    elif backend == "opentsne":
        from openTSNE import TSNE as OpenTSNE

        embedding = np.asarray(
            OpenTSNE(
                n_components=2,
                perplexity=perplexity,
                learning_rate="auto",
                early_exaggeration_iter=250,
                early_exaggeration=12.0,
                n_iter=500,
                exaggeration=None,
                theta=0.5,
                negative_gradient_method="bh",
                initialization="pca",
                metric="euclidean",
                neighbors="exact",
                n_jobs=1,
                random_state=random_state,
                verbose=False,
            ).fit(features)
        )
    else:
        raise ConfigError(f"unknown t-SNE backend {backend!r}; choose one of: {', '.join(TSNE_BACKENDS)}")
    return min_max_scale(np.asarray(embedding, dtype=np.float64))


def jittered_pca_layout(features: np.ndarray, random_state: int, scale: float = 0.01) -> np.ndarray:
    """scikit-learn's PCA start for t-SNE (first axis scaled to standard deviation 1e-4)
    plus Gaussian jitter of ``scale`` times that deviation, drawn from ``random_state``."""
    # float32 and the same operations as scikit-learn: t-SNE is chaotic enough that a
    # start that differs in its last bits ends in another layout.
    layout = PCA(n_components=2, svd_solver="full").fit_transform(features.astype(np.float32))
    layout = layout / np.std(layout[:, 0]) * 1e-4
    noise = np.random.default_rng(random_state).normal(scale=scale * 1e-4, size=layout.shape)
    return (layout + noise.astype(np.float32)).astype(np.float32)


def min_max_scale(points: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1]; a constant column maps to 0."""
    low = points.min(axis=0)
    span = points.max(axis=0) - low
    return (points - low) / np.where(span > 0, span, 1.0)


def tsne_silhouette_block(features: np.ndarray, labels: np.ndarray, **tsne_options) -> tuple[float, np.ndarray]:
    """Score of one block and its scaled embedding: ``(silhouette, (n, 2) points)``."""
    embedding = tsne_embedding(features, **tsne_options)
    return float(silhouette_score(embedding, labels, metric="euclidean")), embedding


def _block_in_worker(features: np.ndarray, labels: np.ndarray, threads: int, **tsne_options) -> tuple[float, np.ndarray]:
    # Each of n worker processes gets cores / n native threads (OpenMP, BLAS): with an
    # inherited OMP_NUM_THREADS, workers x threads oversubscribe the cores and the
    # Barnes-Hut gradient's spinning OpenMP threads slow t-SNE down ~10x.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return tsne_silhouette_block(features, labels, **tsne_options)


@register_criterion
class TSNESilhouette(Criterion):
    """SLS: silhouette of each block's min-max-scaled 2-D t-SNE against the labels.

    Blocks are independent, so they run in ``n_jobs`` worker processes (default: one
    per core, at most one per block); the scores do not depend on ``n_jobs``. After
    :meth:`score`, ``embeddings_`` holds each block's scaled 2-D points.

    Args:
        backend: ``"sklearn"`` (paper-faithful) or ``"opentsne"`` (faster).
        perplexity: t-SNE perplexity.
        pca_dims: project on this many principal components before t-SNE (None: off).
        n_jobs: worker processes; ``1`` runs in this process.
        progress: show a progress bar over blocks.
    """

    name = "sls"
    kind = "quality"
    stochastic = True
    label = "t-SNE silhouette (SLS score)"

    def __init__(
        self,
        backend: str = "sklearn",
        perplexity: float = 30.0,
        pca_dims: int | None = None,
        n_jobs: int | None = None,
        progress: bool = False,
    ) -> None:
        if backend not in TSNE_BACKENDS:
            raise ConfigError(f"unknown t-SNE backend {backend!r}; choose one of: {', '.join(TSNE_BACKENDS)}")
        self.backend = backend
        self.perplexity = perplexity
        self.pca_dims = pca_dims
        self.n_jobs = n_jobs
        self.progress = progress

    def score(self, features, labels, *, block_input=None, random_state=0, run=0):
        """Scores per block; ``run`` > 0 (a further seed of ``--seeds``) jitters the start."""
        from joblib import Parallel, delayed
        from tqdm.auto import tqdm

        features, labels = check_features(features, labels)
        n_jobs = self.n_jobs or min(len(features), os.cpu_count() or 1)
        options = dict(backend=self.backend, perplexity=self.perplexity, random_state=random_state,
                       pca_dims=self.pca_dims, jitter=run > 0)  # fmt: skip
        if n_jobs == 1:
            # In this process, under the caller's own thread limits: raising them here
            # would also hang a forked process (an OpenMP pool does not survive a fork).
            tasks = (delayed(tsne_silhouette_block)(f, labels, **options) for f in features)
        else:
            threads = max(1, (os.cpu_count() or 1) // n_jobs)
            tasks = (delayed(_block_in_worker)(f, labels, threads, **options) for f in features)
        results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
        results = list(tqdm(results, total=len(features), desc=f"t-SNE per block (seed {random_state})",
                            unit="block", disable=not self.progress))  # fmt: skip
        self.embeddings_ = [embedding for _, embedding in results]
        return np.array([score for score, _ in results])


@register_criterion
class RawSilhouette(Criterion):
    """Silhouette of each block's raw features against the labels (no t-SNE)."""

    name = "silhouette"
    kind = "quality"
    label = "silhouette of raw features"

    def score(self, features, labels, *, block_input=None, random_state=0):
        features, labels = check_features(features, labels)
        return np.array([silhouette_score(f, labels, metric="euclidean") for f in features])
