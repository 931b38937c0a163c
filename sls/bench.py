"""Measurements: throughput and parameter counts."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


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
) -> dict[str, float]:
    """Images per second of each model, measured in one run on the same input.

    Each model gets ``warmup`` untimed forwards, then the models take turns for
    ``rounds`` rounds of ``iters`` timed forwards each, so a slow spell of a noisy
    machine hits all of them alike; the median round is reported.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(batch)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(iters):
                model(batch)
            rates[name].append(batch_size * iters / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model, frozen and trainable."""
    return sum(p.numel() for p in model.parameters())
