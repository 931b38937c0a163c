"""Layer criteria the paper argues do not fit PETL models, behind the same interface.

- ``block-influence`` (ShortGPT, Men et al. 2024): 1 - cosine similarity of a block's
  input and output, here on the pooled token (CLS), averaged over the images.
- ``cka``: linear CKA (Kornblith et al. 2019) of each block's features to the last block's.
- ``probe``: cross-validated accuracy of a logistic-regression probe per block,
  chance-corrected (balanced accuracy adjusted so chance is 0 and perfect is 1).
- ``random``: seeded uniform scores; the SLS rule on noise.
"""

from __future__ import annotations

import numpy as np

from sls.criteria import Criterion, check_features, register_criterion
from sls.errors import ScoreError


@register_criterion
class BlockInfluence(Criterion):
    """ShortGPT's block influence: mean over images of 1 - cos(block input, block output)."""

    name = "block-influence"
    kind = "importance"
    needs_input = True
    label = "block influence (1 - cos in/out)"

    def score(self, features, labels, *, block_input=None, random_state=0):
        features, labels = check_features(features, labels)
        if block_input is None:
            raise ScoreError("block-influence needs the input of block 1 (the embedding's pooled output)")
        inputs = [np.asarray(block_input, dtype=np.float64), *features[:-1]]
        scores = []
        for block, (x, y) in enumerate(zip(inputs, features), start=1):
            if x.shape != y.shape:
                raise ScoreError(
                    f"block-influence compares a block's input and output, but block {block} changes the width "
                    f"({x.shape[1]} -> {y.shape[1]}, a Swin stage boundary); use another criterion"
                )
            cos = (x * y).sum(axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
            scores.append(float(np.mean(1.0 - cos)))
        return np.array(scores)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, d) feature matrices: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@register_criterion
class LinearCKA(Criterion):
    """Linear CKA of each block's features to the last block's (1 at the top)."""

    name = "cka"
    kind = "quality"
    label = "linear CKA to the last block"

    def score(self, features, labels, *, block_input=None, random_state=0):
        features, labels = check_features(features, labels)
        return np.array([linear_cka(f, features[-1]) for f in features])


@register_criterion
class LinearProbe(Criterion):
    """Chance-corrected cross-validated accuracy of a logistic-regression probe per block.

    Args:
        folds: stratified folds (shuffled with the seed).
        n_jobs: parallel folds.
    """

    name = "probe"
    kind = "quality"
    stochastic = True
    label = "probe accuracy (chance-corrected)"
    per_block = True

    def __init__(self, folds: int = 3, n_jobs: int | None = None) -> None:
        self.folds = folds
        self.n_jobs = n_jobs

    def score(self, features, labels, *, block_input=None, random_state=0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import balanced_accuracy_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        features, labels = check_features(features, labels)
        if np.bincount(labels).min() < self.folds:
            raise ScoreError(f"the probe's {self.folds}-fold cross-validation needs {self.folds} images of every class")
        folds = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=random_state)
        scores = []
        for feats in features:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
            predicted = cross_val_predict(probe, feats, labels, cv=folds, n_jobs=self.n_jobs)
            scores.append(balanced_accuracy_score(labels, predicted, adjusted=True))
        return np.array(scores)


@register_criterion
class RandomScores(Criterion):
    """Uniform random scores in [0, 1), seeded: what the SLS rule does on noise."""

    name = "random"
    kind = "quality"
    stochastic = True
    label = "random score"

    def score(self, features, labels, *, block_input=None, random_state=0):
        features, labels = check_features(features, labels)
        return np.random.default_rng(random_state).uniform(size=len(features))
