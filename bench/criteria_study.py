"""Does the SLS criterion choose better depths than other layer criteria? Measured.

    python bench/criteria_study.py --data mnist5k,fashion-mnist,digits
    python bench/criteria_study.py --task segmentation      # the dense demo's recipe on mnist-scenes
    python bench/criteria_study.py --task detection

For each dataset: fine-tune the demo's PETL model once (sls.pipeline defaults:
embedded DINOv2 ViT-S/14, LoRA r=8, 84 px, 2000 train / 1000 test images, 2 epochs),
extract the block features once, let every criterion choose k (alpha 0.3, its
documented rule), then truncate at each chosen k, retrain one epoch (PETL of the kept
blocks + head) and measure test accuracy and throughput (batch 32, all models timed
in turns in one run). Prints a Markdown table for BENCHMARKS.md.

With ``--task segmentation|detection`` the recipe is ``sls demo --task``'s (mnist-scenes,
112 px), the metric the task's (mIoU, COCO mAP), and every criterion scores the task's
samples (regions or boxes, see README "Dense tasks"); ``--depths`` adds fixed depths.
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
from sls.recipes import apply_recipe, demo_recipe


def study(data: str, criteria: list[str], epochs: int | None, task: str = "classification",
          depths: tuple[int, ...] = ()) -> list[str]:  # fmt: skip
    settings = apply_recipe(demo_recipe(task), {})
    settings |= {"progress": False, "score_all": True} | ({"data": data} if data else {})
    settings |= {"epochs": epochs} if epochs else {}
    exp = Experiment.from_config(RunConfig(**settings))
    acc_full, _ = finetune(exp)
    chosen = {}
    for criterion in criteria:
        selector = score_blocks(exp, criterion)
        chosen[criterion] = selector.depth_
        print(f"  {criterion}: scores {[round(float(v), 3) for v in selector.scores_]} -> k = {selector.depth_}",
              flush=True)  # fmt: skip
    chosen |= {f"fixed k={d}": d for d in depths}
    results = {}
    for depth in sorted(set(chosen.values())):
        pruned = prune(exp, depth)
        before = exp.quality(pruned, exp.test_loader, "before", progress=False)
        retrain_pruned(exp, pruned)
        after = exp.quality(pruned, exp.test_loader, "after", progress=False)
        results[depth] = (pruned, before, after)
    # Timed as deployed (LoRA folded), like every figure sls reports.
    models = {"full": deployable_model(exp.model)} | {f"k={k}": deployable_model(m) for k, (m, _, _) in results.items()}
    speed = throughput(models, batch_size=32, img_size=exp.backbone.img_size)
    data = data or settings["data"]
    rows = [f"| {data} | full model | {exp.backbone.num_blocks} | {100 * acc_full:.1f} | - | 1.00x |"]
    for criterion, depth in chosen.items():
        _, before, after = results[depth]
        rows.append(f"| {data} | {criterion} | {depth} | {100 * after:.1f} | {100 * before:.1f} | "
                    f"{speed[f'k={depth}'] / speed['full']:.2f}x |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="comma-separated (default: mnist5k,fashion-mnist,digits; "
                                                     "mnist-scenes for a dense --task)")
    parser.add_argument("--task", default="classification", choices=("classification", "segmentation", "detection"))
    parser.add_argument("--depths", default="", help="comma-separated depths measured besides the criteria's")
    parser.add_argument("--criteria", default="sls,silhouette,block-influence,cka,probe,random",
                        help=f"comma-separated, among {', '.join(list_criteria())}")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the recipe's)")
    args = parser.parse_args()
    started = time.perf_counter()
    metric = {"classification": "test acc.", "segmentation": "test mIoU", "detection": "test mAP"}[args.task]
    print(f"| data | criterion | k | {metric} after retraining (%) | before retraining (%) | speed-up |")
    print("|---|---|---|---|---|---|")
    datasets = args.data.split(",") if args.data else (["mnist5k", "fashion-mnist", "digits"]
                                                       if args.task == "classification" else [""])
    depths = tuple(int(d) for d in args.depths.split(",") if d)
    for data in datasets:
        for row in study(data, args.criteria.split(","), args.epochs, args.task, depths):
            print(row, flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
