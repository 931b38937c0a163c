"""ViT-B/16 and Swin-B, full against SLS-pruned at several k: img/s and latency at batch 1
and 64, fp32 and bf16, eager and compiled. One command on a machine with one GPU:

    python bench/gpu_throughput.py --json gpu.json                  # a GPU: about 4 minutes
    OMP_NUM_THREADS=2 python bench/gpu_throughput.py --device cpu --models test_vit --img-size 32   # anywhere

Random weights (``weights="random"``: speed does not depend on the values), 224 px by
default, no PETL modules: LoRA and RepAdapter fold into the linear layers for inference,
so the plain backbone is what a deployed task runs. Each model is truncated at every k
of ``--depths`` (for Swin-B, whose stages hold 2, 2, 18, 2 blocks, 4 and 22 are stage
boundaries and 8 falls inside stage 3); the truncations share the full model's tensors
(:func:`sls.backbones.shared_copy`), so one model's memory is held per backbone.

For each (model, precision, compile) the full and pruned models are measured in turns
on the same batches (:func:`sls.bench.measure`: throughput per batch size, batch-1
latency p50 / p99, FLOPs, peak memory of a forward), so each speed-up is a ratio
measured in one run. ``bf16`` is torch.autocast to bfloat16 (float16 on GPUs without
it). ``compiled`` is :func:`torch.compile` (``--compile``'s path; eager with a warning
where the platform cannot compile): to stay within minutes it runs the full model and
the first k only, and its compile time is reported. Prints a Markdown table labelled
with the device and writes every figure as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sls.backbones import create_backbone, shared_copy, truncate
from sls.bench import measure
from sls.runtime import COMPILE_FAILURES, Runtime, resolve_device

MODELS = {"vit_base_patch16_224": "ViT-B/16", "swin_base_patch4_window7_224": "Swin-B"}
SWIN_DEPTHS = (4, 8, 22)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--depths", type=_numbers, default=[4, 8], help="k values for ViTs (default: 4,8)")
    parser.add_argument("--swin-depths", type=_numbers, default=list(SWIN_DEPTHS),
                        help="k values for Swin (default: 4,8,22)")
    parser.add_argument("--batches", type=_numbers, default=[1, 64], help="batch sizes (default: 1,64)")
    parser.add_argument("--precisions", type=_names, default=["fp32", "bf16"], help="fp32, bf16 (default: both)")
    parser.add_argument("--compile", type=_names, default=["eager", "compiled"], dest="modes",
                        help="eager, compiled (default: both)")
    parser.add_argument("--img-size", type=int, default=None, help="input side (default: the model's, 224)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--warmup-time", type=float, default=0.5, help="seconds of untimed forwards (default: 0.5)")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds of timed forwards per model and round (default: 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    for precision in args.precisions:
        if precision not in ("fp32", "bf16"):
            parser.error(f"unknown precision {precision!r}; choose fp32 or bf16")
    for mode in args.modes:
        if mode not in ("eager", "compiled"):
            parser.error(f"unknown --compile value {mode!r}; choose eager or compiled")
    return args


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    rows = []
    print(f"Device: **{device_label(device)}**; torch {torch.__version__}; warm-up {args.warmup_time:g} s, "
          f"{args.rounds} rounds of at least {args.min_time:g} s per model, median round; channels-last "
          f"{'on' if args.channels_last else 'off'}.")
    print(f"Command: `{' '.join(['python', *sys.argv])}`\n")
    print("| model | precision | mode | batch | variant | blocks | params (M) | GFLOPs | img/s | speed-up "
          "| p50 / p99 ms (batch 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in _names(args.models):
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        full, info = create_backbone(name, num_classes=100, weights="random", **kwargs)
        full.eval()
        depths = args.swin_depths if info.family == "swin" else args.depths
        depths = [k for k in depths if k < info.num_blocks]
        all_models = {"full": full} | {f"k={k}": truncate(shared_copy(full, share_trainable=True), k) for k in depths}
        for precision in args.precisions:
            for mode in args.modes:
                models = all_models if mode == "eager" else dict(list(all_models.items())[:2])
                runtime = Runtime(device=device, amp=precision == "bf16", channels_last=args.channels_last,
                                  compile=mode == "compiled")  # fmt: skip
                for model in models.values():
                    runtime.place(model)
                started = time.perf_counter()
                figures = measure(models, img_size=info.img_size, batch_sizes=args.batches, min_time=args.min_time,
                                  rounds=args.rounds, warmup_time=args.warmup_time, runtime=runtime)  # fmt: skip
                seconds = time.perf_counter() - started
                label = f"bf16 ({str(runtime.amp_dtype(device)).removeprefix('torch.')})" if runtime.amp else "fp32"
                eager = mode == "compiled" and bool(COMPILE_FAILURES)
                for batch in args.batches:
                    base = figures["full"]["throughput"][str(batch)]
                    for variant, mine in figures.items():
                        blocks = info.num_blocks if variant == "full" else int(variant[2:])
                        rate = mine["throughput"][str(batch)]
                        lat = mine.get("latency_ms", {})
                        latency = f"{lat['p50']:.2f} / {lat['p99']:.2f}" if lat else ""
                        print(f"| {MODELS.get(name, name)} | {label} | {mode}{' (eager: failed)' if eager else ''} "
                              f"| {batch} | {variant} | {blocks}/{info.num_blocks} | {mine['parameters'] / 1e6:.1f} "
                              f"| {mine['flops'] / 1e9:.2f} | {rate:.1f} | {rate / base:.2f}x | {latency} |",
                              flush=True)  # fmt: skip
                        rows.append({"model": name, "precision": precision, "mode": mode, "compiled": mode == "compiled"
                                     and not eager, "batch": batch, "variant": variant, "blocks": blocks,
                                     "num_blocks": info.num_blocks, "parameters": mine["parameters"],
                                     "flops": mine["flops"], "images_per_s": rate, "speedup": rate / base,
                                     "latency_ms": lat or None, "peak_memory": mine.get("peak_memory"),
                                     "measure_seconds": seconds})  # fmt: skip
    result = {"device": device_label(device), "torch": torch.__version__, "argv": sys.argv,
              "compile_failures": list(COMPILE_FAILURES), "rows": rows}  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwritten: {args.json}")
    return result


if __name__ == "__main__":
    run(parse_args())
