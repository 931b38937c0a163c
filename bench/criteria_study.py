"""Does the SLS criterion choose better depths than other layer criteria? Measured.

    python bench/criteria_study.py --data mnist5k,fashion-mnist,digits

For each dataset: fine-tune the demo's PETL model once (sls.pipeline defaults:
embedded DINOv2 ViT-S/14, LoRA r=8, 84 px, 2000 train / 1000 test images, 2 epochs),
extract the block features once, let every criterion choose k (alpha 0.3, its
documented rule), then truncate at each chosen k, retrain one epoch (PETL of the kept
blocks + head) and measure test accuracy and throughput (batch 32, all models timed
in turns in one run). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

from sls.bench import throughput
from sls.config import RunConfig
from sls.criteria import list_criteria
from sls.experiment import Experiment
from sls.petl.merge import deployable_model
from sls.pipeline import finetune, prune, retrain_pruned, score_blocks
from sls.recipes import apply_recipe
from sls.train import accuracy

DEMO = apply_recipe("demo", {})


def study(data: str, criteria: list[str], epochs: int) -> list[str]:
    exp = Experiment.from_config(RunConfig(**{**DEMO, "data": data, "epochs": epochs, "progress": False}))
    acc_full, _ = finetune(exp)
    chosen = {}
    for criterion in criteria:
        selector = score_blocks(exp, criterion)
        chosen[criterion] = selector.depth_
    results = {}
    for depth in sorted(set(chosen.values())):
        pruned = prune(exp, depth)
        before = accuracy(pruned, exp.test_loader, progress=False)
        retrain_pruned(exp, pruned)
        after = accuracy(pruned, exp.test_loader, progress=False)
        results[depth] = (pruned, before, after)
    # Timed as deployed (LoRA folded), like every figure sls reports.
    models = {"full": deployable_model(exp.model)} | {f"k={k}": deployable_model(m) for k, (m, _, _) in results.items()}
    speed = throughput(models, batch_size=32, img_size=exp.backbone.img_size)
    rows = [f"| {data} | full model | {exp.backbone.num_blocks} | {100 * acc_full:.1f} | - | 1.00x |"]
    for criterion, depth in chosen.items():
        _, before, after = results[depth]
        rows.append(f"| {data} | {criterion} | {depth} | {100 * after:.1f} | {100 * before:.1f} | "
                    f"{speed[f'k={depth}'] / speed['full']:.2f}x |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist5k,fashion-mnist,digits")
    parser.add_argument("--criteria", default="sls,silhouette,block-influence,cka,probe,random",
                        help=f"comma-separated, among {', '.join(list_criteria())}")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    print("| data | criterion | k | test acc. after 1 retraining epoch (%) | before retraining (%) | speed-up |")
    print("|---|---|---|---|---|---|")
    for data in args.data.split(","):
        for row in study(data, args.criteria.split(","), args.epochs):
            print(row, flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
