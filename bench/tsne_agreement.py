"""How far do openTSNE's scores and k move from scikit-learn's? Measured.

    python bench/tsne_agreement.py --task runs/demo --data fashion-mnist digits

For every feature set: the per-block pooled features (one forward pass, through the
feature cache, as ``sls analyze`` gets them), then the SLS scores of every block with
each t-SNE backend (``sklearn``, the paper's; ``opentsne``, Barnes-Hut with exact
neighbours; ``opentsne-fft``, FFT gradients with approximate neighbours), all from the
same seed. Reports per backend the largest absolute score difference to
scikit-learn's, k at ``--alpha`` (default 0.3) and the wall time of scoring every
block (``--jobs`` workers, default one per core). Feature sets:

- ``--task DIR`` (repeatable): a task folder's fine-tuned model (all N blocks, with its
  PETL modules) on the task's own data and analysed images (``sls demo`` makes one);
- ``--data NAME ...``: the plain backbone ``--model`` on an embedded set (``mnist5k``,
  ``fashion-mnist``, ``digits``) at ``--img-size``.

Prints a Markdown table for BENCHMARKS.md and writes every score to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import time

from sls import __version__
from sls._io import write_json
from sls.analyze import AnalyzeConfig, analysed_features
from sls.criteria.silhouette import TSNE_BACKENDS
from sls.record import read_record
from sls.select import tsne_agreement


def feature_sets(args: argparse.Namespace) -> list[tuple[str, AnalyzeConfig]]:
    """(label, AnalyzeConfig) of every feature set asked for, tasks first."""
    sets = []
    for task in args.task:
        config = read_record(task).config
        sets.append((f"task {task} ({config.data})",
                     AnalyzeConfig(task=task, data=config.data, samples=config.analysis_samples,
                                   weights=args.weights, progress=False)))  # fmt: skip
    for name in args.data:
        sets.append((f"{args.model} on {name}",
                     AnalyzeConfig(model=args.model, weights=args.weights, data=name, img_size=args.img_size,
                                   samples=args.samples, progress=False)))  # fmt: skip
    return sets


def table(rows: list[dict], backends: tuple[str, ...]) -> str:
    """Markdown: one row per feature set; per backend max |dSC| to the reference, k and seconds."""
    reference = backends[0]
    head = ["features", "n", "blocks"]
    for backend in backends:
        head += [f"k {backend}", f"s {backend}"] + ([f"max abs dSC {backend}"] if backend != reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["features"], str(row["n_samples"]), str(row["n_blocks"])]
        for backend in backends:
            res = row["backends"][backend]
            cells += [str(res["depth"]), f"{res['seconds']:.1f}"]
            if backend != reference:
                cells.append(f"{res['max_abs_diff']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", default=[], help="a task folder (repeatable)")
    parser.add_argument("--data", nargs="*", default=[], help="embedded data sets scored with the plain --model")
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--samples", type=int, default=1000, help="training images per --data set")
    parser.add_argument(
        "--backends",
        default=",".join(TSNE_BACKENDS),
        help="comma-separated; the first is the reference (default: %(default)s)",
    )
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=-1, help="t-SNE worker processes (default: one per core)")
    parser.add_argument("--out", default="tsne_agreement.json")
    args = parser.parse_args()
    if not args.task and not args.data:
        parser.error("give at least one --task DIR or --data NAME")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())

    started, rows = time.perf_counter(), []
    for label, config in feature_sets(args):
        analysed = analysed_features(config)
        print(
            f"{label}: {len(analysed.labels)} images, {len(analysed.features)} blocks "
            f"({'cached' if analysed.cache_hit else 'computed'} features); scoring with {', '.join(backends)}"
        )
        result = tsne_agreement(analysed.features, analysed.labels, backends=backends, alpha=args.alpha,
                                perplexity=args.perplexity, random_state=args.seed, n_jobs=args.jobs)  # fmt: skip
        rows.append({"features": label, "model": analysed.model, "data": config.data, **result})
    print()
    print(table(rows, backends))
    write_json(args.out, {"sls_version": __version__, "cores": os.cpu_count(), "alpha": args.alpha,
                          "perplexity": args.perplexity, "seed": args.seed, "jobs": args.jobs,
                          "seconds": round(time.perf_counter() - started, 1), "feature_sets": rows})  # fmt: skip
    print(f"\nscores per block and backend in {args.out}")


if __name__ == "__main__":
    main()
