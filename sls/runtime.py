"""Where and how the models run: the device, mixed precision and the channels-last layout.

A :class:`Runtime` is passed explicitly to what runs a model (:func:`sls.train.train`,
:func:`sls.train.predict` / ``accuracy``, :func:`sls.bench.throughput`, the retraining
strategies, comparisons, the analysis); there is no process-wide runtime. Without one
those functions run float32 in the usual layout on the device the model is on.
:meth:`Runtime.from_options` builds one from the command-line options (``--device``,
``--amp``, ``--channels-last``) and :meth:`Runtime.place` moves a model to it.

Batches always go to the device the model's parameters are on, so a model placed
once runs there; a task made on one device resumes, evaluates and compares on
another (tensors are stored and loaded on the CPU).

Mixed precision (``amp``) is :func:`torch.autocast`: bfloat16 on CPU and on GPUs that
support it, float16 (with a gradient scaler while training) on older GPUs. Block
features for the layer criteria are always computed in float32 (see
:func:`sls.backbones.block_features`): ``amp`` speeds up training, evaluation and
inference, and leaves the scores that choose k to float32.

``compile`` runs the models through :func:`torch.compile` (training, evaluation, the
feature pass and throughput): the first call of each model and input shape compiles
(tens of seconds on a CPU), the later ones run the compiled code. Where the platform
cannot compile (no C++ compiler, an unsupported Python or device), the first call
says so in one warning and the model runs eagerly from then on: the results are the
same, only slower. ``bench/compile_cost.py`` measures compile time against time saved.

The channels-last layout changes only 4-D tensors: in a ViT or a Swin that is the
patch embedding's convolution and the input batch, so expect little from it on these
models; it is offered for the GPU path and measured in ``bench/gpu_throughput.py``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
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
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"--device {spec}: under torchrun each process takes its local GPU; use --device cuda "
                              "(or CUDA_VISIBLE_DEVICES to choose the GPUs)")  # fmt: skip
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
        device: where :meth:`place` puts a model (batches follow the model's device).
        amp: autocast the forward pass to 16-bit floats (see :meth:`amp_dtype`).
        channels_last: keep the model's 4-D weights and the input batches channels-last.
        compile: run the models through :func:`torch.compile` (see :meth:`compiled`).
    """

    device: torch.device = torch.device("cpu")
    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_options(cls, device: str = "auto", amp: bool = False, channels_last: bool = False,
                     compile: bool = False) -> Runtime:  # fmt: skip
        """The runtime of a command's ``--device`` (see :func:`resolve_device`), ``--amp``,
        ``--channels-last`` and ``--compile``."""
        return cls(device=resolve_device(device), amp=bool(amp), channels_last=bool(channels_last),
                   compile=bool(compile))  # fmt: skip

    def describe(self) -> dict:
        """What the record keeps of where a stage ran."""
        return {"device": str(self.device), "amp": self.amp, "channels_last": self.channels_last,
                "compile": self.compile and not COMPILE_FAILURES, "threads": torch.get_num_threads()}  # fmt: skip

    def compiled(self, model: nn.Module) -> nn.Module:
        """``model`` as the runtime runs it: itself, or with ``compile`` a
        :class:`CompiledModel` that compiles at its first call and falls back to eager
        (one warning) where compiling fails. The same module compiled twice shares
        torch's compiled code (its cache is keyed by the module and the input shapes)."""
        return CompiledModel(model) if self.compile else model

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

    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to the runtime's device (in place), channels-last when asked."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


COMPILE_FAILURES: list[str] = []
"""Why compiling failed in this process (one line each), for the record and the tests."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that say torch.compile could not compile (dynamo, inductor and its
    C++ / CUDA compilers), not that the model itself failed."""
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    return (dynamo.TorchDynamoException, inductor.InductorError, inductor.CppCompileError, inductor.CUDACompileError)


class CompiledModel(nn.Module):
    """``torch.compile(model)`` that falls back to ``model`` itself, with one warning, when
    compiling fails, at the first call or at a later recompile (a new input shape). Only a
    compiler's own errors fall back; the model's errors (out of memory included) are
    raised. Parameters and state are ``model``'s (nothing is copied). A failure is kept
    for the process (:data:`COMPILE_FAILURES`): later models run eagerly without trying."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._compiled = None if COMPILE_FAILURES else torch.compile(model)

    def forward(self, *args, **kwargs):
        if self._compiled is None:
            return self.model(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except _compile_errors() as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            COMPILE_FAILURES.append(reason)
            warnings.warn(f"--compile: torch.compile cannot compile here ({reason}); running eagerly", stacklevel=2)
            self._compiled = None
            return self.model(*args, **kwargs)
