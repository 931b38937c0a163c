"""Fine-tuning, retraining and evaluation loops (CPU or GPU)."""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sls.errors import ConfigError


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 1e-4,
    warmup_fraction: float = 0.1,
    min_lr_ratio: float = 0.01,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train the model's trainable parameters (PETL modules and head) with AdamW.

    The learning rate warms up linearly over the first ``warmup_fraction`` of the
    updates, then follows a cosine down to ``lr * min_lr_ratio`` (timm's scheduler,
    stepped per update). Frozen parameters stay untouched.

    Returns:
        the mean training loss of each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=lr * min_lr_ratio,
        warmup_t=int(math.ceil(warmup_fraction * total)),
        warmup_lr_init=lr * min_lr_ratio,
        t_in_epochs=False,
    )
    criterion = nn.CrossEntropyLoss()
    losses = []
    step = 0
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            running, seen = 0.0, 0
            for images, targets in loader:
                loss = criterion(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                scheduler.step_update(step)
                running += loss.item() * len(targets)
                seen += len(targets)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
            losses.append(running / seen)
    model.eval()
    return losses


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, *, desc: str = "evaluate", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample in loader order."""
    model.eval()
    logits, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        logits.append(model(images))
        labels.append(torch.as_tensor(targets))
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, loader: DataLoader, *, desc: str = "evaluate", progress: bool = True) -> float:
    """Top-1 accuracy on the loader's samples, in [0, 1]."""
    logits, labels = predict(model, loader, desc=desc, progress=progress)
    return float((logits.argmax(dim=1) == labels).float().mean())
