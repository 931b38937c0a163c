"""Layer criteria against hand computations, the registry, seeds and the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import blob_features, silhouette_by_hand
from sklearn.metrics import silhouette_score
from torch.utils.data import DataLoader, TensorDataset

import sls.features
from sls.criteria import _CRITERIA, Criterion, get_criterion, list_criteria, register_criterion
from sls.criteria.baselines import linear_cka
from sls.errors import ConfigError, ScoreError
from sls.select import DepthSelector, select_depth


def test_registry_lists_every_criterion():
    assert list_criteria() == ["block-influence", "cka", "probe", "random", "silhouette", "sls"]
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        get_criterion("nope")


def test_a_new_criterion_is_one_class_and_one_decorator():
    @register_criterion
    class LastIsBest(Criterion):
        name = "test-last-is-best"
        kind = "quality"

        def score(self, features, labels, *, block_input=None, random_state=0):
            return np.linspace(0.1, 1.0, len(features))

    try:
        features, labels = blob_features([1.0] * 10)
        # T = 0.3; scores 0.1, 0.2, 0.3, ...: block 2 (0.2) is the first below T from the top.
        assert DepthSelector(criterion="test-last-is-best").fit(features, labels).depth_ == 3
        with pytest.raises(ValueError, match="registered twice"):
            register_criterion(LastIsBest)
    finally:
        del _CRITERIA["test-last-is-best"]


def test_raw_silhouette_by_hand():
    features, labels = blob_features([0.0, 1.0, 3.0])
    scores = get_criterion("silhouette").score(features, labels)
    for got, feats in zip(scores, features):
        assert got == pytest.approx(silhouette_by_hand(feats, labels), abs=1e-9)
    assert scores[0] < scores[1] < scores[2]


def test_block_influence_by_hand():
    labels = np.array([0, 1, 0, 1])
    block_input = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    out1 = np.array([[0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos: 0, 1, 1, 1/sqrt(2)
    out2 = -out1  # cos with out1: -1 for every row
    scores = get_criterion("block-influence").score([out1, out2], labels, block_input=block_input)
    assert scores[0] == pytest.approx(np.mean([1.0, 0.0, 0.0, 1 - 1 / np.sqrt(2)]))
    assert scores[1] == pytest.approx(2.0)
    with pytest.raises(ScoreError, match="needs the input of block 1"):
        get_criterion("block-influence").score([out1], labels)


def test_importance_rule():
    # T = 0.3 * 0.5 = 0.15; the highest block with a score >= T is block 2.
    decision = select_depth(np.array([0.5, 0.3, 0.05, 0.02]), 0.3, kind="importance")
    assert (decision.depth, decision.threshold) == (2, pytest.approx(0.15))
    assert select_depth(np.array([0.1, 0.2, 0.3]), 0.3, kind="importance").depth == 3


def test_linear_cka_against_the_hsic_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 7))
    h = np.eye(30) - 1.0 / 30
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    assert linear_cka(x, y) == pytest.approx(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)
    scores = get_criterion("cka").score([x, y, x], np.arange(30) % 3)
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(linear_cka(y, x))


def test_probe_is_chance_corrected():
    separable, labels = blob_features([0.0, 10.0])
    scores = get_criterion("probe").score(separable, labels, random_state=0)
    assert scores[1] == pytest.approx(1.0)
    assert abs(scores[0]) < 0.25  # pure noise: chance level is 0 after correction


def test_random_scores_are_seeded():
    features, labels = blob_features([1.0] * 4)
    random = get_criterion("random")
    np.testing.assert_array_equal(random.score(features, labels, random_state=3),
                                  random.score(features, labels, random_state=3))  # fmt: skip
    assert not np.array_equal(random.score(features, labels, random_state=3),
                              random.score(features, labels, random_state=4))  # fmt: skip


def test_sls_criterion_matches_sklearn_silhouette_of_its_embeddings():
    features, labels = blob_features([0.5, 2.0])
    criterion = get_criterion("sls", n_jobs=1)
    scores = criterion.score(features, labels, random_state=0)
    for score, points in zip(scores, criterion.embeddings_):
        assert score == pytest.approx(silhouette_score(points, labels))


# Seeds ---------------------------------------------------------------------------


def test_several_seeds_report_spread_and_the_rule_on_the_mean():
    features, labels = blob_features([0.0, 0.3, 1.0, 2.0])
    selector = DepthSelector(n_seeds=3, n_jobs=1).fit(features, labels)
    assert selector.scores_per_seed_.shape == (3, 4)
    np.testing.assert_allclose(selector.scores_, selector.scores_per_seed_.mean(axis=0))
    np.testing.assert_allclose(selector.scores_std_, selector.scores_per_seed_.std(axis=0))
    assert (selector.scores_std_ > 0).any()  # t-SNE seeds do move the scores
    assert len(selector.depths_per_seed_) == 3
    assert selector.depth_ == select_depth(selector.scores_, selector.alpha).depth
    single = DepthSelector(n_jobs=1).fit(features, labels)
    np.testing.assert_array_equal(single.scores_per_seed_[0], selector.scores_per_seed_[0])


def test_the_jittered_start_is_sklearns_pca_start_plus_seeded_noise():
    # scale=0 must reproduce scikit-learn's own init="pca" start: the same embedding, bit for bit.
    from sklearn.manifold import TSNE

    from sls.criteria.silhouette import jittered_pca_layout

    features, _ = blob_features([1.0])
    x = features[0].astype(np.float32)
    options = {"n_components": 2, "perplexity": 30.0, "random_state": 0, "method": "barnes_hut", "n_jobs": 1}
    np.testing.assert_array_equal(TSNE(init=jittered_pca_layout(x, 0, scale=0.0), **options).fit_transform(x),
                                  TSNE(init="pca", **options).fit_transform(x))  # fmt: skip
    one, again, other = (jittered_pca_layout(x, seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    noise = one - jittered_pca_layout(x, 1, scale=0.0)
    assert 0.5e-6 < noise.std() < 2e-6  # 1% of the start's 1e-4 spread


# At the paper's shape (1000 images x 384 features, ViT-S) scikit-learn's PCA start is
# randomized, so random_state moves it: the seed spread must start from that very start.
# The paper's t-SNE call, written out independently of sls.criteria.silhouette.
PAPER_TSNE = {"n_components": 2, "perplexity": 30.0, "early_exaggeration": 12.0, "learning_rate": "auto",
              "max_iter": 1000, "n_iter_without_progress": 300, "min_grad_norm": 1e-7, "metric": "euclidean",
              "verbose": 0, "method": "barnes_hut", "angle": 0.5, "n_jobs": 1}  # fmt: skip


@pytest.fixture(scope="module")
def vit_s_shaped():
    """1000 x 384 float32 features in 10 Gaussian clusters, and their labels."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    centers = rng.normal(size=(10, 384))
    return (rng.normal(size=(1000, 384)) + centers[labels]).astype(np.float32), labels


@pytest.fixture(scope="module")
def paper_runs(vit_s_shaped):
    """The sls criterion's first run (the paper's call) for seeds 0 and 1: (score, points)."""
    from sls.criteria.silhouette import tsne_silhouette_block

    x, labels = vit_s_shaped
    return {seed: tsne_silhouette_block(x, labels, random_state=seed) for seed in (0, 1)}


def test_at_1000_x_384_random_state_moves_the_pca_start_and_the_score(vit_s_shaped, paper_runs):
    from sklearn.decomposition import PCA

    from sls.criteria.silhouette import TSNE_PCA_SOLVER, sklearn_pca_start

    x, _ = vit_s_shaped
    solver = PCA(n_components=2, svd_solver=TSNE_PCA_SOLVER).fit(x)._fit_svd_solver
    assert solver == "randomized"  # what makes the seed matter at this shape, in every scikit-learn
    assert not np.array_equal(sklearn_pca_start(x, 0), sklearn_pca_start(x, 1))
    # ... only in its last bits (the axes' signs are fixed by svd_flip): the start's spread is 1e-4.
    np.testing.assert_allclose(sklearn_pca_start(x, 0), sklearn_pca_start(x, 1), rtol=0, atol=1e-8)
    (score_0, _), (score_1, _) = paper_runs[0], paper_runs[1]
    assert score_0 != score_1  # the spread over seeds is real here, even without jitter
    assert 0.5 < min(score_0, score_1) and abs(score_0 - score_1) < 0.05


@pytest.mark.slow
def test_at_1000_x_384_the_reproduced_start_is_sklearns_init_pca_start(vit_s_shaped, paper_runs):
    from sklearn.manifold import TSNE

    from sls.criteria.silhouette import jittered_pca_layout, min_max_scale

    x, _ = vit_s_shaped
    for seed in (0, 1):
        start = jittered_pca_layout(x, seed, scale=0.0)
        again = TSNE(init=start, random_state=seed, **PAPER_TSNE).fit_transform(x)
        np.testing.assert_array_equal(min_max_scale(again.astype(np.float64)), paper_runs[seed][1])
    # And the paper's call itself, independently of sls: init="pca" at the same seed.
    paper = TSNE(init="pca", random_state=1, **PAPER_TSNE).fit_transform(x)
    np.testing.assert_array_equal(min_max_scale(paper.astype(np.float64)), paper_runs[1][1])


def test_deterministic_criteria_run_once_whatever_the_seeds():
    features, labels = blob_features([0.0, 1.0])
    selector = DepthSelector(criterion="silhouette", n_seeds=4).fit(features, labels)
    assert selector.scores_per_seed_.shape == (1, 2)


# Feature cache -------------------------------------------------------------------


def test_feature_cache_hit_runs_no_forward_pass(tmp_path, monkeypatch):
    from sls.backbones import create_backbone

    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.arange(20) % 3), batch_size=8)
    parts = {"data": "unit", "split": "train"}
    first, hit = sls.features.cached_block_features(model, loader, key_parts=parts, cache=tmp_path, progress=False)
    assert not hit and len(list(tmp_path.glob("*.npz"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(sls.features, "block_features", no_forward)
    again, hit = sls.features.cached_block_features(model, loader, key_parts=parts, cache=tmp_path, progress=False)
    assert hit
    for a, b in zip(first.features, again.features):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.block_input, again.block_input)
    # Another split, or changed model tensors, is another key: the forward pass runs.
    with pytest.raises(AssertionError, match="must not run"):
        sls.features.cached_block_features(model, loader, key_parts=parts | {"split": "val"}, cache=tmp_path)
    with torch.no_grad():
        model.blocks[0].norm1.bias.add_(0.1)
    with pytest.raises(AssertionError, match="must not run"):
        sls.features.cached_block_features(model, loader, key_parts=parts, cache=tmp_path)


def test_tsne_workers_cap_their_native_threads(monkeypatch):
    # Workers x inherited OMP threads oversubscribe the cores (t-SNE ran ~10x slower).
    from threadpoolctl import threadpool_info, threadpool_limits

    from sls.criteria import silhouette

    seen = []

    def record(features, labels, **options):
        seen.append({pool["user_api"]: pool["num_threads"] for pool in threadpool_info()})
        return 0.0, features

    monkeypatch.setattr(silhouette, "tsne_silhouette_block", record)
    with threadpool_limits(limits=3):  # what the worker inherits
        for threads in (1, 2):
            silhouette._block_in_worker(np.zeros((4, 2)), np.zeros(4), threads)
        inherited = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    assert seen[0] and set(seen[0].values()) == {1} and set(seen[1].values()) == {2}
    assert set(inherited.values()) == {3}  # restored afterwards


def test_scoring_in_this_process_keeps_the_callers_thread_limits(monkeypatch):
    # n_jobs=1 runs here: raising OpenMP's threads would hang a forked caller (DDP tests).
    from threadpoolctl import threadpool_info, threadpool_limits

    from sls.criteria import silhouette

    seen = []

    def record(features, labels, **options):
        seen.append({pool["num_threads"] for pool in threadpool_info()})
        return 0.0, features

    monkeypatch.setattr(silhouette, "tsne_silhouette_block", record)
    features, labels = blob_features([0.0, 1.0])
    with threadpool_limits(limits=1):
        silhouette.TSNESilhouette(n_jobs=1).score(features, labels)
    assert seen == [{1}, {1}]
