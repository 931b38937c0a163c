"""Semantic segmentation: a label per pixel, a linear head on the last kept block, mIoU.

The head is DINOv2's linear segmentation probe: BatchNorm and a 1x1 convolution on
the last kept block's patch map (after the final norm), upsampled bilinearly to the
image. The loss is the per-pixel cross-entropy, :data:`IGNORE_INDEX` left out.

The criterion's samples are patch cells (see :func:`cell_labels`): each block's map,
average-pooled to the grid of the model's last map (a ViT's patch grid, unchanged),
gives one feature per cell; a cell's label is its majority class. A class-balanced,
seeded sample of at most ``samples`` cells is scored, the same cells for every block.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from sls.backbones import BlockFeatures
from sls.data.dense import IGNORE_INDEX
from sls.errors import ConfigError, DataError
from sls.runtime import Runtime, model_device
from sls.tasks import register_task
from sls.tasks.dense import DenseModel, DenseTask, gather_blocks

PURITY = 0.5
"""A cell is scored when its majority class holds at least this share of its labelled pixels ..."""
MAX_IGNORED = 0.5
"""... and at most this share of its pixels are ignored."""
SAMPLE_SEED = 0


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 convolution: per-cell class logits from a ``width``-channel map."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.classify = nn.Conv2d(width, num_classes, kernel_size=1)
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.zeros_(self.classify.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(features))


class SegmentationModel(DenseModel):
    """Encoder + :class:`LinearSegHead`; ``model(images)`` gives ``(B, C, H, W)`` logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__(encoder)
        self.num_classes = num_classes
        self.head = self.make_head()
        self.head_width = self.width

    def make_head(self) -> nn.Module:
        return LinearSegHead(self.width, self.num_classes)

    @torch.no_grad()
    def narrow_inputs(self, kept: torch.Tensor) -> None:
        """Keep only the head's input channels ``kept`` (the encoder's residual channels
        a width pruning kept, in order): the BatchNorm's weight, bias and running
        statistics and the 1x1 convolution's inputs. In place; ``head_width`` follows."""
        kept = torch.as_tensor(kept, dtype=torch.long)
        norm, classify = self.head.norm, self.head.classify
        index = kept.to(norm.weight.device)
        for name in ("weight", "bias"):
            param = getattr(norm, name)
            if param is not None:
                setattr(norm, name, nn.Parameter(param.index_select(0, index).clone(), param.requires_grad))
        for name in ("running_mean", "running_var"):
            buffer = getattr(norm, name)
            if buffer is not None:
                setattr(norm, name, buffer.index_select(0, index).clone())
        norm.num_features = len(kept)
        weight = classify.weight
        classify.weight = nn.Parameter(weight.index_select(1, index).clone(), weight.requires_grad)
        classify.in_channels = len(kept)
        self.head_width = len(kept)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = F.interpolate(self.head(self.feature_map(images)), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)  # fmt: skip
        if targets is None:
            return logits
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows the true class, columns the predicted; ignored pixels left out."""
    keep = target != IGNORE_INDEX
    if (target[keep] >= num_classes).any() or (target[keep] < 0).any():
        raise DataError(f"a mask holds a label outside 0..{num_classes - 1} (and {IGNORE_INDEX}, ignored)")
    index = target[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU (mean IoU over the classes present in the labels or the predictions), pixel
    accuracy, and the IoU of each class (None for a class in neither)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union)]
    present = [v for v in iou if v is not None]
    total = float(confusion.sum())
    return {"mIoU": float(np.mean(present)) if present else 0.0,
            "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0, "iou_per_class": iou}  # fmt: skip


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, loader, num_classes: int, *, desc: str = "evaluate",
                          progress: bool = True, runtime: Runtime | None = None) -> dict:  # fmt: skip
    """mIoU and pixel accuracy of ``model`` on the loader's images, at the input size."""
    runtime, device = runtime or Runtime(), model_device(model)
    model.eval()  # every process runs every image: a padded shard would count some twice
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    net = runtime.compiled(model)
    for images, masks in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        with runtime.autocast(device):
            logits = net(runtime.inputs(images, device))
        confusion += confusion_matrix(logits.argmax(dim=1).cpu(), masks, num_classes)
    return segmentation_metrics(confusion)


def cell_labels(mask: torch.Tensor, grid: tuple[int, int], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell of ``grid`` over a ``(H, W)`` mask: its majority label, and whether it is
    clean enough to score (majority >= :data:`PURITY` of its labelled pixels, ignored
    pixels <= :data:`MAX_IGNORED`). Row-major over the grid."""
    rows, cols = grid
    height, width = mask.shape
    if height % rows or width % cols:
        raise ConfigError(f"a {width}x{height} mask does not divide into {cols}x{rows} cells")
    cell_h, cell_w = height // rows, width // cols
    cells = mask.reshape(rows, cell_h, cols, cell_w).permute(0, 2, 1, 3).reshape(rows * cols, cell_h * cell_w)
    ignored = (cells == IGNORE_INDEX).sum(1)
    labelled = cells.clone()
    labelled[cells == IGNORE_INDEX] = num_classes  # one extra bin, not counted
    offsets = torch.arange(rows * cols)[:, None] * (num_classes + 1)
    counts = torch.bincount((labelled + offsets).reshape(-1), minlength=rows * cols * (num_classes + 1))
    counts = counts.reshape(rows * cols, num_classes + 1)[:, :num_classes]
    top, label = counts.max(dim=1)
    total = counts.sum(1)
    clean = (total > 0) & (top >= PURITY * total) & (ignored <= MAX_IGNORED * cell_h * cell_w)
    return label, clean


SAMPLE_KINDS = ("regions", "cells")


def choose_cells(labels: list[torch.Tensor], clean: list[torch.Tensor], samples: int | None,
                 seed: int = SAMPLE_SEED, kind: str = "cells") -> list[tuple[int, tuple[int, ...], int]]:  # fmt: skip
    """A class-balanced, seeded sample as ``(image, cells, label)``, sorted: with
    ``kind="cells"`` each clean cell on its own; with ``kind="regions"`` each image's
    clean cells of one class together (one sample per class an image shows). Every
    class present gets up to ``ceil(samples / classes)`` samples (all of a rarer class)."""
    candidates: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for image, (lab, ok) in enumerate(zip(labels, clean)):
        cells = torch.nonzero(ok).flatten().tolist()
        if kind == "cells":
            for cell in cells:
                candidates.setdefault(int(lab[cell]), []).append((image, (cell,)))
            continue
        by_class: dict[int, list[int]] = {}
        for cell in cells:
            by_class.setdefault(int(lab[cell]), []).append(cell)
        for label, members in by_class.items():
            candidates.setdefault(label, []).append((image, tuple(members)))
    if not candidates:
        raise DataError("no patch cell of the analysed images is clean enough to score (each is mixed or ignored)")
    rng = np.random.default_rng(seed)
    quota = None if samples is None else math.ceil(samples / len(candidates))
    chosen = []
    for label in sorted(candidates):
        cells = candidates[label]
        if quota is not None and len(cells) > quota:
            cells = [cells[i] for i in sorted(rng.choice(len(cells), size=quota, replace=False))]
        chosen += [(image, cell, label) for image, cell in cells]
    return sorted(chosen)


@register_task
class Segmentation(DenseTask):
    """Per-pixel labels: :class:`SegmentationModel`, mIoU, patch cells for the criteria."""

    name = "segmentation"
    metric = "mIoU"

    def __init__(self, samples: str = "regions", **options) -> None:
        if samples not in SAMPLE_KINDS:
            raise ConfigError(f"unknown segmentation samples {samples!r}; choose one of: {', '.join(SAMPLE_KINDS)}")
        if options:
            raise ConfigError(f"the segmentation task takes the option samples, not {', '.join(options)}")
        super().__init__(samples=samples)

    def build_model(self, encoder, num_classes, img_size):
        return SegmentationModel(encoder, num_classes)

    def evaluate(self, model, loader, *, desc="evaluate", progress=True, runtime=None) -> dict:
        return evaluate_segmentation(model, loader, model.num_classes, desc=desc, progress=progress, runtime=runtime)

    @torch.inference_mode()
    def block_features(self, model, loader, *, samples=None, progress=True) -> BlockFeatures:
        dataset, encoder = loader.dataset, model.encoder
        device = next(model.parameters()).device
        model.eval()
        size = dataset.img_size
        with torch.no_grad():
            grid = tuple(model.feature_map(torch.zeros(1, 3, size, size, device=device)).shape[-2:])
        masks = [dataset.target(i) for i in range(len(dataset))]
        per_cell = [cell_labels(mask, grid, model.num_classes) for mask in masks]
        chosen = choose_cells([p[0] for p in per_cell], [p[1] for p in per_cell], samples,
                              kind=self.options["samples"])  # fmt: skip
        return gather_cells(encoder, dataset, chosen, grid, batch_size=loader.batch_size, progress=progress)


def gather_cells(encoder: nn.Module, dataset, chosen: list[tuple[int, tuple[int, ...], int]],
                 grid: tuple[int, int], *, batch_size: int, progress: bool) -> BlockFeatures:  # fmt: skip
    """Every block's feature of the chosen ``(image, cells, label)`` samples (the mean over
    their cells), in one pass over the images that hold them (each block's map
    average-pooled to ``grid``)."""
    by_image: dict[int, list[tuple[int, ...]]] = {}
    for image, cells, _ in chosen:
        by_image.setdefault(image, []).append(cells)

    def pick(batch: list[int], feature_map: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(feature_map.float(), grid).flatten(2)  # (B, D, cells)
        return torch.stack([pooled[r, :, torch.tensor(cells)].mean(dim=-1)
                            for r, i in enumerate(batch) for cells in by_image[i]]).cpu()  # fmt: skip

    labels = np.array([label for _, _, label in chosen], dtype=np.int64)
    return gather_blocks(encoder, dataset, sorted(by_image), pick, labels, batch_size=batch_size, progress=progress)
