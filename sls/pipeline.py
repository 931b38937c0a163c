"""One whole SLS run, stage by stage, as one function that reads top to bottom.

data -> backbone + PETL -> fine-tune -> block features (one pass) -> scores -> k
-> truncate -> retrain -> measure -> task folder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sls import __version__
from sls.artifact import save_task, task_tensor_bytes
from sls.backbones import create_backbone, truncate
from sls.bench import parameter_count, throughput
from sls.data import ImageArrayDataset, load_dataset, make_transform, split_dataset, stratified_subset
from sls.errors import ConfigError
from sls.features import cached_block_features, feature_key_parts
from sls.petl import create_petl
from sls.report import plot_scores, write_scores_csv
from sls.select import DepthSelector
from sls.train import accuracy, train


@dataclass
class RunConfig:
    """Everything a run depends on; dumped resolved into the task record.

    The defaults are the demo: the embedded DINOv2 ViT-S/14, LoRA r=8 on ``qkv``,
    MNIST-5k at 84 px (6x6 patches), 2000 training and 1000 test images, 2 epochs;
    it fits in about 4 minutes on 2 CPU cores. Blocks are scored on at most
    ``analysis_samples`` training images (a stratified subset, in order): 1000 is
    what the paper's VTAB-1k runs score on, and t-SNE's cost grows with n; None
    scores every training image.
    """

    model: str = "embedded-dinov2-s"
    weights: str | None = None
    data: str = "mnist5k"
    petl: str = "lora"
    petl_options: dict = field(default_factory=dict)
    img_size: int = 84
    train_samples: int | None = 2000
    test_samples: int | None = 1000
    analysis_samples: int | None = 1000
    epochs: int = 2
    retrain_epochs: int = 1
    retrain: bool = True
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    alpha: float = 0.3
    criterion: str = "sls"
    tsne: str = "sklearn"
    perplexity: float = 30.0
    tsne_seed: int = 0
    depth: int | None = None
    seed: int = 0
    throughput_batch: int = 32
    out: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1 or self.retrain_epochs < 1:
            raise ConfigError("--epochs and --retrain-epochs must be >= 1")
        if self.batch_size < 1 or self.throughput_batch < 1:
            raise ConfigError("batch sizes must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels, got {self.img_size}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.data}-{config.model}-{config.petl}-{stamp}"


def run(config: RunConfig) -> dict:
    """Fine-tune, score every block, prune to k, retrain, measure and save a task.

    Returns:
        the task record (also written to ``<out>/record.json``).
    """
    config.validate()
    started = time.perf_counter()
    seed_everything(config.seed)
    out = Path(config.out) if config.out else default_out_dir(config)
    log = print if config.progress else (lambda *a, **k: None)

    # Data: deterministic stratified splits, images transformed as the model expects.
    data = load_dataset(config.data)
    splits = split_dataset(data.labels, train_size=config.train_samples, test_size=config.test_samples)
    num_classes = len(data.classes)

    # Backbone with a fresh head, then the PETL modules; only they and the head train.
    model, backbone = create_backbone(config.model, num_classes=num_classes, weights=config.weights, img_size=config.img_size)
    petl = create_petl(config.petl, **config.petl_options)
    petl.apply(model)
    if config.depth is not None and not 1 <= config.depth <= backbone.num_blocks:
        raise ConfigError(f"--depth {config.depth} is out of range: the model has blocks 1..{backbone.num_blocks}")

    transform = make_transform(backbone.img_size, backbone.mean, backbone.std, backbone.interpolation)
    train_set = ImageArrayDataset(data, splits.train, transform)
    test_set = ImageArrayDataset(data, splits.test, transform)
    shuffled = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=shuffled)
    # The analysis pass sees every (analysed) training image once, in order, nothing dropped.
    analysed = stratified_subset(splits.train, data.labels, config.analysis_samples)
    analysis_loader = DataLoader(ImageArrayDataset(data, analysed, transform), batch_size=64, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False)
    log(f"{backbone.model}: {backbone.num_blocks} blocks at {backbone.img_size}px; {config.data}: "
        f"{len(train_set)} train / {len(test_set)} test images, {num_classes} classes")

    # 1. Fine-tune the PETL model with all N blocks.
    train(model, train_loader, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
          desc="fine-tune", progress=config.progress)
    acc_full = accuracy(model, test_loader, desc="test full", progress=config.progress)

    # 2-5. One pass for every block's pooled feature, scores, threshold, k.
    analysis, _ = cached_block_features(model, analysis_loader, progress=config.progress,
                                        key_parts=feature_key_parts(config.data, "train", analysed, backbone.img_size,
                                                                    backbone.mean, backbone.std, backbone.interpolation))
    selector = DepthSelector(alpha=config.alpha, criterion=config.criterion, tsne=config.tsne,
                             perplexity=config.perplexity, random_state=config.tsne_seed,
                             progress=config.progress).fit(*analysis)
    depth = config.depth if config.depth is not None else selector.depth_

    # 6. The pruned model: blocks k+1..N really removed.
    pruned = truncate(copy.deepcopy(model), depth)
    acc_pruned = accuracy(pruned, test_loader, desc="test pruned", progress=config.progress)

    # 7. Retrain the kept blocks' PETL parameters and the head.
    acc_retrained = None
    if config.retrain:
        train(pruned, train_loader, epochs=config.retrain_epochs, lr=config.lr,
              weight_decay=config.weight_decay, desc="retrain", progress=config.progress)
        acc_retrained = accuracy(pruned, test_loader, desc="test retrained", progress=config.progress)

    # 8. Measure both models in the same run, on the same batch.
    speed = throughput({"full": model, "pruned": pruned}, batch_size=config.throughput_batch,
                       img_size=backbone.img_size)

    record = {
        "sls_version": __version__,
        "backbone": backbone.to_dict(),
        "petl": {"method": petl.name, "hparams": petl.hparams},
        "num_classes": num_classes,
        "classes": data.classes,
        "data": {"name": config.data, "source": data.source, "splits": splits.describe(),
                 "analysed_train_samples": int(len(analysed)),
                 "split_rule": "stratified, seed 0: 20% test, 10% val, rest train; then stratified subsets"},
        "criterion": config.criterion,
        "tsne": {"backend": config.tsne, "perplexity": config.perplexity, "random_state": config.tsne_seed},
        "alpha": config.alpha,
        "scores": [float(s) for s in selector.scores_],
        "threshold": float(selector.threshold_),
        "selected_depth": int(selector.depth_),
        "selection_reason": selector.reason_,
        "depth": int(depth),
        "seed": config.seed,
        "results": {
            "accuracy": {"full": acc_full, "pruned_no_retrain": acc_pruned, "pruned_retrained": acc_retrained},
            "throughput": {"full": speed["full"], "pruned": speed["pruned"], "batch_size": config.throughput_batch,
                           "unit": "images/s", "threads": torch.get_num_threads()},
            "parameters": {"full": parameter_count(model), "pruned": parameter_count(pruned),
                           "task_tensors": sum(p.numel() for p in pruned.parameters() if p.requires_grad)},
        },
        "config": dataclasses.asdict(config) | {"out": str(out)},
    }
    record["results"]["storage_bytes"] = {"task": task_tensor_bytes(pruned)}
    record["results"]["seconds"] = round(time.perf_counter() - started, 1)
    save_task(out, pruned, record, finetuned=model)
    write_scores_csv(out / "scores.csv", selector.scores_, selector.threshold_, depth)
    plot_scores(out / "scores.png", selector.scores_, selector.threshold_, depth,
                title=f"SLS scores: {backbone.model} + {petl.name} on {config.data}")
    return record
