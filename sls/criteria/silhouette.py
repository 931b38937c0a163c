"""The SLS criterion: silhouette of a 2-D t-SNE of each block's features.

Paper-faithful settings (Han & Tang, ECCV 2024): scikit-learn t-SNE with two
components, PCA initialisation, perplexity 30 and ``random_state=0``; each axis of
the embedding min-max scaled to [0, 1]; the silhouette (Euclidean) of that
embedding with the true labels as clusters. Every t-SNE argument is passed
explicitly so the scores do not move when scikit-learn changes a default.
"""

from __future__ import annotations

import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from sls.criteria import check_features, register_criterion
from sls.errors import ConfigError, ScoreError

TSNE_BACKENDS = ("sklearn", "opentsne")


def tsne_embedding(
    features: np.ndarray,
    *,
    backend: str = "sklearn",
    perplexity: float = 30.0,
    random_state: int = 0,
) -> np.ndarray:
    """2-D t-SNE of ``features`` (n, d), each axis min-max scaled to [0, 1]."""
    n = features.shape[0]
    if n <= 3 * perplexity:
        raise ScoreError(
            f"t-SNE with perplexity {perplexity:g} needs more than {3 * perplexity:g} samples, "
            f"got {n}; use more images or a smaller perplexity"
        )
    if backend == "sklearn":
        embedding = TSNE(
            n_components=2,
            perplexity=perplexity,
            early_exaggeration=12.0,
            learning_rate="auto",
            max_iter=1000,
            n_iter_without_progress=300,
            min_grad_norm=1e-7,
            metric="euclidean",
            init="pca",
            verbose=0,
            random_state=random_state,
            method="barnes_hut",
            angle=0.5,
            n_jobs=1,
        ).fit_transform(features.astype(np.float32))
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


def min_max_scale(points: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1]; a constant column maps to 0."""
    low = points.min(axis=0)
    span = points.max(axis=0) - low
    return (points - low) / np.where(span > 0, span, 1.0)


def tsne_silhouette_block(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    backend: str = "sklearn",
    perplexity: float = 30.0,
    random_state: int = 0,
) -> tuple[float, np.ndarray]:
    """Score of one block and its scaled embedding: ``(silhouette, (n, 2) points)``."""
    embedding = tsne_embedding(features, backend=backend, perplexity=perplexity, random_state=random_state)
    return float(silhouette_score(embedding, labels, metric="euclidean")), embedding


@register_criterion("sls")
def tsne_silhouette(
    features: list[np.ndarray],
    labels: np.ndarray,
    *,
    backend: str = "sklearn",
    perplexity: float = 30.0,
    random_state: int = 0,
    n_jobs: int | None = None,
    progress: bool = False,
    return_embeddings: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
    """SLS score of every block: silhouette of its min-max-scaled 2-D t-SNE.

    Blocks are independent, so they run in ``n_jobs`` worker processes (default: one
    per core, at most one per block); results do not depend on ``n_jobs``.

    Args:
        features: one ``(n, d)`` array per block, bottom-up.
        labels: ``(n,)`` integer class labels.
        backend: ``"sklearn"`` (paper-faithful) or ``"opentsne"`` (faster).
        perplexity: t-SNE perplexity.
        random_state: t-SNE seed; the same seed gives the same scores.
        n_jobs: worker processes; ``1`` runs in this process.
        progress: show a progress bar over blocks.
        return_embeddings: also return each block's scaled 2-D embedding.

    Returns:
        ``(n_blocks,)`` scores, and the embeddings if asked.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    features, labels = check_features(features, labels)
    if backend not in TSNE_BACKENDS:
        raise ConfigError(f"unknown t-SNE backend {backend!r}; choose one of: {', '.join(TSNE_BACKENDS)}")
    if n_jobs is None:
        import os

        n_jobs = min(len(features), os.cpu_count() or 1)
    job = delayed(tsne_silhouette_block)
    tasks = (job(f, labels, backend=backend, perplexity=perplexity, random_state=random_state) for f in features)
    results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
    results = list(tqdm(results, total=len(features), desc="t-SNE per block", unit="block", disable=not progress))
    if n_jobs != 1:
        # Idle workers' OpenMP threads keep spinning for a while and would slow the
        # training and timing that follow: stop them now.
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    scores = np.array([score for score, _ in results])
    if return_embeddings:
        return scores, [embedding for _, embedding in results]
    return scores
