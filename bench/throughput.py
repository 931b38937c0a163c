"""Throughput of a backbone truncated to every depth k, against the full model, in one run.

    python bench/throughput.py --model embedded-dinov2-s --img-size 84 --batch-size 32

Prints, per k: images/s, speed-up over the full model, the FLOPs ratio and the
speed-up / FLOPs-ratio efficiency. All models are timed in turns on the same batch
(sls.bench.throughput), so a noisy spell of the machine hits them alike.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from sls.backbones import create_backbone, truncate
from sls.bench import throughput


def forward_flops(model: torch.nn.Module, img_size: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops()


def depth_efficiency(
    full: torch.nn.Module, depths: list[int], *, batch_size: int, img_size: int, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Per model ("full", "k=4", ...): images/s, speed-up over the full model, FLOPs
    ratio (full / truncated) and efficiency (speed-up / FLOPs ratio), timed in one run."""
    models = {"full": full} | {f"k={k}": truncate(copy.deepcopy(full), k) for k in depths}
    rates = throughput(models, batch_size=batch_size, img_size=img_size, rounds=rounds)
    flops = {name: forward_flops(model, img_size) for name, model in models.items()}
    results = {}
    for name in models:
        speedup = rates[name] / rates["full"]
        flops_ratio = flops["full"] / flops[name]
        results[name] = {"images_per_s": rates[name], "speedup": speedup, "flops_ratio": flops_ratio,
                         "efficiency": speedup / flops_ratio}  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depths", default="4,6,8,10", help="comma-separated k values")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    full, info = create_backbone(args.model, num_classes=10, weights=args.weights, img_size=args.img_size)
    depths = [int(k) for k in args.depths.split(",")]
    results = depth_efficiency(full, depths, batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds)
    print(f"{info.model} ({info.num_blocks} blocks), {args.img_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':>7} {'img/s':>8} {'speed-up':>9} {'FLOPs ratio':>12} {'efficiency':>11}")
    for name, r in results.items():
        print(f"{name:>7} {r['images_per_s']:8.1f} {r['speedup']:8.2f}x {r['flops_ratio']:11.2f}x "
              f"{r['efficiency']:11.2f}")


if __name__ == "__main__":
    main()
