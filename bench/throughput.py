"""Throughput, latency and FLOPs of a backbone truncated to every depth k, against the full model, in one run.

    python bench/throughput.py --model embedded-dinov2-s --img-size 84 --batch-size 32

Prints, per k: images/s at batch 1 and at ``--batch-size``, the speed-ups over the full
model, the FLOPs ratio, the speed-up / FLOPs-ratio efficiency and the batch-1 latency,
all from one :func:`sls.bench.measure` run (the models take turns, so a noisy spell of
the machine hits them alike). ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from sls.backbones import create_backbone, truncate
from sls.bench import measure


def depth_efficiency(full: torch.nn.Module, depths: list[int], *, batch_size: int, img_size: int,
                     rounds: int = 3, min_time: float | None = None) -> dict[str, dict]:  # fmt: skip
    """Per model ("full", "k=4", ...): :func:`sls.bench.measure`'s figures plus the
    speed-ups over the full model at both batch sizes, the FLOPs ratio (full /
    truncated) and the efficiency (speed-up / FLOPs ratio)."""
    models = {"full": full} | {f"k={k}": truncate(copy.deepcopy(full), k) for k in depths}
    figures = measure(models, img_size=img_size, batch_sizes=(1, batch_size), rounds=rounds, min_time=min_time)
    base = figures["full"]
    for mine in figures.values():
        mine["speedup"] = mine["throughput"][str(batch_size)] / base["throughput"][str(batch_size)]
        mine["speedup_batch1"] = mine["throughput"]["1"] / base["throughput"]["1"]
        mine["flops_ratio"] = base["flops"] / mine["flops"]
        mine["efficiency"] = mine["speedup"] / mine["flops_ratio"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depths", default="4,6,8,10", help="comma-separated k values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    full, info = create_backbone(args.model, num_classes=10, weights=args.weights, img_size=args.img_size)
    depths = [int(k) for k in args.depths.split(",")]
    results = depth_efficiency(full, depths, batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds)
    print(f"{info.model} ({info.num_blocks} blocks), {args.img_size} px, batch 1 and {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':>7} {'img/s':>8} {'speed-up':>9} {'b1 img/s':>9} {'b1 speed-up':>12} {'p50 ms':>7} "
          f"{'GFLOPs':>7} {'FLOPs ratio':>12} {'efficiency':>11}")
    for name, r in results.items():
        print(f"{name:>7} {r['throughput'][str(args.batch_size)]:8.1f} {r['speedup']:8.2f}x "
              f"{r['throughput']['1']:9.1f} {r['speedup_batch1']:11.2f}x {r['latency_ms']['p50']:7.1f} "
              f"{r['flops'] / 1e9:7.2f} {r['flops_ratio']:11.2f}x {r['efficiency']:11.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"model": info.model, "img_size": args.img_size, "batch_size": args.batch_size,
                       "threads": torch.get_num_threads(), "results": results}, file, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
