"""Many tasks over one shared backbone in memory: the core of ``sls serve``.

A task folder is a few PETL tensors, a head and k. :class:`TaskPool` builds each distinct
backbone (timm name, weights, input size, options) once, frozen, and every task as a
:func:`~sls.backbones.shared_copy` of it: the copy shares every frozen backbone tensor's
storage and owns only the task's PETL modules (LoRA and RepAdapter left unmerged, so
nothing of the backbone is copied), its head (a classifier, or a dense task's segmentation
or detection head) and its cut at k. Its outputs are those of
:func:`sls.experiment.load_task` on the same images, bit for bit (tested).

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
from PIL import Image
from torch import nn

from sls._rng import seeded
from sls.artifact import check_fingerprint, load_tensors, record_weights
from sls.backbones import BackboneInfo, create_backbone, shared_copy, truncate
from sls.data import make_transform
from sls.data.files import to_rgb
from sls.data.store import ModelTransform
from sls.errors import TaskRecordError
from sls.petl import petl_from_record, trainable_state
from sls.record import RECORD_FILE, TaskRecord, read_record
from sls.runtime import Runtime
from sls.serve.mux import MuxGroup
from sls.tasks import TaskType, get_task
from sls.tasks.render import box_entries, boxes_of, mask_of, present_classes


@dataclass(eq=False)  # a task is itself (hashed by identity): the scheduler keys batches on it
class ServedTask:
    """One task in the pool: its model over the shared backbone, and how to feed it."""

    name: str
    folder: Path
    record: TaskRecord
    model: nn.Module
    transform: ModelTransform
    classes: list[str]
    backbone_key: tuple
    task_type: TaskType
    loaded_from: float = 0.0
    """The record's modification time when it was loaded (a reload replaces a changed task)."""
    signature: tuple | None = None
    """What it shares with the tasks it can be batched with (:meth:`MuxGroup.signature`)."""

    @property
    def img_size(self) -> int:
        return int(self.record.backbone["img_size"])

    def describe(self) -> dict:
        """What ``GET /v1/tasks`` says of it."""
        own = sum(t.numel() * t.element_size() for t in trainable_state(self.model).values())
        stored = sum(int(entry.get("bytes", 0)) for kind, entry in self.record.files.items() if kind == "task")
        return {"name": self.name, "type": self.task_type.name, "backbone": self.record.backbone["model"],
                "k": int(self.record.depth), "blocks": self.record.num_blocks, "classes": self.classes,
                "task_bytes": own, "storage_bytes": stored, "img_size": self.img_size,
                "metric": self.record.results.get("metric") or self.task_type.metric,
                "test": self.record.results.get("accuracy")}  # fmt: skip

    def answer(self, output, size: tuple[int, int], *, top_k: int = 5, threshold: float = 0.3) -> dict:
        """One image's answer from its row of :meth:`TaskPool.forward`'s output (``size``: the
        image's width and height): the ``top_k`` classes with their probabilities; the class
        of every pixel (a ``(height, width)`` uint8 array under ``"mask"``) and the classes
        present; or the boxes scored at least ``threshold``, in the image's pixels. These are
        what ``sls predict`` prints or writes for the same image."""
        if self.task_type.name == "segmentation":
            mask = mask_of(output, size)
            return {"mask": mask, "present": present_classes(mask, self.classes)}
        if self.task_type.dense:
            return {"boxes": box_entries(*boxes_of(output, size, self.img_size, threshold), self.classes)}
        probabilities, labels = output.topk(min(top_k, output.numel()))
        return {"label": int(labels[0]), "class": self.classes[int(labels[0])],
                "top": [{"label": int(c), "class": self.classes[int(c)], "probability": float(p)}
                        for p, c in zip(probabilities, labels)]}  # fmt: skip


def task_folders(paths: list[str | Path]) -> list[Path]:
    """The task folders ``paths`` name: each path is a task folder (it holds a record) or a
    folder of task folders (each sub-folder with a record, sorted by name)."""
    found = []
    for path in map(Path, paths):
        if (path / RECORD_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(sub for sub in path.iterdir() if (sub / RECORD_FILE).is_file())
        else:
            raise TaskRecordError(f"{path}: no such task folder")
    return found


@dataclass
class TaskPool:
    """Tasks by name over one frozen backbone per distinct backbone.

    Args:
        runtime: where the models run (default: the CPU, float32).
    """

    runtime: Runtime = field(default_factory=Runtime)
    mux: bool = True
    """Batch the requests of tasks of one backbone and PETL structure in one pass (:mod:`sls.serve.mux`)."""
    tasks: dict[str, ServedTask] = field(default_factory=dict)
    backbones: dict[tuple, tuple[nn.Module, BackboneInfo]] = field(default_factory=dict)
    placement: dict[str, tuple[MuxGroup, int]] = field(default_factory=dict)
    """Each task batched with others: its group and its index in it (replaced whole on a change)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _regroup(self) -> None:
        """Rebuild the groups whose members changed (called under the lock)."""
        if not self.mux:
            return
        by_signature: dict[tuple, list[ServedTask]] = {}
        for task in self.tasks.values():
            if task.signature is not None:
                by_signature.setdefault(task.signature, []).append(task)
        current = {id(group): group for group, _ in self.placement.values()}
        placement = {}
        for members in by_signature.values():
            if len(members) < 2:
                continue
            group = next((g for g in current.values() if [id(t) for t in g.tasks] == [id(t) for t in members]), None)
            if group is None:
                group = MuxGroup(self.backbones[members[0].backbone_key][0], members, self.runtime)
            placement |= {task.name: (group, index) for index, task in enumerate(members)}
        self.placement = placement

    def add(self, folder: str | Path, name: str | None = None, *, regroup: bool = True) -> ServedTask:
        """Load the task folder ``folder`` (pruned; the retrained tensors when it has them)
        under ``name`` (default: the folder's name); a name already served is replaced.
        ``regroup=False`` leaves the groups of shared passes to the caller (:meth:`sync`
        rebuilds them once for all the folders it loads).

        Raises:
            TaskRecordError: not a pruned task, or another backbone than its record's
                fingerprint says.
        """
        folder = Path(folder)
        loaded_from = (folder / RECORD_FILE).stat().st_mtime if (folder / RECORD_FILE).is_file() else 0.0
        record = read_record(folder)
        if "prune" not in record.stages:
            raise TaskRecordError(f"{folder} is not pruned yet; run `sls prune {folder}` first")
        task_type = get_task(record.config.task, **record.config.task_options)
        saved = record.backbone
        weights = record_weights(record)
        key = (
            saved["model"],
            str(weights),
            int(saved["img_size"]),
            repr(sorted((saved.get("model_kwargs") or {}).items())),
        )
        with self._lock:
            if key not in self.backbones:  # built headless: each task brings its own head
                base, info = create_backbone(saved["model"], num_classes=0, weights=weights,
                                             img_size=int(saved["img_size"]), model_kwargs=saved.get("model_kwargs"))  # fmt: skip
                for param in base.parameters():  # the shared part: nothing of it trains or changes
                    param.requires_grad_(False)
                self.backbones[key] = (self.runtime.place(base.eval()), info)
            base, info = self.backbones[key]
        check_fingerprint(info.fingerprint, record, folder, info.weights)
        with seeded(record.config.seed):  # as load_task builds it (its values are then loaded)
            model = shared_copy(base)  # every backbone tensor shared, the modules its own
            model.reset_classifier(task_type.backbone_classes(record.num_classes))
            petl_from_record(record.petl).apply(model)
            model = task_type.build_model(model, record.num_classes, int(saved["img_size"]))
        model = load_tensors(truncate(model, int(record.depth)), folder, record).eval()
        self.runtime.place(model)
        transform = make_transform(int(saved["img_size"]), tuple(saved["mean"]), tuple(saved["std"]),
                                   saved.get("interpolation", "bicubic"))  # fmt: skip
        task = ServedTask(name or folder.name, folder, record, model, transform,
                          record.classes or [str(c) for c in range(record.num_classes)], key, task_type,
                          loaded_from)  # fmt: skip
        task.signature = MuxGroup.signature(task) if self.mux else None
        with self._lock:
            previous = self.tasks.get(task.name)
            self.tasks[task.name] = task
            try:
                if regroup:
                    self._regroup()
            except Exception:  # a folder that fails changes nothing: the task it would replace serves on
                if previous is None:
                    del self.tasks[task.name]
                else:
                    self.tasks[task.name] = previous
                raise
        return task

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (its backbone stays while another task uses it)."""
        with self._lock:
            task = self.tasks.pop(name)
            if not any(t.backbone_key == task.backbone_key for t in self.tasks.values()):
                del self.backbones[task.backbone_key]
            self._regroup()

    def sync(self, paths: list[str | Path]) -> dict[str, list]:
        """Bring the pool in line with the task folders under ``paths`` (see
        :func:`task_folders`) and with the folders of the tasks it serves: a new folder is
        added (named after it), a task whose record changed since it was loaded is loaded
        again, a task whose folder no longer holds a record is removed. A folder that fails
        to load is reported under ``failed`` and changes nothing (a task it would replace
        keeps serving).

        Returns:
            the names ``added``, ``replaced`` and ``removed``, and ``failed``: one
            ``{"folder", "error"}`` per folder that did not load.
        """
        report: dict[str, list] = {"added": [], "replaced": [], "removed": [], "failed": []}
        for name, task in list(self.tasks.items()):
            if not (task.folder / RECORD_FILE).is_file():
                self.remove(name)
                report["removed"].append(name)
        served = {task.folder.resolve(): name for name, task in self.tasks.items()}
        wanted = task_folders([p for p in map(Path, paths) if p.exists()]) + [t.folder for t in self.tasks.values()]
        for folder in dict.fromkeys(wanted):
            name = served.get(folder.resolve())
            try:
                if name is None:
                    if folder.name in self.tasks:
                        raise TaskRecordError(f"the name {folder.name!r} is served from {self.tasks[folder.name].folder}; "
                                              "rename one of the two folders")  # fmt: skip
                    report["added"].append(self.add(folder, regroup=False).name)
                elif (folder / RECORD_FILE).stat().st_mtime != self.tasks[name].loaded_from:
                    self.add(folder, name, regroup=False)
                    report["replaced"].append(name)
            except Exception as error:  # noqa: BLE001 - reported per folder; the others load
                report["failed"].append({"folder": str(folder), "error": " ".join(str(error).split())})
        try:  # once for every folder loaded
            with self._lock:
                self._regroup()
        except Exception as error:  # noqa: BLE001 - the tasks serve on, batched per task (a stale group is not used)
            report["failed"].append({"folder": "(shared passes)", "error": " ".join(str(error).split())})
        return report

    @torch.inference_mode()
    def forward(self, name: str | ServedTask, images: torch.Tensor):
        """Task ``name``'s output (or that of a task object, served or since replaced) for a
        batch of preprocessed ``images``, on the CPU: class probabilities ``(n, classes)``
        (float32), segmentation logits ``(n, classes, h, w)``, or one dict of boxes, labels
        and scores per image."""
        task = name if isinstance(name, ServedTask) else self.tasks[name]
        device = next(task.model.parameters()).device
        with self.runtime.autocast(device):
            out = task.model(self.runtime.inputs(images, device))
        if isinstance(out, torch.Tensor):
            out = out.float()
            return out.cpu() if task.task_type.dense else out.softmax(dim=-1).cpu()
        return [{key: value.cpu() for key, value in found.items()} for found in out]

    def predict(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, classes)`` (float32, CPU) of preprocessed ``images`` for
        the classification task ``name``."""
        return self.forward(name, images)

    def answer(self, name: str, images: list[Image.Image], *, top_k: int = 5, threshold: float = 0.3) -> list[dict]:
        """The Python entry point of a request: task ``name``'s answers (:meth:`ServedTask.answer`)
        for ``images`` (any PIL mode, converted as ``sls predict`` reads a file), in one batch."""
        task = self.tasks[name]
        images = [to_rgb(image) for image in images]
        out = self.forward(name, torch.stack([task.transform(image) for image in images]))
        return [task.answer(row, image.size, top_k=top_k, threshold=threshold) for row, image in zip(out, images)]

    def shared_bytes(self) -> int:
        """Bytes of the backbones' tensors, held once whatever the number of tasks."""
        return sum(sum(p.numel() * p.element_size() for p in base.parameters()) for base, _ in self.backbones.values())
