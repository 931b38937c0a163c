"""SLS against DepGraph width pruning of the same PETL model, on one task.

:func:`compare` rebuilds a task's data from its record and measures, on the task's
test split:

- the full fine-tuned model (all N blocks);
- SLS: the saved task at its k (retrained as its run retrained it), the same k
  without retraining, and a few other depths (the fine-tuned model truncated; not
  retrained unless ``retrain_epochs`` is given);
- DepGraph (:mod:`sls.baselines.depgraph`: Taylor importance on a few training
  batches, one uniform ratio, attention head dims pruned, every kept width a multiple
  of 8, adapters and head kept) of the same fine-tuned model at (a) the ratio removing
  as many parameters as SLS's k, (b) the ratio whose measured throughput matches SLS's
  k, and (c) every ratio of ``ratios``; and at (a) and (b) with magnitude importance
  too, so the comparison does not rest on one ranking. With ``retrain_epochs`` every
  DepGraph model is retrained for that many epochs (the PETL modules, re-inserted where
  pruning folded them away, and the head).

Retraining here uses the task's own strategy and options (``clr`` for a task that was
not retrained), the same for SLS's other depths and for DepGraph, at the task's
schedule: the SLS row and the DepGraph rows get the same retraining. Two exceptions,
stated in ``compare.json``: ``tfs`` cannot reset DepGraph's pruned modules to values
they never had, so DepGraph gets ``clr`` there; ``distill``'s feature term compares
widths DepGraph changed, so it is off for DepGraph.

Every task type compares: each model's figure is the task's primary metric (accuracy,
mIoU, mAP; the rows keep the column name ``accuracy``, ``settings["metric"]`` names it).
DepGraph prunes a dense model's encoder and narrows its task head's inputs to the kept
residual channels; the retrained rows train that whole head with the PETL modules.

Every model is measured as it is deployed (:func:`sls.export.deployable_model`: LoRA
and RepAdapter folded into the backbone's linears), all in one :func:`sls.bench.measure`
run so a noisy machine hits them alike: throughput at batch 1 and at the task's batch,
batch-1 latency percentiles, parameters, FLOPs and peak memory.

Equal throughput (b) is found by interpolation, not bisection: the DepGraph models at
the ``ratios`` and at the equal-parameter ratio are timed with SLS's model; the ratio
at which that measured curve (made non-decreasing in the ratio, against timing noise;
ratio 0 is the full model) reaches SLS's throughput is interpolated linearly between
the two ratios around it, or extrapolated from the last two, capped at
:data:`~sls.baselines.depgraph.MAX_RATIO`. The model at that ratio is then timed again
with all the others; the reported figures come from that final run.

Per-task storage in bytes, in two accountings. ``storage_bytes``, what a DepGraph user
meets in practice (and the paper assumes): SLS keeps its task tensor file +
``record.json`` (the shared backbone is not counted: every task reuses it); the full
PETL model keeps the PETL tensors of all N blocks + head + the record; DepGraph keeps
its whole pruned model (widths differ from the shared backbone's), as a
``.safetensors`` state dict. ``storage_bytes_indices``: with the backbone frozen and
shared, a DepGraph task could instead keep the indices of its kept channels (int32)
+ its PETL tensors (sized for the pruned widths; a folded method's fine-tuned update
sliced to the kept channels too, once the model is retrained with a fresh one on top)
+ head + the record: a few times SLS's bytes, not the backbone's; SLS's rows are the same in both.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sls._io import write_json, write_text
from sls._rng import seeded
from sls.artifact import RECORD_FILE, task_file, task_tensor_bytes
from sls.backbones import shared_copy, truncate
from sls.baselines.depgraph import (
    MAX_RATIO,
    ROUND_TO,
    depgraph_prune,
    kept_indices_bytes,
    ratio_for_parameter_reduction,
)
from sls.bench import measure, parameter_count, state_dict_bytes, throughput
from sls.errors import ConfigError, TaskRecordError
from sls.experiment import Experiment, pruned_model
from sls.export import deployable_model
from sls.petl import head_parameter_names, petl_from_record
from sls.record import TaskRecord
from sls.report import plot_compare
from sls.retrain import create_strategy
from sls.runtime import Runtime
from sls.train import Schedule

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
CSV_COLUMNS = ("model", "method", "importance", "depth", "ratio", "matched", "retrained", "accuracy", "throughput",
               "speedup", "throughput_batch1", "speedup_batch1", "latency_p50_ms", "latency_p99_ms", "gflops",
               "flops_ratio", "peak_memory_mb", "parameters", "storage_bytes", "storage_bytes_indices")  # fmt: skip


@dataclass
class _Candidate:
    """One model of the comparison, before it is measured."""

    name: str
    method: str  # "full", "sls" or "depgraph"
    model: nn.Module  # the deployable model: what is timed and evaluated
    depth: int
    ratio: float | None = None
    matched: str | None = None  # "task" (SLS's k), "parameters" or "throughput" (DepGraph)
    retrained: bool = False
    storage_bytes: int = 0
    storage_bytes_indices: int | None = None  # None: the same as storage_bytes
    importance: str | None = None  # DepGraph's channel ranking


def default_depths(depth: int, num_blocks: int) -> list[int]:
    """The task's k and the quarter, half and three-quarter depths, below N."""
    quarters = {int(num_blocks * q + 0.5) for q in (0.25, 0.5, 0.75)}
    return sorted({depth} | {d for d in quarters if 1 <= d < num_blocks})


def ratio_at_throughput(ratios: list[float], rates: list[float], target: float) -> float:
    """The DepGraph ratio whose throughput reaches ``target``, from measured points.

    Args:
        ratios: increasing ratios, the first one 0 (the full model).
        rates: measured images/s at each ratio; made non-decreasing first, since
            removing channels never slows a model down and only noise says otherwise.
        target: the images/s to reach.

    Returns:
        the ratio interpolated linearly between the two measured ratios around
        ``target``; above every point, extrapolated from the last two, at most
        :data:`MAX_RATIO`; 0 when the full model is already as fast.
    """
    if len(ratios) != len(rates) or len(ratios) < 2 or ratios[0] != 0 or list(ratios) != sorted(set(ratios)):
        raise ValueError("ratio_at_throughput needs increasing ratios starting at 0, one rate each")
    speeds = np.maximum.accumulate(np.asarray(rates, dtype=float))
    if target <= speeds[0]:
        return 0.0
    for i in range(1, len(ratios)):
        if speeds[i] >= target:  # speeds[i - 1] < target here, so the slope is positive
            fraction = (target - speeds[i - 1]) / (speeds[i] - speeds[i - 1])
            return float(ratios[i - 1] + fraction * (ratios[i] - ratios[i - 1]))
    slope = (speeds[-1] - speeds[-2]) / (ratios[-1] - ratios[-2])
    if slope <= 0:
        return MAX_RATIO
    return float(min(MAX_RATIO, ratios[-1] + (target - speeds[-1]) / slope))


def _importance_loader(exp: Experiment, n_batches: int) -> DataLoader:
    """The same few shuffled training batches rank the channels of every DepGraph model."""
    train_set, batch_size = exp.train_loader.dataset, exp.config.batch_size
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(exp.config.seed))
    return DataLoader(Subset(train_set, order[: n_batches * batch_size].tolist()), batch_size=batch_size, shuffle=False,
                      generator=torch.Generator(), collate_fn=exp.task.collate)  # fmt: skip


def _make_trainable(model: nn.Module, record: TaskRecord) -> nn.Module:
    """Train the task's PETL method and the head of a DepGraph model, re-inserting the
    method where the pruning folded it into the backbone (LoRA, RepAdapter): fresh
    modules start as an identity update, so retraining starts from the pruned model.
    A dense model's method goes into its encoder, and its whole task head trains."""
    petl = petl_from_record(record.petl)
    dense = getattr(model, "is_dense_model", False)
    if not any(petl.is_petl_param(name) for name, _ in model.named_parameters()):
        petl.apply(model.encoder if dense else model)
    if dense:
        head = {name for name, _ in model.named_parameters() if name.startswith("head.")}
    else:
        head = head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(petl.is_petl_param(name) or name in head)
    return model


def _retrain(model: nn.Module, exp: Experiment, record: TaskRecord, epochs: int, *, depgraph: bool = False,
             lr: float | None = None) -> str:  # fmt: skip
    """Retrain ``model`` in place with the task's strategy for ``epochs``; returns the
    strategy used (see the module docstring for DepGraph's two exceptions)."""
    name = record.retrain_strategy or "clr"
    options = dict(record.retrain_options or {}) if record.retrain_strategy else {}
    if depgraph and name == "tfs":
        name, options = "clr", {}
    if depgraph and name == "distill":
        options["feature_weight"] = 0.0
    cfg = exp.config
    # The task's own schedule; warm-up is scaled when the epochs differ.
    warmup = cfg.warmup_epochs
    if warmup is not None:
        warmup = float(warmup) * epochs / max(1, exp.retrain_epochs)
    peak = cfg.lr if lr is None else lr
    min_lr = cfg.min_lr if lr is None or cfg.min_lr is None else cfg.min_lr * lr / cfg.lr
    schedule = Schedule(lr=peak, weight_decay=cfg.weight_decay, warmup_epochs=warmup, min_lr=min_lr)
    if exp.train_loader.generator is not None:
        exp.train_loader.generator.manual_seed(cfg.seed)
    with seeded(cfg.seed):
        create_strategy(name, **options).retrain(model, teacher=exp.model, loader=exp.train_loader, epochs=epochs,
                                                 schedule=schedule, initial_state=exp.initial_state,
                                                 progress=cfg.progress, runtime=exp.runtime)  # fmt: skip
    return name


def _rows(candidates: list[_Candidate], exp: Experiment, *, batch_size: int) -> list[dict]:
    """The task's metric (under ``accuracy``: accuracy, mIoU, mAP), the measurements
    (one run), parameters and storage of every candidate."""
    unique = {id(c.model): c.model for c in candidates}  # a model listed twice is measured once
    figures = measure({str(key): model for key, model in unique.items()}, img_size=exp.backbone.img_size,
                      batch_sizes=(1, batch_size), runtime=exp.runtime, progress=exp.log)  # fmt: skip
    accuracies = {key: exp.quality(model, exp.test_loader, "test") for key, model in unique.items()}
    full = figures[str(id(candidates[0].model))]
    rows = []
    for c in candidates:
        mine = figures[str(id(c.model))]
        rate, rate1 = mine["throughput"][str(batch_size)], mine["throughput"]["1"]
        rows.append({
            "model": c.name,
            "method": c.method,
            "importance": c.importance,
            "depth": c.depth,
            "ratio": None if c.ratio is None else round(c.ratio, 4),
            "matched": c.matched,
            "retrained": c.retrained,
            "accuracy": accuracies[id(c.model)],
            "throughput": rate,
            "speedup": rate / full["throughput"][str(batch_size)],
            "throughput_batch1": rate1,
            "speedup_batch1": rate1 / full["throughput"]["1"],
            "latency_p50_ms": mine["latency_ms"]["p50"],
            "latency_p99_ms": mine["latency_ms"]["p99"],
            "gflops": mine["flops"] / 1e9,
            "flops_ratio": full["flops"] / mine["flops"],
            "peak_memory_mb": mine["peak_memory"]["forward"] / 1e6,
            "parameters": mine["parameters"],
            "storage_bytes": c.storage_bytes,
            "storage_bytes_indices": c.storage_bytes if c.storage_bytes_indices is None else c.storage_bytes_indices,
        })  # fmt: skip
    return rows


def compare_csv(rows: list[dict]) -> str:
    """CSV text of :func:`compare`'s rows, one model a line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


def compare(
    task_dir: str | Path,
    *,
    ratios: tuple[float, ...] | list[float] = DEFAULT_RATIOS,
    depths: list[int] | None = None,
    retrain_epochs: int | None = None,
    weights: str | Path | None = None,
    n_batches: int = 4,
    heads: str = "dims",
    depgraph_train: str = "petl",
    depgraph_lr: float | None = None,
    throughput_batch: int | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    runtime: Runtime | None = None,
) -> dict:
    """Compare a task's SLS pruning with DepGraph width pruning of the same PETL model.

    Args:
        task_dir: a pruned task folder (``sls run``, or ``sls prune`` and later).
        ratios: DepGraph ratios measured besides the two matched ones, in (0, MAX_RATIO].
        depths: SLS depths measured besides the task's k (default: N/4, N/2, 3N/4).
        retrain_epochs: retrain the SLS depths other than the task's and every
            DepGraph model for this many epochs (the task's own retraining budget is
            ``TaskRecord.retrain_epochs``); None: no retraining, so the
            like-for-like SLS figure is the task's k before retraining.
        weights: the backbone's weights file; default: the record's.
        n_batches: training batches of DepGraph's Taylor importance.
        heads: DepGraph's attention pruning: ``"dims"`` (every head narrower) or
            ``"whole"`` (whole heads removed); see :func:`sls.baselines.depgraph.depgraph_prune`.
        depgraph_train: what retrains in a DepGraph model: ``"petl"`` (its PETL modules
            and head on the frozen pruned backbone, as SLS) or ``"all"`` (every weight,
            Torch-Pruning's usual recovery; its storage is then the whole model in both
            accountings).
        depgraph_lr: peak learning rate of DepGraph's retraining (default: the task's).
            Training every weight wants a far lower rate than a PETL method's: at the
            demo's 3e-3 it collapses (BENCHMARKS.md).
        throughput_batch: batch size of the timing; default: the task's.
        progress: progress bars and a line per step.
        out: folder of ``compare.json``, ``compare.csv`` and ``compare.png``;
            default: ``<task_dir>/compare``.
        runtime: where and how every model runs and is timed (default: the CPU, float32).

    Returns:
        ``rows`` (one dict per model: the task's metric in [0, 1] under ``accuracy``
        (accuracy, mIoU or mAP, named by ``settings["metric"]``), images/s, speed-up over the
        full model, parameters, per-task storage bytes), ``summary`` (the figures
        at equal parameters and equal throughput, the storage ratio) and
        ``settings``; also written to ``compare.json``.

    Raises:
        ConfigError: a ratio or depth out of range, a PETL method DepGraph
            cannot prune (Convpass), or ``distill`` retraining of a dense task.
        TaskRecordError: an unpruned or incomplete task, or another backbone.
    """
    task_dir = Path(task_dir)
    ratios = sorted({float(r) for r in ratios})
    if any(not 0 < r <= MAX_RATIO for r in ratios):
        raise ConfigError(f"DepGraph ratios must be in (0, {MAX_RATIO}], got {', '.join(map(str, ratios))}")
    if depgraph_lr is not None and not depgraph_lr > 0:
        raise ConfigError(f"depgraph_lr must be > 0, got {depgraph_lr}")
    if depgraph_train not in ("petl", "all"):
        raise ConfigError(f"depgraph_train must be 'petl' or 'all', got {depgraph_train!r}")
    if retrain_epochs is not None and retrain_epochs < 1:
        raise ConfigError(f"--retrain-epochs must be >= 1, got {retrain_epochs}")
    exp, record = Experiment.from_record(task_dir, weights=weights, runtime=runtime or Runtime(),
                                         overrides={"progress": progress})  # fmt: skip
    if "prune" not in record.stages:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    with seeded(record.seed):
        return _compare(task_dir, exp, record, ratios=ratios, depths=depths, retrain_epochs=retrain_epochs,
                        n_batches=n_batches, heads=heads, depgraph_train=depgraph_train, depgraph_lr=depgraph_lr,
                        throughput_batch=throughput_batch, out=out)


def _compare(task_dir: Path, exp: Experiment, record: TaskRecord, *, ratios: list[float], depths: list[int] | None,
             retrain_epochs: int | None, n_batches: int, heads: str, depgraph_train: str,
             depgraph_lr: float | None, throughput_batch: int | None, out) -> dict:  # fmt: skip
    task_retrained = "retrain" in record.stages
    if exp.task.dense and retrain_epochs is not None and record.retrain_strategy == "distill":
        raise ConfigError(f"the distill retraining strategy matches a classifier's logits; the {exp.task.name} "
                          "task cannot retrain with it")  # fmt: skip
    num_blocks, depth = record.num_blocks, int(record.depth)
    depths = sorted(set(depths) | {depth}) if depths is not None else default_depths(depth, num_blocks)
    if any(not 1 <= d <= num_blocks for d in depths):
        raise ConfigError(f"SLS depths must be in 1..{num_blocks}, got {', '.join(map(str, depths))}")
    batch_size = int(throughput_batch or exp.config.throughput_batch)
    img_size = exp.backbone.img_size
    log = exp.log
    finetuned = exp.model
    task_model = pruned_model(exp, record, task_dir)
    importance_loader = _importance_loader(exp, n_batches)
    record_bytes = (task_dir / RECORD_FILE).stat().st_size

    full = _Candidate("full", "full", deployable_model(finetuned), num_blocks,
                      storage_bytes=task_tensor_bytes(finetuned) + record_bytes)  # fmt: skip
    sls_task = _Candidate(f"SLS k={depth} (task)", "sls", deployable_model(task_model), depth, matched="task",
                          retrained=task_retrained,
                          storage_bytes=task_file(record, task_dir).stat().st_size + record_bytes)  # fmt: skip
    candidates = [full, sls_task]
    sls_fair = sls_task
    if task_retrained:
        unretrained = truncate(shared_copy(finetuned), depth)
        sls_fair = _Candidate(f"SLS k={depth} no retrain", "sls", deployable_model(unretrained), depth,
                              storage_bytes=task_tensor_bytes(unretrained) + record_bytes)  # fmt: skip
        candidates.append(sls_fair)
    if retrain_epochs is not None:
        sls_fair = sls_task
        if not task_retrained or retrain_epochs != record.retrain_epochs:
            # The task's own row had another budget: SLS's k gets the DepGraph rows' one here.
            log(f"retraining SLS k={depth} for {retrain_epochs} epoch(s), the budget of every retrained row")
            model = truncate(shared_copy(finetuned), depth)
            _retrain(model, exp, record, retrain_epochs)
            sls_fair = _Candidate(f"SLS k={depth} retrained {retrain_epochs} epoch(s)", "sls", deployable_model(model),
                                  depth, retrained=True, storage_bytes=task_tensor_bytes(model) + record_bytes)  # fmt: skip
            candidates.append(sls_fair)
    for other in depths:
        if other in (depth, num_blocks):
            continue
        log(f"SLS at k={other}")
        model = truncate(shared_copy(finetuned), other)
        if retrain_epochs is not None:
            log(f"retraining SLS k={other}")
            _retrain(model, exp, record, retrain_epochs)
        candidates.append(_Candidate(f"SLS k={other}", "sls", deployable_model(model), other,
                                     retrained=retrain_epochs is not None,
                                     storage_bytes=task_tensor_bytes(model) + record_bytes))  # fmt: skip

    # DepGraph prunes the deployable fine-tuned model: LoRA and RepAdapter are folded
    # first (exact), so parameters are counted on the same footing as SLS's.
    base = full.model
    target = parameter_count(base) - parameter_count(sls_task.model)
    log(f"DepGraph: searching the ratio that removes {target} parameters")
    ratio_params = ratio_for_parameter_reduction(base, importance_loader, target, heads=heads)

    depgraph_strategies = set()

    def depgraph(ratio: float, name: str, matched: str | None = None, importance: str = "taylor") -> _Candidate:
        log(f"DepGraph at ratio {ratio:.4f} ({importance})")
        model, kept = depgraph_prune(base, importance_loader, ratio=ratio, n_batches=n_batches, importance=importance,
                                     heads=heads, return_kept=True)  # fmt: skip
        petl = petl_from_record(record.petl)
        folded = not any(petl.is_petl_param(n) for n, _ in model.named_parameters())  # LoRA, RepAdapter
        if depgraph_train == "all" and retrain_epochs is not None:  # Torch-Pruning's recovery: every weight trains
            trainable = model.requires_grad_(True)
        else:
            trainable = _make_trainable(model, record)
        if retrain_epochs is not None:
            log(f"retraining {name}")
            depgraph_strategies.add(_retrain(trainable, exp, record, retrain_epochs, depgraph=True, lr=depgraph_lr))
        deployable = deployable_model(trainable)
        # Over a frozen shared backbone: the kept channels' indices, the PETL tensors at
        # the pruned widths and the head rebuild this model. A folded method's fine-tuned
        # update lives in the pruned weights, so once retrained a fresh one rides on top
        # of it: both are counted (sliced to the kept channels, the first has the second's shapes).
        petl_bytes = sum(p.numel() * p.element_size() for n, p in trainable.named_parameters() if petl.is_petl_param(n))
        indices = kept_indices_bytes(kept) + task_tensor_bytes(trainable) + record_bytes
        if folded and retrain_epochs is not None:
            indices += petl_bytes
        if depgraph_train == "all" and retrain_epochs is not None:
            indices = state_dict_bytes(deployable)  # a retrained backbone is the task's own: kept whole
        return _Candidate(name, "depgraph", deployable, num_blocks, ratio=ratio, matched=matched,
                          retrained=retrain_epochs is not None, storage_bytes=state_dict_bytes(deployable),
                          storage_bytes_indices=indices, importance=importance)  # fmt: skip

    grid = [depgraph(r, f"DepGraph r={r:.2f}") for r in ratios]
    by_params = depgraph(ratio_params, f"DepGraph =params r={ratio_params:.2f}", "parameters")
    measured = sorted({c.ratio: c for c in [*grid, by_params] if c.ratio > 0}.items())
    log("DepGraph: timing the ratios against SLS to match its throughput")
    calibration = throughput({"full": full.model, "sls": sls_task.model, **{str(r): c.model for r, c in measured}},
                             batch_size=batch_size, img_size=img_size, runtime=exp.runtime)  # fmt: skip
    ratio_speed = ratio_at_throughput([0.0, *(r for r, _ in measured)],
                                      [calibration["full"], *(calibration[str(r)] for r, _ in measured)],
                                      calibration["sls"])  # fmt: skip
    by_speed = depgraph(ratio_speed, f"DepGraph =speed r={ratio_speed:.2f}", "throughput")
    magnitude = [depgraph(ratio_params, f"DepGraph magnitude =params r={ratio_params:.2f}", "parameters", "magnitude"),
                 depgraph(ratio_speed, f"DepGraph magnitude =speed r={ratio_speed:.2f}", "throughput", "magnitude")]
    candidates += [by_params, by_speed, *magnitude, *grid]

    log(f"measuring every model: throughput in one run, then test {exp.task.metric}")
    rows = _rows(candidates, exp, batch_size=batch_size)
    named = {row["model"]: row for row in rows}
    fair, task_row = named[sls_fair.name], named[sls_task.name]
    params_row, speed_row = named[by_params.name], named[by_speed.name]
    magnitude_params, magnitude_speed = named[magnitude[0].name], named[magnitude[1].name]
    full_params = named["full"]["parameters"]
    summary = {
        "depth": depth,
        "num_blocks": num_blocks,
        "sls_row": fair["model"],
        "retrained": fair["retrained"],
        # The SLS row the differences use had the DepGraph rows' retraining (or none, as they).
        "retrain_epochs": retrain_epochs,
        # DepGraph's whole pruned backbone (what its users store) / SLS's task files.
        "storage_ratio_depgraph_over_sls": params_row["storage_bytes"] / task_row["storage_bytes"],
        # Kept-channel indices + PETL + head (a frozen, shared backbone) / SLS's task files.
        "storage_ratio_depgraph_indices_over_sls": params_row["storage_bytes_indices"] / task_row["storage_bytes"],
        "parameters_removed": {"sls": full_params - task_row["parameters"],
                               "depgraph_equal_parameters": full_params - params_row["parameters"],
                               "full": full_params},  # fmt: skip
        "equal_parameters": {"ratio": params_row["ratio"],
                             "accuracy_sls_minus_depgraph": fair["accuracy"] - params_row["accuracy"],
                             "accuracy_sls_minus_depgraph_magnitude": fair["accuracy"] - magnitude_params["accuracy"],
                             "sls_over_depgraph_throughput": task_row["throughput"] / params_row["throughput"],
                             "sls_over_depgraph_throughput_batch1":
                                 task_row["throughput_batch1"] / params_row["throughput_batch1"],
                             "depgraph_over_sls_flops": params_row["gflops"] / task_row["gflops"]},  # fmt: skip
        "equal_throughput": {"ratio": speed_row["ratio"], "sls_images_per_s": task_row["throughput"],
                             "depgraph_images_per_s": speed_row["throughput"],
                             # Below 1 when even MAX_RATIO is slower than SLS: no DepGraph ratio matches.
                             "depgraph_over_sls_throughput": speed_row["throughput"] / task_row["throughput"],
                             "accuracy_sls_minus_depgraph": fair["accuracy"] - speed_row["accuracy"],
                             "accuracy_sls_minus_depgraph_magnitude": fair["accuracy"] - magnitude_speed["accuracy"]},  # fmt: skip
    }
    out = Path(out) if out is not None else task_dir / "compare"
    result = {
        "task": str(task_dir),
        "out": str(out),
        "rows": rows,
        "summary": summary,
        "settings": {"metric": exp.task.metric,  # what each row's ``accuracy`` is: accuracy, mIoU, mAP
                     "ratios": ratios, "depths": depths, "retrain_epochs": retrain_epochs, "n_batches": n_batches,
                     "throughput_batch": batch_size, "img_size": img_size, "threads": torch.get_num_threads(),
                     "device": str(exp.runtime.device), "amp": exp.runtime.amp,
                     "task_retrain_epochs": record.retrain_epochs if task_retrained else None,
                     "retrain_strategy": (record.retrain_strategy or "clr") if retrain_epochs is not None else None,
                     "depgraph_retrain_strategies": sorted(depgraph_strategies),
                     "depgraph_round_to": ROUND_TO, "depgraph_importances": ["taylor", "magnitude"],
                     "depgraph_heads": heads, "depgraph_train": depgraph_train,
                     "depgraph_lr": depgraph_lr if depgraph_lr is not None else exp.config.lr},  # fmt: skip
    }
    write_text(out / "compare.csv", compare_csv(rows))
    plot_compare(out / "compare.png", rows, title=f"{record.backbone['model']} + {record.petl['method']} "
                                                  f"on {exp.config.data}: SLS vs DepGraph",
                 metric=exp.task.metric)  # fmt: skip
    write_json(out / "compare.json", result)
    return result
