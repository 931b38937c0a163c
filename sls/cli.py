"""The ``sls`` command: parse, call the library, print.

User errors (:class:`sls.SLSError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

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
    from sls.pipeline import RunConfig

    d = RunConfig()
    parser.add_argument("--model", default=d.model, help="embedded model name or timm model name (default: %(default)s)")
    parser.add_argument("--weights", default=d.weights, help="local weights file for the timm model ('random' for random weights)")
    parser.add_argument("--data", default=d.data, help="mnist5k, fashion-mnist or digits (default: %(default)s)")
    parser.add_argument("--petl", default=d.petl, help="PETL method: lora or adapter (default: %(default)s)")
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
        seed=args.seed, out=args.out, progress=not args.quiet,
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
