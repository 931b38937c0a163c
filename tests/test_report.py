"""Plot helpers: labels that stay readable when points crowd."""

from __future__ import annotations

import itertools

from sls.report import _pyplot, annotate_apart


def test_crowded_point_labels_do_not_overlap():
    # sls compare's points on the demo task: three models within 15 img/s and 1.8 points
    # of each other on an axis that runs down to 22%.
    points = [(195.6, 97.8, "SLS k=8 (task)"), (193.8, 97.1, "DepGraph =speed r=0.20"),
              (181.3, 96.0, "DepGraph =params r=0.18"), (131.2, 97.5, "full"), (247.3, 90.1, "DepGraph r=0.30"),
              (194.7, 22.0, "SLS k=8 no retrain")]  # fmt: skip
    fig, ax = _pyplot().subplots(figsize=(7.2, 4.6), dpi=120)
    try:
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        labels = annotate_apart(ax, points)
        renderer = fig.canvas.get_renderer()
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert [label.get_text() for label in labels] == [p[2] for p in sorted(points, key=lambda p: (-p[1], p[0]))]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        # The top label keeps its place beside its point; only the crowded ones moved down.
        assert labels[0].xyann == (4, 3) and any(label.xyann[1] < 3 for label in labels)
        assert all(label.xyann == (4, 3) for label in labels if label.get_text() in ("full", "DepGraph r=0.30", "SLS k=8 no retrain"))
    finally:
        _pyplot().close(fig)
