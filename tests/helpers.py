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
