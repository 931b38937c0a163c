"""Measurements: throughput and parameter counts."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sls.runtime import Runtime, model_device, synchronize


@torch.inference_mode()
def throughput(
    models: dict[str, nn.Module],
    *,
    batch_size: int,
    img_size: int,
    warmup: int = 2,
    iters: int = 5,
    rounds: int = 3,
    seed: int = 0,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Images per second of each model, measured in one run on the same input.

    Each model gets ``warmup`` untimed forwards, then the models take turns for
    ``rounds`` rounds of ``iters`` timed forwards each, so a slow spell of a noisy
    machine hits all of them alike; the median round is reported. Each model runs on
    the device it is on, with ``runtime``'s precision and layout (default: float32);
    a GPU's queue is drained before the clock is read.
    """
    runtime = runtime or Runtime()
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    devices = {name: model_device(model) for name, model in models.items()}
    inputs = {name: runtime.inputs(batch, device) for name, device in devices.items()}

    def forward(name: str, times: int) -> None:
        with runtime.autocast(devices[name]):
            for _ in range(times):
                models[name](inputs[name])
        synchronize(devices[name])

    for name, model in models.items():
        model.eval()
        forward(name, warmup)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            start = time.perf_counter()
            forward(name, iters)
            rates[name].append(batch_size * iters / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model, frozen and trainable."""
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's whole state dict written as one ``.safetensors`` file:
    what a user keeps to deploy the model without any shared backbone."""
    from safetensors.torch import save

    return len(save({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}))
