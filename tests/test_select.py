"""DepthSelector and the SLS stop rule, on plain numpy arrays (no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import blob_features, silhouette_by_hand
from sklearn.manifold import TSNE
from sklearn.preprocessing import MinMaxScaler

from sls import DepthSelector, select_depth
from sls.errors import ConfigError, ScoreError


def test_scores_match_an_independent_sklearn_computation():
    features, labels = blob_features([0.0, 0.5, 2.0])
    selector = DepthSelector(alpha=0.3, random_state=0, n_jobs=1).fit(features, labels)
    for block, feats in enumerate(features):
        embedding = TSNE(n_components=2, perplexity=30.0, init="pca", random_state=0).fit_transform(
            feats.astype(np.float32)
        )
        expected = silhouette_by_hand(MinMaxScaler().fit_transform(embedding), labels)
        assert selector.scores_[block] == pytest.approx(expected, abs=1e-6)
    # Separation grows with depth, and so must the scores.
    assert selector.scores_[0] < selector.scores_[1] < selector.scores_[2]
    assert selector.scores_[2] > 0.5


def test_fit_sets_learned_state_and_is_reproducible():
    features, labels = blob_features([0.0, 0.2, 1.0, 2.0, 2.5])
    first = DepthSelector(alpha=0.3, n_jobs=2).fit(features, labels)
    again = DepthSelector(alpha=0.3, n_jobs=1).fit(features, labels)
    np.testing.assert_array_equal(first.scores_, again.scores_)
    assert first.depth_ == again.depth_
    assert first.n_blocks_ == 5
    assert first.threshold_ == pytest.approx(0.3 * first.scores_[-1])
    assert first.depth_ == select_depth(first.scores_, 0.3).depth
    assert len(first.embeddings_) == 5 and first.embeddings_[0].shape == (120, 2)
    assert first.embeddings_[0].min() == 0.0 and first.embeddings_[0].max() == 1.0


def test_selector_does_not_need_torch():
    code = "import sys, sls, sls.select, sls.criteria; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# The stop rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "alpha", "depth", "reason"),
    [
        # Walk down from block 5: 0.8, 0.6, 0.5 pass T = 0.24; block 2 (0.1) fails -> k = 3.
        ([0.05, 0.1, 0.5, 0.6, 0.8], 0.3, 3, "rule"),
        # A non-monotone curve: the walk stops at the first failure from the top (block 3),
        # even though block 2 would pass again.
        ([0.05, 0.7, 0.1, 0.6, 0.8], 0.3, 4, "rule"),
        # Nothing fails: keep only block 1.
        ([0.5, 0.6, 0.7, 0.8], 0.3, 1, "all-pass"),
        # A score exactly at T passes (the rule is SC_i < T to fail).
        ([0.1, 0.3, 1.0], 0.3, 2, "rule"),
        # The first examined block (N) fails: only possible for alpha > 1; nothing pruned.
        ([0.1, 0.9, 0.5], 1.5, 3, "top-fails"),
        # alpha > 1 where block N passes its own T is impossible: SC_N < alpha * SC_N.
        ([0.9, 0.95, 0.99], 1.01, 3, "top-fails"),
        # alpha = 0: T = 0 and only negative scores fail.
        ([-0.2, 0.1, 0.3], 0.0, 2, "rule"),
        # A single block.
        ([0.4], 0.3, 1, "all-pass"),
    ],
)
def test_stop_rule(scores, alpha, depth, reason):
    decision = select_depth(np.array(scores), alpha)
    assert decision.depth == depth
    assert decision.reason == reason
    assert decision.threshold == pytest.approx(alpha * scores[-1])


@pytest.mark.parametrize(
    ("scores", "margin", "passing_below"),
    [
        # T = 0.24: block 2 (0.1) stops the walk 0.14 under T; block 3 (0.5) is 0.26 over.
        ([0.05, 0.1, 0.5, 0.6, 0.8], 0.14, ()),
        # T = 0.24: block 3 (0.1) stops, 0.14 under; block 4 (0.6) 0.36 over; block 2 (0.7) passes again.
        ([0.05, 0.7, 0.1, 0.6, 0.8], 0.14, (2,)),
        # T = 0.3: block 1 (0.1) stops, 0.2 under; block 2 sits exactly on T: margin 0.
        ([0.1, 0.3, 1.0], 0.0, ()),
        # T = 0.3: block 2 (0.29) stops 0.01 under T; block 1 passes again.
        ([0.9, 0.29, 0.5, 1.0], 0.01, (1,)),
    ],
)
def test_the_decision_reports_its_margin_and_blocks_passing_under_the_stop(scores, margin, passing_below):
    decision = select_depth(np.array(scores), 0.3)
    assert decision.reason == "rule"
    assert decision.margin == pytest.approx(margin)
    assert decision.passing_below == passing_below
    assert select_depth(np.array([0.5, 0.6, 0.7]), 0.3).margin is None  # all pass: no stop to measure


@pytest.mark.parametrize("top", [0.0, -0.3])
def test_nonpositive_top_score_keeps_all_blocks_with_a_warning(top):
    with pytest.warns(UserWarning, match="keeping all blocks"):
        decision = select_depth(np.array([0.5, 0.4, top]), 0.3)
    assert decision.depth == 3
    assert decision.reason == "top-nonpositive"


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        select_depth(np.array([0.1, 0.2]), alpha)
    features, labels = blob_features([1.0])
    with pytest.raises(ConfigError, match="alpha"):
        DepthSelector(alpha=alpha).fit(features, labels)


# Bad input ----------------------------------------------------------------------


def test_one_class_is_refused():
    features, labels = blob_features([1.0, 2.0])
    with pytest.raises(ScoreError, match="at least 2"):
        DepthSelector().fit(features, np.zeros_like(labels))


def test_too_few_samples_for_the_perplexity():
    features, labels = blob_features([1.0], n_per_class=10)
    with pytest.raises(ScoreError, match="perplexity 30 needs more than 90 samples, got 30"):
        DepthSelector().fit(features, labels)
    # A smaller perplexity makes the same data usable.
    assert DepthSelector(perplexity=5.0, n_jobs=1).fit(features, labels).depth_ == 1


def test_non_finite_features_name_the_block():
    features, labels = blob_features([1.0, 2.0])
    features[1][3, 2] = np.nan
    with pytest.raises(ScoreError, match="block 2: features hold NaN"):
        DepthSelector().fit(features, labels)


def test_mismatched_shapes_and_labels():
    features, labels = blob_features([1.0, 2.0])
    with pytest.raises(ScoreError, match="block 1"):
        DepthSelector().fit([features[0][:-1], features[1]], labels)
    with pytest.raises(ScoreError, match="integers"):
        DepthSelector().fit(features, labels.astype(float))


def test_unknown_criterion_and_backend():
    features, labels = blob_features([1.0])
    with pytest.raises(ConfigError, match="unknown criterion"):
        DepthSelector(criterion="nope").fit(features, labels)
    with pytest.raises(ConfigError, match="unknown t-SNE backend"):
        DepthSelector(tsne="nope").fit(features, labels)


def test_opentsne_backend_gives_the_same_ordering():
    features, labels = blob_features([0.0, 2.0])
    selector = DepthSelector(tsne="opentsne", n_jobs=1).fit(features, labels)
    assert selector.scores_[0] < 0.1 < 0.5 < selector.scores_[1]
