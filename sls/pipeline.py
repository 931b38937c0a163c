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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader

from sls import __version__, distributed
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
from sls.errors import ConfigError, ScoreError, TaskRecordError
from sls.features import cached_block_features, feature_key_parts
from sls.petl import PETLMethod, create_petl
from sls.report import plot_budget, plot_scores, write_scores_csv
from sls.retrain import create_strategy, search_depth, within_budget
from sls.runtime import Runtime, resolve_device, set_runtime
from sls.select import DepthSelector
from sls.train import Schedule, accuracy, train

NORMALIZATIONS = ("model", "imagenet")
"""Input statistics: the model's pretrained config, or ImageNet's (the paper's VTAB code)."""


@dataclass
class RunConfig:
    """Everything a run depends on; dumped resolved into the task record.

    The defaults are the demo: the embedded DINOv2 ViT-S/14, LoRA r=8 on ``qkv``,
    MNIST-5k at 84 px (6x6 patches), 2000 training and 1000 test images, 2 epochs,
    2 retraining epochs (1 leaves the pruned model 1.1 points short of the full one);
    it fits in about 3 minutes on 2 CPU cores. Blocks are scored on at most
    ``analysis_samples`` training images (a stratified subset, in order): 1000 is
    what the paper's VTAB-1k runs score on, and t-SNE's cost grows with n; None
    scores every training image.

    Retraining runs ``retrain_strategy`` (see :mod:`sls.retrain`: ft, clr, tfs,
    distill, with ``retrain_options``) for ``retrain_epochs``, the same budget for every
    strategy. ``alpha`` chooses k; k is also reported for each of ``alphas`` from the
    same scores. ``max_drop`` (percentage points) replaces SLS's k by the smallest k
    whose retrained accuracy on at most ``val_samples`` validation images stays within
    that many points of the full model's (:func:`budget_search`); the test split is
    never used to choose.

    ``device`` (auto: CUDA when available), ``amp`` (autocast to bfloat16, or float16
    on GPUs without it) and ``channels_last`` set where and how the models run
    (:mod:`sls.runtime`); block features are computed in float32 either way. Under
    ``torchrun`` the run is data-parallel (:mod:`sls.distributed`); ``batch_size``
    stays the global batch.
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
    retrain_epochs: int = 2
    retrain: bool = True
    retrain_strategy: str = "clr"
    retrain_options: dict = field(default_factory=dict)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None
    min_lr: float | None = None
    drop_path: float = 0.0
    normalize: str = "model"
    batch_size: int = 32
    alpha: float = 0.3
    alphas: list[float] = field(default_factory=list)
    max_drop: float | None = None
    val_samples: int | None = 1000
    criterion: str = "sls"
    tsne: str = "sklearn"
    perplexity: float = 30.0
    tsne_seed: int = 0
    tsne_seeds: int = 1
    depth: int | None = None
    seed: int = 0
    throughput_batch: int = 32
    skip_bad_images: bool = False
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    recipe: str | None = None
    out: str | None = None
    progress: bool = True

    @property
    def schedule(self) -> Schedule:
        """The optimiser settings, the same for fine-tuning and retraining."""
        return Schedule(self.lr, self.weight_decay, self.warmup_epochs, self.min_lr)

    def validate(self) -> None:
        if self.epochs < 1 or self.retrain_epochs < 1:
            raise ConfigError("--epochs and --retrain-epochs must be >= 1")
        if self.tsne_seeds < 1:
            raise ConfigError(f"--tsne-seeds must be >= 1, got {self.tsne_seeds}")
        if self.batch_size < 1 or self.throughput_batch < 1:
            raise ConfigError("batch sizes must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be from 0 to --lr ({self.lr:g}), got {self.min_lr:g}")
        if self.warmup_epochs is not None:
            shortest = min(self.epochs, self.retrain_epochs) if self.retrain else self.epochs
            if not 0 <= self.warmup_epochs < shortest:
                raise ConfigError(f"--warmup-epochs must be from 0 to fewer than the {shortest} epochs of the "
                                  f"shortest training, got {self.warmup_epochs:g}")  # fmt: skip
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels, got {self.img_size}")
        for alpha in [self.alpha, *self.alphas]:
            if not math.isfinite(alpha) or alpha < 0:
                raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
        create_strategy(self.retrain_strategy, **self.retrain_options)
        create_petl(self.petl, **self.petl_options)
        if self.max_drop is not None:
            if not math.isfinite(self.max_drop) or self.max_drop < 0:
                raise ConfigError(f"--max-drop must be a number of points >= 0, got {self.max_drop}")
            if self.depth is not None:
                raise ConfigError("--max-drop chooses the depth itself; leave out --depth")


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
    val_loader: DataLoader | None = None
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trainable tensors as initialised, before any training (the ``tfs`` strategy resets to them)."""

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
                                      img_size=config.img_size, drop_path_rate=config.drop_path,
                                      model_kwargs=config.model_kwargs)  # fmt: skip
    if config.normalize == "imagenet":
        backbone = dataclasses.replace(backbone, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    petl = create_petl(config.petl, **config.petl_options)
    petl.apply(model)
    runtime = Runtime(amp=config.amp, channels_last=config.channels_last)
    set_runtime(runtime)  # train, accuracy and throughput follow it, like the seed above
    runtime.place(model, resolve_device(config.device))
    initial_state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if config.max_drop is not None and len(splits.val) == 0:
        raise ConfigError(f"--max-drop chooses k on a validation split, and {config.data} has none; give it one "
                          "(VTAB-1k val200.txt, a val/ folder, 'val' rows in a CSV split column) or leave out --max-drop")  # fmt: skip
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
    if config.criterion == "sls" and config.depth is None and len(analysed) <= 3 * config.perplexity:
        # Found now, not after the fine-tuning: t-SNE could not score the blocks.
        raise ScoreError(
            f"t-SNE with perplexity {config.perplexity:g} needs more than {3 * config.perplexity:g} samples, "
            f"got {len(analysed)} training images; use more images or a smaller perplexity"
        )
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False)
    skipped = train_set.skipped + test_set.skipped
    val_loader = None
    if len(splits.val):
        val_set = ImageDataset(data, stratified_subset(splits.val, data.labels, config.val_samples), transform,
                               skip_bad=skip)  # fmt: skip
        val_loader = DataLoader(val_set, batch_size=64, shuffle=False)
        skipped += val_set.skipped
    for item, reason in skipped:
        print(f"sls: skipped {data.item_name(item)}: {reason}")
    experiment = Experiment(config, data, splits, backbone, petl, model, train_loader, test_loader,
                            analysis_loader, analysed, val_loader=val_loader, initial_state=initial_state)  # fmt: skip
    experiment.log(f"{backbone.model}: {backbone.num_blocks} blocks at {backbone.img_size}px; {config.data}: "
                   f"{len(splits.train)} train / {len(splits.test)} test images, {len(data.classes)} classes")
    return experiment


def finetune(exp: Experiment) -> float:
    """Train the PETL modules and head with all N blocks; return the test accuracy."""
    cfg = exp.config
    train(exp.model, exp.train_loader, epochs=cfg.epochs, **cfg.schedule.train_kwargs(), desc="fine-tune",
          progress=cfg.progress)  # fmt: skip
    return accuracy(exp.model, exp.test_loader, desc="test full", progress=cfg.progress)


def score_blocks(exp: Experiment, criterion: str | None = None) -> DepthSelector:
    """One pass (cached) for every block's pooled feature, then scores, threshold and k."""
    cfg, bb = exp.config, exp.backbone
    key = feature_key_parts(exp.data, "train", exp.analysed, bb.img_size, bb.mean, bb.std, bb.interpolation)
    analysis, _ = cached_block_features(exp.model, exp.analysis_loader, key_parts=key, progress=cfg.progress)
    selector = DepthSelector(alpha=cfg.alpha, criterion=criterion or cfg.criterion, tsne=cfg.tsne,
                             perplexity=cfg.perplexity, random_state=cfg.tsne_seed, n_seeds=cfg.tsne_seeds,
                             progress=cfg.progress)  # fmt: skip
    return distributed.run_on_main(selector.fit, *analysis)  # t-SNE once; other processes get k from it


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
        retrain_pruned(exp, pruned)
        acc_retrained = accuracy(pruned, exp.test_loader, desc="test retrained", progress=cfg.progress)
    return pruned, acc_pruned, acc_retrained


def retrain_pruned(exp: Experiment, pruned: nn.Module, strategy: str | None = None, **options) -> list[float]:
    """Retrain a pruned copy of the fine-tuned model in place with the config's strategy
    (or ``strategy`` with ``options``) for ``retrain_epochs``, the fine-tuned model as
    teacher. Seeds itself and rewinds the batch order first, so retraining the same
    depth always gives the same model, whatever ran before in the process."""
    cfg = exp.config
    method = create_strategy(strategy, **options) if strategy else create_strategy(cfg.retrain_strategy,
                                                                                    **cfg.retrain_options)  # fmt: skip
    seed_everything(cfg.seed)
    if exp.train_loader.generator is not None:
        exp.train_loader.generator.manual_seed(cfg.seed)
    return method.retrain(pruned, teacher=exp.model, loader=exp.train_loader, epochs=cfg.retrain_epochs,
                          schedule=cfg.schedule, initial_state=exp.initial_state, progress=cfg.progress)  # fmt: skip


def budget_search(exp: Experiment, start: int) -> dict:
    """The smallest depth whose accuracy on the validation split stays within
    ``config.max_drop`` points of the full model's there (:func:`sls.retrain.search_depth`
    from ``start``, SLS's k). Each depth tried is truncated from the fine-tuned model and
    retrained as the task will be (:func:`retrain_pruned`; not at all with
    ``retrain=False``); the test split is never looked at. Every depth tried and the
    full model are then timed in one run.

    Returns:
        the record's ``budget_search`` entry: the chosen depth and, per depth tried,
        its validation accuracy, drop in points, whether it is within budget and its
        throughput.
    """
    cfg, n_blocks = exp.config, exp.backbone.num_blocks
    if exp.val_loader is None:
        raise ConfigError(f"--max-drop chooses k on a validation split, and {cfg.data} has none")
    overlap = int(np.intersect1d(exp.val_loader.dataset.indices, exp.splits.train).size)
    if overlap:
        warnings.warn(f"{overlap} validation images are also training images (VTAB-1k trains on train800val200, "
                      "which holds val200): the accuracies that choose k are optimistic", stacklevel=2)  # fmt: skip
    full = accuracy(exp.model, exp.val_loader, desc="val full", progress=cfg.progress)

    def evaluate(depth: int) -> float:
        pruned = truncate(copy.deepcopy(exp.model), depth)
        if cfg.retrain:
            retrain_pruned(exp, pruned)
        return accuracy(pruned, exp.val_loader, desc=f"val k={depth}", progress=cfg.progress)

    search = search_depth(evaluate, start=start, n_blocks=n_blocks, full_accuracy=full, max_drop=cfg.max_drop)
    exp.log(f"--max-drop {cfg.max_drop:g}: k = {search.depth} after {search.evaluations} depth(s) tried from {start}")
    depths = sorted({depth for depth, _ in search.tried} | {n_blocks})
    models = {str(d): exp.model if d == n_blocks else truncate(copy.deepcopy(exp.model), d) for d in depths}
    rates = distributed.run_on_main(throughput, models, batch_size=cfg.throughput_batch, img_size=exp.backbone.img_size)
    tried = [{"depth": depth, "val_accuracy": acc, "drop_points": 100 * (full - acc),
              "within_budget": within_budget(acc, full, cfg.max_drop), "throughput": rates[str(depth)],
              "speedup": rates[str(depth)] / rates[str(n_blocks)]} for depth, acc in search.tried]  # fmt: skip
    return {
        "max_drop_points": cfg.max_drop,
        "split": "val",
        "val_images": len(exp.val_loader.dataset),
        "val_overlaps_train": overlap,
        "retrained": cfg.retrain,
        "retrain_strategy": cfg.retrain_strategy if cfg.retrain else None,
        "retrain_epochs": cfg.retrain_epochs if cfg.retrain else 0,
        "start_depth": int(start),
        "chosen_depth": int(search.depth),
        "retrainings": search.evaluations if cfg.retrain else 0,
        "full": {"depth": n_blocks, "val_accuracy": full, "throughput": rates[str(n_blocks)]},
        "tried": tried,
        "throughput_batch": cfg.throughput_batch,
    }


STAGES = ("finetune", "prune", "retrain", "evaluate")
"""The stages of a run. Each reads the task folder the previous one wrote and writes
it back (tensors first, record last, atomically), so a killed run resumes from its
last completed stage and ends as an uninterrupted run would: every stage rebuilds
its data and model from the record and seeds itself the same way."""

_NOT_CONFIG = ("out", "progress", "device")  # may differ between a run and its resumption


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
                 "val_samples": int(len(exp.val_loader.dataset)) if exp.val_loader is not None else 0,
                 "used_for": {"train": "fine-tuning, block scores, retraining", "val": "choosing k under --max-drop "
                              "(a stratified subset of at most val_samples)", "test": "every reported accuracy"},
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
    out = Path(config.out) if config.out else distributed.run_on_main(default_out_dir, config)  # one time stamp
    check_writable(out)
    exp = prepare(config)
    record = _base_record(exp, out)
    record["results"]["accuracy"]["full"] = finetune(exp)
    record["stages"] = ["finetune"]
    distributed.run_on_main(save_task, out, exp.model, record, finetuned=exp.model)
    return record


def stage_prune(task_dir: str | Path, *, alpha: float | None = None, alphas: list[float] | None = None,
                criterion: str | None = None, depth: int | None = None, max_drop: float | None = None,
                tsne_seeds: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Stage 2: score every block of the fine-tuned model (one cached pass), choose k
    (or take ``depth``), drop blocks k+1..N and measure the accuracy before retraining.

    k is also reported for each of ``alphas`` from the same scores. With ``tsne_seeds``
    > 1 the SLS scores are the mean over that many t-SNE starts and k the most frequent
    k among them (the record keeps each start's k and the scores' spread). With ``max_drop``
    the depth is the one :func:`budget_search` finds from SLS's k (written to
    ``budget.png`` as validation accuracy against throughput)."""
    task_dir = Path(task_dir)
    exp, record = _reopen(task_dir, progress, alpha=alpha, alphas=alphas, criterion=criterion, depth=depth,
                          max_drop=max_drop, tsne_seeds=tsne_seeds)  # fmt: skip
    config = exp.config
    selector = score_blocks(exp)
    k = config.depth if config.depth is not None else selector.depth_
    per_alpha = [{"alpha": config.alpha, "threshold": selector.threshold_, "depth": selector.depth_,
                  "reason": selector.reason_}]  # fmt: skip
    with warnings.catch_warnings():  # a warning about these scores was given for the first alpha already
        warnings.simplefilter("ignore")
        for value in config.alphas:
            decision = selector.decide(value)
            per_alpha.append({"alpha": value, "threshold": decision.threshold, "depth": decision.depth,
                              "reason": decision.reason})  # fmt: skip
    for stale in ("budget_search", "retrain_strategy", "retrain_options", "retrain_epochs", "retrain_budget"):
        record.pop(stale, None)
    (task_dir / "budget.png").unlink(missing_ok=True)
    if config.max_drop is not None:
        record["budget_search"] = budget_search(exp, selector.depth_)
        k = record["budget_search"]["chosen_depth"]
    pruned = truncate(copy.deepcopy(exp.model), k)
    record.update({
        "criterion": config.criterion,
        "tsne": {"backend": config.tsne, "perplexity": config.perplexity, "random_state": config.tsne_seed,
                 "seeds": len(selector.depths_per_seed_)},
        "alpha": config.alpha,
        "scores": [float(v) for v in selector.scores_],
        "scores_std": [float(v) for v in selector.scores_std_],
        "depths_per_seed": [int(d) for d in selector.depths_per_seed_],
        "threshold": float(selector.threshold_),
        "selected_depth": int(selector.depth_),
        "selection_reason": selector.reason_,
        "selection_margin": selector.margin_,
        "passing_below": selector.passing_below_,
        "depth_per_alpha": per_alpha,
        "depth": int(k),
        "stages": ["finetune", "prune"],
    })  # fmt: skip
    accuracies = record["results"]["accuracy"]
    record["results"] = {"accuracy": {"full": accuracies["full"]}}
    record["results"]["accuracy"]["pruned_no_retrain"] = accuracy(pruned, exp.test_loader, desc="test pruned",
                                                                  progress=progress)  # fmt: skip
    distributed.run_on_main(save_task, task_dir, pruned, record)
    distributed.run_on_main(write_scores_csv, task_dir / "scores.csv", selector.scores_, selector.threshold_, k)
    distributed.run_on_main(plot_scores, task_dir / "scores.png", selector.scores_, selector.threshold_, k,
                            title=f"SLS scores: {exp.backbone.model} + {exp.petl.name} on {config.data}")  # fmt: skip
    if "budget_search" in record:
        distributed.run_on_main(plot_budget, task_dir / "budget.png", record["budget_search"],
                                title=f"--max-drop {config.max_drop:g}: {exp.backbone.model} + {exp.petl.name} on {config.data}")  # fmt: skip
    return record


def _reopen_pruned(task_dir: Path, progress: bool, **overrides) -> tuple[Experiment, dict, nn.Module]:
    exp, record = _reopen(task_dir, progress, **overrides)
    if "prune" not in record["stages"]:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    pruned = load_tensors(truncate(copy.deepcopy(exp.model), int(record["depth"])), task_dir / WEIGHTS_FILE)
    return exp, record, pruned


def stage_retrain(task_dir: str | Path, *, epochs: int | None = None, strategy: str | None = None,
                  progress: bool = True) -> dict:  # fmt: skip
    """Stage 3: retrain the kept blocks' PETL modules and the head with the task's
    retraining strategy (or ``strategy``) for its ``retrain_epochs`` (or ``epochs``)."""
    task_dir = Path(task_dir)
    exp, record, pruned = _reopen_pruned(task_dir, progress, retrain_epochs=epochs, retrain_strategy=strategy)
    cfg = exp.config
    if int(record["depth"]) < exp.backbone.num_blocks:
        retrain_pruned(exp, pruned)
        steps = cfg.retrain_epochs * len(exp.train_loader)
        record.update({
            "retrain_strategy": cfg.retrain_strategy,
            "retrain_options": create_strategy(cfg.retrain_strategy, **cfg.retrain_options).options,
            "retrain_epochs": cfg.retrain_epochs,
            "retrain_budget": f"{cfg.retrain_epochs} epoch(s) over {len(exp.train_loader.dataset)} training images, "
                              f"batch {cfg.batch_size}: {steps} updates, the same for every strategy (distill also "
                              "runs the unpruned teacher forward at each update)",
        })  # fmt: skip
    else:  # Nothing was pruned: the fine-tuned model is the task (as the --max-drop search assumes).
        record.update({"retrain_strategy": None, "retrain_options": {}, "retrain_epochs": 0,
                       "retrain_budget": "none: k = N, nothing was pruned, so the fine-tuned model is kept"})  # fmt: skip
    record["stages"] = ["finetune", "prune", "retrain"]
    record["results"].pop("throughput", None)
    distributed.run_on_main(save_task, task_dir, pruned, record)
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
    speed = distributed.run_on_main(throughput, {"full": exp.model, "pruned": pruned},
                                    batch_size=cfg.throughput_batch, img_size=exp.backbone.img_size)  # fmt: skip
    results["throughput"] = {"full": speed["full"], "pruned": speed["pruned"], "batch_size": cfg.throughput_batch,
                             "unit": "images/s", "threads": torch.get_num_threads()}  # fmt: skip
    results["parameters"] = {"full": parameter_count(exp.model), "pruned": parameter_count(pruned),
                             "task_tensors": sum(p.numel() for p in pruned.parameters() if p.requires_grad)}  # fmt: skip
    results["storage_bytes"] = {"task": task_tensor_bytes(pruned)}
    record["stages"] = [*[s for s in record["stages"] if s != "evaluate"], "evaluate"]
    distributed.run_on_main(save_task, task_dir, pruned, record)
    return record


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output folder {out}: {existing} is not a writable folder")


def changed_settings(config: RunConfig, record: dict) -> list[str]:
    """The settings in which a task record's run differs from ``config`` (sorted names;
    empty when ``config`` would resume it). Output folder, progress and device may differ."""
    mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_CONFIG}
    # A setting added after the record was written counts as its default there.
    defaults = {k: v for k, v in dataclasses.asdict(RunConfig()).items() if k not in _NOT_CONFIG}
    theirs = {**defaults, **{k: v for k, v in record.get("config", {}).items() if k not in _NOT_CONFIG}}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def run(config: RunConfig) -> dict:
    """All stages in order: fine-tune, prune (score blocks, choose k), retrain, evaluate.

    If ``config.out`` already holds a run with the same configuration, the stages it
    completed are skipped (resume). Another configuration there is refused.

    Returns:
        the task record (also written to ``<out>/record.json``).
    """
    started = time.perf_counter()
    config.validate()
    out = Path(config.out) if config.out else distributed.run_on_main(default_out_dir, config)  # one time stamp
    config = dataclasses.replace(config, out=str(out))
    done: list[str] = []
    if (out / RECORD_FILE).is_file():
        previous = read_record(out)
        changed = changed_settings(config, previous)
        if changed:
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
