"""One whole SLS run, stage by stage, reading top to bottom.

data -> backbone + PETL -> fine-tune -> block features (one pass) -> scores -> k
-> truncate -> retrain -> measure -> task folder.

The building blocks (:func:`prepare`, :func:`finetune`, :func:`score_blocks`,
:func:`prune_and_retrain`) work in memory; the stages (:func:`stage_finetune` ...
:func:`stage_evaluate`) wrap them around a task folder, and :func:`run` chains the stages.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sls import __version__
from sls.artifact import (
    FINETUNED_FILE,
    RECORD_FILE,
    WEIGHTS_FILE,
    check_fingerprint,
    load_tensors,
    read_record,
    save_task,
    task_tensor_bytes,
)
from sls.backbones import BackboneInfo, create_backbone, truncate
from sls.bench import parameter_count, throughput
from sls.data import ImageDataset, ImageSource, Splits, load_dataset, make_splits, make_transform, stratified_subset
from sls.errors import ConfigError, TaskRecordError
from sls.features import cached_block_features, feature_key_parts
from sls.petl import PETLMethod, create_petl
from sls.report import plot_scores, write_scores_csv
from sls.select import DepthSelector
from sls.train import accuracy, train


@dataclass
class RunConfig:
    """Everything a run depends on; dumped resolved into the task record.

    The defaults are the demo: the embedded DINOv2 ViT-S/14, LoRA r=8 on ``qkv``,
    MNIST-5k at 84 px (6x6 patches), 2000 training and 1000 test images, 2 epochs;
    it fits in about 4 minutes on 2 CPU cores. Blocks are scored on at most
    ``analysis_samples`` training images (a stratified subset, in order): 1000 is
    what the paper's VTAB-1k runs score on, and t-SNE's cost grows with n; None
    scores every training image.
    """

    model: str = "embedded-dinov2-s"
    weights: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    data: str = "mnist5k"
    petl: str = "lora"
    petl_options: dict = field(default_factory=dict)
    img_size: int = 84
    train_samples: int | None = 2000
    test_samples: int | None = 1000
    analysis_samples: int | None = 1000
    epochs: int = 2
    retrain_epochs: int = 1
    retrain: bool = True
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    alpha: float = 0.3
    criterion: str = "sls"
    tsne: str = "sklearn"
    perplexity: float = 30.0
    tsne_seed: int = 0
    depth: int | None = None
    seed: int = 0
    throughput_batch: int = 32
    skip_bad_images: bool = False
    out: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1 or self.retrain_epochs < 1:
            raise ConfigError("--epochs and --retrain-epochs must be >= 1")
        if self.batch_size < 1 or self.throughput_batch < 1:
            raise ConfigError("batch sizes must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels, got {self.img_size}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.data}-{config.model}-{config.petl}-{stamp}"


@dataclass
class Experiment:
    """Everything a run builds from its :class:`RunConfig` before training."""

    config: RunConfig
    data: ImageSource
    splits: Splits
    backbone: BackboneInfo
    petl: PETLMethod
    model: nn.Module
    train_loader: DataLoader
    test_loader: DataLoader
    analysis_loader: DataLoader
    analysed: np.ndarray

    def log(self, message: str) -> None:
        if self.config.progress:
            print(message)


def prepare(config: RunConfig) -> Experiment:
    """Data (deterministic stratified splits, the model's transform), backbone with a
    fresh head, PETL modules inserted (only they and the head train), loaders."""
    config.validate()
    seed_everything(config.seed)
    data = load_dataset(config.data)
    splits = make_splits(data, train_size=config.train_samples, test_size=config.test_samples)
    model, backbone = create_backbone(config.model, num_classes=len(data.classes), weights=config.weights,
                                      img_size=config.img_size, model_kwargs=config.model_kwargs)  # fmt: skip
    petl = create_petl(config.petl, **config.petl_options)
    petl.apply(model)
    if config.depth is not None and not 1 <= config.depth <= backbone.num_blocks:
        raise ConfigError(f"--depth {config.depth} is out of range: the model has blocks 1..{backbone.num_blocks}")
    transform = make_transform(backbone.img_size, backbone.mean, backbone.std, backbone.interpolation)
    skip = config.skip_bad_images
    train_set = ImageDataset(data, splits.train, transform, skip_bad=skip)
    test_set = ImageDataset(data, splits.test, transform, skip_bad=skip)
    shuffled = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=shuffled)
    # The analysis pass sees every analysed training image once, in order, nothing dropped.
    analysed = stratified_subset(train_set.indices, data.labels, config.analysis_samples)
    analysis_loader = DataLoader(ImageDataset(data, analysed, transform), batch_size=64, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False)
    for item, reason in train_set.skipped + test_set.skipped:
        print(f"sls: skipped {data.item_name(item)}: {reason}")
    experiment = Experiment(config, data, splits, backbone, petl, model, train_loader, test_loader,
                            analysis_loader, analysed)  # fmt: skip
    experiment.log(f"{backbone.model}: {backbone.num_blocks} blocks at {backbone.img_size}px; {config.data}: "
                   f"{len(splits.train)} train / {len(splits.test)} test images, {len(data.classes)} classes")
    return experiment


def finetune(exp: Experiment) -> float:
    """Train the PETL modules and head with all N blocks; return the test accuracy."""
    cfg = exp.config
    train(exp.model, exp.train_loader, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
          desc="fine-tune", progress=cfg.progress)  # fmt: skip
    return accuracy(exp.model, exp.test_loader, desc="test full", progress=cfg.progress)


def score_blocks(exp: Experiment, criterion: str | None = None) -> DepthSelector:
    """One pass (cached) for every block's pooled feature, then scores, threshold and k."""
    cfg, bb = exp.config, exp.backbone
    key = feature_key_parts(exp.data, "train", exp.analysed, bb.img_size, bb.mean, bb.std, bb.interpolation)
    analysis, _ = cached_block_features(exp.model, exp.analysis_loader, key_parts=key, progress=cfg.progress)
    return DepthSelector(alpha=cfg.alpha, criterion=criterion or cfg.criterion, tsne=cfg.tsne,
                         perplexity=cfg.perplexity, random_state=cfg.tsne_seed,
                         progress=cfg.progress).fit(*analysis)  # fmt: skip


def prune_and_retrain(exp: Experiment, depth: int) -> tuple[nn.Module, float, float | None]:
    """A copy of the fine-tuned model with blocks depth+1..N really removed, retrained
    (PETL of the kept blocks + head) unless the config says not to.

    Returns:
        the pruned model, its test accuracy before retraining and after (None
        without retraining).
    """
    cfg = exp.config
    pruned = truncate(copy.deepcopy(exp.model), depth)
    acc_pruned = accuracy(pruned, exp.test_loader, desc="test pruned", progress=cfg.progress)
    acc_retrained = None
    if cfg.retrain:
        train(pruned, exp.train_loader, epochs=cfg.retrain_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
              desc="retrain", progress=cfg.progress)  # fmt: skip
        acc_retrained = accuracy(pruned, exp.test_loader, desc="test retrained", progress=cfg.progress)
    return pruned, acc_pruned, acc_retrained


STAGES = ("finetune", "prune", "retrain", "evaluate")
"""The stages of a run. Each reads the task folder the previous one wrote and writes
it back (tensors first, record last, atomically), so a killed run resumes from its
last completed stage and ends as an uninterrupted run would: every stage rebuilds
its data and model from the record and seeds itself the same way."""

_NOT_CONFIG = ("out", "progress")  # may differ between a run and its resumption


def _log(config: RunConfig, message: str) -> None:
    if config.progress:
        print(message)


def _base_record(exp: Experiment, out: Path) -> dict:
    config = exp.config
    return {
        "sls_version": __version__,
        "stages": [],
        "backbone": exp.backbone.to_dict(),
        "petl": {"method": exp.petl.name, "hparams": exp.petl.hparams},
        "num_classes": len(exp.data.classes),
        "classes": exp.data.classes,
        "data": {"name": config.data, "source": exp.data.source, "splits": exp.splits.describe(),
                 "analysed_train_samples": int(len(exp.analysed)),
                 "split_rule": ("the dataset's own splits" if exp.data.splits is not None else
                                "stratified, seed 0: 20% test, 10% val, rest train") + "; then stratified subsets"},
        "depth": exp.backbone.num_blocks,
        "seed": config.seed,
        "results": {"accuracy": {}},
        "config": dataclasses.asdict(config) | {"out": str(out)},
    }  # fmt: skip


def _reopen(task_dir: Path, progress: bool, **overrides) -> tuple[Experiment, dict]:
    """Rebuild a task's experiment from its record, with the fine-tuned tensors loaded."""
    record = read_record(task_dir)
    if "config" not in record or "stages" not in record or "finetune" not in record["stages"]:
        raise TaskRecordError(f"{task_dir} holds no fine-tuned run; start with `sls finetune` or `sls run`")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in record["config"].items() if k in fields})
    config.progress = progress
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    exp = prepare(config)
    check_fingerprint(exp.backbone.fingerprint, record, task_dir, exp.backbone.weights)
    load_tensors(exp.model, task_dir / FINETUNED_FILE)
    exp.model.eval()
    record["config"] = dataclasses.asdict(config) | {"out": str(task_dir)}
    return exp, record


def stage_finetune(config: RunConfig) -> dict:
    """Stage 1: fine-tune the PETL modules and head with all N blocks; save the task folder."""
    out = Path(config.out) if config.out else default_out_dir(config)
    check_writable(out)
    exp = prepare(config)
    record = _base_record(exp, out)
    record["results"]["accuracy"]["full"] = finetune(exp)
    record["stages"] = ["finetune"]
    save_task(out, exp.model, record, finetuned=exp.model)
    return record


def stage_prune(task_dir: str | Path, *, alpha: float | None = None, criterion: str | None = None,
                depth: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Stage 2: score every block of the fine-tuned model (one cached pass), choose k
    (or take ``depth``), drop blocks k+1..N and measure the accuracy before retraining."""
    task_dir = Path(task_dir)
    exp, record = _reopen(task_dir, progress, alpha=alpha, criterion=criterion, depth=depth)
    config = exp.config
    selector = score_blocks(exp)
    k = config.depth if config.depth is not None else selector.depth_
    pruned = truncate(copy.deepcopy(exp.model), k)
    record.update({
        "criterion": config.criterion,
        "tsne": {"backend": config.tsne, "perplexity": config.perplexity, "random_state": config.tsne_seed},
        "alpha": config.alpha,
        "scores": [float(v) for v in selector.scores_],
        "threshold": float(selector.threshold_),
        "selected_depth": int(selector.depth_),
        "selection_reason": selector.reason_,
        "depth": int(k),
        "stages": ["finetune", "prune"],
    })  # fmt: skip
    accuracies = record["results"]["accuracy"]
    record["results"] = {"accuracy": {"full": accuracies["full"]}}
    record["results"]["accuracy"]["pruned_no_retrain"] = accuracy(pruned, exp.test_loader, desc="test pruned",
                                                                  progress=progress)  # fmt: skip
    save_task(task_dir, pruned, record)
    write_scores_csv(task_dir / "scores.csv", selector.scores_, selector.threshold_, k)
    plot_scores(task_dir / "scores.png", selector.scores_, selector.threshold_, k,
                title=f"SLS scores: {exp.backbone.model} + {exp.petl.name} on {config.data}")  # fmt: skip
    return record


def _reopen_pruned(task_dir: Path, progress: bool, **overrides) -> tuple[Experiment, dict, nn.Module]:
    exp, record = _reopen(task_dir, progress, **overrides)
    if "prune" not in record["stages"]:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    pruned = load_tensors(truncate(copy.deepcopy(exp.model), int(record["depth"])), task_dir / WEIGHTS_FILE)
    return exp, record, pruned


def stage_retrain(task_dir: str | Path, *, epochs: int | None = None, progress: bool = True) -> dict:
    """Stage 3: retrain the kept blocks' PETL modules and the head."""
    task_dir = Path(task_dir)
    exp, record, pruned = _reopen_pruned(task_dir, progress, retrain_epochs=epochs)
    cfg = exp.config
    train(pruned, exp.train_loader, epochs=cfg.retrain_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
          desc="retrain", progress=progress)  # fmt: skip
    record["stages"] = ["finetune", "prune", "retrain"]
    record["results"].pop("throughput", None)
    save_task(task_dir, pruned, record)
    return record


def stage_evaluate(task_dir: str | Path, *, progress: bool = True) -> dict:
    """Stage 4: test accuracy of the task, throughput of the full and pruned models
    (same run, same batch), parameters and per-task storage."""
    task_dir = Path(task_dir)
    exp, record, pruned = _reopen_pruned(task_dir, progress)
    cfg = exp.config
    retrained = "retrain" in record["stages"]
    key = "pruned_retrained" if retrained else "pruned_no_retrain"
    results = record["results"]
    results["accuracy"][key] = accuracy(pruned, exp.test_loader, desc="test task", progress=progress)
    results["accuracy"].setdefault("pruned_retrained", None)
    speed = throughput({"full": exp.model, "pruned": pruned}, batch_size=cfg.throughput_batch,
                       img_size=exp.backbone.img_size)  # fmt: skip
    results["throughput"] = {"full": speed["full"], "pruned": speed["pruned"], "batch_size": cfg.throughput_batch,
                             "unit": "images/s", "threads": torch.get_num_threads()}  # fmt: skip
    results["parameters"] = {"full": parameter_count(exp.model), "pruned": parameter_count(pruned),
                             "task_tensors": sum(p.numel() for p in pruned.parameters() if p.requires_grad)}  # fmt: skip
    results["storage_bytes"] = {"task": task_tensor_bytes(pruned)}
    record["stages"] = [*[s for s in record["stages"] if s != "evaluate"], "evaluate"]
    save_task(task_dir, pruned, record)
    return record


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output folder {out}: {existing} is not a writable folder")


def run(config: RunConfig) -> dict:
    """All stages in order: fine-tune, prune (score blocks, choose k), retrain, evaluate.

    If ``config.out`` already holds a run with the same configuration, the stages it
    completed are skipped (resume). Another configuration there is refused.

    Returns:
        the task record (also written to ``<out>/record.json``).
    """
    started = time.perf_counter()
    config.validate()
    out = Path(config.out) if config.out else default_out_dir(config)
    config = dataclasses.replace(config, out=str(out))
    done: list[str] = []
    if (out / RECORD_FILE).is_file():
        previous = read_record(out)
        mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_CONFIG}
        theirs = {k: v for k, v in previous.get("config", {}).items() if k not in _NOT_CONFIG}
        if mine != theirs:
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ConfigError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                              "choose another --out or run the stage commands on it")  # fmt: skip
        done = list(previous.get("stages", []))
        if done:
            _log(config, f"resuming {out}: stages {', '.join(done)} already done")
    if "finetune" not in done:
        stage_finetune(config)
    if "prune" not in done:
        stage_prune(out, progress=config.progress)
    if config.retrain and "retrain" not in done:
        stage_retrain(out, progress=config.progress)
    if "evaluate" not in done:
        record = stage_evaluate(out, progress=config.progress)
    else:
        record = read_record(out)
    record["results"]["seconds"] = round(time.perf_counter() - started, 1)
    return record
