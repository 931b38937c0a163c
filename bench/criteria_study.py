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
from sls.criteria import list_criteria
from sls.pipeline import RunConfig, finetune, prepare, prune_and_retrain, score_blocks


def study(data: str, criteria: list[str], epochs: int) -> list[str]:
    exp = prepare(RunConfig(data=data, epochs=epochs, progress=False))
    acc_full = finetune(exp)
    chosen = {}
    for criterion in criteria:
        selector = score_blocks(exp, criterion)
        chosen[criterion] = selector.depth_
    results = {}
    for depth in sorted(set(chosen.values())):
        pruned, before, after = prune_and_retrain(exp, depth)
        results[depth] = (pruned, before, after)
    models = {"full": exp.model} | {f"k={k}": m for k, (m, _, _) in results.items()}
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
