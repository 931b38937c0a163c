"""ViT-B/16 and Swin-B throughput, full against SLS-pruned, at several batch sizes and precisions.

    python bench/gpu_throughput.py                                   # a GPU machine: batch 1 and 64
    OMP_NUM_THREADS=1 python bench/gpu_throughput.py --batches 1,8 --min-time 0.2 --rounds 3   # a small CPU

Random weights (``weights="random"``: speed does not depend on the values), 224 px, no
PETL modules: LoRA and RepAdapter fold into the linear layers for inference, so the
plain backbone is what a deployed task runs. Each model is truncated at every k of
``--depths`` (for Swin-B, whose stages hold 2, 2, 18, 2 blocks, 4 and 22 are stage
boundaries and 8 falls inside stage 3). For each (model, precision) the full and pruned
models are measured in turns on the same batches (sls.bench.measure: throughput per
batch size, batch-1 latency, FLOPs), so the speed-ups are ratios measured in one run. ``amp`` is torch.autocast to bfloat16 (float16
on GPUs without bfloat16). Prints a Markdown table labelled with the device.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys

import torch

from sls.backbones import create_backbone, truncate
from sls.bench import measure
from sls.runtime import Runtime, resolve_device

MODELS = {"vit_base_patch16_224": "ViT-B/16", "swin_base_patch4_window7_224": "Swin-B"}
SWIN_DEPTHS = (4, 8, 22)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--depths", type=_numbers, default=[4, 8], help="k values for ViT-B (default: 4,8)")
    parser.add_argument("--swin-depths", type=_numbers, default=list(SWIN_DEPTHS),
                        help="k values for Swin-B (default: 4,8,22)")
    parser.add_argument("--batches", type=_numbers, default=[1, 64], help="batch sizes (default: 1,64)")
    parser.add_argument("--precisions", default="fp32,amp", help="fp32, amp or both (default: fp32,amp)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--warmup-time", type=float, default=1.0, help="seconds of untimed forwards (default: 1)")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of timed forwards per model and round (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default: 3)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    print(f"Device: **{device_label(device)}**; torch {torch.__version__}; 224 px; warm-up {args.warmup_time:g} s, "
          f"{args.rounds} rounds of at least {args.min_time:g} s per model, median round; channels-last "
          f"{'on' if args.channels_last else 'off'}.")
    print(f"Command: `{' '.join(['python', *sys.argv])}`\n")
    print("| model | precision | batch | variant | blocks | params (M) | GFLOPs | img/s | speed-up | p50 ms (batch 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        full, info = create_backbone(name, num_classes=100, weights="random")
        depths = args.swin_depths if info.family == "swin" else args.depths
        models = {"full": full} | {f"k={k}": truncate(copy.deepcopy(full), k) for k in depths}
        for precision in args.precisions.split(","):
            runtime = Runtime(device=device, amp=precision == "amp", channels_last=args.channels_last)
            for model in models.values():
                runtime.place(model)
            figures = measure(models, img_size=info.img_size, batch_sizes=args.batches, min_time=args.min_time,
                              rounds=args.rounds, warmup_time=args.warmup_time, runtime=runtime)  # fmt: skip
            label = f"amp ({str(runtime.amp_dtype(device)).removeprefix('torch.')})" if runtime.amp else "fp32"
            for batch in args.batches:
                base = figures["full"]["throughput"][str(batch)]
                for variant, mine in figures.items():
                    blocks = info.num_blocks if variant == "full" else int(variant[2:])
                    rate = mine["throughput"][str(batch)]
                    latency = f"{mine['latency_ms']['p50']:.2f}" if "latency_ms" in mine else ""
                    print(f"| {MODELS.get(name, name)} | {label} | {batch} | {variant} | {blocks}/{info.num_blocks} "
                          f"| {mine['parameters'] / 1e6:.1f} | {mine['flops'] / 1e9:.1f} | {rate:.1f} | "
                          f"{rate / base:.2f}x | {latency} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
