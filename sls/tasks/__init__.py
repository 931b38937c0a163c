"""Task types: what a run predicts, and everything that depends on it.

A task type (``--task``) is one :class:`TaskType` subclass registered here; the pipeline,
the record, ``compare``, ``export`` and ``predict`` reach the data, the model's head,
the loss, the metric and the features the criteria score only through it. So a fourth
task type is one module with one registered class:

- :class:`~sls.tasks.classification.Classification` (the default): a label per image,
  top-1 accuracy, each block's pooled token;
- :class:`~sls.tasks.segmentation.Segmentation`: a label per pixel, mIoU, each block's
  patch tokens against their cell's label;
- :class:`~sls.tasks.detection.Detection`: boxes, COCO mAP, each block's RoI-aligned
  features of the boxes against their class.

Every task keeps the same SLS: the criteria (:mod:`sls.criteria`) score ``(n, d)``
features against ``(n,)`` labels, whatever a sample is (an image, a patch, a box).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sls._registry import Registry
from sls.backbones import BlockFeatures
from sls.data import Splits
from sls.runtime import Runtime

EVAL_BATCH = 64


def loader_settings(dataset: Dataset, device: torch.device | str | None) -> dict:
    """Worker processes and pinned memory for a loader feeding a model on ``device``.

    A dataset read from a uint8 store (``dataset.store``) needs no worker: a batch is an
    index and one normalisation. One that decodes images per item gets, for a GPU, a
    worker per core (at most 8) so decoding overlaps the GPU's work; on the CPU the cores
    are the model's, so it decodes in this process. Workers are not kept between epochs:
    a new iterator draws its workers' seed from the loader's generator before the
    shuffle and a kept one does not, so keeping them would make a rewound generator
    (retraining, :func:`sls.pipeline.retrain_pruned`) shuffle differently the second time.
    Batches for a GPU are pinned (page-locked), so their copy to it can be asynchronous.
    """
    from sls.data.store import decode_workers

    cuda = device is not None and torch.device(device).type == "cuda"
    workers = 0 if getattr(dataset, "store", False) or not cuda else decode_workers(len(dataset))
    return {"num_workers": workers, "pin_memory": cuda}


class TaskType:
    """What a task type provides. Subclasses set the class attributes and override the methods.

    Attributes:
        name: the ``--task`` value.
        metric: the name of the primary metric (in [0, 1]; higher is better). The record
            keeps it under ``results.accuracy`` (the key classification always had) and
            names it in ``results.metric``; every figure of the task is in ``results.metrics``.
        dense: whether its targets are per pixel or per object (not one label per image).
    """

    name = ""
    metric = "accuracy"
    dense = False

    def __init__(self, **options) -> None:
        self.options = options

    # Data ---------------------------------------------------------------------------
    def load_data(self, spec: str):
        """The dataset ``spec`` names, as a source the task's datasets read."""
        raise NotImplementedError

    def classes(self, data) -> list[str]:
        """What each label of ``data`` means for this task."""
        raise NotImplementedError

    def splits(self, data, *, train_size: int | None, test_size: int | None) -> Splits:
        """The train / val / test indices of ``data``."""
        raise NotImplementedError

    def dataset(self, data, indices: np.ndarray, transform, img_size: int, *, skip_bad: bool = False,
                progress: bool = False, cache: bool = True) -> Dataset:  # fmt: skip
        """Torch view of ``indices`` of ``data``: (image tensor, target) pairs
        (``progress``: a bar while images are decoded into a store; ``cache``: a store too
        large for memory may be memory-mapped from the cache folder)."""
        raise NotImplementedError

    def loader(self, dataset: Dataset, *, batch_size: int = EVAL_BATCH, shuffle: bool = False,
               generator: torch.Generator | None = None, device: torch.device | str | None = None) -> DataLoader:  # fmt: skip
        """A loader of ``dataset`` (a fresh generator when none is given: the caller's stay
        untouched) for a model on ``device``: see :func:`loader_settings`."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator or torch.Generator(),
                          collate_fn=self.collate, **loader_settings(dataset, device))  # fmt: skip

    collate = None

    def analysed(self, data, train: np.ndarray, samples: int | None) -> np.ndarray:
        """The training images the blocks are scored on."""
        raise NotImplementedError

    # Model --------------------------------------------------------------------------
    def build_model(self, encoder: nn.Module, num_classes: int, img_size: int) -> nn.Module:
        """The task's model around a PETL-adapted timm ``encoder`` (its new modules are trainable)."""
        raise NotImplementedError

    def backbone_classes(self, num_classes: int) -> int:
        """The classifier width timm builds the encoder with (0: none, the task brings its head)."""
        return 0

    # Metrics and features -----------------------------------------------------------
    def evaluate(self, model: nn.Module, loader: DataLoader, *, desc: str = "evaluate", progress: bool = True,
                 runtime: Runtime | None = None) -> dict:  # fmt: skip
        """Every metric of the task on ``loader``; the primary one under :attr:`metric`."""
        raise NotImplementedError

    def block_features(self, model: nn.Module, loader: DataLoader, *, samples: int | None = None,
                       progress: bool = True) -> BlockFeatures:  # fmt: skip
        """Per block, the ``(n, d)`` features the criteria score and their ``(n,)`` labels (one pass)."""
        raise NotImplementedError

    def check_finetune(self, curve: list[dict], value: float, num_classes: int) -> dict:
        """Whether a fine-tune learned enough for its block scores to mean anything."""
        problems = []
        if not value > 0.05:
            problems.append(f"the test {self.metric} is {100 * value:.1f}%, barely above nothing")
        final = curve[-1]["loss"] if curve else math.nan
        return {"ok": not problems, "problems": problems, "chance": 0.0, "accuracy": value, "accuracy_split": "test",
                "final_loss": final, "uniform_loss": None}  # fmt: skip


_TASKS: Registry[type[TaskType]] = Registry("task type")
register_task = _TASKS.register


def get_task(name: str = "classification", **options) -> TaskType:
    """The registered task type ``name`` (one line listing the names when unknown)."""
    _load_builtins()
    return _TASKS.get(name)(**options)


def list_tasks() -> list[str]:
    _load_builtins()
    return _TASKS.names()


def _load_builtins() -> None:
    from sls.tasks import classification, detection, segmentation  # noqa: F401  (they register themselves)


__all__ = ["EVAL_BATCH", "TaskType", "get_task", "list_tasks", "register_task"]
