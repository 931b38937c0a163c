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


def _key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE options; values are read as JSON when they parse (numbers, lists), else kept as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SLSError(f"{flag} wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


ALL = "all"
"""What ``_count_or_all`` gives for 'all' (None stands for "not given" on the command line)."""


def _count_or_all(text: str) -> int | str:
    if text == ALL:
        return ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The RunConfig options. Every default is None ("not given"), so that a ``--recipe``
    fills in only what the command line leaves out; the help shows RunConfig's default."""
    from sls.petl import list_petl
    from sls.pipeline import NORMALIZATIONS, RunConfig
    from sls.recipes import describe_recipes, list_recipes
    from sls.retrain import create_strategy, list_strategies

    d = RunConfig()

    def option(*flags: str, help: str, default_shown=None, **kwargs) -> None:
        if default_shown is not None:
            help = f"{help} (default: {default_shown})"
        parser.add_argument(*flags, default=None, help=help, **kwargs)

    def samples(value: int | None) -> str:
        return ALL if value is None else str(value)

    option("--recipe", choices=list_recipes(), help=f"preset of the settings below; an option given here wins: "
           f"{describe_recipes()}")  # fmt: skip
    option("--model", help="embedded model name or timm model name", default_shown=d.model)
    option("--weights", help="local weights file for the timm model ('random' for random weights)")
    option("--model-option", action="append", metavar="KEY=VALUE",
           help="extra timm.create_model argument, e.g. depth=6 (repeatable; stored in the record)")
    option("--data", help="mnist5k, fashion-mnist, digits, a VTAB-1k folder, an image-folder tree or a path,label CSV",
           default_shown=d.data)  # fmt: skip
    option("--petl", help=f"PETL method: {', '.join(list_petl())}", default_shown=d.petl)
    option("--petl-option", action="append", metavar="KEY=VALUE", help="PETL hyper-parameter, e.g. r=16 (repeatable)")
    option("--img-size", type=int, help="input side in pixels", default_shown=d.img_size)
    option("--train-samples", type=_count_or_all, help="training images, or 'all'",
           default_shown=samples(d.train_samples))
    option("--test-samples", type=_count_or_all, help="test images, or 'all'", default_shown=samples(d.test_samples))
    option("--analysis-samples", type=_count_or_all, help="training images the blocks are scored on, or 'all'",
           default_shown=samples(d.analysis_samples))
    option("--epochs", type=int, help="fine-tuning epochs", default_shown=d.epochs)
    option("--retrain-epochs", type=int, help="retraining epochs after pruning", default_shown=d.retrain_epochs)
    option("--no-retrain", action="store_true", help="prune without retraining")
    strategies = "; ".join(f"{name}: {create_strategy(name).description}" for name in list_strategies())
    option("--retrain-strategy", choices=list_strategies(), default_shown=d.retrain_strategy,
           help=f"how to retrain after pruning, for --retrain-epochs whatever the strategy: {strategies}")
    option("--retrain-option", action="append", metavar="KEY=VALUE",
           help="retraining option, e.g. temperature=4, ce_weight=0.5, feature_weight=1 (distill), "
                "lr_ratio=0.1 (ft) (repeatable)")
    option("--max-drop", type=float, metavar="POINTS",
           help="choose the smallest k whose retrained validation accuracy is at most POINTS below "
                "the full model's, searching from SLS's k")
    option("--val-samples", type=_count_or_all, help="validation images --max-drop measures on, or 'all'",
           default_shown=samples(d.val_samples))
    option("--lr", type=float, help="AdamW peak learning rate", default_shown=d.lr)
    option("--weight-decay", type=float, help="AdamW weight decay", default_shown=d.weight_decay)
    option("--warmup-epochs", type=float, help="linear warm-up before the cosine decay",
           default_shown="a tenth of the epochs")
    option("--min-lr", type=float, help="learning rate at the end of the cosine", default_shown="lr / 100")
    option("--drop-path", type=float, help="stochastic depth rate of the backbone while training",
           default_shown=d.drop_path)
    option("--normalize", choices=NORMALIZATIONS, default_shown=d.normalize,
           help="input mean and std: the model's pretrained config, or ImageNet's")
    option("--batch-size", type=int, help="training batch size", default_shown=d.batch_size)
    option("--throughput-batch", type=int, help="batch size of the throughput measurement",
           default_shown=d.throughput_batch)
    option("--alpha", type=float, nargs="+", metavar="A", default_shown=d.alpha,
           help="threshold factor, T = alpha * SC_N; several values report k for each from one "
                "scoring, the first prunes")
    option("--tsne", choices=["sklearn", "opentsne"], help="t-SNE backend", default_shown=d.tsne)
    option("--tsne-seeds", type=int, metavar="N", default_shown=d.tsne_seeds,
           help="t-SNE starts to score the blocks with: mean scores, k = the most frequent k (ties: the larger)")
    option("--depth", type=int, help="keep exactly this many blocks instead of SLS's k")
    option("--seed", type=int, help="training seed", default_shown=d.seed)
    option("--out", help="task folder (default: runs/<data>-<model>-<petl>-<time>)")
    option("--skip-bad-images", action="store_true", help="leave out unreadable images (reported) instead of stopping")
    option("--device", default_shown=d.device,
           help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes its local GPU")
    option("--amp", action="store_true", help="mixed precision: autocast to bfloat16 (float16 on GPUs "
           "without bfloat16) for training, evaluation and throughput; block scores stay float32")
    option("--channels-last", action="store_true", help="channels-last memory layout for the model and its input "
           "batches")  # fmt: skip
    option("--quiet", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace):
    """RunConfig from the options given, over the ``--recipe``'s settings, over the defaults."""
    from sls.pipeline import RunConfig
    from sls.recipes import apply_recipe

    given = {
        "model": args.model, "weights": args.weights, "data": args.data, "petl": args.petl,
        "img_size": args.img_size, "train_samples": args.train_samples, "test_samples": args.test_samples,
        "analysis_samples": args.analysis_samples, "epochs": args.epochs, "retrain_epochs": args.retrain_epochs,
        "retrain": False if args.no_retrain else None, "retrain_strategy": args.retrain_strategy,
        "max_drop": args.max_drop, "val_samples": args.val_samples, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "min_lr": args.min_lr,
        "drop_path": args.drop_path, "normalize": args.normalize, "batch_size": args.batch_size,
        "throughput_batch": args.throughput_batch, "tsne": args.tsne, "tsne_seeds": args.tsne_seeds,
        "depth": args.depth, "seed": args.seed, "out": args.out, "skip_bad_images": args.skip_bad_images,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
        "progress": False if args.quiet else None,
    }  # fmt: skip
    settings = {key: (None if value == ALL else value) for key, value in given.items() if value is not None}
    for key, flag, pairs in (("petl_options", "--petl-option", args.petl_option),
                             ("retrain_options", "--retrain-option", args.retrain_option),
                             ("model_kwargs", "--model-option", args.model_option)):  # fmt: skip
        if pairs:
            settings[key] = _key_values(pairs, flag)
    if args.alpha:
        settings["alpha"], settings["alphas"] = args.alpha[0], args.alpha[1:]
    if args.recipe:
        settings = apply_recipe(args.recipe, settings)
    return RunConfig(**settings)


def _execute(config) -> int:
    import dataclasses

    from sls import distributed
    from sls.pipeline import run
    from sls.report import print_summary, selection_notes

    # Under torchrun (WORLD_SIZE > 1) every process runs this; only rank 0 prints.
    with distributed.session(config.device):
        record = run(dataclasses.replace(config, progress=config.progress and distributed.is_main()))
        if not distributed.is_main():
            return 0
    print_summary(record)
    for line in selection_notes(record):
        print(line)
    plots = "scores.png, budget.png" if "budget_search" in record else "scores.png"
    print(f"task folder: {record['config']['out']}  (record.json, task.safetensors, scores.csv, {plots})")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _execute(_config_from(args))


def _finetune(args: argparse.Namespace) -> int:
    from sls.pipeline import stage_finetune

    record = stage_finetune(_config_from(args))
    print(f"fine-tuned: test accuracy {100 * record['results']['accuracy']['full']:.1f}% with all "
          f"{record['backbone']['num_blocks']} blocks; next: sls prune {record['config']['out']}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from sls.pipeline import stage_prune
    from sls.report import depth_distribution, scores_line, selection_notes

    alpha, alphas = (args.alpha[0], args.alpha[1:]) if args.alpha else (None, None)
    record = stage_prune(args.task, alpha=alpha, alphas=alphas, criterion=args.criterion, depth=args.depth,
                         max_drop=args.max_drop, tsne_seeds=args.tsne_seeds, progress=not args.quiet)  # fmt: skip
    if len(record["depths_per_seed"]) > 1:
        per_seed = record["depths_per_seed"]
        print(f"k over {len(per_seed)} t-SNE starts: {depth_distribution(per_seed)}")
    if len(record["depth_per_alpha"]) > 1:
        per_alpha = record["depth_per_alpha"]
        print("k per alpha: " + ", ".join(f"alpha={row['alpha']:g}: k={row['depth']}" for row in per_alpha))
    search = record.get("budget_search")
    if search:
        tried = ", ".join(f"k={row['depth']} {100 * row['val_accuracy']:.1f}%" for row in search["tried"])
        print(f"--max-drop {search['max_drop_points']:g}: full model {100 * search['full']['val_accuracy']:.1f}% on "
              f"{search['val_images']} validation images; tried {tried}; k = {search['chosen_depth']} "
              f"(SLS's k = {search['start_depth']}); plot: {args.task}/budget.png")  # fmt: skip
    print(f"{scores_line(record)}; test accuracy before retraining "
          f"{100 * record['results']['accuracy']['pruned_no_retrain']:.1f}%; next: sls retrain {args.task}")
    for line in selection_notes(record):
        print(line)
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from sls.pipeline import stage_retrain

    stage_retrain(args.task, epochs=args.retrain_epochs, strategy=args.retrain_strategy, progress=not args.quiet)
    print(f"retrained; next: sls evaluate {args.task}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from sls.artifact import read_record
    from sls.pipeline import STAGES
    from sls.report import print_summary, scores_line, selection_notes

    record = read_record(args.task)
    stages = record.get("stages", [])
    if "evaluate" in stages:
        print_summary(record)
    else:
        accuracies = ", ".join(f"{name.replace('_', ' ')} {100 * value:.1f}%"
                               for name, value in record.get("results", {}).get("accuracy", {}).items())  # fmt: skip
        print(f"{args.task}: {record['backbone']['model']} + {record['petl']['method']} on {record['data']['name']}; "
              f"stages done: {', '.join(stages) or 'none'}; test accuracy: {accuracies or 'not measured'}")  # fmt: skip
        if stages and stages[-1] in STAGES[:-1]:
            print(f"next: sls {STAGES[STAGES.index(stages[-1]) + 1]} {args.task}")
    if "scores" in record:
        print(scores_line(record))
    for line in selection_notes(record):
        print(line)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sls.pipeline import stage_evaluate
    from sls.report import print_summary

    print_summary(stage_evaluate(args.task, progress=not args.quiet))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from sls import distributed
    from sls.sweep import load_sweep, parse_shard, run_sweep

    shard = parse_shard(args.shard) if args.shard else (0, 1)
    first = load_sweep(args.config, out=args.out)  # checked before any process group opens
    # Under torchrun every process runs every task together; only rank 0 prints and writes.
    with distributed.session(first.tasks[0].config.device):
        sweep = load_sweep(args.config, out=args.out, progress=not args.quiet and distributed.is_main())
        report = run_sweep(sweep, shard=shard, dry_run=args.dry_run)
        if not distributed.is_main():
            return 2 if report.failed else 0
    if args.dry_run:
        print(f"dry run: {len(sweep.tasks[shard[0]::shard[1]])} of {len(sweep.tasks)} tasks in this shard; "
              "nothing run or written")
        return 0
    for row in report.rows:
        if row["level"] != "task" and row["full_accuracy"] is not None:
            print(f"{row['method']} / {row['group']} ({row['level']}): accuracy {100 * row['full_accuracy']:.1f}% -> "
                  f"{100 * row['pruned_accuracy']:.1f}%, mean k {row['depth']:.1f}, speed-up {row['speedup']:.2f}x")
    print(f"{len(report.ran)} run, {len(report.skipped)} already done, {len(report.failed)} failed; "
          f"summary: {', '.join(str(path) for path in report.files)}")
    if report.failed:
        print(f"sls: error: {len(report.failed)} task(s) failed: {', '.join(report.failed)}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sls.pipeline import RunConfig

    return _execute(RunConfig(out=args.out, progress=not args.quiet))


def _analyze(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sls.analyze import AnalyzeConfig, analyze
    from sls.report import depth_distribution

    config = AnalyzeConfig(
        model=args.model, weights=args.weights, task=args.task, data=args.data, img_size=args.img_size,
        samples=None if args.samples == ALL else args.samples,
        criteria=[c.strip() for c in args.criterion.split(",") if c.strip()],
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


def _numbers(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(value) for value in text.split(",") if value.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sls.artifact import read_record
    from sls.compare import compare

    retrain_epochs = args.retrain_epochs
    if args.retrain and retrain_epochs is None:  # the budget the task's own retraining had
        retrain_epochs = int(read_record(args.task).get("config", {}).get("retrain_epochs", 1))
    result = compare(args.task, ratios=args.ratios, depths=args.depths, retrain_epochs=retrain_epochs,
                     weights=args.weights, n_batches=args.batches, throughput_batch=args.batch_size,
                     progress=not args.quiet, out=args.out)  # fmt: skip
    summary = result["summary"]
    table = Table(title=f"SLS (k = {summary['depth']} of {summary['num_blocks']} blocks) against DepGraph, "
                        f"batch {result['settings']['throughput_batch']}")  # fmt: skip
    for column in ("model", "retrained", "test accuracy", "img/s", "speed-up", "parameters", "storage per task"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        table.add_row(row["model"], "yes" if row["retrained"] else "no", f"{100 * row['accuracy']:.1f}%",
                      f"{row['throughput']:.1f}", f"{row['speedup']:.2f}x", f"{row['parameters'] / 1e6:.3f} M",
                      _size(row["storage_bytes"]))  # fmt: skip
    Console().print(table)
    params, speed = summary["equal_parameters"], summary["equal_throughput"]
    print(f"storage per task, DepGraph at equal parameters / SLS: {summary['storage_ratio_depgraph_over_sls']:.1f}x")
    print(f"equal parameters (DepGraph r={params['ratio']:.3f}): accuracy SLS - DepGraph = "
          f"{100 * params['accuracy_sls_minus_depgraph']:+.1f} points ({summary['sls_row']})")
    print(f"equal throughput (DepGraph r={speed['ratio']:.3f}, {speed['depgraph_over_sls_throughput']:.2f}x SLS's "
          f"img/s): accuracy SLS - DepGraph = {100 * speed['accuracy_sls_minus_depgraph']:+.1f} points")
    print(f"results in {result['out']} (compare.json, compare.csv, compare.png)")
    return 0


EXPORT_SUFFIXES = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sls.artifact import load_task
    from sls.export import deployable_model, export_model

    model, record = load_task(args.task, weights=args.weights)
    path = Path(args.out) if args.out else Path(args.task) / "export" / f"model{EXPORT_SUFFIXES[args.format]}"
    export_model(deployable_model(model), path, args.format, model_kwargs=record["backbone"].get("model_kwargs"))
    print(f"{path}: {args.format}, {record['depth']} of {record['backbone']['num_blocks']} blocks, "
          f"{_size(path.stat().st_size)}; input {record['backbone']['img_size']} px normalised with "
          f"mean {tuple(record['backbone']['mean'])}, std {tuple(record['backbone']['std'])}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch

    from sls.artifact import load_task
    from sls.data import make_transform
    from sls.data.files import read_image
    from sls.export import predict

    model, record = load_task(args.task, weights=args.weights)
    backbone = record["backbone"]
    transform = make_transform(backbone["img_size"], tuple(backbone["mean"]), tuple(backbone["std"]),
                               backbone.get("interpolation", "bicubic"))  # fmt: skip
    # Every image is read before anything is printed: a bad one stops the command whole.
    images = [transform(read_image(path)) for path in args.images]
    classes = record.get("classes") or [str(c) for c in range(record["num_classes"])]
    for start in range(0, len(images), args.batch_size):
        labels, probabilities = predict(model, torch.stack(images[start : start + args.batch_size]))
        for path, label, row in zip(args.images[start:], labels.tolist(), probabilities):
            print(f"{path}: {classes[label]} ({row[label].item():.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sls", description="Prune tail blocks of PETL-adapted vision transformers (SLS, ECCV 2024).")
    parser.add_argument("--version", action="version", version=f"sls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole SLS run on the embedded default (DINOv2 ViT-S/14, LoRA, MNIST-5k)")
    demo.add_argument("--out", default=None, help="task folder (default: runs/demo-<time>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="all stages: fine-tune, prune (score blocks, k), retrain, evaluate; "
                                          "resumes a killed run given the same --out")  # fmt: skip
    _add_run_options(run)
    run.set_defaults(handler=_run)
    finetune = commands.add_parser("finetune", help="stage 1: fine-tune PETL + head with all blocks into a task folder")
    _add_run_options(finetune)
    finetune.set_defaults(handler=_finetune)
    prune = commands.add_parser("prune", help="stage 2: score the blocks of a fine-tuned task, choose k, drop the rest")
    prune.add_argument("task", help="task folder")
    prune.add_argument("--alpha", type=float, nargs="+", default=None, metavar="A",
                       help="threshold factor(s); k is reported for each, the first prunes (default: the task's)")
    prune.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                       help="smallest k within POINTS of the full model's validation accuracy (default: the task's)")
    prune.add_argument("--criterion", default=None, help="layer criterion (default: the task's, sls)")
    prune.add_argument("--depth", type=int, default=None, help="keep exactly this many blocks")
    prune.add_argument("--tsne-seeds", type=int, default=None, metavar="N",
                       help="t-SNE starts; k = the most frequent k over them (default: the task's, 1)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(handler=_prune)
    retrain = commands.add_parser("retrain", help="stage 3: retrain the kept blocks' PETL modules and the head")
    retrain.add_argument("task", help="task folder")
    retrain.add_argument("--retrain-epochs", type=int, default=None, help="epochs (default: the task's)")
    retrain.add_argument("--retrain-strategy", default=None, help="ft, clr, tfs or distill (default: the task's)")
    retrain.add_argument("--quiet", action="store_true", help="no progress bars")
    retrain.set_defaults(handler=_retrain)
    evaluate = commands.add_parser("evaluate", help="stage 4: accuracy, throughput, parameters and storage of a task")
    evaluate.add_argument("task", help="task folder")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=_evaluate)
    show = commands.add_parser("show", help="what a task folder holds: stages done, scores, k, and the results "
                                            "measured so far (reads only; nothing is run or written)")  # fmt: skip
    show.add_argument("task", help="task folder")
    show.set_defaults(handler=_show)
    sweep = commands.add_parser("sweep", help="run every task of a YAML sweep file (skipping finished ones) and "
                                              "summarise them per task and per VTAB group")  # fmt: skip
    sweep.add_argument("config", help="sweep file: defaults, methods, tasks (see sls.sweep)")
    sweep.add_argument("--out", default=None, help="sweep folder (default: the file's out, else runs/<file name>)")
    sweep.add_argument("--shard", default=None, metavar="I/N",
                       help="run only tasks I, I+N, I+2N, ... (0-based): one share per machine or GPU")
    sweep.add_argument("--dry-run", action="store_true", help="list the tasks and their state; run nothing")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.set_defaults(handler=_sweep)

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

    compare = commands.add_parser("compare", help="SLS against DepGraph width pruning of the same PETL model: "
                                                  "accuracy, throughput, parameters, storage per task")  # fmt: skip
    compare.add_argument("task", help="a pruned task folder")
    compare.add_argument("--ratios", type=_numbers(float), default=[0.1, 0.2, 0.3, 0.4, 0.5],
                         help="DepGraph ratios measured besides the two matched to SLS (default: 0.1,0.2,0.3,0.4,0.5)")
    compare.add_argument("--depths", type=_numbers(int), default=None,
                         help="SLS depths measured besides the task's k (default: N/4, N/2, 3N/4)")
    compare.add_argument("--retrain", action="store_true",
                         help="retrain the other SLS depths and every DepGraph model for the task's retrain epochs")
    compare.add_argument("--retrain-epochs", type=int, default=None, help="retrain for this many epochs instead")
    compare.add_argument("--batches", type=int, default=4, help="training batches of the Taylor importance (default: %(default)s)")
    compare.add_argument("--batch-size", type=int, default=None, help="throughput batch size (default: the task's)")
    compare.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    compare.add_argument("--out", default=None, help="output folder (default: TASK/compare)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.set_defaults(handler=_compare)

    export = commands.add_parser("export", help="write a task's pruned model as one standalone file "
                                                "(LoRA and RepAdapter merged, dropped blocks gone)")  # fmt: skip
    export.add_argument("task", help="a pruned task folder")
    export.add_argument("--format", required=True, choices=list(EXPORT_SUFFIXES), help="file format")
    export.add_argument("--out", default=None, help="file to write (default: TASK/export/model.<ext>)")
    export.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    export.set_defaults(handler=_export)

    predict = commands.add_parser("predict", help="print the most probable class of each image with a task's model")
    predict.add_argument("task", help="a pruned task folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL mode)")
    predict.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    predict.set_defaults(handler=_predict)
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
