"""The ``sls`` command: parse, call the library, print.

User errors (:class:`sls.SLSError`) print one line and exit with status 2. The run
options come from :class:`sls.config.RunConfig` (:mod:`sls._cli_options`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np

from sls import __version__
from sls._cli_options import add_config_options, count_or, settings_from
from sls.config import RUNTIME_KEYS
from sls.errors import ConfigError, SLSError

ALL = "all"


def _run_fields() -> list[str]:
    from sls.config import config_fields

    return list(config_fields())


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of these settings (the keys of a sweep's defaults); options given here win")
    add_config_options(parser, _run_fields())


def _config_from(args: argparse.Namespace):
    """RunConfig from the options given, over ``--config``'s, over the ``--recipe``'s, over the defaults."""
    from sls.config import RunConfig
    from sls.recipes import apply_recipe

    settings = settings_from(args, _run_fields())
    if settings.get("recipe"):
        settings = apply_recipe(settings["recipe"], settings)
    return RunConfig(**settings)


def _stage_parser(commands, name: str, help: str, keys: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help)
    parser.add_argument("task", help="task folder")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"YAML file of settings; sls {name} takes {', '.join(keys)} and where it runs")
    add_config_options(parser, keys, default_note="the task's")
    add_config_options(parser, (*RUNTIME_KEYS, "progress"))
    return parser


def _stage_settings(args: argparse.Namespace, stage: str) -> dict:
    from sls.stages import STAGE_SETTINGS

    return settings_from(args, (*STAGE_SETTINGS[stage], *RUNTIME_KEYS, "progress"))


@contextlib.contextmanager
def _processes(device: str | None):
    """The torchrun session of a command that runs a model data-parallel (rank 0 prints)."""
    from sls import distributed

    with distributed.session(device or "auto"):
        yield distributed.is_main()


def _one_process(command: str) -> None:
    from sls import distributed

    if distributed.launched():
        raise ConfigError(f"sls {command} runs in one process; start it without torchrun")


def _runtime(args: argparse.Namespace):
    from sls.runtime import Runtime

    return Runtime.from_options(args.device or "auto", bool(args.amp), bool(args.channels_last), bool(args.compile))


def _execute(config) -> int:
    import dataclasses

    from sls import distributed
    from sls.report import print_summary, run_notes, selection_notes
    from sls.stages import run

    # Under torchrun (WORLD_SIZE > 1) every process runs this; only rank 0 prints.
    with _processes(config.device) as main:
        record = run(dataclasses.replace(config, progress=config.progress and distributed.is_main()))
        if not main:
            return 0
    summary = record.to_dict()
    print_summary(summary)
    for line in [*selection_notes(summary), *run_notes(summary)]:
        print(line)
    plots = ("scores.png, " if record.scores is not None else "") + "training.png"
    plots += ", budget.png" if record.budget_search else ""
    plots += ", predictions.png" if record.results.get("metric") else ""
    tensors = record.files["task"]["file"] if "task" in record.files else "task.safetensors"
    scores = "scores.csv, " if record.scores is not None else ""
    print(f"task folder: {record.config.out}  (record.json, config.yaml, {tensors}, {scores}{plots})")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _execute(_config_from(args))


def _finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from sls import distributed
    from sls.report import run_notes
    from sls.stages import stage_finetune

    config = _config_from(args)
    with _processes(config.device) as main:
        record = stage_finetune(dataclasses.replace(config, progress=config.progress and distributed.is_main()))
        if not main:
            return 0
    for line in run_notes(record.to_dict()):
        print(line)
    print(f"fine-tuned: test {record.results.get('metric', 'accuracy')} {100 * record.results['accuracy']['full']:.1f}% with all "
          f"{record.num_blocks} blocks; next: sls prune {record.config.out}")
    return 0


def _stage(args: argparse.Namespace, stage: str):
    """Run ``stage`` on the task folder under torchrun's processes; the record on rank 0, else None."""
    from sls import distributed, stages

    settings = _stage_settings(args, stage)
    progress = settings.pop("progress", True)
    with _processes(settings.get("device")) as main:
        record = getattr(stages, f"stage_{stage}")(args.task, progress=progress and distributed.is_main(), **settings)
        return record if main else None


def _prune(args: argparse.Namespace) -> int:
    from sls.report import depth_distribution, scores_line, selection_notes

    record = _stage(args, "prune")
    if record is None:
        return 0
    if len(record.depths_per_seed or []) > 1:
        print(f"k over {len(record.depths_per_seed)} t-SNE starts: {depth_distribution(record.depths_per_seed)}")
    if len(record.depth_per_alpha or []) > 1:
        print("k per alpha: " + ", ".join(f"alpha={row['alpha']:g}: k={row['depth']}" for row in record.depth_per_alpha))
    search = record.budget_search
    if search:
        tried = ", ".join(f"k={row['depth']} {100 * row['val_accuracy']:.1f}%" for row in search["tried"])
        print(f"--max-drop {search['max_drop_points']:g}: full model {100 * search['full']['val_accuracy']:.1f}% on "
              f"{search['val_images']} validation images; tried {tried}; k = {search['chosen_depth']} "
              f"(SLS's k = {search['start_depth']}); plot: {args.task}/budget.png")  # fmt: skip
    summary = record.to_dict()
    scored = f"{scores_line(summary)}; " if record.scores is not None else f"k = {record.depth} given (no block scored); "
    print(f"{scored}test {summary['results'].get('metric', 'accuracy')} before retraining "
          f"{100 * record.results['accuracy']['pruned_no_retrain']:.1f}%; next: sls retrain {args.task}")
    for line in selection_notes(summary):
        print(line)
    return 0


def _retrain(args: argparse.Namespace) -> int:
    if _stage(args, "retrain") is not None:
        print(f"retrained; next: sls evaluate {args.task}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sls.report import print_summary

    record = _stage(args, "evaluate")
    if record is not None:
        print_summary(record.to_dict())
    return 0


def _show(args: argparse.Namespace) -> int:
    from sls.record import read_record
    from sls.report import print_summary, run_notes, scores_line, selection_notes
    from sls.stages import STAGES

    record = read_record(args.task)
    summary = record.to_dict()
    if "evaluate" in record.stages:
        print_summary(summary)
    else:
        accuracies = ", ".join(f"{name.replace('_', ' ')} {100 * value:.1f}%"
                               for name, value in record.results.get("accuracy", {}).items() if value is not None)  # fmt: skip
        print(f"{args.task}: {record.backbone['model']} + {record.petl['method']} on {record.config.data}; "
              f"stages done: {', '.join(record.stages) or 'none'}; test {record.results.get('metric', 'accuracy')}: "
              f"{accuracies or 'not measured'}")  # fmt: skip
        if record.stages and record.stages[-1] in STAGES[:-1]:
            print(f"next: sls {STAGES[STAGES.index(record.stages[-1]) + 1]} {args.task}")
    if record.scores is not None:
        print(scores_line(summary))
    for line in [*selection_notes(summary), *run_notes(summary)]:
        print(line)
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
    busy = f", {len(report.busy)} being written elsewhere" if report.busy else ""
    print(f"{len(report.ran)} run, {len(report.skipped)} already done, {len(report.failed)} failed{busy}; "
          f"summary: {', '.join(str(path) for path in report.files)}")
    if report.failed:
        print(f"sls: error: {len(report.failed)} task(s) failed: {', '.join(report.failed)}", file=sys.stderr)
        return 2
    return 0



def _demo(args: argparse.Namespace) -> int:
    from sls.config import RunConfig
    from sls.recipes import apply_recipe, demo_recipe

    given = {key: getattr(args, key) for key in RUNTIME_KEYS if getattr(args, key) is not None}
    settings = apply_recipe(demo_recipe(args.task), {"out": args.out, "progress": not args.quiet, **given})
    return _execute(RunConfig(**settings))


def _analyze(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sls.analyze import AnalyzeConfig, analyze
    from sls.report import depth_distribution

    _one_process("analyze")
    config = AnalyzeConfig(
        model=args.model, weights=args.weights, task=args.task, data=args.data, img_size=args.img_size,
        samples=None if args.samples == ALL else args.samples,
        criteria=[c.strip() for c in args.criterion.split(",") if c.strip()],
        alpha=args.alpha, tsne=args.tsne, perplexity=args.perplexity, pca_dims=args.pca, seeds=args.seeds,
        seed=args.seed, use_cache=not args.no_cache, out=args.out, progress=args.progress is None,
    )  # fmt: skip
    summary = analyze(config, runtime=_runtime(args))
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

    if args.task != "classification":
        return _data_check_dense(args)
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

    from sls.compare import compare
    from sls.record import read_record

    _one_process("compare")
    retrain_epochs = args.retrain_epochs
    if args.retrain and retrain_epochs is None:  # the budget the task's own retraining had
        record = read_record(args.task)
        retrain_epochs = int(record.retrain_epochs or record.setting("retrain_epochs") or 1)
    result = compare(args.task, ratios=args.ratios, depths=args.depths, retrain_epochs=retrain_epochs,
                     weights=args.weights, n_batches=args.batches, heads=args.depgraph_heads,
                     depgraph_train=args.depgraph_train, depgraph_lr=args.depgraph_lr,
                     throughput_batch=args.batch_size,
                     progress=args.progress is None, out=args.out, runtime=_runtime(args))  # fmt: skip
    summary = result["summary"]
    table = Table(title=f"SLS (k = {summary['depth']} of {summary['num_blocks']} blocks) against DepGraph, "
                        f"batch {result['settings']['throughput_batch']}")  # fmt: skip
    for column in ("model", "retrained", f"test {result['settings'].get('metric', 'accuracy')}", "img/s", "speed-up", "batch 1", "p50 ms", "GFLOPs",
                   "parameters", "storage: whole", "storage: indices"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        table.add_row(row["model"], "yes" if row["retrained"] else "no", f"{100 * row['accuracy']:.1f}%",
                      f"{row['throughput']:.1f}", f"{row['speedup']:.2f}x", f"{row['speedup_batch1']:.2f}x",
                      f"{row['latency_p50_ms']:.1f}", f"{row['gflops']:.2f}", f"{row['parameters'] / 1e6:.3f} M",
                      _size(row["storage_bytes"]), _size(row["storage_bytes_indices"]))  # fmt: skip
    console = Console()
    # Eleven columns: written to a file or a pipe (80 columns by default), keep them readable.
    (console if console.is_terminal else Console(width=170)).print(table)
    params, speed = summary["equal_parameters"], summary["equal_throughput"]
    print(f"storage per task, DepGraph at equal parameters / SLS: {summary['storage_ratio_depgraph_over_sls']:.1f}x "
          f"storing its pruned backbone (as its users do); "
          f"{summary['storage_ratio_depgraph_indices_over_sls']:.2f}x storing only kept-channel indices + PETL + head "
          "over a frozen shared backbone")  # fmt: skip
    print(f"equal parameters (DepGraph r={params['ratio']:.3f}): accuracy SLS - DepGraph = "
          f"{100 * params['accuracy_sls_minus_depgraph']:+.1f} points ({summary['sls_row']}; "
          f"{100 * params['accuracy_sls_minus_depgraph_magnitude']:+.1f} against magnitude ranking); "
          f"SLS {params['sls_over_depgraph_throughput']:.2f}x its img/s, DepGraph "
          f"{params['depgraph_over_sls_flops']:.2f}x SLS's FLOPs")  # fmt: skip
    print(f"equal throughput (DepGraph r={speed['ratio']:.3f}, {speed['depgraph_over_sls_throughput']:.2f}x SLS's "
          f"img/s): accuracy SLS - DepGraph = {100 * speed['accuracy_sls_minus_depgraph']:+.1f} points "
          f"({100 * speed['accuracy_sls_minus_depgraph_magnitude']:+.1f} against magnitude ranking)")
    print(f"results in {result['out']} (compare.json, compare.csv, compare.png)")
    return 0


EXPORT_SUFFIXES = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
EXPORT_FORMATS = [*EXPORT_SUFFIXES, "peft"]  # peft's is a folder


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sls.experiment import load_task
    from sls.export import (
        PEFT_CONFIG,
        PEFT_README,
        PEFT_WEIGHTS,
        check_peft_exportable,
        deployable_model,
        export_model,
        export_peft,
    )
    from sls.record import read_record
    from sls.runtime import Runtime

    _one_process("export")
    if args.format == "peft":  # refused before any model is built
        check_peft_exportable([read_record(args.task).petl["method"]])
    # Traced on the CPU unless told otherwise: the file should not depend on the exporting machine.
    model, record = load_task(args.task, weights=args.weights, runtime=Runtime.from_options(args.device or "cpu"))
    backbone = record.backbone
    if args.format == "peft":
        path = Path(args.out) if args.out else Path(args.task) / "export" / "peft"
        # The folder's README names the backbone's weights: --weights when given, not the record's.
        weights = {} if not args.weights else {"weights": args.weights if args.weights == "random"
                                               else str(Path(args.weights).resolve())}  # fmt: skip
        export_peft(model, path, backbone={**backbone, **weights})
        print(f"{path}: peft LoRA adapter ({PEFT_WEIGHTS} {_size((path / PEFT_WEIGHTS).stat().st_size)}, "
              f"{PEFT_CONFIG}) for {backbone['timm_name']} cut to {record.depth} of {record.num_blocks} blocks; "
              f"{PEFT_README} there shows PeftModel.from_pretrained on the timm model")  # fmt: skip
        return 0
    path = Path(args.out) if args.out else Path(args.task) / "export" / f"model{EXPORT_SUFFIXES[args.format]}"
    export_model(deployable_model(model), path, args.format, model_kwargs=backbone.get("model_kwargs"))
    print(f"{path}: {args.format}, {record.depth} of {record.num_blocks} blocks, "
          f"{_size(path.stat().st_size)}; input {backbone['img_size']} px normalised with "
          f"mean {tuple(backbone['mean'])}, std {tuple(backbone['std'])}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch

    from sls.data import make_transform
    from sls.data.files import read_image
    from sls.experiment import load_task
    from sls.export import predict
    from sls.tasks import get_task

    _one_process("predict")
    runtime = _runtime(args)
    model, record = load_task(args.task, weights=args.weights, runtime=runtime)
    backbone = record.backbone
    transform = make_transform(backbone["img_size"], tuple(backbone["mean"]), tuple(backbone["std"]),
                               backbone.get("interpolation", "bicubic"))  # fmt: skip
    classes = record.classes or [str(c) for c in range(record.num_classes)]
    task = get_task(record.config.task, **record.config.task_options)
    if task.dense:
        return _predict_dense(args, task, model, record, transform, classes)
    if args.out is not None:
        raise ConfigError("--out is for the dense tasks' masks and boxes; a classifier's predictions are printed")
    # Every image is read before anything is printed: a bad one stops the command whole.
    images = [transform(read_image(path)) for path in args.images]
    for start in range(0, len(images), args.batch_size):
        labels, probabilities = predict(model, torch.stack(images[start : start + args.batch_size]), runtime=runtime)
        for path, label, row in zip(args.images[start:], labels.tolist(), probabilities):
            print(f"{path}: {classes[label]} ({row[label].item():.3f})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from sls.runtime import Runtime
    from sls.serve.app import TOKEN_ENV, ServeSettings, serve
    from sls.serve.pool import TaskPool

    _one_process("serve")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
                             max_images=args.max_images, max_pixels=args.max_pixels,
                             token=args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None)  # fmt: skip
    runtime = Runtime.from_options(args.device or "auto", bool(args.amp), bool(args.channels_last))
    serve(args.tasks, host=args.host, port=args.port, settings=settings, pool=TaskPool(runtime, mux=not args.per_task_batches),
          log_level=args.log_level)  # fmt: skip
    return 0


def _data_check_dense(args: argparse.Namespace) -> int:
    from sls.data.layouts import check_dense
    from sls.tasks import get_task

    task = get_task(args.task)
    report = check_dense(task.load_data(args.dataset), task.name, limit=args.limit, progress=not args.quiet)
    print(report.format())
    if not report.ok:
        print(f"sls: error: {len(report.problems)} problem(s) in {args.dataset}; the first: {report.problems[0]}",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _predict_dense(args, task, model, record, transform, classes) -> int:
    from sls.data.files import read_image
    from sls.tasks.render import predict_dense

    out = Path(args.out) if args.out else Path(args.task) / "predictions"
    images = [read_image(path) for path in args.images]  # a bad image stops the command before any file
    stems = [Path(path).stem for path in args.images]
    if len(set(stems)) != len(stems):
        raise ConfigError("two images share a file name; their outputs would overwrite each other")
    out.mkdir(parents=True, exist_ok=True)
    for image, stem in zip(images, stems):
        summary = predict_dense(task, model, image, transform, int(record.backbone["img_size"]), classes, out, stem,
                                threshold=args.threshold)  # fmt: skip
        print(f"{out / summary}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    import time

    from sls import features

    folder = features.features_dir()
    if args.action == "clear":
        count, size = features.clear(folder)
        print(f"removed {count} cached feature file(s), {size / 2**20:.1f} MB, from {folder}")
        return 0
    found = features.entries(folder)
    for entry in reversed(found):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"{entry.path.name}  {entry.bytes / 2**20:8.1f} MB  last used {used}")
    total = sum(e.bytes for e in found)
    print(f"{len(found)} entries, {total / 2**20:.1f} MB of {features.max_bytes() / 2**20:.0f} MB "
          f"(SLS_CACHE_MAX_MB) in {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sls", description="Prune tail blocks of PETL-adapted vision transformers (SLS, ECCV 2024).")
    parser.add_argument("--version", action="version", version=f"sls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole SLS run on the embedded default (DINOv2 ViT-S/14, LoRA, MNIST-5k)")
    demo.add_argument("--out", default=None, help="task folder (default: runs/demo-<time>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification",
                      help="classification on MNIST-5k, or a dense task on the composed mnist-scenes "
                           "(default: %(default)s)")  # fmt: skip
    add_config_options(demo, RUNTIME_KEYS)
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="all stages: fine-tune, prune (score blocks, k), retrain, evaluate; "
                                          "resumes a killed run given the same --out")  # fmt: skip
    _add_run_options(run)
    run.set_defaults(handler=_run)
    finetune = commands.add_parser("finetune", help="stage 1: fine-tune PETL + head with all blocks into a task folder")
    _add_run_options(finetune)
    finetune.set_defaults(handler=_finetune)
    from sls.stages import STAGE_SETTINGS

    _stage_parser(commands, "prune", "stage 2: score the blocks of a fine-tuned task, choose k, drop the rest",
                  STAGE_SETTINGS["prune"]).set_defaults(handler=_prune)
    _stage_parser(commands, "retrain", "stage 3: retrain the kept blocks' PETL modules and the head",
                  STAGE_SETTINGS["retrain"]).set_defaults(handler=_retrain)
    _stage_parser(commands, "evaluate", "stage 4: accuracy, throughput, parameters and storage of a task",
                  STAGE_SETTINGS["evaluate"]).set_defaults(handler=_evaluate)
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

    cache = commands.add_parser("cache", help="the feature cache: list its entries or clear it "
                                              "(folder: $SLS_CACHE, else $XDG_CACHE_HOME/sls, else ~/.cache/sls)")  # fmt: skip
    cache.add_argument("action", choices=("list", "clear"), help="list: entries, sizes, last use; clear: remove all")
    cache.set_defaults(handler=_cache)

    from sls.criteria import list_criteria

    analyze = commands.add_parser("analyze", help="score every block of a plain or PETL-tuned model; no training")
    analyze.add_argument("--model", default="embedded-dinov2-s", help="embedded or timm model name (default: %(default)s)")
    analyze.add_argument("--weights", default=None, help="local weights file for the backbone")
    analyze.add_argument("--task", default=None, help="a task folder: analyse its fine-tuned PETL model (all blocks)")
    analyze.add_argument("--data", default="mnist5k", help="mnist5k, fashion-mnist or digits (default: %(default)s)")
    analyze.add_argument("--img-size", type=int, default=84, help="input side without --task (default: %(default)s)")
    analyze.add_argument("--samples", type=count_or(ALL), default=1000,
                         help="training images scored, or 'all' (default: %(default)s)")
    analyze.add_argument("--criterion", default="sls",
                         help=f"comma-separated criteria among {', '.join(list_criteria())} (default: %(default)s)")
    analyze.add_argument("--alpha", type=float, default=0.3, help="threshold factor (default: %(default)s)")
    analyze.add_argument("--tsne", default="sklearn", choices=["sklearn", "opentsne", "opentsne-fft", "torchdr"],
                         help="t-SNE backend (default: %(default)s)")
    analyze.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: %(default)s)")
    analyze.add_argument("--pca", type=int, default=None, metavar="DIMS", help="PCA to DIMS dimensions before t-SNE")
    analyze.add_argument("--seeds", type=int, default=1, help="seeds per stochastic criterion; k = the rule on the mean scores")
    analyze.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    analyze.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    analyze.add_argument("--out", default=None, help="output folder (default: runs/analyze-<data>-<model>-<time>)")
    add_config_options(analyze, (*RUNTIME_KEYS, "progress"))
    analyze.set_defaults(handler=_analyze)

    data = commands.add_parser("data", help="inspect a dataset without a model")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a dataset and print counts per class and split")
    check.add_argument("dataset", help="an embedded name, a VTAB-1k folder, an image-folder tree or a CSV file; "
                                       "for --task segmentation or detection mnist-scenes, or an ADE20K, VOC2012, "
                                       "COCO or images/ + masks/ folder")  # fmt: skip
    check.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification",
                       help="the labels to check; the dense tasks list classes, objects and pixels per class and "
                            "every bad file, exit 2 when there is one (default: %(default)s)")  # fmt: skip
    check.add_argument("--limit", type=int, default=None, help="dense tasks: check only the first N images")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
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
    compare.add_argument("--depgraph-heads", choices=("dims", "whole"), default="dims",
                         help="DepGraph narrows every head (dims) or removes whole heads, each kept one keeping its "
                              "size (default: %(default)s)")
    compare.add_argument("--depgraph-train", choices=("petl", "all"), default="petl",
                         help="with --retrain, DepGraph retrains its PETL modules and head on the frozen pruned "
                              "backbone (petl, as SLS) or every weight (all, Torch-Pruning's usual recovery; "
                              "its storage is then its whole model) (default: %(default)s)")
    compare.add_argument("--depgraph-lr", type=float, default=None,
                         help="peak learning rate of DepGraph's retraining (default: the task's; training every "
                              "weight wants a far lower one)")
    compare.add_argument("--batch-size", type=int, default=None, help="throughput batch size (default: the task's)")
    compare.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    compare.add_argument("--out", default=None, help="output folder (default: TASK/compare)")
    add_config_options(compare, (*RUNTIME_KEYS, "progress"))
    compare.set_defaults(handler=_compare)

    export = commands.add_parser("export", help="write a task's pruned model as one standalone file "
                                                "(LoRA and RepAdapter merged, dropped blocks gone)")  # fmt: skip
    export.add_argument("task", help="a pruned task folder")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="file format; peft: a LoRA task as a peft adapter folder, unmerged")
    export.add_argument("--out", default=None,
                        help="file to write, folder for peft (default: TASK/export/model.<ext>, TASK/export/peft)")
    export.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    add_config_options(export, ("device",), default_note="cpu")
    export.set_defaults(handler=_export)

    predict = commands.add_parser("predict", help="print the most probable class of each image with a task's model "
                                                  "(dense tasks: write masks or boxes and overlays)")
    predict.add_argument("task", help="a pruned task folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL mode)")
    predict.add_argument("--weights", default=None, help="the backbone's weights file (default: the record's)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    predict.add_argument("--out", default=None, help="dense tasks: folder of the masks (PNG) or boxes (JSON) and "
                                                     "their overlays (default: TASK/predictions)")  # fmt: skip
    predict.add_argument("--threshold", type=float, default=0.3, help="detection: the lowest score of a box written "
                                                                      "(default: %(default)s)")  # fmt: skip
    add_config_options(predict, RUNTIME_KEYS)
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser("serve", help="serve many pruned tasks over HTTP, each distinct backbone loaded once "
                                              "(OpenAPI docs at /docs)")  # fmt: skip
    serve.add_argument("tasks", nargs="+", metavar="TASK_DIR",
                       help="task folders, or folders of task folders (a reload rescans them)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; any other needs a token)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--token", default=None, help="a token every call must send as 'Authorization: Bearer "
                                                     "<token>' (default: $SLS_SERVE_TOKEN, else none)")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=16, help="the most images of one forward pass "
                                                                 "(default: %(default)s)")  # fmt: skip
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch's first request waits for "
                                                                      "others of its task (default: %(default)s)")  # fmt: skip
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="the largest request body (default: %(default)s)")
    serve.add_argument("--max-images", type=int, default=64, help="the most images of one request "
                                                                  "(default: %(default)s)")  # fmt: skip
    serve.add_argument("--max-pixels", type=int, default=40_000_000,
                       help="the most pixels of one image, refused before decoding (default: %(default)s)")
    serve.add_argument("--per-task-batches", action="store_true",
                       help="run each forward pass on one task's images only (default: the tasks of one backbone "
                            "and PETL structure share passes)")  # fmt: skip
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level (default: %(default)s)")
    add_config_options(serve, ("device", "amp", "channels_last"))
    serve.set_defaults(handler=_serve)
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
