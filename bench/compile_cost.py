"""What ``--compile`` costs and saves: compile time against time saved per batch, in one run.

    OMP_NUM_THREADS=2 python bench/compile_cost.py                     # the demo's model: ViT-S at 84 px
    OMP_NUM_THREADS=2 python bench/compile_cost.py --img-size 224 --depth 8

The embedded ViT-S with LoRA folded (what a deployed task runs; ``--depth K`` truncates
it), at batch ``--batch``: eager and ``torch.compile``d inference in turns on the same
input (:func:`sls.bench.throughput`), and a training step (forward, backward, AdamW on
the LoRA tensors) eager and compiled. The compile time is the first call's wall time
minus an eager call's; the break-even is the number of batches after which compiling
has paid for itself. Peak resident memory is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from sls.backbones import create_backbone, truncate
from sls.bench import peak_rss_mb, throughput
from sls.petl import create_petl
from sls.petl.merge import deployable_model
from sls.runtime import COMPILE_FAILURES, Runtime


def first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def steady(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=None, help="truncate to k blocks")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per steady-state figure")
    args = parser.parse_args()

    model, info = create_backbone("embedded-dinov2-s", num_classes=10, img_size=args.img_size)
    create_petl("lora").apply(model)
    if args.depth:
        truncate(model, args.depth)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    print(f"{info.model} at {args.img_size} px, {len(model.blocks)} blocks, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    # Inference, as timed and served: LoRA folded.
    deployed = deployable_model(model)
    compiled = Runtime(compile=True).compiled(deployed)
    with torch.inference_mode():
        eager_call = steady(lambda: deployed(x), args.calls)
        compile_first = first_call(lambda: compiled(x))
    # Both in turns on the same input, in one run (the compiled one is already compiled).
    rates = throughput({"eager": deployed, "compiled": compiled}, batch_size=args.batch, img_size=args.img_size)
    saved = args.batch / rates["eager"] - args.batch / rates["compiled"]
    compile_seconds = compile_first - eager_call
    print(f"inference: eager {rates['eager']:.1f} img/s, compiled {rates['compiled']:.1f} img/s "
          f"({rates['compiled'] / rates['eager']:.2f}x); compile {compile_seconds:.1f} s; "
          + (f"break-even after {compile_seconds / saved:.0f} batches" if saved > 0 else "never pays off here"))

    # Training step on the LoRA tensors.
    def step_fn(net):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    model.train()
    eager_step = steady(step_fn(model), args.calls)
    compiled_step = step_fn(Runtime(compile=True).compiled(model))
    compile_train = first_call(compiled_step) - eager_step
    compiled_time = steady(compiled_step, args.calls)
    saved_train = eager_step - compiled_time
    print(f"training step: eager {eager_step:.2f} s, compiled {compiled_time:.2f} s "
          f"({eager_step / compiled_time:.2f}x); compile {compile_train:.1f} s; "
          + (f"break-even after {compile_train / saved_train:.0f} steps" if saved_train > 0 else "never pays off here"))
    if COMPILE_FAILURES:
        print(f"compile failed, eager figures: {COMPILE_FAILURES[0]}")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
