"""What choosing k costs, against one plain forward pass and against its floor, in one run.

    python bench/analysis_cost.py --task runs/demo-... --rounds 3      # a fine-tuned task (the goals' setting)
    python bench/analysis_cost.py --img-size 224 --samples 1000        # the frozen embedded backbone

Measures over the same N training images (decoded once into the store, so no pass pays
for decoding):
  (i)    one plain forward pass (model(x), head included);
  (ii)   sls's analysis as ``sls prune`` runs it: ONE pass collecting every block's
         pooled feature (forward hooks), then t-SNE + silhouette top-down from block N,
         as many blocks at a time as there are cores, down to the first block below T
         (``blocks="needed"``); per t-SNE backend asked for. ``--score-all`` also times
         scoring every block (what a plot or several alphas ask for);
  (floor) one plain pass plus the t-SNEs the rule needs (blocks N down to the stopping
         block), each timed alone on one core, spread over the cores at best
         (max(longest, sum / cores));
  (iii)  the published code's approach: one full forward pass per examined block,
         top-down from block N until the stop rule fires, each followed by that
         block's t-SNE + silhouette (scikit-learn).
Prints (ii)/(floor) (goal <= 1.05), (ii)/(i) (goals <= 1.10 at 224 px, <= 1.5 at 84 px
with the fastest backend whose k is scikit-learn's) and (iii)/(ii), and the peak
resident memory of the process. ``--rounds R`` times (i) and the feature pass R times
in turns and keeps the fastest of each.

With ``--task`` the model is that task's fine-tuned PETL model with all its blocks, at
the task's image size and preprocessing, on the task's data (``--samples`` of its
training split). A frozen backbone often gives the top block a score <= 0, so the
rule keeps every block after scoring one; a fine-tuned model gives the rule something
to cut, which is where the lazy walk and (iii) differ.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from joblib import effective_n_jobs
from torch.utils.data import DataLoader

from sls.backbones import block_features, create_backbone, vit
from sls.bench import peak_rss_mb
from sls.criteria.silhouette import tsne_silhouette_block
from sls.data import ImageDataset, load_dataset, make_splits, make_transform, stratified_subset
from sls.experiment import load_task
from sls.select import DepthSelector


@torch.inference_mode()
def plain_pass(model, loader) -> None:
    model.eval()
    for images, _ in loader:
        model(images)


@torch.inference_mode()
def one_block_pass(model, loader, index: int) -> np.ndarray:
    """A full forward pass that keeps block ``index``'s pooled output (the published way)."""
    model.eval()
    store = []
    hook = vit.blocks(model)[index].register_forward_hook(
        lambda _m, _i, out: store.append(vit.pool_tokens(model, out).float())
    )
    try:
        for images, _ in loader:
            model(images)
    finally:
        hook.remove()
    return torch.cat(store).numpy()


def published_analysis(model, loader, labels: np.ndarray, alpha: float) -> tuple[int, int]:
    """Top-down: a pass and a t-SNE per examined block until SC_i < alpha * SC_N."""
    n_blocks = len(vit.blocks(model))
    threshold = None
    for block in range(n_blocks, 0, -1):
        score, _ = tsne_silhouette_block(one_block_pass(model, loader, block - 1), labels)
        if threshold is None:
            threshold = alpha * score
            if score <= 0:
                return n_blocks, 1
        elif score < threshold:
            return block + 1, n_blocks - block + 1
    return 1, n_blocks


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def tsne_floor(features: list[np.ndarray], labels: np.ndarray, blocks: list[int], backend: str, cores: int) -> float:
    """The t-SNEs of ``blocks`` (1-based), each alone on one core, spread over ``cores`` at best."""
    from threadpoolctl import threadpool_limits

    seconds = []
    with threadpool_limits(limits=1):
        for block in blocks:
            seconds.append(timed(lambda f=features[block - 1]: tsne_silhouette_block(f, labels, backend=backend))[0])
    return max(max(seconds), sum(seconds) / cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-dinov2-s")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--tsne", default="sklearn,opentsne", help="backends for (ii), comma-separated")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--task", default=None, help="a task folder: time its fine-tuned model on its data")
    parser.add_argument("--rounds", type=int, default=1, help="time (i) and the feature pass this many times "
                        "in turns and keep the fastest of each")  # fmt: skip
    parser.add_argument("--score-all", action="store_true", help="also time scoring every block")
    parser.add_argument("--skip-published", action="store_true", help="skip (iii), the slowest part")
    parser.add_argument("--skip-floor", action="store_true", help="skip timing each needed t-SNE alone")
    args = parser.parse_args()

    if args.task:
        model, record = load_task(args.task, weights=args.weights, stage="finetuned")
        bb, cfg = record.backbone, record.config.to_dict()
        data = load_dataset(cfg["data"])
        splits = make_splits(data, train_size=cfg["train_samples"], test_size=cfg["test_samples"])
        name, img_size, n_blocks, source = bb["model"], bb["img_size"], bb["num_blocks"], f"task {args.task}"
        data_name = cfg["data"]
        transform = make_transform(img_size, tuple(bb["mean"]), tuple(bb["std"]), bb["interpolation"])
    else:
        data = load_dataset(args.data)
        model, info = create_backbone(args.model, num_classes=len(data.classes), weights=args.weights,
                                      img_size=args.img_size)  # fmt: skip
        splits = make_splits(data)
        name, img_size, n_blocks, source = info.model, info.img_size, info.num_blocks, "frozen backbone"
        data_name = args.data
        transform = make_transform(info.img_size, info.mean, info.std, info.interpolation)
    indices = stratified_subset(splits.train, data.labels, args.samples)
    dataset = ImageDataset(data, indices, transform, store=True)
    dataset.pixels  # decoded once, before any timing
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    cores = effective_n_jobs(-1)
    print(f"{name} ({source}), {n_blocks} blocks, {img_size} px, N = {len(indices)} {data_name} training "
          f"images, {torch.get_num_threads()} threads, {cores} cores for the t-SNEs")  # fmt: skip

    plain_pass(model, [next(iter(loader))])  # warm-up
    # (i) and the feature pass in turns, the fastest of each kept: on a shared machine
    # two passes of the same work can differ by 25%, which would swamp the scoring cost.
    plains, passes = [], []
    for _ in range(args.rounds):
        plains.append(timed(plain_pass, model, loader)[0])
        t_pass, feats = timed(lambda: block_features(model, loader, progress=False))
        passes.append(t_pass)
    t_plain, t_features = min(plains), min(passes)

    def each(times: list[float]) -> str:
        return f" (fastest of {len(times)}: {', '.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""

    print(f"(i)    one plain forward pass:            {t_plain:7.1f} s{each(plains)}")
    print(f"       one pass collecting every block:   {t_features:7.1f} s{each(passes)}  "
          f"({t_features / t_plain:.3f} x (i))")
    totals, reference = {}, None
    for backend in args.tsne.split(","):
        t_scores, selector = timed(lambda: DepthSelector(alpha=args.alpha, tsne=backend, n_jobs=-1,
                                                         blocks="needed").fit(feats.features, feats.labels))  # fmt: skip
        total = t_features + t_scores
        reference = selector.depth_ if reference is None else reference
        scored = selector.scored_blocks_
        needed = list(range(n_blocks, (selector.depth_ - 1 if selector.reason_ == "rule" else 1) - 1, -1))
        if selector.reason_ in ("top-nonpositive", "top-fails"):
            needed = [n_blocks]
        print(f"(ii)   analysis, t-SNE {backend:12s}:  {total:7.1f} s  (features {t_features:.1f} s + scores "
              f"{t_scores:.1f} s of blocks {scored[0]}..{scored[-1]}; k = {selector.depth_}"
              f"{'' if selector.depth_ == reference else ', NOT the first backend k'})  ->  (ii)/(i) = "
              f"{total / t_plain:.3f}")  # fmt: skip
        if not args.skip_floor:
            floor = t_plain + tsne_floor(feats.features, feats.labels, needed, backend, cores)
            print(f"       floor: (i) + the {len(needed)} t-SNE(s) the rule needs over {cores} cores: {floor:7.1f} s"
                  f"  ->  (ii)/floor = {total / floor:.3f}")  # fmt: skip
        if args.score_all:
            t_all, _ = timed(lambda: DepthSelector(alpha=args.alpha, tsne=backend, n_jobs=-1).fit(
                feats.features, feats.labels))  # fmt: skip
            print(f"       every block scored (--score-all): {t_features + t_all:7.1f} s  ->  /(i) = "
                  f"{(t_features + t_all) / t_plain:.3f}")  # fmt: skip
        totals[backend] = total
    if not args.skip_published:
        t_published, (depth, passes) = timed(published_analysis, model, loader, feats.labels, args.alpha)
        print(f"(iii)  published approach:                {t_published:7.1f} s  ({passes} passes; k = {depth})"
              f"  ->  (iii)/(ii) = {t_published / totals.get('sklearn', total):.2f}")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
