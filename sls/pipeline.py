"""The SLS pipeline, reading top to bottom, on one :class:`~sls.experiment.Experiment`.

fine-tune (all N blocks) -> check it learned -> block features (one pass) -> scores -> k
-> truncate -> retrain -> measure.

Each function works in memory; :mod:`sls.stages` wraps them around a task folder
(record, resume, processes) and :func:`sls.stages.run` chains them. Every training
runs seeded from the run's seed and leaves the caller's generators as they were.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sls import distributed
from sls._rng import seeded
from sls.backbones import shared_copy, truncate
from sls.bench import flops, throughput
from sls.errors import ConfigError
from sls.experiment import Experiment
from sls.features import cached_block_features, feature_key_parts
from sls.petl import trainable_state
from sls.petl.merge import deployable_model
from sls.retrain import create_strategy, search_depth, within_budget
from sls.select import DepthSelector, criterion_options
from sls.train import train

NEAR_CHANCE = 0.1
"""A fine-tune is near chance when its accuracy is below chance + this share of the way to 100%."""
LOSS_BARELY_FELL = 0.9
"""... and its loss barely fell when the last epoch's is above this share of ln(classes),
the loss of a uniform guess (where a fresh head starts)."""


def _curve(exp: Experiment, model: nn.Module, rows: list[dict], desc: str):
    """The ``after_epoch`` callback of a training: appends the epoch's loss and, where the
    data has a validation split, ``model``'s accuracy on it (never the test split)."""

    def after_epoch(epoch: int, loss: float) -> None:
        val = None
        if exp.val_loader is not None:
            val = exp.quality(model, exp.val_loader, f"val {desc}", progress=False)
        rows.append({"epoch": epoch, "loss": float(loss), "val_accuracy": val})

    return after_epoch


def finetune(exp: Experiment) -> tuple[float, list[dict]]:
    """Train the PETL modules and head with all N blocks.

    Returns:
        the test accuracy (the task's primary metric), and the training curve (one row per epoch).
    """
    cfg, rows = exp.config, []
    after_epoch = _curve(exp, exp.model, rows, "fine-tune")
    with seeded(cfg.seed):
        train(exp.model, exp.train_loader, epochs=exp.epochs, **cfg.schedule.train_kwargs(), desc="fine-tune",
              progress=cfg.progress, runtime=exp.runtime, after_epoch=after_epoch)  # fmt: skip
    return exp.quality(exp.model, exp.test_loader, "test full"), rows


def check_finetune(curve: list[dict], test_accuracy: float, num_classes: int) -> dict:
    """Whether a fine-tune learned enough for its block scores to mean anything.

    Flags an accuracy near chance (the last validation accuracy, else the test one,
    below ``chance + NEAR_CHANCE * (1 - chance)``) and a loss that barely fell (the last
    epoch's above ``LOSS_BARELY_FELL * ln(classes)``).

    Returns:
        ``{"ok", "problems", "chance", "accuracy", "accuracy_split", "final_loss", "uniform_loss"}``.
    """
    chance = 1.0 / num_classes
    val = [row["val_accuracy"] for row in curve if row.get("val_accuracy") is not None]
    measured, split = (val[-1], "val") if val else (test_accuracy, "test")
    uniform = math.log(num_classes)
    final = curve[-1]["loss"] if curve else math.nan
    problems = []
    if measured < chance + NEAR_CHANCE * (1 - chance):
        problems.append(f"{split} accuracy {100 * measured:.1f}% is near chance ({100 * chance:.1f}%)")
    if num_classes > 1 and final > LOSS_BARELY_FELL * uniform:
        problems.append(f"the loss barely fell (last epoch {final:.3f}; a uniform guess has {uniform:.3f})")
    return {"ok": not problems, "problems": problems, "chance": chance, "accuracy": measured,
            "accuracy_split": split, "final_loss": final, "uniform_loss": uniform}  # fmt: skip


def score_blocks(exp: Experiment, criterion: str | None = None) -> DepthSelector:
    """One pass (cached) for every block's pooled feature, then scores, threshold and k.

    The run's own criterion scores only the blocks its rule reads (top-down, down to
    the first block below T; ``selector.scored_blocks_``) unless ``score_all``, further
    ``alphas`` or several t-SNE seeds ask for every block; another ``criterion`` (a
    study) scores them all."""
    cfg, bb = exp.config, exp.backbone
    key = feature_key_parts(exp.data, "train", exp.analysed, bb.img_size, bb.mean, bb.std, bb.interpolation)
    compute = exp.task.block_features
    if exp.task.dense:  # the regions, cells or boxes scored: the task, its options and their number are in the key
        key |= {"task": exp.task.name, "task_options": exp.task.options, "samples": cfg.analysis_samples}
        compute = functools.partial(compute, samples=cfg.analysis_samples)
    analysis, _ = cached_block_features(exp.model, exp.analysis_loader, key_parts=key, use_cache=cfg.cache,
                                       progress=cfg.progress, compute=compute)
    # The run's t-SNE options reach its own criterion as given (one it does not take is
    # refused); another criterion (a study) gets those it takes. n_jobs=-1: blocks in parallel.
    options = {"tsne": cfg.tsne, "perplexity": cfg.perplexity, "n_jobs": -1, "progress": cfg.progress}
    if criterion is not None and criterion != cfg.criterion:
        options = {key: value for key, value in options.items() if key in criterion_options(criterion)}
    every = cfg.score_all or bool(cfg.alphas) or (criterion is not None and criterion != cfg.criterion)
    selector = DepthSelector(alpha=cfg.alpha, criterion=criterion or cfg.criterion, random_state=cfg.tsne_seed,
                             n_seeds=cfg.tsne_seeds, blocks="all" if every else "needed", **options)  # fmt: skip
    return distributed.run_on_main(selector.fit, *analysis)  # t-SNE once; other processes get k from it


def decisions_per_alpha(exp: Experiment, selector: DepthSelector) -> list[dict]:
    """k for the config's alpha and for each of its further ``alphas``, from the same scores."""
    rows = [{"alpha": exp.config.alpha, "threshold": selector.threshold_, "depth": selector.depth_,
             "reason": selector.reason_}]  # fmt: skip
    with warnings.catch_warnings():  # a warning about these scores was given for the first alpha already
        warnings.simplefilter("ignore")
        for value in exp.config.alphas:
            decision = selector.decide(value)
            rows.append({"alpha": value, "threshold": decision.threshold, "depth": decision.depth,
                         "reason": decision.reason})  # fmt: skip
    return rows


def prune(exp: Experiment, depth: int) -> nn.Module:
    """A copy of the fine-tuned model with blocks depth+1..N really removed. The copy
    shares the frozen backbone tensors with the fine-tuned model
    (:func:`~sls.backbones.shared_copy`): its own are the trainable ones. Seeded: a
    Swin cut before its last stage gets the same fresh norm and head every time."""
    with seeded(exp.config.seed):
        return truncate(shared_copy(exp.model), depth)


def retrain_pruned(exp: Experiment, pruned: nn.Module, strategy: str | None = None, *, curve: bool = True,
                   **options) -> list[dict]:  # fmt: skip
    """Retrain a pruned model in place with the config's strategy (or ``strategy`` with
    ``options``) for the run's retraining epochs, the fine-tuned model as teacher.
    Seeded, with the batch order rewound, so retraining the same depth always gives the
    same model, whatever ran before in the process.

    Returns:
        the retraining curve (one row per epoch; empty with ``curve=False``, which skips
        its validation passes).
    """
    cfg, rows = exp.config, []
    method = create_strategy(strategy or cfg.retrain_strategy, **(options if strategy else cfg.retrain_options))
    after_epoch = _curve(exp, pruned, rows, "retrain")
    if exp.train_loader.generator is not None:
        exp.train_loader.generator.manual_seed(cfg.seed)
    with seeded(cfg.seed):
        method.retrain(pruned, teacher=exp.model, loader=exp.train_loader, epochs=exp.retrain_epochs,
                       schedule=cfg.schedule, initial_state=exp.initial_state, progress=cfg.progress,
                       runtime=exp.runtime, after_epoch=after_epoch if curve else None)  # fmt: skip
    return rows


@dataclass
class BudgetSearch:
    """What :func:`budget_search` found: the record's entry, and per depth it retrained,
    the retrained trainable tensors and the retraining curve, so the chosen depth is
    not retrained a second time."""

    entry: dict
    retrained: dict[int, tuple[dict[str, torch.Tensor], list[dict], float]] = field(default_factory=dict)
    """Per depth retrained: its trainable tensors (on the CPU), its curve and the seconds it took."""

    @property
    def depth(self) -> int:
        return int(self.entry["chosen_depth"])


def budget_search(exp: Experiment, start: int) -> BudgetSearch:
    """The smallest depth whose accuracy on the validation split stays within
    ``config.max_drop`` points of the full model's there (:func:`sls.retrain.search_depth`
    from ``start``, SLS's k). Each depth tried is truncated from the fine-tuned model and
    retrained as the task will be (not at all with ``retrain=False``), its curve
    included; the test split is never looked at. Every depth tried and the full model
    are then timed in one run, as truncations of one deployable copy.

    Returns:
        the record's ``budget_search`` entry (the chosen depth and, per depth tried,
        its validation accuracy, drop in points, whether it is within budget and its
        throughput), and the tensors and curve of each depth retrained.
    """
    cfg, n_blocks, runtime = exp.config, exp.backbone.num_blocks, exp.runtime
    if exp.val_loader is None:
        raise ConfigError(f"--max-drop chooses k on a validation split, and {cfg.data} has none")
    overlap = int(np.intersect1d(exp.val_loader.dataset.indices, exp.splits.train).size)
    if overlap:
        warnings.warn(f"{overlap} validation images are also training images (VTAB-1k trains on train800val200, "
                      "which holds val200): the accuracies that choose k are optimistic", stacklevel=2)  # fmt: skip
    full = exp.quality(exp.model, exp.val_loader, "val full")
    retrained: dict[int, tuple[dict[str, torch.Tensor], list[dict], float]] = {}

    def evaluate(depth: int) -> float:
        pruned = prune(exp, depth)
        if not cfg.retrain:
            return exp.quality(pruned, exp.val_loader, f"val k={depth}")
        started = time.perf_counter()
        rows = retrain_pruned(exp, pruned)  # the last epoch's validation pass is the depth's accuracy
        state = {name: t.clone() for name, t in trainable_state(pruned).items()}  # CPU copies
        retrained[depth] = (state, rows, time.perf_counter() - started)
        return rows[-1]["val_accuracy"]

    search = search_depth(evaluate, start=start, n_blocks=n_blocks, full_accuracy=full, max_drop=cfg.max_drop)
    exp.log(f"--max-drop {cfg.max_drop:g}: k = {search.depth} after {search.evaluations} depth(s) tried from {start}")
    depths = sorted({depth for depth, _ in search.tried} | {n_blocks})
    # Timed as deployed (LoRA and RepAdapter folded), like every other figure: one folded
    # copy, each depth a truncation sharing its tensors (the tensors' values do not change a time).
    deployed = deployable_model(exp.model)
    models = {str(d): deployed if d == n_blocks else truncate(shared_copy(deployed, share_trainable=True), d)
              for d in depths}  # fmt: skip
    rates = distributed.run_on_main(throughput, models, batch_size=cfg.throughput_batch,
                                    img_size=exp.backbone.img_size, runtime=runtime)  # fmt: skip
    work = {key: flops(model, img_size=exp.backbone.img_size) for key, model in models.items()}
    del models, deployed
    tried = [{"depth": depth, "val_accuracy": acc, "drop_points": 100 * (full - acc),
              "within_budget": within_budget(acc, full, cfg.max_drop), "throughput": rates[str(depth)],
              "speedup": rates[str(depth)] / rates[str(n_blocks)], "flops": work[str(depth)]}
             for depth, acc in search.tried]  # fmt: skip
    entry = {
        "max_drop_points": cfg.max_drop,
        "split": "val",
        "val_images": len(exp.val_loader.dataset),
        "val_overlaps_train": overlap,
        "retrained": cfg.retrain,
        "retrain_strategy": cfg.retrain_strategy if cfg.retrain else None,
        "retrain_epochs": exp.retrain_epochs if cfg.retrain else 0,
        "start_depth": int(start),
        "chosen_depth": int(search.depth),
        "retrainings": search.evaluations if cfg.retrain else 0,
        "full": {"depth": n_blocks, "val_accuracy": full, "throughput": rates[str(n_blocks)],
                 "flops": work[str(n_blocks)]},
        "tried": tried,
        "throughput_batch": cfg.throughput_batch,
    }
    return BudgetSearch(entry, retrained)
