"""Image classification: one label per image (the paper's task, and the default)."""

from __future__ import annotations

import numpy as np
from torch import nn

from sls.backbones import block_features
from sls.data import ImageDataset, load_dataset, make_splits, stratified_subset
from sls.tasks import TaskType, register_task
from sls.train import predict


@register_task
class Classification(TaskType):
    """A timm classifier's own head; top-1 accuracy; each block's pooled token (CLS, or
    the mean token) against the image's label."""

    name = "classification"
    metric = "accuracy"

    def load_data(self, spec: str):
        return load_dataset(spec)

    def classes(self, data) -> list[str]:
        return list(data.classes)

    def splits(self, data, *, train_size, test_size):
        return make_splits(data, train_size=train_size, test_size=test_size)

    def dataset(self, data, indices, transform, img_size, *, skip_bad=False, progress=False, cache=True):
        return ImageDataset(data, indices, transform, skip_bad=skip_bad, store=True, progress=progress, cache=cache)

    def analysed(self, data, train: np.ndarray, samples: int | None) -> np.ndarray:
        return stratified_subset(train, data.labels, samples)

    def build_model(self, encoder: nn.Module, num_classes: int, img_size: int) -> nn.Module:
        return encoder

    def backbone_classes(self, num_classes: int) -> int:
        return num_classes

    def evaluate(self, model, loader, *, desc="evaluate", progress=True, runtime=None) -> dict:
        logits, labels = predict(model, loader, desc=desc, progress=progress, runtime=runtime)
        return {"accuracy": float((logits.argmax(dim=1) == labels).float().mean())}

    def block_features(self, model, loader, *, samples=None, progress=True):
        return block_features(model, loader, progress=progress)

    def check_finetune(self, curve, value, num_classes):
        from sls.pipeline import check_finetune

        return check_finetune(curve, value, num_classes)
