"""Plain helpers shared by tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def blob_features(separations, n_per_class=40, n_classes=3, dim=16, seed=0):
    """One (n, dim) array per block: class means pushed apart by each separation."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centers = rng.normal(size=(n_classes, dim))
    noise = rng.normal(size=(len(labels), dim))
    return [noise + s * centers[labels] for s in separations], labels


def silhouette_by_hand(points, labels):
    """Mean silhouette written from its definition: (b - a) / max(a, b) per point."""
    dist = cdist(points, points)
    values = []
    for i, label in enumerate(labels):
        same = labels == label
        same[i] = False
        a = dist[i, same].mean()
        b = min(dist[i, labels == other].mean() for other in np.unique(labels) if other != label)
        values.append((b - a) / max(a, b))
    return float(np.mean(values))
