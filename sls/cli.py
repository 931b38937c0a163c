"""The ``sls`` command: parse, call the library, print.

User errors (:class:`sls.SLSError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np

from sls import __version__
from sls.errors import SLSError


def _petl_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SLSError(f"--petl-option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    from sls.petl import list_petl
    from sls.pipeline import RunConfig

    d = RunConfig()
    parser.add_argument("--model", default=d.model, help="embedded model name or timm model name (default: %(default)s)")
    parser.add_argument("--weights", default=d.weights, help="local weights file for the timm model ('random' for random weights)")
    parser.add_argument("--data", default=d.data, help="mnist5k, fashion-mnist, digits, a VTAB-1k folder, an image-folder "
                        "tree or a path,label CSV (default: %(default)s)")
    parser.add_argument("--petl", default=d.petl, help=f"PETL method: {', '.join(list_petl())} (default: %(default)s)")
    parser.add_argument("--petl-option", action="append", default=[], metavar="KEY=VALUE",
                        help="PETL hyper-parameter, e.g. r=16 (repeatable)")
    parser.add_argument("--img-size", type=int, default=d.img_size, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--train-samples", type=int, default=d.train_samples, help="training images (default: %(default)s)")
    parser.add_argument("--test-samples", type=int, default=d.test_samples, help="test images (default: %(default)s)")
    parser.add_argument("--analysis-samples", type=_count_or_all, default=d.analysis_samples,
                        help="training images the blocks are scored on, or 'all' (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs, help="retraining epochs after pruning (default: %(default)s)")
    parser.add_argument("--no-retrain", action="store_true", help="prune without retraining")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="threshold factor, T = alpha * SC_N (default: %(default)s)")
    parser.add_argument("--tsne", default=d.tsne, choices=["sklearn", "opentsne"], help="t-SNE backend (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=None, help="keep exactly this many blocks instead of SLS's k")
    parser.add_argument("--seed", type=int, default=d.seed, help="training seed (default: %(default)s)")
    parser.add_argument("--out", default=None, help="task folder (default: runs/<data>-<model>-<petl>-<time>)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out unreadable images (reported) instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace):
    from sls.pipeline import RunConfig

    return RunConfig(
        model=args.model, weights=args.weights, data=args.data, petl=args.petl,
        petl_options=_petl_options(args.petl_option), img_size=args.img_size,
        train_samples=args.train_samples, test_samples=args.test_samples,
        analysis_samples=args.analysis_samples, epochs=args.epochs,
        retrain_epochs=args.retrain_epochs, retrain=not args.no_retrain, lr=args.lr,
        batch_size=args.batch_size, alpha=args.alpha, tsne=args.tsne, depth=args.depth,
        seed=args.seed, out=args.out, skip_bad_images=args.skip_bad_images, progress=not args.quiet,
    )  # fmt: skip


def _execute(config) -> int:
    from sls.pipeline import run
    from sls.report import print_summary

    record = run(config)
    print_summary(record)
    print(f"task folder: {record['config']['out']}  (record.json, task.safetensors, scores.csv, scores.png)")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _execute(_config_from(args))


def _demo(args: argparse.Namespace) -> int:
    from sls.pipeline import RunConfig

    return _execute(RunConfig(out=args.out, progress=not args.quiet))


def _analyze(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sls.analyze import AnalyzeConfig, analyze, depth_distribution

    config = AnalyzeConfig(
        model=args.model, weights=args.weights, task=args.task, data=args.data, img_size=args.img_size,
        samples=args.samples, criteria=[c.strip() for c in args.criterion.split(",") if c.strip()],
        alpha=args.alpha, tsne=args.tsne, perplexity=args.perplexity, pca_dims=args.pca, seeds=args.seeds,
        seed=args.seed, use_cache=not args.no_cache, out=args.out, progress=not args.quiet,
    )  # fmt: skip
    summary = analyze(config)
    table = Table(title=f"Block scores of {summary['model']} on {summary['data']['name']} "
                        f"({summary['data']['samples']} training images)")  # fmt: skip
    table.add_column("criterion")
    table.add_column("k")
    table.add_column(f"k over {config.seeds} seed(s)")
    table.add_column("scores, block 1 -> N")
    for res in summary["criteria"]:
        scores = " ".join(f"{v:.2f}" for v in res["scores"])
        table.add_row(res["criterion"], str(res["depth"]), depth_distribution(res["depths_per_seed"]), scores)
    Console().print(table)
    cached = "features from the cache" if summary["feature_cache_hit"] else "features computed and cached"
    print(f"{cached}; results in {summary['config']['out']} (scores.csv, scores.json, scores.png"
          f"{', tsne.png' if 'sls' in config.criteria else ''})")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sls.data import LabelledFiles, load_dataset, make_splits
    from sls.data.files import find_bad_images

    data = load_dataset(args.dataset)
    splits = make_splits(data)
    print(f"{data.source}: {len(data)} images, {len(data.classes)} classes "
          f"({'its own splits' if data.splits is not None else 'split by sls'})")
    table = Table()
    table.add_column("class")
    for split in ("train", "val", "test"):
        table.add_column(split, justify="right")
    per_split = {name: np.bincount(data.labels[idx], minlength=len(data.classes))
                 for name, idx in (("train", splits.train), ("val", splits.val), ("test", splits.test))}  # fmt: skip
    for label, name in enumerate(data.classes):
        table.add_row(f"{label}: {name}", *(str(per_split[s][label]) for s in ("train", "val", "test")))
    table.add_row("all", *(str(per_split[s].sum()) for s in ("train", "val", "test")))
    Console().print(table)
    bad = find_bad_images(data, np.arange(len(data))) if isinstance(data, LabelledFiles) else []
    for _, reason in bad:
        print(f"bad image: {reason}")
    empty = [s for s in ("train", "test") if per_split[s].sum() == 0]
    if bad or empty:
        problems = [f"{len(bad)} unreadable image(s)"] * bool(bad) + [f"empty {s} split" for s in empty]
        raise SLSError(f"{args.dataset}: {', '.join(problems)}")
    print("ok: every image reads")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sls", description="Prune tail blocks of PETL-adapted vision transformers (SLS, ECCV 2024).")
    parser.add_argument("--version", action="version", version=f"sls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole SLS run on the embedded default (DINOv2 ViT-S/14, LoRA, MNIST-5k)")
    demo.add_argument("--out", default=None, help="task folder (default: runs/demo-<time>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="fine-tune, score blocks, prune to k, retrain, measure and save a task")
    _add_run_options(run)
    run.set_defaults(handler=_run)

    from sls.criteria import list_criteria

    analyze = commands.add_parser("analyze", help="score every block of a plain or PETL-tuned model; no training")
    analyze.add_argument("--model", default="embedded-dinov2-s", help="embedded or timm model name (default: %(default)s)")
    analyze.add_argument("--weights", default=None, help="local weights file for the backbone")
    analyze.add_argument("--task", default=None, help="a task folder: analyse its fine-tuned PETL model (all blocks)")
    analyze.add_argument("--data", default="mnist5k", help="mnist5k, fashion-mnist or digits (default: %(default)s)")
    analyze.add_argument("--img-size", type=int, default=84, help="input side without --task (default: %(default)s)")
    analyze.add_argument("--samples", type=_count_or_all, default=1000,
                         help="training images scored, or 'all' (default: %(default)s)")
    analyze.add_argument("--criterion", default="sls",
                         help=f"comma-separated criteria among {', '.join(list_criteria())} (default: %(default)s)")
    analyze.add_argument("--alpha", type=float, default=0.3, help="threshold factor (default: %(default)s)")
    analyze.add_argument("--tsne", default="sklearn", choices=["sklearn", "opentsne"], help="t-SNE backend (default: %(default)s)")
    analyze.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: %(default)s)")
    analyze.add_argument("--pca", type=int, default=None, metavar="DIMS", help="PCA to DIMS dimensions before t-SNE")
    analyze.add_argument("--seeds", type=int, default=1, help="seeds per stochastic criterion; k = the most frequent")
    analyze.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    analyze.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    analyze.add_argument("--out", default=None, help="output folder (default: runs/analyze-<data>-<model>-<time>)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(handler=_analyze)

    data = commands.add_parser("data", help="inspect a dataset without a model")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a dataset and print counts per class and split")
    check.add_argument("dataset", help="an embedded name, a VTAB-1k folder, an image-folder tree or a CSV file")
    check.set_defaults(handler=_data_check)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sls: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning  # restored by catch_warnings
            return args.handler(args)
    except SLSError as err:
        print(f"sls: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sls: interrupted; files already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
