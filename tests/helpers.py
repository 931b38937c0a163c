"""Plain helpers shared by tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist
from torch.utils.data import DataLoader, TensorDataset


def blob_features(separations, n_per_class=40, n_classes=3, dim=16, seed=0):
    """One (n, dim) array per block: class means pushed apart by each separation."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centers = rng.normal(size=(n_classes, dim))
    noise = rng.normal(size=(len(labels), dim))
    return [noise + s * centers[labels] for s in separations], labels


def silhouette_by_hand(points, labels):
    """Mean silhouette written from its definition: (b - a) / max(a, b) per point."""
    dist = cdist(points, points)
    values = []
    for i, label in enumerate(labels):
        same = labels == label
        same[i] = False
        a = dist[i, same].mean()
        b = min(dist[i, labels == other].mean() for other in np.unique(labels) if other != label)
        values.append((b - a) / max(a, b))
    return float(np.mean(values))


def randomize_trainable(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Stand-in for training: every trainable tensor drawn from a seeded normal times
    ``scale`` (LoRA B and the adapters' up start at zero, which would hide them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model


def images_for(model: torch.nn.Module, n: int = 9) -> torch.Tensor:
    """``n`` seeded random images of the model's input size."""
    height, width = model.patch_embed.img_size
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(0))


def loader_of(images: torch.Tensor, batch_size: int = 4) -> DataLoader:
    """The images in order, labelled 0, 1, 2, 0, ..."""
    labels = torch.arange(len(images)) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def tiny_scenes(n: int = 12, side: int = 64, seed: int = 0):
    """Composed scenes of 1-3 blocky 'digits' of 3 classes on a 64 px canvas; the last 4 the test split."""
    from sls.data.dense import MnistScenes
    from sls.data.scenes import compose_scenes

    rng = np.random.default_rng(seed)
    digits = np.zeros((30, 28, 28), dtype=np.uint8)
    for i, d in enumerate(digits):  # blocky "digits": a filled rectangle each, of varying size
        h, w = rng.integers(10, 24, size=2)
        d[(28 - h) // 2 : (28 + h) // 2, (28 - w) // 2 : (28 + w) // 2] = 255
    labels = np.arange(30) % 3
    scenes = compose_scenes(digits, labels, n, side=side, digits_per_scene=(1, 3), scales=(16, 24), seed=seed,
                            classes=["a", "b", "c"])  # fmt: skip
    splits = {"train": np.arange(n - 4), "val": np.arange(0), "test": np.arange(n - 4, n)}
    return MnistScenes(scenes, splits, "tiny")


def tiny_dense_model(task: str, img_size: int = 64, depth: int = 4, **options):
    """A 4-block random ViT-Tiny/16 with LoRA in the task's model (4 segmentation classes, 3 detection)."""
    from sls.backbones import create_backbone
    from sls.petl import create_petl
    from sls.tasks import get_task

    torch.manual_seed(0)
    encoder, info = create_backbone("vit_tiny_patch16_224", num_classes=0, img_size=img_size, weights="random",
                                    model_kwargs={"depth": depth})  # fmt: skip
    create_petl("lora").apply(encoder)
    kind = get_task(task, **options)
    return kind, kind.build_model(encoder, 4 if task == "segmentation" else 3, img_size), info


def write_mask_folder(root, data) -> None:
    """The scenes as a user's images/ + masks/ folder pair with a classes.txt."""
    from PIL import Image

    for split, indices in data.splits.items():
        for i in indices:
            for kind, array in (("images", data.scenes.images[i]), ("masks", data.scenes.masks[i].astype(np.uint8))):
                folder = root / kind / split
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"scene{i}.png")
    (root / "classes.txt").write_text("\n".join(data.classes_for("segmentation")) + "\n")
