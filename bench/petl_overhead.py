"""What each PETL method costs at inference, deployed as sls deploys it (issue 4).

    OMP_NUM_THREADS=2 python bench/petl_overhead.py --img-size 112 --batch 32 --depth 8

The embedded DINOv2 ViT-S/14 (or ``--model``), every PETL method applied with its
defaults and its trainable tensors set to random non-zero values (stand-in for
training), then made deployable (:func:`sls.export.deployable_model`: LoRA and
RepAdapter folded into the linear layers, adapter and Convpass kept as modules).
Each deployed model, full and truncated at ``--depth``, is timed against the plain
backbone in one :func:`sls.bench.throughput` run (the models take turns, so the ratios
hold on a noisy machine). Also checks that the folded models have exactly the plain
backbone's parameter shapes and that deploying changed no output by more than 1e-4.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from sls.backbones import create_backbone, truncate
from sls.bench import parameter_count, throughput
from sls.export import deployable_model
from sls.petl import create_petl, list_petl


def randomise_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=8, help="the pruned depth timed beside the full one")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed forwards per model and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    plain, info = create_backbone(args.model, num_classes=10, img_size=args.img_size)
    plain.eval()
    images = torch.randn(4, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    shapes = {name: tuple(p.shape) for name, p in plain.named_parameters()}
    models = {("plain", "full"): plain, ("plain", f"k={args.depth}"): truncate(copy.deepcopy(plain), args.depth)}
    notes = {}
    for method in list_petl():
        adapted = create_petl(method).apply(copy.deepcopy(plain))
        randomise_trainable(adapted)
        adapted.eval()
        deployed = deployable_model(adapted)
        with torch.no_grad():
            error = (deployed(images) - adapted(images)).abs().max().item()
        same_shapes = {name: tuple(p.shape) for name, p in deployed.named_parameters()} == shapes
        notes[method] = (same_shapes, error, parameter_count(deployed) - parameter_count(plain))
        models[(method, "full")] = deployed
        models[(method, f"k={args.depth}")] = truncate(copy.deepcopy(deployed), args.depth)
    rates = throughput({f"{m}/{d}": model for (m, d), model in models.items()}, batch_size=args.batch,
                       img_size=args.img_size, min_time=args.min_time, rounds=args.rounds)  # fmt: skip

    print(f"Command: `{' '.join(['python', *sys.argv])}`; {info.model}, {args.img_size} px, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), one run.\n")
    print(f"| method (deployed) | extra params | plain shapes | max abs change on deploying | "
          f"full: img/s (vs plain) | k={args.depth}: img/s (vs plain k={args.depth}) |")
    print("|---|---|---|---|---|---|")
    full, cut = rates["plain/full"], rates[f"plain/k={args.depth}"]
    print(f"| plain backbone | 0 | yes | - | {full:.1f} (1.00x) | {cut:.1f} (1.00x) |")
    for method, (same_shapes, error, extra) in notes.items():
        a, b = rates[f"{method}/full"], rates[f"{method}/k={args.depth}"]
        print(f"| {method} | {extra:,} | {'yes' if same_shapes else 'no'} | {error:.1e} | {a:.1f} ({a / full:.2f}x) "
              f"| {b:.1f} ({b / cut:.2f}x) |")


if __name__ == "__main__":
    main()
