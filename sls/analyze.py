"""Score every block of a plain or PETL-tuned model, with any criteria, training nothing.

model (+ task) -> block features (one pass, cached) -> each criterion over seeds -> k
-> scores.csv, scores.json, scores.png, tsne.png.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from sls import __version__
from sls._io import write_json, write_text
from sls._rng import seeded
from sls.backbones import create_backbone
from sls.criteria import criterion_class
from sls.data import ImageDataset, load_dataset, make_splits, make_transform, stratified_subset
from sls.errors import ConfigError
from sls.experiment import Experiment
from sls.features import cached_block_features, feature_key_parts
from sls.report import plot_criteria, plot_embeddings
from sls.runtime import Runtime
from sls.select import DepthSelector, criterion_options


@dataclass
class AnalyzeConfig:
    """What ``sls analyze`` depends on; dumped resolved into ``scores.json``.

    ``task`` analyses a task folder's fine-tuned model (all N blocks, with their PETL
    modules) at the record's image size; otherwise the plain backbone ``model``.
    """

    model: str = "embedded-dinov2-s"
    weights: str | None = None
    task: str | None = None
    data: str = "mnist5k"
    img_size: int = 84
    samples: int | None = 1000
    criteria: list[str] = field(default_factory=lambda: ["sls"])
    alpha: float = 0.3
    tsne: str = "sklearn"
    perplexity: float = 30.0
    pca_dims: int | None = None
    seeds: int = 1
    seed: int = 0
    use_cache: bool = True
    out: str | None = None
    progress: bool = True


@dataclass
class AnalysedFeatures:
    """Every block's pooled features of the analysed training images, and their source.

    Attributes:
        features: one ``(n, d)`` array per block, bottom-up.
        labels: ``(n,)`` class indices.
        block_input: ``(n, d)`` pooled input of block 1.
        model: the backbone's name.
        classes: the dataset's class names.
        cache_hit: whether the features came from the feature cache.
    """

    features: list[np.ndarray]
    labels: np.ndarray
    block_input: np.ndarray
    model: str
    classes: list[str]
    cache_hit: bool


def analysed_features(config: AnalyzeConfig, *, runtime: Runtime | None = None) -> AnalysedFeatures:
    """One forward pass (or a feature-cache hit) for every block's pooled feature of
    ``config.samples`` training images of ``config.data``: a task folder's fine-tuned
    model (all N blocks, with their PETL modules) or the plain backbone ``config.model``.

    The model runs where ``runtime`` says (default: the CPU); a task folder is opened
    through :meth:`sls.experiment.Experiment.from_record`."""
    data = load_dataset(config.data)
    runtime = runtime or Runtime()
    if config.task:
        exp, record = Experiment.from_record(config.task, weights=config.weights, runtime=runtime, with_data=False)
        model, info = exp.model, exp.backbone
    else:
        with seeded(config.seed):  # the fresh head's draw; the caller's generators are left alone
            model, info = create_backbone(config.model, num_classes=len(data.classes), weights=config.weights,
                                          img_size=config.img_size)  # fmt: skip
        runtime.place(model.eval())
    img_size, mean, std, interpolation = info.img_size, info.mean, info.std, info.interpolation
    # A task's own data is split as its run split it, so the same images are scored.
    sizes = {}
    if config.task and record.config.data == config.data:
        sizes = {"train": record.config.train_samples, "test": record.config.test_samples}
    splits = make_splits(data, train_size=sizes.get("train"), test_size=sizes.get("test"))
    indices = stratified_subset(splits.train, data.labels, config.samples)
    transform = make_transform(img_size, mean, std, interpolation)
    loader = DataLoader(ImageDataset(data, indices, transform), batch_size=64, shuffle=False)
    key = feature_key_parts(data, "train", indices, img_size, mean, std, interpolation)
    (features, labels, block_input), cache_hit = cached_block_features(
        model, loader, key_parts=key, use_cache=config.use_cache, progress=config.progress
    )
    return AnalysedFeatures(features, labels, block_input, info.model, list(data.classes), cache_hit)


def analyze(config: AnalyzeConfig, *, runtime: Runtime | None = None) -> dict:
    """Score the blocks with every requested criterion; write and return the results.

    The model runs where ``runtime`` says (default: the CPU); a task folder is opened
    through :meth:`sls.experiment.Experiment.from_record`."""
    started = time.perf_counter()
    for name in config.criteria:
        criterion_class(name)  # fail on a typo before any forward pass
    if config.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {config.seeds}")
    runtime = runtime or Runtime()
    analysed = analysed_features(config, runtime=runtime)
    features, labels, block_input, name = analysed.features, analysed.labels, analysed.block_input, analysed.model

    results = []
    embeddings = None
    for criterion in config.criteria:
        # One set of options for every criterion: each gets those it takes; n_jobs=-1: blocks in parallel.
        options = {"tsne": config.tsne, "perplexity": config.perplexity, "pca_dims": config.pca_dims, "n_jobs": -1,
                   "progress": config.progress}  # fmt: skip
        selector = DepthSelector(alpha=config.alpha, criterion=criterion, random_state=config.seed, n_seeds=config.seeds,
                                 **{k: v for k, v in options.items() if k in criterion_options(criterion)})  # fmt: skip
        selector.fit(features, labels, block_input)
        if criterion == "sls":  # the first seed's points and their own scores; kept/dropped by the chosen k
            embeddings = (selector.embeddings_, selector.scores_per_seed_[0], selector.depth_)
        results.append({
            "criterion": criterion,
            "kind": selector.kind_,
            "label": criterion_class(criterion).label,
            "scores": selector.scores_.tolist(),
            "scores_std": selector.scores_std_.tolist(),
            "scores_per_seed": selector.scores_per_seed_.tolist(),
            "depths_per_seed": selector.depths_per_seed_,
            "depth": selector.depth_,
            "threshold": selector.threshold_,
            "reason": selector.reason_,
            "margin": selector.margin_,
            "passing_below": selector.passing_below_,
        })  # fmt: skip

    out = Path(config.out) if config.out else Path("runs") / f"analyze-{config.data}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = {
        "sls_version": __version__,
        "model": name,
        "task": config.task,
        "data": {"name": config.data, "split": "train", "samples": len(labels)},
        "depth_rule": "quality criteria: SLS top-down rule with T = alpha * score_N; importance criteria: "
                      "k = highest block with score >= alpha * max; over seeds: the rule on the mean scores "
                      "(depths_per_seed: each seed's own k)",
        "criteria": results,
        "feature_cache_hit": analysed.cache_hit,
        "runtime": runtime.describe(),
        "seconds": round(time.perf_counter() - started, 1),
        "config": dataclasses.asdict(config) | {"out": str(out)},
    }  # fmt: skip
    write_text(out / "scores.csv", criteria_csv(results))
    write_json(out / "scores.json", summary)
    plot_criteria(out / "scores.png", results)
    if embeddings is not None:
        points, scores, depth = embeddings
        plot_embeddings(out / "tsne.png", points, labels, scores, depth=depth, classes=analysed.classes)
    return summary


def criteria_csv(results: list[dict]) -> str:
    """Long-format CSV: one row per criterion and block."""
    lines = ["criterion,block,score,std,kept"]
    for res in results:
        for block, (score, std) in enumerate(zip(res["scores"], res["scores_std"]), start=1):
            lines.append(f"{res['criterion']},{block},{score:.6f},{std:.6f},{int(block <= res['depth'])}")
    return "\n".join(lines) + "\n"
