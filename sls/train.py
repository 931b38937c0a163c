"""Fine-tuning, retraining and evaluation loops (CPU or GPU)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sls import distributed
from sls.errors import ConfigError
from sls.runtime import Runtime, model_device


def to_device(targets, device: torch.device):
    """A batch's targets (a tensor, or a list of dicts of tensors) on ``device``."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    if isinstance(targets, (list, tuple)):
        return [to_device(t, device) for t in targets]
    if isinstance(targets, dict):
        return {key: to_device(value, device) for key, value in targets.items()}
    return torch.as_tensor(targets).to(device)


@dataclass(frozen=True)
class Schedule:
    """The optimiser settings of a run: AdamW at peak rate ``lr``, a linear warm-up over
    ``warmup_epochs`` (None: a tenth of the epochs), then a cosine down to ``min_lr``
    (None: ``lr / 100``)."""

    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None
    min_lr: float | None = None

    def train_kwargs(self) -> dict:
        """The keyword arguments of :func:`train` that this schedule sets."""
        return dict(lr=self.lr, weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs, min_lr=self.min_lr)


def parameter_groups(model: nn.Module, lr: float) -> list[dict]:
    """The trainable parameters as optimiser groups: one at ``lr``, and for a model with a
    ``head_lr_scale`` (a dense task's) its head's at ``lr * head_lr_scale``. A fresh dense
    head learns at the rate of a linear probe, while the PETL modules inside the frozen
    blocks, at that rate, drive every patch to the background class (measured on
    mnist-scenes: BENCHMARKS.md)."""
    scale = getattr(model, "head_lr_scale", None)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not scale:
        return [{"params": [p for _, p in trainable]}]
    head = [p for name, p in trainable if name.startswith("head.")]
    rest = [p for name, p in trainable if not name.startswith("head.")]
    return [group for group in ({"params": rest}, {"params": head, "lr": lr * scale}) if group["params"]]


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float | None = None,
    min_lr: float | None = None,
) -> CosineLRScheduler:
    """timm's cosine schedule, stepped per update (``step_update(n)`` after update n),
    from the optimiser's learning rate ``lr``: a linear warm-up from ``min_lr`` over
    ``warmup_epochs`` (default: a tenth of ``epochs``), then a cosine down to ``min_lr``
    (default: ``lr / 100``) at the last update."""
    lr = optimizer.param_groups[0]["lr"]
    floor = lr / 100 if min_lr is None else min_lr
    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps_per_epoch,
        lr_min=floor,
        warmup_t=int(math.ceil(warmup * steps_per_epoch)),
        warmup_lr_init=floor,
        t_in_epochs=False,
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 1e-4,
    warmup_epochs: float | None = None,
    min_lr: float | None = None,
    schedule: str = "cosine",
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    runtime: Runtime | None = None,
    after_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the model's trainable parameters (PETL modules and head) with AdamW.

    With ``schedule="cosine"`` the learning rate warms up linearly from ``min_lr`` over
    the first ``warmup_epochs`` (default: a tenth of ``epochs``), then follows a cosine
    down to ``min_lr`` (default: ``lr / 100``) at the last update (timm's scheduler,
    stepped per update, so short runs get a whole schedule too); with
    ``schedule="constant"`` it stays at ``lr``. Frozen parameters stay untouched.

    Batches go to the model's device, with ``runtime``'s mixed precision and memory
    layout (:mod:`sls.runtime`; default: float32). Inside a process group of
    several processes (:mod:`sls.distributed`) the model trains data-parallel: each
    process takes its share of every batch and the gradients are averaged.

    Args:
        objective: ``(images, targets) -> loss``, computed with ``model``; default:
            the cross-entropy of ``model(images)``. Not data-parallel: refused inside
            a process group.
        after_epoch: called with (epoch from 1, its mean loss) after each epoch, on
            every process (a validation pass); the model is back in training mode after it.

    Returns:
        the mean training loss of each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}; choose cosine or constant")
    if warmup_epochs is not None and not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"warm-up must last from 0 to fewer than the {epochs} epochs, got {warmup_epochs}")
    if min_lr is not None and not 0 <= min_lr <= lr:
        raise ConfigError(f"the final learning rate must be from 0 to lr = {lr:g}, got {min_lr:g}")
    if objective is not None and distributed.active():
        raise ConfigError("a custom training objective cannot run data-parallel; run it in one process")
    runtime, device = runtime or Runtime(), model_device(model)
    loader = distributed.shuffled_shard(loader)
    net = runtime.compiled(distributed.data_parallel(model))
    scaler = runtime.grad_scaler(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, lr), lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    scheduler = None
    if schedule == "cosine":
        scheduler = cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=len(loader),
                                    warmup_epochs=warmup_epochs, min_lr=min_lr)  # fmt: skip
    if objective is None and getattr(model, "is_dense_model", False):

        def objective(images: torch.Tensor, targets) -> torch.Tensor:  # a dense model computes its own loss
            return net(images, targets)
    elif objective is None:
        cross_entropy = nn.CrossEntropyLoss()

        def objective(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return cross_entropy(net(images), targets)
    losses = []
    step = 0
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            distributed.set_epoch(loader, epoch)
            running, seen = 0.0, 0
            for images, targets in loader:
                images, targets = runtime.inputs(images, device), to_device(targets, device)
                with runtime.autocast(device):
                    loss = objective(images, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if scheduler is not None:
                    scheduler.step_update(step)
                running += loss.item() * len(targets)
                seen += len(targets)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
            running, seen = distributed.sum_over_processes(running, seen)
            losses.append(running / seen)
            if after_epoch is not None:
                after_epoch(epoch + 1, losses[-1])
                model.train()
    model.eval()
    return losses


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, *, desc: str = "evaluate", progress: bool = True,
            runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Logits (float32, on the CPU) and labels of every sample in loader order.

    Batches go to the model's device, with ``runtime``'s mixed precision and memory
    layout (:mod:`sls.runtime`; default: float32). Inside a process group each process predicts
    its share and every process gets all of them back in order
    (:func:`sls.distributed.ordered_shard`).
    """
    runtime, device = runtime or Runtime(), model_device(model)
    loader, gather = distributed.ordered_shard(loader)
    model.eval()
    net = runtime.compiled(model)
    logits, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        with runtime.autocast(device):
            logits.append(net(runtime.inputs(images, device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return gather(torch.cat(logits)), gather(torch.cat(labels))


def accuracy(model: nn.Module, loader: DataLoader, *, desc: str = "evaluate", progress: bool = True,
             runtime: Runtime | None = None) -> float:  # fmt: skip
    """Top-1 accuracy on the loader's samples, in [0, 1] (see :func:`predict`)."""
    logits, labels = predict(model, loader, desc=desc, progress=progress, runtime=runtime)
    return float((logits.argmax(dim=1) == labels).float().mean())
