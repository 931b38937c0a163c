"""SLS against DepGraph width pruning of the same PETL model, on one task.

:func:`compare` rebuilds a task's data from its record and measures, on the task's
test split:

- the full fine-tuned model (all N blocks);
- SLS: the saved task at its k (retrained as its run retrained it), the same k
  without retraining, and a few other depths (the fine-tuned model truncated; not
  retrained unless ``retrain_epochs`` is given);
- DepGraph (:mod:`sls.baselines.depgraph`: Taylor importance on a few training
  batches, one uniform ratio, attention head dims pruned, adapters and head kept) of
  the same fine-tuned model at (a) the ratio removing as many parameters as SLS's k,
  (b) the ratio whose measured throughput matches SLS's k, and (c) every ratio of
  ``ratios``. With ``retrain_epochs`` every DepGraph model is retrained for that many
  epochs (the PETL modules, re-inserted where pruning folded them away, and the head).

Retraining here is :func:`sls.train.train`'s schedule (warm-up, then cosine) from the
current values, at the task's learning rate: the pipeline's default ``clr`` strategy,
whatever strategy the task itself was retrained with.

Every model is measured as it is deployed (:func:`sls.export.deployable_model`: LoRA
and RepAdapter folded into the backbone's linears), all in one
:func:`sls.bench.throughput` run so a noisy machine hits them alike.

Equal throughput (b) is found by interpolation, not bisection: the DepGraph models at
the ``ratios`` and at the equal-parameter ratio are timed with SLS's model; the ratio
at which that measured curve (made non-decreasing in the ratio, against timing noise;
ratio 0 is the full model) reaches SLS's throughput is interpolated linearly between
the two ratios around it, or extrapolated from the last two, capped at
:data:`~sls.baselines.depgraph.MAX_RATIO`. The model at that ratio is then timed again
with all the others; the reported figures come from that final run.

Per-task storage in bytes: SLS keeps its task tensor file + ``record.json`` (the
shared backbone is not counted: every task reuses it); the full PETL model keeps the
PETL tensors of all N blocks + head + the record; DepGraph keeps its whole pruned
model (widths differ from the shared backbone's), as a ``.safetensors`` state dict.
"""

from __future__ import annotations

import copy
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
from sls.backbones import truncate
from sls.baselines.depgraph import MAX_RATIO, depgraph_prune, ratio_for_parameter_reduction
from sls.bench import parameter_count, state_dict_bytes, throughput
from sls.errors import ConfigError, TaskRecordError
from sls.experiment import Experiment, pruned_model
from sls.export import deployable_model
from sls.petl import head_parameter_names, petl_from_record
from sls.record import TaskRecord
from sls.report import plot_compare
from sls.runtime import Runtime
from sls.train import accuracy, train

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
CSV_COLUMNS = ("model", "method", "depth", "ratio", "matched", "retrained", "accuracy", "throughput", "speedup",
               "parameters", "storage_bytes")  # fmt: skip


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
                      generator=torch.Generator())


def _make_trainable(model: nn.Module, record: TaskRecord) -> nn.Module:
    """Train the task's PETL method and the head of a DepGraph model, re-inserting the
    method where the pruning folded it into the backbone (LoRA, RepAdapter): fresh
    modules start as an identity update, so retraining starts from the pruned model."""
    petl = petl_from_record(record.petl)
    if not any(petl.is_petl_param(name) for name, _ in model.named_parameters()):
        return petl.apply(model)
    head = head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(petl.is_petl_param(name) or name in head)
    return model


def _retrain(model: nn.Module, exp: Experiment, epochs: int, desc: str) -> None:
    cfg = exp.config
    # The task's own schedule; warm-up is scaled when the epochs differ.
    warmup = cfg.warmup_epochs
    if warmup is not None:
        warmup = float(warmup) * epochs / max(1, exp.retrain_epochs)
    with seeded(cfg.seed):
        train(model, exp.train_loader, epochs=epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=warmup,
              min_lr=cfg.min_lr, desc=desc, progress=cfg.progress, runtime=exp.runtime)  # fmt: skip


def _rows(candidates: list[_Candidate], exp: Experiment, *, batch_size: int) -> list[dict]:
    """Accuracy, throughput (one run), parameters and storage of every candidate."""
    unique = {id(c.model): c.model for c in candidates}  # a model listed twice is measured once
    rates = throughput({str(key): model for key, model in unique.items()}, batch_size=batch_size,
                       img_size=exp.backbone.img_size, runtime=exp.runtime)  # fmt: skip
    accuracies = {key: accuracy(model, exp.test_loader, desc="test", progress=exp.config.progress, runtime=exp.runtime)
                  for key, model in unique.items()}  # fmt: skip
    full_rate = rates[str(id(candidates[0].model))]
    return [
        {
            "model": c.name,
            "method": c.method,
            "depth": c.depth,
            "ratio": None if c.ratio is None else round(c.ratio, 4),
            "matched": c.matched,
            "retrained": c.retrained,
            "accuracy": accuracies[id(c.model)],
            "throughput": rates[str(id(c.model))],
            "speedup": rates[str(id(c.model))] / full_rate,
            "parameters": parameter_count(c.model),
            "storage_bytes": c.storage_bytes,
        }
        for c in candidates
    ]


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
        throughput_batch: batch size of the timing; default: the task's.
        progress: progress bars and a line per step.
        out: folder of ``compare.json``, ``compare.csv`` and ``compare.png``;
            default: ``<task_dir>/compare``.
        runtime: where and how every model runs and is timed (default: the CPU, float32).

    Returns:
        ``rows`` (one dict per model: accuracy in [0, 1], images/s, speed-up over the
        full model, parameters, per-task storage bytes), ``summary`` (the figures
        at equal parameters and equal throughput, the storage ratio) and
        ``settings``; also written to ``compare.json``.

    Raises:
        ConfigError: a ratio or depth out of range, or a PETL method DepGraph
            cannot prune (Convpass).
        TaskRecordError: an unpruned or incomplete task, or another backbone.
    """
    task_dir = Path(task_dir)
    ratios = sorted({float(r) for r in ratios})
    if any(not 0 < r <= MAX_RATIO for r in ratios):
        raise ConfigError(f"DepGraph ratios must be in (0, {MAX_RATIO}], got {', '.join(map(str, ratios))}")
    if retrain_epochs is not None and retrain_epochs < 1:
        raise ConfigError(f"--retrain-epochs must be >= 1, got {retrain_epochs}")
    exp, record = Experiment.from_record(task_dir, weights=weights, runtime=runtime or Runtime(),
                                         overrides={"progress": progress})  # fmt: skip
    if "prune" not in record.stages:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    with seeded(record.seed):
        return _compare(task_dir, exp, record, ratios=ratios, depths=depths, retrain_epochs=retrain_epochs,
                        n_batches=n_batches, throughput_batch=throughput_batch, out=out)


def _compare(task_dir: Path, exp: Experiment, record: TaskRecord, *, ratios: list[float], depths: list[int] | None,
             retrain_epochs: int | None, n_batches: int, throughput_batch: int | None, out) -> dict:  # fmt: skip
    task_retrained = "retrain" in record.stages
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
        unretrained = truncate(copy.deepcopy(finetuned), depth)
        sls_fair = _Candidate(f"SLS k={depth} no retrain", "sls", deployable_model(unretrained), depth,
                              storage_bytes=task_tensor_bytes(unretrained) + record_bytes)  # fmt: skip
        candidates.append(sls_fair)
    if retrain_epochs is not None:
        sls_fair = sls_task
    for other in depths:
        if other in (depth, num_blocks):
            continue
        log(f"SLS at k={other}")
        model = truncate(copy.deepcopy(finetuned), other)
        if retrain_epochs is not None:
            _retrain(model, exp, retrain_epochs, f"retrain SLS k={other}")
        candidates.append(_Candidate(f"SLS k={other}", "sls", deployable_model(model), other,
                                     retrained=retrain_epochs is not None,
                                     storage_bytes=task_tensor_bytes(model) + record_bytes))  # fmt: skip

    # DepGraph prunes the deployable fine-tuned model: LoRA and RepAdapter are folded
    # first (exact), so parameters are counted on the same footing as SLS's.
    base = full.model
    target = parameter_count(base) - parameter_count(sls_task.model)
    log(f"DepGraph: searching the ratio that removes {target} parameters")
    ratio_params = ratio_for_parameter_reduction(base, importance_loader, target)

    def depgraph(ratio: float, name: str, matched: str | None = None) -> _Candidate:
        log(f"DepGraph at ratio {ratio:.4f}")
        model = depgraph_prune(base, importance_loader, ratio=ratio, n_batches=n_batches)
        if retrain_epochs is not None:
            _retrain(_make_trainable(model, record), exp, retrain_epochs, f"retrain {name}")
        deployable = deployable_model(model)
        return _Candidate(name, "depgraph", deployable, num_blocks, ratio=ratio, matched=matched,
                          retrained=retrain_epochs is not None, storage_bytes=state_dict_bytes(deployable))  # fmt: skip

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
    candidates += [by_params, by_speed, *grid]

    log("measuring every model: throughput in one run, then test accuracy")
    rows = _rows(candidates, exp, batch_size=batch_size)
    named = {row["model"]: row for row in rows}
    fair, task_row = named[sls_fair.name], named[sls_task.name]
    params_row, speed_row = named[by_params.name], named[by_speed.name]
    full_params = named["full"]["parameters"]
    summary = {
        "depth": depth,
        "num_blocks": num_blocks,
        "sls_row": fair["model"],
        "retrained": fair["retrained"],
        "storage_ratio_depgraph_over_sls": params_row["storage_bytes"] / task_row["storage_bytes"],
        "parameters_removed": {"sls": full_params - task_row["parameters"],
                               "depgraph_equal_parameters": full_params - params_row["parameters"],
                               "full": full_params},  # fmt: skip
        "equal_parameters": {"ratio": params_row["ratio"],
                             "accuracy_sls_minus_depgraph": fair["accuracy"] - params_row["accuracy"]},  # fmt: skip
        "equal_throughput": {"ratio": speed_row["ratio"], "sls_images_per_s": task_row["throughput"],
                             "depgraph_images_per_s": speed_row["throughput"],
                             # Below 1 when even MAX_RATIO is slower than SLS: no DepGraph ratio matches.
                             "depgraph_over_sls_throughput": speed_row["throughput"] / task_row["throughput"],
                             "accuracy_sls_minus_depgraph": fair["accuracy"] - speed_row["accuracy"]},  # fmt: skip
    }
    out = Path(out) if out is not None else task_dir / "compare"
    result = {
        "task": str(task_dir),
        "out": str(out),
        "rows": rows,
        "summary": summary,
        "settings": {"ratios": ratios, "depths": depths, "retrain_epochs": retrain_epochs, "n_batches": n_batches,
                     "throughput_batch": batch_size, "img_size": img_size, "threads": torch.get_num_threads(),
                     "device": str(exp.runtime.device), "amp": exp.runtime.amp,
                     "task_retrain_epochs": record.retrain_epochs if task_retrained else None},  # fmt: skip
    }
    write_text(out / "compare.csv", compare_csv(rows))
    plot_compare(out / "compare.png", rows, title=f"{record.backbone['model']} + {record.petl['method']} "
                                                  f"on {exp.config.data}: SLS vs DepGraph")  # fmt: skip
    write_json(out / "compare.json", result)
    return result
