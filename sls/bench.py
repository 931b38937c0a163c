"""Measurements: the one place every figure of speed, size and cost comes from.

:func:`measure` takes named models and gives, for each, in one run on the same input:

- throughput (images/s) at every batch size asked (batch 1 and a large batch by
  default): ``torch.utils.benchmark``'s ``blocked_autorange`` with at least
  ``min_time`` seconds per round, the models taking turns over ``rounds`` rounds so a
  slow spell of a noisy machine hits all of them alike (median of the rounds), after
  ``warmup_time`` seconds of untimed forwards; every timed call ends with the device's
  queue drained, so a GPU is timed for its work, not for launching it;
- latency at batch 1: percentiles (p50, p90, p99) of single synchronised forwards, at
  least 50 of them (with fewer than 100 calls p99 is close to the slowest call; the
  count is reported);
- parameters: their total, frozen and trainable alike;
- FLOPs per image: ``torch.utils.flop_counter`` (2 per multiply-add: linear layers,
  convolutions and attention, which it counts through a formula registered here for
  the CPU's fused attention kernel; element-wise ops, norms and softmax are not counted);
- peak memory of a forward at the largest batch: on CUDA, the allocator's peak above
  what was allocated before; elsewhere the peak of the bytes held by the tensors the
  forward creates, as PyTorch's dispatcher sees them (a fused op such as ``linear``,
  ``layer_norm`` or attention counts its output, not its internal temporaries or a
  kernel's workspace; ``how`` says which method measured). The parameters' bytes are
  reported beside it. On GPUs, float32 runs as PyTorch is set (TF32 off by default).

Callers pass the models as they are deployed (:func:`sls.petl.merge.deployable_model`:
LoRA and RepAdapter folded), so every command times and counts the same thing.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sls.runtime import Runtime, model_device, synchronize

DEFAULT_BATCH_SIZES = (1, 32)
LATENCY_PERCENTILES = (50, 90, 99)
MIN_TIME = 0.5
"""Default seconds of timed forwards per model and round (read at each call)."""
WARMUP_TIME = 0.5
"""Default seconds of untimed forwards before timing (read at each call)."""


def _forward_fn(model: nn.Module, inputs: torch.Tensor, device: torch.device, runtime: Runtime) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode(), runtime.autocast(device):
            model(inputs)
        synchronize(device)

    return forward


def _warm_up(forward: Callable[[], None], seconds: float, at_least: int = 2) -> None:
    start, calls = time.perf_counter(), 0
    while calls < at_least or time.perf_counter() - start < seconds:
        forward()
        calls += 1


def _seconds_per_call(forward: Callable[[], None], min_time: float) -> float:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="forward()", globals={"forward": forward}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def _inputs(batch_size: int, img_size: int | tuple[int, int], seed: int) -> torch.Tensor:
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def throughput(
    models: dict[str, nn.Module],
    *,
    batch_size: int,
    img_size: int | tuple[int, int],
    min_time: float | None = None,
    rounds: int = 3,
    warmup_time: float | None = None,
    seed: int = 0,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Images per second of each model at one batch size, measured in one run on the
    same input (see the module docstring for how). Each model runs on the device it
    is on, with ``runtime``'s precision and layout (default: float32)."""
    runtime = runtime or Runtime()
    min_time = MIN_TIME if min_time is None else min_time
    warmup_time = WARMUP_TIME if warmup_time is None else warmup_time
    batch = _inputs(batch_size, img_size, seed)
    forwards = {}
    for name, model in models.items():
        model.eval()
        device = model_device(model)
        forwards[name] = _forward_fn(runtime.compiled(model), runtime.inputs(batch, device), device, runtime)
        _warm_up(forwards[name], warmup_time)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, forward in forwards.items():
            seconds[name].append(_seconds_per_call(forward, min_time))
    return {name: batch_size / statistics.median(values) for name, values in seconds.items()}


def latency(
    model: nn.Module,
    *,
    img_size: int | tuple[int, int],
    min_time: float | None = None,
    warmup_time: float | None = None,
    seed: int = 0,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Milliseconds per synchronised batch-1 forward: mean and percentiles over at least
    ``min_time`` seconds (default: 3 x :data:`MIN_TIME`) of single calls, and at least 50 calls."""
    runtime = runtime or Runtime()
    min_time = 3 * MIN_TIME if min_time is None else min_time
    warmup_time = WARMUP_TIME if warmup_time is None else warmup_time
    model.eval()
    device = model_device(model)
    forward = _forward_fn(runtime.compiled(model), runtime.inputs(_inputs(1, img_size, seed), device), device, runtime)
    _warm_up(forward, warmup_time)
    times, start = [], time.perf_counter()
    while len(times) < 50 or time.perf_counter() - start < min_time:
        began = time.perf_counter()
        forward()
        times.append(time.perf_counter() - began)
    millis = 1000 * np.asarray(times)
    return {"mean": float(millis.mean()), **{f"p{q}": float(np.percentile(millis, q)) for q in LATENCY_PERCENTILES},
            "calls": len(times)}  # fmt: skip


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flops(model: nn.Module, *, img_size: int | tuple[int, int], runtime: Runtime | None = None) -> int:
    """FLOPs of one forward of one image (2 per multiply-add; see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    runtime = runtime or Runtime()
    model.eval()
    device = model_device(model)
    # torch counts the GPU attention kernels; the CPU's fused kernel needs the same formula.
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops})
    with torch.inference_mode(), counter:
        model(runtime.inputs(_inputs(1, img_size, 0), device))
    return int(counter.get_total_flops())


class _LiveTensorBytes(contextlib.AbstractContextManager):
    """The peak of the bytes held by the tensors created while it is active.

    A dispatch mode sees every tensor an operation returns; each storage is counted
    once while any tensor that the mode saw on it is alive, and released when the last
    of them is freed.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [tensors alive, bytes]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in torch.utils._pytree.tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        tracker._track(tensor)
                return out

        self._mode = Mode()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def peak_memory(model: nn.Module, *, batch_size: int, img_size: int | tuple[int, int],
                runtime: Runtime | None = None) -> dict[str, int | str]:  # fmt: skip
    """Peak bytes of one forward at ``batch_size`` above what was held before, and the
    parameters' bytes (see the module docstring for how each device is measured)."""
    runtime = runtime or Runtime()
    model.eval()
    device = model_device(model)
    inputs = runtime.inputs(_inputs(batch_size, img_size, 0), device)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), runtime.autocast(device):
            model(inputs)
        synchronize(device)
        return {"forward": int(torch.cuda.max_memory_allocated(device) - before), "parameters": parameters,
                "batch_size": batch_size, "how": "cuda allocator peak"}  # fmt: skip
    with torch.inference_mode(), runtime.autocast(device), _LiveTensorBytes() as tracker:
        model(inputs)
    return {"forward": int(tracker.peak), "parameters": parameters, "batch_size": batch_size,
            "how": "peak of live tensors"}  # fmt: skip


def measure(
    models: dict[str, nn.Module],
    *,
    img_size: int | tuple[int, int],
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    min_time: float | None = None,
    rounds: int = 3,
    warmup_time: float | None = None,
    runtime: Runtime | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Every figure of every model, measured in one run (see the module docstring).

    Returns:
        per model: ``parameters``, ``flops`` (per image), ``throughput`` (images/s keyed
        by the batch size as a string), ``latency_ms`` (batch 1: mean, p50, p90, p99,
        calls; present when 1 is among ``batch_sizes``) and ``peak_memory`` (at the
        largest batch: ``forward`` and ``parameters`` bytes).
    """
    runtime = runtime or Runtime()
    batch_sizes = sorted({int(b) for b in batch_sizes})
    say = progress or (lambda _message: None)
    results: dict[str, dict] = {
        name: {"parameters": parameter_count(model), "flops": flops(model, img_size=img_size, runtime=runtime),
               "throughput": {}}  # fmt: skip
        for name, model in models.items()
    }
    for batch_size in batch_sizes:
        say(f"timing {len(models)} model(s) at batch {batch_size}")
        rates = throughput(models, batch_size=batch_size, img_size=img_size, min_time=min_time, rounds=rounds,
                           warmup_time=warmup_time, runtime=runtime)  # fmt: skip
        for name, rate in rates.items():
            results[name]["throughput"][str(batch_size)] = rate
    for name, model in models.items():
        if 1 in batch_sizes:
            results[name]["latency_ms"] = latency(model, img_size=img_size,
                                                  min_time=None if min_time is None else min_time * rounds,
                                                  warmup_time=warmup_time, runtime=runtime)  # fmt: skip
        results[name]["peak_memory"] = peak_memory(model, batch_size=batch_sizes[-1], img_size=img_size, runtime=runtime)
    return results


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model, frozen and trainable."""
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's whole state dict written as one ``.safetensors`` file:
    what a user keeps to deploy the model without any shared backbone."""
    from safetensors.torch import save

    return len(save({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}))
