"""Many classification tasks over one shared backbone in memory: the core of ``sls serve``.

A task folder is a few PETL tensors, a head and k. :class:`TaskPool` builds each distinct
backbone (timm name, weights, input size, options) once, frozen, and every task as a
:func:`~sls.backbones.shared_copy` of it: the copy shares every frozen backbone tensor's
storage and owns only the task's PETL modules (LoRA and RepAdapter left unmerged, so
nothing of the backbone is copied), its head and its cut at k. Its predictions are those
of :func:`sls.experiment.load_task` on the same images, bit for bit (tested).

Why unmerged: folding LoRA or RepAdapter into the weights is free at inference only for
a model that owns its weights; here the weights are shared by every task, so each task's
update runs beside them (the small per-request cost of the adapters' extra matmuls;
``bench/serve_load.py`` measures it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sls.artifact import check_fingerprint, load_tensors, record_weights
from sls.backbones import BackboneInfo, create_backbone, shared_copy, truncate
from sls.data import make_transform
from sls.data.store import ModelTransform
from sls.errors import TaskRecordError
from sls.petl import petl_from_record, trainable_state
from sls.record import TaskRecord, read_record
from sls.runtime import Runtime


@dataclass
class ServedTask:
    """One task in the pool: its model over the shared backbone, and how to feed it."""

    name: str
    folder: Path
    record: TaskRecord
    model: nn.Module
    transform: ModelTransform
    classes: list[str]
    backbone_key: tuple

    def describe(self) -> dict:
        """What ``GET /v1/tasks`` says of it."""
        own = sum(t.numel() * t.element_size() for t in trainable_state(self.model).values())
        return {"name": self.name, "backbone": self.record.backbone["model"], "k": int(self.record.depth),
                "blocks": self.record.num_blocks, "classes": self.classes, "task_bytes": own,
                "img_size": self.transform.img_size}  # fmt: skip


@dataclass
class TaskPool:
    """Tasks by name over one frozen backbone per distinct backbone.

    Args:
        runtime: where the models run (default: the CPU, float32).
    """

    runtime: Runtime = field(default_factory=Runtime)
    tasks: dict[str, ServedTask] = field(default_factory=dict)
    backbones: dict[tuple, tuple[nn.Module, BackboneInfo]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, folder: str | Path, name: str | None = None) -> ServedTask:
        """Load the task folder ``folder`` (pruned; the retrained tensors when it has them)
        under ``name`` (default: the folder's name); a name already served is replaced.

        Raises:
            TaskRecordError: not a pruned classification task, or another backbone than its
                record's fingerprint says.
        """
        folder = Path(folder)
        record = read_record(folder)
        if "prune" not in record.stages:
            raise TaskRecordError(f"{folder} is not pruned yet; run `sls prune {folder}` first")
        if record.config.task != "classification":
            raise TaskRecordError(f"{folder} is a {record.config.task} task; the pool serves classification tasks")
        saved = record.backbone
        weights = record_weights(record)
        key = (saved["model"], str(weights), int(saved["img_size"]), repr(sorted((saved.get("model_kwargs") or {}).items())))
        with self._lock:
            if key not in self.backbones:
                base, info = create_backbone(saved["model"], num_classes=record.num_classes, weights=weights,
                                             img_size=int(saved["img_size"]), model_kwargs=saved.get("model_kwargs"))  # fmt: skip
                for param in base.parameters():  # the shared part: nothing of it trains or changes
                    param.requires_grad_(False)
                self.backbones[key] = (self.runtime.place(base.eval()), info)
            base, info = self.backbones[key]
        check_fingerprint(info.fingerprint, record, folder, info.weights)
        model = shared_copy(base)  # every backbone tensor shared, the modules its own
        model.reset_classifier(record.num_classes)  # the task's head (its values load below)
        petl_from_record(record.petl).apply(model)
        model = load_tensors(truncate(model, int(record.depth)), folder, record).eval()
        self.runtime.place(model)
        transform = make_transform(int(saved["img_size"]), tuple(saved["mean"]), tuple(saved["std"]),
                                   saved.get("interpolation", "bicubic"))  # fmt: skip
        task = ServedTask(name or folder.name, folder, record, model, transform,
                          record.classes or [str(c) for c in range(record.num_classes)], key)  # fmt: skip
        with self._lock:
            self.tasks[task.name] = task
        return task

    @torch.inference_mode()
    def predict(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, classes)`` (float32, CPU) of preprocessed ``images`` for task ``name``."""
        task = self.tasks[name]
        device = next(task.model.parameters()).device
        with self.runtime.autocast(device):
            logits = task.model(self.runtime.inputs(images, device))
        return logits.float().softmax(dim=-1).cpu()

    def shared_bytes(self) -> int:
        """Bytes of the backbones' tensors, held once whatever the number of tasks."""
        return sum(sum(p.numel() * p.element_size() for p in base.parameters()) for base, _ in self.backbones.values())
