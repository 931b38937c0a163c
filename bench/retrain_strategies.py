"""Retraining strategies at an equal budget, on the demo configuration (issue 8).

    OMP_NUM_THREADS=2 python bench/retrain_strategies.py --datasets mnist5k,fashion-mnist,digits --budgets 1,2

For each dataset the demo's PETL model (embedded DINOv2 ViT-S/14, LoRA r=8 on qkv,
84 px, 2000 train / 1000 test images, 2 epochs) is fine-tuned once and scored once;
SLS (alpha 0.3) chooses k; the model is truncated at k and a fresh copy is retrained
with each strategy for the same number of epochs over the same shuffled batches
(``sls.pipeline.retrain_pruned``: seeded, so only the strategy differs). At the first
budget every variant runs (the four strategies with their defaults, plus distillation
with a label term and with a feature term); at larger budgets the four strategies.
Accuracies are on the test split and on the validation split (at most 1000 images);
the speed-up is the pruned model's throughput over the full model's, batch 32, timed
in one run (it does not depend on the strategy). Prints one Markdown table per
dataset as soon as it is done, and writes every figure to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from sls.backbones import truncate
from sls.bench import throughput
from sls.config import RunConfig
from sls.experiment import Experiment
from sls.petl.merge import deployable_model
from sls.pipeline import finetune, retrain_pruned, score_blocks
from sls.recipes import apply_recipe
from sls.train import accuracy

VARIANTS = {
    "ft": ("ft", {}),
    "clr": ("clr", {}),
    "tfs": ("tfs", {}),
    "distill": ("distill", {}),
    "distill+ce": ("distill", {"ce_weight": 0.5}),
    "distill+feat": ("distill", {"feature_weight": 1.0}),
}
STRATEGIES_ONLY = ("ft", "clr", "tfs", "distill")


def bench_dataset(data: str, budgets: list[int], variants: list[str]) -> dict:
    config = RunConfig(**apply_recipe("demo", {"data": data, "progress": False, "score_all": True}))
    started = time.perf_counter()
    exp = Experiment.from_config(config)
    full_test, _ = finetune(exp)
    full_val = accuracy(exp.model, exp.val_loader, progress=False)
    selector = score_blocks(exp)
    depth = selector.depth_
    pruned = truncate(copy.deepcopy(exp.model), depth)
    rates = throughput({"full": deployable_model(exp.model), "pruned": deployable_model(pruned)},
                       batch_size=config.throughput_batch,
                       img_size=exp.backbone.img_size)  # fmt: skip
    result = {
        "data": data, "depth": int(depth), "num_blocks": exp.backbone.num_blocks,
        "scores": [round(float(v), 4) for v in selector.scores_],
        "full": {"test": full_test, "val": full_val},
        "no_retrain": {"test": accuracy(pruned, exp.test_loader, progress=False),
                       "val": accuracy(pruned, exp.val_loader, progress=False)},
        "throughput": rates, "speedup": rates["pruned"] / rates["full"],
        "val_size": len(exp.val_loader.dataset), "test_size": len(exp.test_loader.dataset),
        "train_size": len(exp.train_loader.dataset), "runs": [],
        "setup_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(f"{data}: full {100 * full_test:.1f}% test, k = {depth}, speed-up {result['speedup']:.2f}x "
          f"({result['setup_seconds']} s to fine-tune and score)", flush=True)  # fmt: skip
    for index, epochs in enumerate(budgets):
        exp.config = dataclasses.replace(config, retrain_epochs=epochs)
        exp.resolved["retrain_epochs"] = epochs
        for name in variants if index == 0 else [v for v in variants if v in STRATEGIES_ONLY]:
            strategy, options = VARIANTS[name]
            model = truncate(copy.deepcopy(exp.model), depth)
            start = time.perf_counter()
            retrain_pruned(exp, model, strategy, **options)
            seconds = time.perf_counter() - start
            run = {"variant": name, "strategy": strategy, "options": options, "epochs": epochs,
                   "test": accuracy(model, exp.test_loader, progress=False),
                   "val": accuracy(model, exp.val_loader, progress=False), "retrain_seconds": round(seconds, 1)}  # fmt: skip
            result["runs"].append(run)
            print(f"  {name:>12} {epochs} epoch(s): test {100 * run['test']:.1f}%, val {100 * run['val']:.1f}% "
                  f"({run['retrain_seconds']} s)", flush=True)  # fmt: skip
    return result


def markdown(result: dict) -> str:
    full = result["full"]
    lines = [
        f"**{result['data']}**: k = {result['depth']} of {result['num_blocks']} blocks, speed-up "
        f"**{result['speedup']:.2f}x** ({result['throughput']['full']:.1f} -> {result['throughput']['pruned']:.1f} "
        f"img/s); full model {100 * full['test']:.1f}% test / {100 * full['val']:.1f}% val; pruned without "
        f"retraining {100 * result['no_retrain']['test']:.1f}% / {100 * result['no_retrain']['val']:.1f}%.",
        "",
        "| strategy | retraining epochs | test acc | vs full (points) | val acc | retraining time |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(f"| {run['variant']} | {run['epochs']} | {100 * run['test']:.1f}% | "
                     f"{100 * (run['test'] - full['test']):+.1f} | {100 * run['val']:.1f}% | {run['retrain_seconds']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="mnist5k,fashion-mnist,digits")
    parser.add_argument("--budgets", default="1", help="comma-separated retraining epochs (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, among: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    print(f"{torch.get_num_threads()} threads; budgets {budgets} epoch(s); variants {', '.join(variants)}", flush=True)
    results = []
    for data in args.datasets.split(","):
        results.append(bench_dataset(data, budgets, variants))
        print("\n" + markdown(results[-1]) + "\n", flush=True)
        if args.out:
            with open(args.out, "w") as file:
                json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
