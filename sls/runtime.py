"""Where and how the models run: the device, mixed precision and the channels-last layout.

The process has one active :class:`Runtime`, like its random seed: a run sets it from
its config (:func:`sls.pipeline.prepare` calls :func:`set_runtime`, next to seeding),
and :func:`sls.train.train`, :func:`sls.train.predict` / ``accuracy`` and
:func:`sls.bench.throughput` follow it, including when they are reached through
other modules (retraining strategies, the budget search, comparisons). The default
is float32 in the usual layout. :func:`use_runtime` sets one for a ``with`` block.

The device is not part of it: batches always go to the device the model's parameters
are on, so a caller places the model once (:meth:`Runtime.place`).

Mixed precision (``amp``) is :func:`torch.autocast`: bfloat16 on CPU and on GPUs that
support it, float16 (with a gradient scaler while training) on older GPUs. Block
features for the layer criteria are always computed in float32 (see
:func:`sls.backbones.block_features`): ``amp`` speeds up training, evaluation and
inference, and leaves the scores that choose k to float32.

The channels-last layout changes only 4-D tensors: in a ViT or a Swin that is the
patch embedding's convolution and the input batch, so expect little from it on these
models; it is offered for the GPU path and measured in ``bench/gpu_throughput.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sls.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """The device a run asks for: ``auto`` (CUDA when available, else CPU), ``cpu``,
    ``cuda`` (the current CUDA device: a distributed run sets it to its local rank's)
    or ``cuda:N``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec!r}: sls runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Runtime:
    """How the forward and backward passes run.

    Attributes:
        amp: autocast the forward pass to 16-bit floats (see :meth:`amp_dtype`).
        channels_last: keep the model's 4-D weights and the input batches channels-last.
    """

    amp: bool = False
    channels_last: bool = False

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """bfloat16 on CPU and on GPUs that have it, float16 on the others; None without amp."""
        if not self.amp:
            return None
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context of a forward pass on ``device`` (a no-op without amp)."""
        dtype = self.amp_dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A loss scaler, active only for float16 (bfloat16 has float32's range)."""
        return torch.amp.GradScaler(device.type, enabled=self.amp_dtype(device) == torch.float16)

    def inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of images on ``device``, in the memory layout the runtime asks for."""
        images = images.to(device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Move the model to ``device`` (in place), channels-last when asked."""
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


_active = Runtime()


def active_runtime() -> Runtime:
    """The runtime that training, prediction and throughput follow now."""
    return _active


def set_runtime(runtime: Runtime) -> Runtime:
    """Make ``runtime`` the process's runtime; returns the previous one."""
    global _active
    previous, _active = _active, runtime
    return previous


@contextlib.contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """``runtime`` is the process's runtime inside the ``with`` block, the previous one after."""
    previous = set_runtime(runtime)
    try:
        yield runtime
    finally:
        set_runtime(previous)
