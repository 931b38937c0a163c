"""What a dense criterion sees: SLS scores and 5-NN accuracy per block, for each kind of sample.

    python bench/dense_samples.py runs/demo-seg            # a fine-tuned segmentation task folder

Scores the task's fine-tuned model (all blocks) with ``samples=regions`` and
``samples=cells`` (README "Dense tasks"), the run's t-SNE settings and alpha, and reports
per kind the SLS scores, the k the rule picks, and the 3-fold 5-NN accuracy of
the features of blocks 1, N/2 and N against their labels (how separable the classes are
before any t-SNE). Prints Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from sls.experiment import Experiment
from sls.pipeline import score_blocks
from sls.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a fine-tuned segmentation task folder")
    args = parser.parse_args()
    exp, record = Experiment.from_record(args.task, overrides={"progress": False, "score_all": True})
    if exp.task.name != "segmentation":
        raise SystemExit(f"{args.task} is a {exp.task.name} task; this compares segmentation's samples")
    print("| samples | SLS scores, blocks 1..N | k | 5-NN accuracy, blocks 1 / N/2 / N |")
    print("|---|---|---|---|")
    for kind in ("regions", "cells"):
        exp.task = get_task("segmentation", samples=kind)
        selector = score_blocks(exp)
        found = exp.task.block_features(exp.model, exp.analysis_loader, samples=exp.config.analysis_samples,
                                        progress=False)  # fmt: skip
        blocks = (0, len(found.features) // 2 - 1, len(found.features) - 1)
        knn = [cross_val_score(KNeighborsClassifier(5), found.features[b], found.labels, cv=3).mean() for b in blocks]
        scores = ", ".join(f"{float(v):.3f}" for v in selector.scores_)
        print(f"| {kind} | {scores} | {selector.depth_} | {' / '.join(f'{v:.2f}' for v in knn)} |", flush=True)


if __name__ == "__main__":
    main()
