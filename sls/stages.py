"""The stages of a run over one task folder, and resuming a run where it stopped.

Each stage opens the folder through :meth:`Experiment.from_record` (the first one
builds it with :meth:`Experiment.from_config`), runs its part of :mod:`sls.pipeline`
and writes the folder back (tensors first, record last, atomically), so a killed run
resumes from its last completed stage and ends as an uninterrupted run would.

A later stage may change only its own settings (:data:`STAGE_SETTINGS`) and where it
runs (``device``, ``amp``, ``channels_last``); the record keeps, per stage, where it
ran and on how many processes. Under ``torchrun`` every process runs the stage
data-parallel and only the main one writes; a training stage (fine-tune, retrain,
prune with ``max_drop``) on another number of processes than the task's first
training would not reproduce it and is refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import torch

from sls import __version__, distributed
from sls._io import write_text
from sls._lock import describe_holder, folder_lock
from sls.artifact import collect_garbage, save_task, task_tensor_bytes
from sls.bench import measure, peak_rss_mb
from sls.config import NOT_COMPARED, RUNTIME_KEYS, RunConfig, config_fields, config_yaml, default_out_dir, nearest
from sls.errors import ConfigError
from sls.experiment import Experiment, pruned_model
from sls.petl import trainable_state
from sls.petl.merge import deployable_model
from sls.pipeline import (
    budget_search,
    decisions_per_alpha,
    finetune,
    prune,
    retrain_pruned,
    score_blocks,
)
from sls.record import RECORD_FILE, TaskRecord, read_record
from sls.report import plot_budget, plot_scores, plot_training, write_scores_csv
from sls.retrain import create_strategy
from sls.runtime import Runtime
from sls.tasks.render import plot_predictions

STAGES = ("finetune", "prune", "retrain", "evaluate")
STAGE_SETTINGS = {
    "prune": ("alpha", "alphas", "criterion", "tsne", "perplexity", "tsne_seed", "tsne_seeds", "depth", "max_drop",
              "val_samples", "analysis_samples", "force", "throughput_batch", "cache", "score_all"),
    "retrain": ("retrain_epochs", "retrain_strategy", "retrain_options"),
    "evaluate": ("throughput_batch",),
}
"""The settings a later stage may set (besides where it runs); the others were fixed by the fine-tune."""
CONFIG_FILE = "config.yaml"


def _open(task_dir: Path, stage: str, settings: dict, runtime: Runtime | None,
          handoff: dict | None = None) -> tuple[Experiment, TaskRecord]:  # fmt: skip
    allowed = (*STAGE_SETTINGS[stage], *RUNTIME_KEYS, "progress")
    for key in settings:
        if key not in allowed:
            where = "a setting of the fine-tune" if key in config_fields() else "not a setting"
            raise ConfigError(f"sls {stage} cannot set {key!r} ({where}){nearest(key, allowed)}; "
                              f"it takes {', '.join(STAGE_SETTINGS[stage])}")  # fmt: skip
    # Where a stage runs (and whether it caches features or scores every block) is not part of the task: not
    # given, it is the default, never the record's.
    settings = {"device": "auto", "amp": False, "channels_last": False, "compile": False, "cache": True,
                "score_all": False, **settings}
    if stage == "prune" and settings.get("depth") is not None and "max_drop" not in settings:
        settings["max_drop"] = None  # a given depth replaces the recorded --max-drop search
    trains = stage == "retrain" or (stage == "prune" and settings.get("max_drop") is not None)
    record = read_record(task_dir)
    if stage == "prune" and record.config.max_drop is not None and "max_drop" not in settings:
        trains = True
    if stage == "retrain" and distributed.active() and settings.get("retrain_strategy", record.config.retrain_strategy) == "distill":
        raise ConfigError("the distill retraining strategy runs in one process; start sls retrain without torchrun")
    if trains and record.world_size not in (None, distributed.world_size()):
        raise ConfigError(f"{task_dir} was trained on {record.world_size} process(es) and this is "
                          f"{distributed.world_size()}: training here would not reproduce an uninterrupted run; "
                          f"run it on {record.world_size} (torchrun --nproc-per-node) or start a new --out")  # fmt: skip
    exp, record = Experiment.from_record(task_dir, overrides=settings, runtime=runtime,
                                         reuse=(handoff or {}).get("experiment"))  # fmt: skip
    if handoff is not None:
        handoff["experiment"] = exp
    return exp, record


def _ran(record: TaskRecord, exp: Experiment, stage: str, started: float) -> None:
    record.config = exp.config
    record.runs.append({"stage": stage, **exp.runtime.describe(), "world_size": distributed.world_size(),
                        "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": peak_rss_mb()})  # fmt: skip



def _save(task_dir: Path, model, record: TaskRecord, **kwargs) -> None:
    """Commit a stage: its tensors, then the record, then the files drawn from the record."""
    def write() -> None:
        save_task(task_dir, model, record, **kwargs)
        render_views(task_dir, record)

    distributed.run_on_main(write)


def render_views(task_dir: Path, record: TaskRecord) -> None:
    """Write the files drawn from the record alone: ``config.yaml``, ``training.png``,
    ``scores.csv``, ``scores.png`` and ``budget.png`` (removed when the record has no
    budget search). A stage commits its record first and these after it, so a run
    killed between the two re-draws them when it resumes (:func:`run`)."""
    title = f"{record.backbone['model']} + {record.petl['method']} on {record.config.data}"
    write_text(task_dir / CONFIG_FILE, config_yaml(record.config, record.resolved))
    if record.training:
        plot_training(task_dir / "training.png", record.training, title=title,
                      metric=record.results.get("metric", "accuracy"))
    if record.scores is not None:
        write_scores_csv(task_dir / "scores.csv", record.scores, record.threshold, record.depth)
        plot_scores(task_dir / "scores.png", record.scores, record.threshold, record.depth,
                    title=f"SLS scores: {title}")  # fmt: skip
    else:  # a new fine-tune over an older task: its scores are gone with it
        for name in ("scores.csv", "scores.png"):
            (task_dir / name).unlink(missing_ok=True)
    if record.budget_search is not None:
        plot_budget(task_dir / "budget.png", record.budget_search, title=f"--max-drop {record.config.max_drop:g}: {title}")
    else:
        (task_dir / "budget.png").unlink(missing_ok=True)


@contextlib.contextmanager
def writing(task_dir: Path):
    """Hold ``task_dir``'s write lock (on the main process; the others do not write)."""
    with contextlib.ExitStack() as stack:
        previous = distributed.run_on_main(lambda: stack.enter_context(folder_lock(task_dir)))
        if previous and distributed.is_main():
            print(f"sls: {task_dir}: took over the lock of {describe_holder(previous)}, which ended without "
                  "releasing it", file=sys.stderr)  # fmt: skip
        yield


def _locked(stage):
    """Run a stage over its task folder (the first argument) holding the folder's lock."""
    @functools.wraps(stage)
    def locked(task_dir, *args, **kwargs):
        if not (Path(task_dir) / RECORD_FILE).is_file():
            read_record(task_dir)  # the one-line error, before a lock would create the folder
        check_writable(Path(task_dir))
        with writing(Path(task_dir)):
            return stage(task_dir, *args, **kwargs)

    return locked


def stage_finetune(config: RunConfig, *, runtime: Runtime | None = None, handoff: dict | None = None) -> TaskRecord:
    """Stage 1: fine-tune the PETL modules and head with all N blocks; save the task folder."""
    started = time.perf_counter()
    out = Path(config.out) if config.out else distributed.run_on_main(default_out_dir, config)  # one time stamp
    check_writable(out)
    with writing(out):
        if (out / RECORD_FILE).is_file() and not config.force:
            done = read_record(out).stages
            if done != ["finetune"]:
                raise ConfigError(f"{out} holds a task ({', '.join(done)} done) that a new fine-tune would discard; "
                                  "choose another --out, or pass --force to replace it")  # fmt: skip
        return _finetune(config, out, runtime, started, handoff)


def _finetune(config: RunConfig, out: Path, runtime: Runtime | None, started: float,
              handoff: dict | None) -> TaskRecord:  # fmt: skip
    exp = Experiment.from_config(config, runtime)
    if handoff is not None:  # the next stage of `sls run` goes on with this model and data
        handoff["experiment"] = exp
    full, curve = finetune(exp)
    classes = exp.task.classes(exp.data)
    check = exp.task.check_finetune(curve, full, len(classes))
    if not check["ok"]:
        exp.log(f"sls: warning: the fine-tune looks failed: {'; '.join(check['problems'])}")
    splits = exp.splits
    record = TaskRecord(
        backbone=exp.backbone.to_dict(), petl={"method": exp.petl.name, "hparams": exp.petl.hparams},
        num_classes=len(classes), depth=exp.backbone.num_blocks,
        config=dataclasses.replace(config, out=str(out)), classes=classes, seed=config.seed,
        data={"name": config.data, "source": exp.data.source, "splits": splits.describe(),
              "analysed_train_samples": int(len(exp.analysed)),
              "val_samples": int(len(exp.val_loader.dataset)) if exp.val_loader is not None else 0,
              "used_for": {"train": "fine-tuning, block scores, retraining",
                           "val": "training curves; choosing k under --max-drop (a stratified subset of at most "
                                  "val_samples)", "test": "every reported accuracy"},
              "split_rule": ("the dataset's own splits" if exp.data.splits is not None else
                             "stratified, seed 0: 20% test, 10% val, rest train") + "; then stratified subsets"},
        stages=["finetune"], results={"accuracy": {"full": full}, **_dense_metrics(exp, "full", "test full")},
        resolved=dict(exp.resolved),
        training={"finetune": curve}, finetune_check=check, sls_version=__version__,
    )  # fmt: skip
    _ran(record, exp, "finetune", started)
    record.config = dataclasses.replace(record.config, out=str(out))
    _save(out, exp.model, record, finetuned=exp.model)
    return record


@_locked
def stage_prune(task_dir: str | Path, *, progress: bool = True, runtime: Runtime | None = None,
                handoff: dict | None = None, **settings) -> TaskRecord:  # fmt: skip
    """Stage 2: score every block of the fine-tuned model (one cached pass), choose k
    (or take ``depth``), drop blocks k+1..N and measure the accuracy before retraining.

    ``settings``: any of :data:`STAGE_SETTINGS` ``["prune"]`` and the runtime keys. k is
    also reported for each of ``alphas``; with ``tsne_seeds`` > 1 the scores are the
    mean over that many t-SNE starts, T and k the rule on that mean (each start's own k
    in ``depths_per_seed``); with ``max_drop`` the
    depth is the one :func:`~sls.pipeline.budget_search` finds from SLS's k.
    A fine-tune that looks failed (near chance, loss barely fell) is refused unless
    ``depth`` or ``force`` is given.
    """
    started, task_dir = time.perf_counter(), Path(task_dir)
    exp, record = _open(task_dir, "prune", {**settings, "progress": progress}, runtime, handoff)
    config = exp.config
    failed = record.finetune_check is not None and not record.finetune_check["ok"]
    if failed and config.depth is None and not config.force:
        raise ConfigError(f"the fine-tune of {task_dir} looks failed ({'; '.join(record.finetune_check['problems'])}),"
                          " so its block scores would choose k from noise; fine-tune longer (--epochs, --lr), "
                          "or pass --depth K or --force to prune anyway")  # fmt: skip
    # A given depth needs no score (nor the feature pass) unless --score-all asks for them.
    scored = config.depth is None or config.max_drop is not None or config.score_all
    selector = score_blocks(exp) if scored else None
    record.clear_selection()
    k = config.depth if config.depth is not None else selector.depth_
    search = None
    if config.max_drop is not None:
        search = budget_search(exp, selector.depth_)
        record.budget_search, k = search.entry, search.depth
    pruned = prune(exp, k)
    record.criterion, record.alpha = config.criterion, config.alpha
    if selector is not None:
        record.tsne = {"backend": config.tsne, "perplexity": config.perplexity, "random_state": config.tsne_seed,
                       "seeds": len(selector.depths_per_seed_)}  # fmt: skip
        record.scores = [None if v != v else float(v) for v in selector.scores_]  # NaN: not scored
        record.scores_std = [None if v != v else float(v) for v in selector.scores_std_]
        record.scored_blocks = list(selector.scored_blocks_)
        record.depths_per_seed = [int(d) for d in selector.depths_per_seed_]
        record.threshold, record.selected_depth = float(selector.threshold_), int(selector.depth_)
        record.selection_reason, record.selection_margin = selector.reason_, selector.margin_
        record.passing_below, record.depth_per_alpha = selector.passing_below_, decisions_per_alpha(exp, selector)
    else:
        record.selection_reason = "given"
    record.depth, record.stages = int(k), ["finetune", "prune"]
    record.data["analysed_train_samples"] = int(len(exp.analysed))
    record.data["val_samples"] = int(len(exp.val_loader.dataset)) if exp.val_loader is not None else 0
    record.results["accuracy"]["pruned_no_retrain"] = exp.quality(pruned, exp.test_loader, "test pruned")
    _merge_metrics(record, _dense_metrics(exp, "pruned_no_retrain", "test pruned"))
    _ran(record, exp, "prune", started)
    if search is not None and k in search.retrained:
        # The search retrained k as the retrain stage would (same strategy, epochs, seed and
        # batch order): its tensors are the retrained task, so that stage is done here.
        tensors, curve, seconds = search.retrained[k]
        unexpected = pruned.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected or tensors.keys() != trainable_state(pruned).keys():
            raise RuntimeError(f"the search's retrained tensors do not fit k = {k}: {sorted(unexpected)[:3]}")
        _record_retrain(record, exp, curve)
        _ran(record, exp, "retrain", time.perf_counter() - seconds)
    _save(task_dir, pruned, record)
    return record


@_locked
def stage_retrain(task_dir: str | Path, *, progress: bool = True, runtime: Runtime | None = None,
                  handoff: dict | None = None, **settings) -> TaskRecord:  # fmt: skip
    """Stage 3: retrain the kept blocks' PETL modules and the head with the task's
    retraining strategy for its retraining epochs (``settings`` may change both)."""
    started, task_dir = time.perf_counter(), Path(task_dir)
    exp, record = _open(task_dir, "retrain", {**settings, "progress": progress}, runtime, handoff)
    # Retrained from the pruned fine-tune (a task retrained by its --max-drop search is
    # retrained again from there, not from its retrained tensors).
    pruned = prune(exp, int(record.depth)) if "retrain" in record.stages else pruned_model(exp, record, task_dir)
    curve = retrain_pruned(exp, pruned) if record.depth < exp.backbone.num_blocks else None
    _record_retrain(record, exp, curve)
    _ran(record, exp, "retrain", started)
    _save(task_dir, pruned, record)
    return record


def _record_retrain(record: TaskRecord, exp: Experiment, curve: list[dict] | None) -> None:
    """The record of a retraining (``curve`` None: k = N, nothing to retrain)."""
    cfg = exp.config
    if curve is not None:
        record.training["retrain"] = curve
        steps = exp.retrain_epochs * len(exp.train_loader)
        record.retrain_strategy = cfg.retrain_strategy
        record.retrain_options = create_strategy(cfg.retrain_strategy, **cfg.retrain_options).options
        record.retrain_epochs = exp.retrain_epochs
        record.retrain_budget = (f"{exp.retrain_epochs} epoch(s) over {len(exp.train_loader.dataset)} training images, "
                                 f"batch {cfg.batch_size}: {steps} updates, the same for every strategy (distill also "
                                 "runs the unpruned teacher forward at each update)")  # fmt: skip
    else:  # Nothing was pruned: the fine-tuned model is the task (as the --max-drop search assumes).
        record.retrain_strategy, record.retrain_options, record.retrain_epochs = None, {}, 0
        record.retrain_budget = "none: k = N, nothing was pruned, so the fine-tuned model is kept"
    record.resolved["retrain_epochs"] = exp.retrain_epochs
    record.stages = ["finetune", "prune", "retrain"]
    record.results.pop("throughput", None)
    record.results.pop("measurements", None)


@_locked
def stage_evaluate(task_dir: str | Path, *, progress: bool = True, runtime: Runtime | None = None,
                   handoff: dict | None = None, **settings) -> TaskRecord:  # fmt: skip
    """Stage 4: test accuracy of the task, throughput of the full and pruned models
    (same run, same batch), parameters and per-task storage."""
    started, task_dir = time.perf_counter(), Path(task_dir)
    exp, record = _open(task_dir, "evaluate", {**settings, "progress": progress}, runtime, handoff)
    pruned = pruned_model(exp, record, task_dir)
    cfg, results = exp.config, record.results
    key = "pruned_retrained" if "retrain" in record.stages else "pruned_no_retrain"
    results["accuracy"][key] = exp.quality(pruned, exp.test_loader, "test task")
    _merge_metrics(record, _dense_metrics(exp, key, "test task"))
    results["accuracy"].setdefault("pruned_retrained", None)
    # The models as deployed (LoRA and RepAdapter folded), timed and counted by one function.
    deployed = {"full": deployable_model(exp.model), "pruned": deployable_model(pruned)}
    figures = distributed.run_on_main(measure, deployed, img_size=exp.backbone.img_size,
                                      batch_sizes=(1, cfg.throughput_batch), runtime=exp.runtime)  # fmt: skip
    del deployed
    results["throughput"] = {"full": figures["full"]["throughput"][str(cfg.throughput_batch)],
                             "pruned": figures["pruned"]["throughput"][str(cfg.throughput_batch)],
                             "batch_size": cfg.throughput_batch, "unit": "images/s", "threads": torch.get_num_threads(),
                             "device": str(exp.runtime.device), "models": "deployable"}  # fmt: skip
    results["measurements"] = figures
    results["parameters"] = {"full": figures["full"]["parameters"], "pruned": figures["pruned"]["parameters"],
                             "task_tensors": sum(p.numel() for p in pruned.parameters() if p.requires_grad)}  # fmt: skip
    results["storage_bytes"] = {"task": task_tensor_bytes(pruned)}
    record.stages = [*[s for s in record.stages if s != "evaluate"], "evaluate"]
    _ran(record, exp, "evaluate", started)
    _save(task_dir, pruned, record)
    if exp.task.dense:  # a picture of the task's predictions on the first test images
        distributed.run_on_main(plot_predictions, task_dir / "predictions.png", exp.task, pruned,
                                exp.test_loader.dataset, record.classes)  # fmt: skip
    return record


def _dense_metrics(exp: Experiment, key: str, desc: str) -> dict:
    """A dense task's every metric of the evaluation ``desc`` as ``results`` entries
    (``metric``: what ``results.accuracy`` holds; ``metrics``: all of them); none for classification."""
    if not exp.task.dense:
        return {}
    return {"metric": exp.task.metric, "metrics": {key: exp.metrics[desc]}}


def _merge_metrics(record: TaskRecord, entries: dict) -> None:
    if entries:
        record.results["metric"] = entries["metric"]
        record.results.setdefault("metrics", {}).update(entries["metrics"])


def _recover(task_dir: Path, record: TaskRecord) -> None:
    collect_garbage(task_dir, record)
    render_views(task_dir, record)


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output folder {out}: {existing} is not a writable folder")


def changed_settings(config: RunConfig, record: TaskRecord) -> list[str]:
    """The settings in which a task record's run differs from ``config`` (sorted names;
    empty when ``config`` would resume it). Output folder, progress and runtime may differ."""
    mine = {k: v for k, v in config.to_dict().items() if k not in NOT_COMPARED}
    theirs = {k: v for k, v in record.config.to_dict().items() if k not in NOT_COMPARED}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def run(config: RunConfig, *, runtime: Runtime | None = None) -> TaskRecord:
    """All stages in order: fine-tune, prune (score blocks, choose k), retrain, evaluate.

    If ``config.out`` already holds a run with the same settings, the stages it
    completed are skipped (resume); where the models run (``device``, ``amp``,
    ``channels_last``, or ``runtime``) may differ, and every remaining stage follows
    the new choice. Another configuration there is refused.

    Returns:
        the task record (also written to ``<out>/record.json``).
    """
    started = time.perf_counter()
    config.validate()
    if distributed.active() and config.retrain and config.retrain_strategy == "distill":
        raise ConfigError("the distill retraining strategy runs in one process; start sls run without torchrun "
                          "or choose another --retrain-strategy")  # fmt: skip
    out = Path(config.out) if config.out else distributed.run_on_main(default_out_dir, config)  # one time stamp
    config = dataclasses.replace(config, out=str(out))
    runtime = runtime or Runtime.from_options(config.device, config.amp, config.channels_last, config.compile)
    later = {"progress": config.progress, **{key: getattr(config, key) for key in RUNTIME_KEYS}}
    prune_later = {**later, "force": config.force, "cache": config.cache, "score_all": config.score_all}
    check_writable(out)
    with writing(out):
        done: list[str] = []
        if (out / RECORD_FILE).is_file():
            previous = read_record(out)
            changed = changed_settings(config, previous)
            if changed:
                raise ConfigError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                                  "choose another --out or run the stage commands on it")  # fmt: skip
            done = list(previous.stages)
            to_train = "retrain" not in done and config.retrain or "prune" not in done and config.max_drop is not None
            if to_train and previous.world_size not in (None, distributed.world_size()):
                raise ConfigError(f"{out} was trained on {previous.world_size} process(es) and this is "
                                  f"{distributed.world_size()}: resuming here would not reproduce an uninterrupted run; "
                                  f"run it on {previous.world_size} (torchrun --nproc-per-node) or start a new --out")  # fmt: skip
            if done and config.progress:
                print(f"resuming {out}: stages {', '.join(done)} already done")
            # A run killed after a stage's record and before the files drawn from it left
            # those stale or missing, and maybe files that record no longer names.
            distributed.run_on_main(_recover, out, previous)
        # One backbone build, weights read and dataset read for the whole run: each stage
        # hands its fine-tuned model and data to the next (a resumed run starts from the folder).
        handoff: dict = {}
        if "finetune" not in done:
            stage_finetune(config, runtime=runtime, handoff=handoff)
        if "prune" not in done:
            done = stage_prune(out, runtime=runtime, handoff=handoff, **prune_later).stages  # --max-drop may retrain
        if config.retrain and "retrain" not in done:
            stage_retrain(out, runtime=runtime, handoff=handoff, **later)
        record = (stage_evaluate(out, runtime=runtime, handoff=handoff, **later) if "evaluate" not in done
                  else read_record(out))  # fmt: skip
    record.results["seconds"] = round(time.perf_counter() - started, 1)
    return record
