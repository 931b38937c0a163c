"""The one experiment builder: a run's data, loaders and model, from a config or a task folder.

:meth:`Experiment.from_config` builds a new run (fresh head and PETL modules, seeded);
:meth:`Experiment.from_record` rebuilds a task folder's run from its record, the same
way, with the fine-tuned tensors loaded, the backbone's fingerprint and the data's
splits checked against the record. Every command that opens a task folder to run its
model goes through :meth:`~Experiment.from_record`: the stages, ``compare``,
``analyze --task``, ``export`` and ``predict`` (those two without the data).

The model is placed on the :class:`~sls.runtime.Runtime`'s device; the caller's random
generators are left as they were (:func:`sls._rng.seeded`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader

from sls._rng import seeded
from sls.artifact import check_fingerprint, load_tensors, record_weights
from sls.backbones import BackboneInfo, create_backbone, pretrained_input_size, shared_copy, truncate
from sls.config import DEMO_IMG_SIZE, RunConfig, resolve
from sls.data import EMBEDDED_DATASETS, ImageSource, Splits, make_transform, stratified_subset
from sls.data.dense import DENSE_EMBEDDED, SCENE_SIDE
from sls.errors import ConfigError, DataError, ScoreError, TaskRecordError
from sls.petl import PETLMethod, create_petl, petl_from_record
from sls.record import TaskRecord, read_record
from sls.runtime import Runtime
from sls.tasks import TaskType, get_task

EVAL_BATCH = 64


@dataclass
class Experiment:
    """Everything a run builds before training: data, splits, loaders, backbone, PETL model."""

    config: RunConfig
    runtime: Runtime
    resolved: dict
    backbone: BackboneInfo
    petl: PETLMethod
    model: nn.Module
    task: TaskType = field(default_factory=get_task)
    data: ImageSource | None = None
    splits: Splits | None = None
    train_loader: DataLoader | None = None
    test_loader: DataLoader | None = None
    analysis_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    analysed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trainable tensors as initialised, before any training (the ``tfs`` strategy resets to them)."""
    metrics: dict[str, dict] = field(default_factory=dict)
    """Every metric of each :meth:`evaluate` so far, by its ``desc`` (the last one of each)."""

    def log(self, message: str) -> None:
        if self.config.progress:
            print(message)

    def evaluate(self, model: nn.Module, loader: DataLoader, desc: str, *, progress: bool | None = None) -> dict:
        """Every metric of the task on ``loader`` (the primary one under ``task.metric``)."""
        progress = self.config.progress if progress is None else progress
        self.metrics[desc] = self.task.evaluate(model, loader, desc=desc, progress=progress, runtime=self.runtime)
        return self.metrics[desc]

    def quality(self, model: nn.Module, loader: DataLoader, desc: str, *, progress: bool | None = None) -> float:
        """The task's primary metric on ``loader`` (accuracy, mIoU, mAP), in [0, 1]."""
        return float(self.evaluate(model, loader, desc, progress=progress)[self.task.metric])

    @property
    def epochs(self) -> int:
        return self.resolved["epochs"]

    @property
    def retrain_epochs(self) -> int:
        return self.resolved["retrain_epochs"]

    @classmethod
    def from_config(cls, config: RunConfig, runtime: Runtime | None = None) -> Experiment:
        """A new run: deterministic stratified splits, the model's transform, the backbone
        with a fresh head and PETL modules inserted (only they and the head train)."""
        config.validate()
        runtime = runtime or Runtime.from_options(config.device, config.amp, config.channels_last, config.compile)
        task = get_task(config.task, **config.task_options)
        data = task.load_data(config.data)
        classes = task.classes(data)
        splits = task.splits(data, train_size=config.train_samples, test_size=config.test_samples)
        resolved = resolve(config, embedded_data=config.data in EMBEDDED_DATASETS or config.data in DENSE_EMBEDDED,
                           pretrained_size=pretrained_input_size(config.model), n_train=len(splits.train),
                           demo_img_size=SCENE_SIDE if task.dense else DEMO_IMG_SIZE)  # fmt: skip
        model, backbone, petl, initial = _build_model(config, task, len(classes), config.model, config.weights,
                                                      resolved["img_size"], config.model_kwargs)  # fmt: skip
        if config.normalize == "imagenet":
            backbone = dataclasses.replace(backbone, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        exp = cls(config, runtime, resolved, backbone, petl, runtime.place(model), task, initial_state=initial)
        exp._attach_data(data, splits)
        exp.log(f"{backbone.model}: {backbone.num_blocks} blocks at {backbone.img_size}px; {config.data} "
                f"({task.name}): {len(splits.train)} train / {len(splits.test)} test images, {len(classes)} classes; "
                f"{exp.epochs} fine-tuning epoch(s) of {len(exp.train_loader)} steps on {runtime.device}")  # fmt: skip
        return exp

    @classmethod
    def from_record(cls, task_dir: str | Path, *, overrides: dict | None = None, runtime: Runtime | None = None,
                    weights: str | Path | None = None, with_data: bool = True, tensors: str | None = "finetuned",
                    reuse: Experiment | None = None) -> tuple[Experiment, TaskRecord]:  # fmt: skip
        """A task folder's run, rebuilt from its record with the fine-tuned tensors loaded.

        Args:
            overrides: settings that replace the record's (a later stage's options).
            runtime: where the model runs; default: the (overridden) config's device.
            weights: the backbone's weights file; default: the record's.
            with_data: also rebuild the data and loaders (and check the splits did not move).
            tensors: the kind of tensor file loaded into the model (``"finetuned"``; None:
                the fresh PETL modules and head).
            reuse: the experiment of the previous stage in this process (``sls run``): its
                fine-tuned model and its data are taken as they are (no second backbone
                build, weights read, fingerprint or dataset read) when they are this
                record's (same backbone fingerprint, PETL method and dataset).

        Raises:
            TaskRecordError: no fine-tuned run in the folder, or another backbone.
            DataError: the dataset's splits differ from the record's.
        """
        task_dir = Path(task_dir)
        record = read_record(task_dir)
        if "finetune" not in record.stages:
            raise TaskRecordError(f"{task_dir} holds no fine-tuned run; start with `sls finetune` or `sls run`")
        # Every override is applied as given, None included ('all', 'auto' on the command line).
        config = dataclasses.replace(record.config, **(overrides or {}))
        if with_data:  # export and predict need only the record's backbone and PETL method
            config.validate()
        runtime = runtime or Runtime.from_options(config.device, config.amp, config.channels_last, config.compile)
        saved = record.backbone
        resolved = {"img_size": int(saved["img_size"]), **record.resolved}
        resolved.setdefault("epochs", record.config.epochs)
        if "retrain_epochs" in (overrides or {}):  # a stage's own option wins over the recorded value
            resolved["retrain_epochs"] = overrides["retrain_epochs"] or resolved["epochs"]
        resolved.setdefault("retrain_epochs", config.retrain_epochs or resolved["epochs"])
        task = get_task(config.task, **config.task_options)
        shaping = ("model", "weights", "model_kwargs", "petl", "petl_options", "task", "task_options", "seed",
                   "img_size", "normalize", "data", "train_samples", "test_samples")  # fmt: skip
        same = (reuse is not None and tensors == "finetuned" and weights is None and with_data
                and reuse.backbone.fingerprint == saved["fingerprint"] and reuse.petl.hparams == record.petl["hparams"]
                and all(getattr(reuse.config, key) == getattr(config, key) for key in shaping))  # fmt: skip
        if same:  # the previous stage's fine-tuned model, as it is in memory
            model, backbone, petl, initial = reuse.model, reuse.backbone, reuse.petl, reuse.initial_state
        else:
            model, backbone, petl, initial = _build_model(config, task, record.num_classes, saved["model"],
                                                          weights or record_weights(record), int(saved["img_size"]),
                                                          saved.get("model_kwargs"), record.petl)  # fmt: skip
            check_fingerprint(backbone.fingerprint, record, task_dir, backbone.weights)
            backbone = dataclasses.replace(backbone, mean=tuple(saved["mean"]), std=tuple(saved["std"]),
                                           interpolation=saved.get("interpolation", backbone.interpolation))  # fmt: skip
            if tensors is not None:
                load_tensors(model, task_dir, record, tensors)
        exp = cls(config, runtime, resolved, backbone, petl, runtime.place(model.eval()), task, initial_state=initial)
        if with_data:
            data = reuse.data if same else task.load_data(config.data)
            splits = task.splits(data, train_size=config.train_samples, test_size=config.test_samples)
            recorded = record.data.get("splits")
            if recorded is not None and splits.describe() != recorded:
                raise DataError(f"the splits of {config.data} differ from those task {task_dir} was trained on; "
                                "the dataset changed since, so its figures would not be on the task's images")  # fmt: skip
            exp._attach_data(data, splits)
        return exp, record

    def _attach_data(self, data: ImageSource, splits: Splits) -> None:
        config, backbone = self.config, self.backbone
        if config.max_drop is not None and len(splits.val) == 0:
            raise ConfigError(f"--max-drop chooses k on a validation split, and {config.data} has none; give it one "
                              "(VTAB-1k val200.txt, a val/ folder, 'val' rows in a CSV split column) or leave out --max-drop")  # fmt: skip
        if config.depth is not None and not 1 <= config.depth <= backbone.num_blocks:
            raise ConfigError(f"--depth {config.depth} is out of range: the model has blocks 1..{backbone.num_blocks}")
        transform = make_transform(backbone.img_size, backbone.mean, backbone.std, backbone.interpolation)
        skip, task, size, device = config.skip_bad_images, self.task, backbone.img_size, self.runtime.device
        accepted = inspect.signature(task.dataset).parameters  # a task type written before the store takes neither
        extra = {key: value for key, value in (("progress", config.progress), ("cache", config.cache))
                 if key in accepted or any(p.kind is p.VAR_KEYWORD for p in accepted.values())}  # fmt: skip
        dataset = functools.partial(task.dataset, data, transform=transform, img_size=size, **extra)
        loader = functools.partial(task.loader, device=device)
        train_set, test_set = dataset(splits.train, skip_bad=skip), dataset(splits.test, skip_bad=skip)
        shuffled = torch.Generator().manual_seed(config.seed)
        self.train_loader = loader(train_set, batch_size=config.batch_size, shuffle=True, generator=shuffled)
        # The analysis pass sees every analysed training image once, in order, nothing dropped.
        self.analysed = task.analysed(data, train_set.indices, config.analysis_samples)
        self.analysis_loader = loader(dataset(self.analysed))
        few = len(self.analysed) <= 3 * config.perplexity and not task.dense  # dense tasks score cells or boxes
        if config.criterion == "sls" and config.depth is None and few:
            # Found now, not after the fine-tuning: t-SNE could not score the blocks.
            raise ScoreError(
                f"t-SNE with perplexity {config.perplexity:g} needs more than {3 * config.perplexity:g} samples, "
                f"got {len(self.analysed)} training images; use more images or a smaller perplexity"
            )
        self.test_loader = loader(test_set)
        skipped = train_set.skipped + test_set.skipped
        if len(splits.val):
            val = splits.val if task.dense else stratified_subset(splits.val, data.labels, config.val_samples)
            if task.dense and config.val_samples is not None:
                val = val[: config.val_samples]
            val_set = dataset(val, skip_bad=skip)
            self.val_loader = loader(val_set)
            skipped += val_set.skipped
        for item, reason in skipped:
            print(f"sls: skipped {data.item_name(item)}: {reason}")
        self.data, self.splits = data, splits


def _build_model(config: RunConfig, task: TaskType, num_classes: int, model_name: str, weights, img_size: int,
                 model_kwargs: dict | None, petl: dict | None = None) -> tuple[nn.Module, BackboneInfo, PETLMethod, dict]:  # fmt: skip
    """Backbone with a fresh head and the PETL modules, drawn from the run's seed, in the
    task's model; and the trainable tensors as drawn."""
    with seeded(config.seed):
        model, backbone = create_backbone(model_name, num_classes=task.backbone_classes(num_classes), weights=weights,
                                          img_size=img_size, drop_path_rate=config.drop_path,
                                          model_kwargs=model_kwargs)  # fmt: skip
        petl = create_petl(config.petl, **config.petl_options) if petl is None else petl_from_record(petl)
        petl.apply(model)
        model = task.build_model(model, num_classes, img_size)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return model, backbone, petl, initial



def load_task(task_dir: str | Path, *, weights: str | Path | None = None, stage: str = "pruned",
              runtime: Runtime | None = None) -> tuple[nn.Module, TaskRecord]:  # fmt: skip
    """Rebuild a task's model from the shared backbone and the task folder (no data needed).

    Args:
        task_dir: a task folder.
        weights: the backbone's weights file; default: the record's (the embedded
            model's cache for embedded models).
        stage: ``"pruned"`` (the task: k blocks) or ``"finetuned"`` (all N blocks
            with their PETL modules, before pruning).
        runtime: where the model goes (default: the CPU).

    Returns:
        the model in eval mode, and the record.

    Raises:
        TaskRecordError: the folder is incomplete or not pruned yet, or the backbone's
            fingerprint differs from the one the task was trained on.
    """
    if stage not in ("pruned", "finetuned"):
        raise TaskRecordError(f"unknown stage {stage!r}; choose one of: pruned, finetuned")
    exp, record = Experiment.from_record(task_dir, weights=weights, with_data=False, runtime=runtime or Runtime(),
                                         tensors="finetuned" if stage == "finetuned" else None)  # fmt: skip
    if stage == "finetuned":
        return exp.model, record
    if "prune" not in record.stages:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    return load_tensors(truncate(exp.model, int(record.depth)), task_dir, record).eval(), record


def pruned_model(exp: Experiment, record: TaskRecord, task_dir: Path) -> nn.Module:
    """A copy of the fine-tuned model cut to the record's k, with the task's tensors loaded
    (it shares the frozen backbone tensors with the fine-tuned model)."""
    if "prune" not in record.stages:
        raise TaskRecordError(f"{task_dir} is not pruned yet; run `sls prune {task_dir}` first")
    pruned = truncate(shared_copy(exp.model), int(record.depth))
    return load_tensors(pruned, task_dir, record).eval()
