"""Shared fixtures: tiny random timm ViTs and small in-memory data; no network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sls.data import ImageArrays


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never read or write the user's cache, except the embedded-model tests,
    # which point SLS_CACHE at their own session folder.
    monkeypatch.setenv("SLS_CACHE", str(tmp_path_factory.getbasetemp() / "sls-cache"))


@pytest.fixture(autouse=True, scope="session")
def _short_timing():
    # Tests check what the measurements are made of and how they are reported, never
    # their values: a short timing keeps the suite fast (bench/ measures for real).
    import sls.bench

    saved = sls.bench.MIN_TIME, sls.bench.WARMUP_TIME
    sls.bench.MIN_TIME, sls.bench.WARMUP_TIME = 0.01, 0.0
    yield
    sls.bench.MIN_TIME, sls.bench.WARMUP_TIME = saved


@pytest.fixture
def tiny_images():
    """60 random 3x32x32 inputs with labels 0..2."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(60, 3, 32, 32, generator=generator)
    labels = torch.arange(60) % 3
    return images, labels


def striped_arrays(n_per_class: int = 40, size: int = 16, seed: int = 0) -> ImageArrays:
    """Three easy classes of grayscale images: horizontal, vertical or no stripes, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size))
            if label == 0:
                img[::4] += 180
            elif label == 1:
                img[:, ::4] += 180
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    return ImageArrays(np.stack(images), np.array(labels), ["horizontal", "vertical", "plain"], "generated")


@pytest.fixture(scope="session")
def served_tasks(tmp_path_factory):
    """Pruned task folders over ONE random test_vit: four classifiers of digits (LoRA k=3,
    LoRA k=5, adapter k=2, RepAdapter k=5) at 32 px, and a segmentation (k=3) and a detection task
    (k=2) of tiny scenes at 64 px (another input size, so a second backbone)."""
    from helpers import tiny_scenes

    from sls.config import RunConfig
    from sls.data.dense import DENSE_EMBEDDED
    from sls.stages import run

    root = tmp_path_factory.mktemp("served")
    tiny = dict(model="test_vit", weights="random", force=True, progress=False, cache=False, throughput_batch=4)
    digits = dict(data="digits", img_size=32, train_samples=200, test_samples=60, analysis_samples=None, epochs=2,
                  retrain_epochs=1, lr=3e-2, batch_size=32)  # fmt: skip
    scenes = dict(data="tiny-scenes", img_size=64, epochs=1, retrain_epochs=1, lr=3e-3, batch_size=4)
    made = {"lora3": dict(digits, petl="lora", depth=3), "lora5": dict(digits, petl="lora", depth=5, seed=2),
            "adapter2": dict(digits, petl="adapter", depth=2),
            "repadapter5": dict(digits, petl="repadapter", depth=5, seed=1),
            "seg3": dict(scenes, task="segmentation", depth=3), "det2": dict(scenes, task="detection", depth=2)}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLS_CACHE", str(tmp_path_factory.getbasetemp() / "sls-cache"))
        patch.setitem(DENSE_EMBEDDED, "tiny-scenes", lambda: tiny_scenes(n=16))
        for name, extra in made.items():
            run(RunConfig(**tiny | extra, out=str(root / name)))
    return {name: root / name for name in made}
