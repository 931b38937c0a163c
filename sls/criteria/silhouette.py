"""Silhouette criteria: the paper's t-SNE silhouette (``sls``) and the raw-feature one.

SLS (Han & Tang, ECCV 2024): scikit-learn t-SNE with two components, PCA
initialisation, perplexity 30 and ``random_state=0``; each axis of the embedding
min-max scaled to [0, 1]; the silhouette (Euclidean) of that embedding with the true
labels as clusters. Every t-SNE argument is passed explicitly so the scores do not
move when a library changes a default.

Seeds. scikit-learn's Barnes-Hut t-SNE draws nothing at random once it has its start;
with ``init="pca"`` the start is a 2-component PCA seeded by ``random_state``, the
first axis scaled to standard deviation 1e-4. Whether ``random_state`` matters
therefore depends on the PCA solver (:data:`TSNE_PCA_SOLVER`) and the shape:

- scikit-learn 1.5 to 1.7 solve it with ``svd_solver="randomized"`` at every shape:
  ``random_state`` always moves the start (in its last bits);
- from 1.8 on, PCA's ``"auto"`` rule chooses. It is exact where ``max(n, d) <= 500``
  or ``n >= 10 d`` with ``d <= 1000`` (e.g. 120 x 16, or 1000 x 50 after
  ``pca_dims=50``): there the start, and so the whole t-SNE, is the same for every
  ``random_state``. Elsewhere, e.g. at the paper's 1000 images x 384 features of a
  ViT-S, it is randomized.

Where the PCA is randomized, t-SNE carries the start's last bits into a different
layout: SC 0.9107 vs 0.9118 for seeds 0 and 1 on 10 synthetic Gaussian clusters of
1000 x 384 (a reviewer measured 0.9112 vs 0.9078 on real features).

So that a spread over seeds measures t-SNE's sensitivity to its start at every shape,
the first run of ``--seeds N`` is the paper's exact call (``init="pca"``,
``random_state=seed``) and each further run (``jitter=True``) starts from
scikit-learn's own PCA start for its seed (:func:`sklearn_pca_start`, bit for bit the
one ``init="pca"`` uses) plus Gaussian jitter of 1% of its first axis' spread, drawn
from that seed: the scheme openTSNE's PCA initialisation always applies.

Backends: ``"sklearn"`` (the paper's), ``"opentsne"`` (openTSNE with Barnes-Hut
gradients and exact neighbours, as earlier records name it) and ``"opentsne-fft"``
(openTSNE's fast setting: FFT-interpolated gradients and Annoy's approximate
neighbours). The FFT's cost per iteration is set by its grid (at least 50 intervals
per axis), not by n: it pays off on tens of thousands of points, while at SLS's 1000
images one block took ~13 s against ~3.5 s for ``"opentsne"`` on one core here.
``"torchdr"`` is TorchDR's t-SNE in torch (exact affinities, PCA start, 1000
iterations with 250 of early exaggeration 12): on a GPU when one is available (blocks
then run one after the other on it), else on the CPU, where it is several times slower
than scikit-learn's at SLS's 1000 images. ``bench/tsne_agreement.py`` measures how far
each backend's scores and k are from scikit-learn's, and each backend's time.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import sklearn
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.utils import check_random_state
from sklearn.utils.fixes import parse_version

from sls.criteria import Criterion, check_features, register_criterion
from sls.errors import ConfigError, ScoreError

TSNE_BACKENDS = ("sklearn", "opentsne", "opentsne-fft", "torchdr")

TSNE_PCA_SOLVER = "auto" if parse_version(sklearn.__version__) >= parse_version("1.8") else "randomized"
"""The ``svd_solver`` of the PCA start of the installed scikit-learn's t-SNE (1.5 to 1.7
pass ``"randomized"``, 1.8 and later PCA's default ``"auto"``)."""


def check_backend(backend: str) -> None:
    """Refuse an unknown t-SNE backend name (one line naming the choices)."""
    if backend not in TSNE_BACKENDS:
        raise ConfigError(f"unknown t-SNE backend {backend!r}; choose one of: {', '.join(TSNE_BACKENDS)}")


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
    ``jitter`` starts scikit-learn's t-SNE from its own PCA start for ``random_state``
    plus seeded jitter (see the module docstring); openTSNE always jitters its PCA
    start with ``random_state``.
    """
    check_backend(backend)
    n = features.shape[0]
    if n <= 3 * perplexity:
        raise ScoreError(
            f"t-SNE with perplexity {perplexity:g} needs more than {3 * perplexity:g} samples, "
            f"got {n}; use more images or a smaller perplexity"
        )
    if features.shape[1] < 2:
        raise ScoreError(f"t-SNE's PCA start needs at least 2 features per sample, got {features.shape[1]} feature(s)")
    if pca_dims is not None and pca_dims < min(features.shape):
        features = PCA(n_components=pca_dims, svd_solver="full").fit_transform(features)
    if backend == "sklearn":
        features = np.ascontiguousarray(features, dtype=np.float32)
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
    elif backend == "torchdr":
        embedding = _torchdr_embedding(features, perplexity, random_state)
    else:
        from openTSNE import TSNE as OpenTSNE

        shared = dict(n_components=2, perplexity=perplexity, learning_rate="auto", early_exaggeration_iter=250,
                      early_exaggeration=12.0, n_iter=500, exaggeration=None, theta=0.5, initialization="pca",
                      metric="euclidean", n_jobs=1, random_state=random_state, verbose=False)  # fmt: skip
        if backend == "opentsne":  # Barnes-Hut gradients, exact neighbours (what earlier records name)
            options = dict(negative_gradient_method="bh", neighbors="exact")
        else:  # "opentsne-fft": openTSNE's fast setting (theta is Barnes-Hut's, unused here)
            options = dict(dof=1, n_interpolation_points=3, min_num_intervals=50, ints_in_interval=1,
                           metric_params=None, initial_momentum=0.8, final_momentum=0.8, max_grad_norm=None,
                           max_step_norm=5, callbacks=None, callbacks_every_iters=50, negative_gradient_method="fft",
                           # Annoy at every n ("auto" would switch to exact neighbours under 1000 points).
                           neighbors="annoy", knn_kwargs={"n_trees": 50})  # fmt: skip
        embedding = OpenTSNE(**shared, **options).fit(features)
    return min_max_scale(np.asarray(embedding, dtype=np.float64))


def _torchdr_embedding(features: np.ndarray, perplexity: float, random_state: int) -> np.ndarray:
    """TorchDR's t-SNE, seeded by ``random_state`` inside :func:`sls._rng.seeded`: TorchDR's
    own ``random_state`` would reseed every global generator and switch cuDNN's
    settings for the whole process, so it is not given one, and cuDNN's flags are
    restored after it."""
    import torch
    from torchdr import TSNE as TorchDRTSNE

    from sls._rng import seeded

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cudnn = torch.backends.cudnn
    with seeded(random_state), cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                           deterministic=cudnn.deterministic):  # fmt: skip
        points = TorchDRTSNE(perplexity=perplexity, n_components=2, init="pca", max_iter=1000, early_exaggeration_coeff=12.0,
                             early_exaggeration_iter=250, device=device, random_state=None,
                             verbose=False).fit_transform(torch.from_numpy(np.ascontiguousarray(features, np.float32)))  # fmt: skip
    return points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)


def sklearn_pca_start(features: np.ndarray, random_state: int) -> np.ndarray:
    """The start scikit-learn's t-SNE computes for ``init="pca"`` at ``random_state``:
    ``PCA(n_components=2, svd_solver=TSNE_PCA_SOLVER)`` seeded by ``random_state``,
    first axis scaled to standard deviation 1e-4, float32.

    The same operations on the same float32 input as ``sklearn.manifold.TSNE``: t-SNE is
    chaotic enough that a start differing in its last bits ends in another layout.
    """
    # TSNE seeds its PCA with check_random_state(random_state), drawn from nothing before.
    pca = PCA(n_components=2, svd_solver=TSNE_PCA_SOLVER, random_state=check_random_state(random_state))
    pca.set_output(transform="default")
    layout = pca.fit_transform(np.ascontiguousarray(features, dtype=np.float32)).astype(np.float32, copy=False)
    return layout / np.std(layout[:, 0]) * 1e-4


def jittered_pca_layout(features: np.ndarray, random_state: int, scale: float = 0.01) -> np.ndarray:
    """:func:`sklearn_pca_start` for ``random_state`` plus Gaussian jitter of ``scale``
    times its first axis' standard deviation (1e-4), drawn from ``random_state``.
    ``scale=0`` gives scikit-learn's ``init="pca"`` start itself."""
    layout = sklearn_pca_start(features, random_state)
    noise = np.random.default_rng(random_state).normal(scale=scale * 1e-4, size=layout.shape)
    return (layout + noise.astype(np.float32)).astype(np.float32)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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

    Blocks are independent, so they run in ``n_jobs`` worker processes (at most one
    per block); the scores do not depend on ``n_jobs``. After :meth:`score`,
    ``embeddings_`` holds each block's scaled 2-D points.

    Args:
        backend: one of :data:`TSNE_BACKENDS`: ``"sklearn"`` (paper-faithful),
            ``"opentsne"`` (Barnes-Hut, exact neighbours) or ``"opentsne-fft"``
            (openTSNE's fast setting).
        perplexity: t-SNE perplexity.
        pca_dims: project on this many principal components before t-SNE (None: off).
        n_jobs: worker processes, as in scikit-learn: None means 1 (unless inside a
            ``joblib.parallel_config`` context), -1 one per core; 1 runs in this process.
        progress: show a progress bar over blocks.
    """

    name = "sls"
    kind = "quality"
    stochastic = True
    label = "t-SNE silhouette (SLS score)"
    per_block = True

    def __init__(
        self,
        backend: str = "sklearn",
        perplexity: float = 30.0,
        pca_dims: int | None = None,
        n_jobs: int | None = None,
        progress: bool = False,
    ) -> None:
        check_backend(backend)
        if isinstance(perplexity, bool) or not isinstance(perplexity, Real) or not 0 < perplexity < math.inf:
            raise ConfigError(f"perplexity must be a number > 0, got {perplexity!r}")
        if pca_dims is not None and (isinstance(pca_dims, bool) or not isinstance(pca_dims, Integral) or pca_dims < 2):
            raise ConfigError(f"pca_dims must be None (off) or an integer >= 2, got {pca_dims!r}")
        self.backend = backend
        self.perplexity = perplexity
        self.pca_dims = pca_dims
        self.n_jobs = n_jobs
        self.progress = progress

    def parallel_blocks(self, n_blocks: int) -> int:
        from joblib import effective_n_jobs

        if self.backend == "torchdr" and _cuda_available():
            return 1  # one GPU: the blocks run one after the other on it
        return min(effective_n_jobs(self.n_jobs), n_blocks)

    def score(self, features, labels, *, block_input=None, random_state=0, run=0):
        """Scores per block; ``run`` > 0 (a further seed of ``--seeds``) jitters the start."""
        from joblib import Parallel, cpu_count, delayed
        from tqdm.auto import tqdm

        features, labels = check_features(features, labels)
        n_jobs = self.parallel_blocks(len(features))
        options = {"backend": self.backend, "perplexity": self.perplexity, "random_state": random_state,
                   "pca_dims": self.pca_dims, "jitter": run > 0}  # fmt: skip
        if n_jobs == 1:
            # In this process, under the caller's own thread limits: raising them here
            # would also hang a forked process (an OpenMP pool does not survive a fork).
            tasks = (delayed(tsne_silhouette_block)(f, labels, **options) for f in features)
        else:
            threads = max(1, cpu_count() // n_jobs)
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
    per_block = True

    def score(self, features, labels, *, block_input=None, random_state=0):
        features, labels = check_features(features, labels)
        return np.array([silhouette_score(f, labels, metric="euclidean") for f in features])
