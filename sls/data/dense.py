"""Dense-labelled image sets (segmentation masks, detection boxes) and their transform.

A dense source answers, for sample ``i``:

- ``image(i)``: an RGB PIL image;
- ``mask(i)``: ``(H, W)`` int64 semantic labels, ``0..C-1`` or :data:`IGNORE_INDEX`
  (segmentation; the image's size);
- ``objects(i)``: ``(boxes, labels)``, boxes ``(n, 4)`` float32 ``x1, y1, x2, y2``
  pixel edges, labels ``(n,)`` int64 ``0..C-1`` (detection);

plus ``classes_for(task)`` (what each label means for ``"segmentation"`` or
``"detection"``: segmentation counts a background class where the set has one,
detection never does; a task the source has no labels for raises DataError), ``splits`` (its own train / val / test indices,
or None), ``labels`` (one label per image, the class covering most of it, for the
record's bookkeeping only), ``content_key`` (for caches) and ``item_name``.

:class:`MnistScenes` is the embedded ``mnist-scenes`` set; :mod:`sls.data.layouts`
reads a user's ADE20K, VOC, COCO and images/masks folders into the same interface.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from sls.data.scenes import IGNORE_INDEX, Scenes, compose_scenes
from sls.errors import DataError

SCENE_SIDE = 112
"""Canvas side of ``mnist-scenes``: 8 x 8 patches of a /14 ViT at the demo's 112 px."""
SCENE_SCALES = (42, 56)
"""Digit sides of ``mnist-scenes``: 3 and 4 patches of 14 px."""
SCENE_GROW = 4
"""``mnist-scenes`` masks label each digit's region: its ink grown by 4 px (see :func:`compose_scenes`)."""
SCENE_SIZES = {"train": 800, "val": 100, "test": 200}
"""Scenes per split; each split is composed from its own digits, so no digit is seen twice."""
SCENE_DIGIT_SHARE = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass
class MnistScenes:
    """``mnist-scenes``: scenes of 2-4 MNIST-5k digits, one split per disjoint pool of digits.

    Segmentation classes: ``background`` then the ten digits (mask value ``c + 1`` is
    digit c's region, its ink grown by :data:`SCENE_GROW` px, a 2 px ring around it
    :data:`IGNORE_INDEX`); detection classes: the ten digits (box label c is digit c,
    the box the ink's).
    """

    scenes: Scenes
    splits: dict[str, np.ndarray]
    source: str

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def digit_classes(self) -> list[str]:
        return list(self.scenes.classes)

    def classes_for(self, task: str) -> list[str]:
        return (["background", *self.scenes.classes] if task == "segmentation" else list(self.scenes.classes))

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Per scene, its first digit's class (bookkeeping only)."""
        return np.array([int(lab[0]) if len(lab) else -1 for lab in self.scenes.labels], dtype=np.int64)

    def item_name(self, i: int) -> str:
        return f"mnist-scenes[{i}]"

    def content_key(self, indices: np.ndarray) -> str:
        digest = hashlib.sha256()
        for i in np.asarray(indices, dtype=np.int64):
            digest.update(self.scenes.images[i].tobytes())
            digest.update(self.scenes.masks[i].astype(np.uint8).tobytes())
            digest.update(self.scenes.boxes[i].tobytes())
            digest.update(self.scenes.labels[i].tobytes())
        return digest.hexdigest()

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.scenes.images[i]).convert("RGB")

    def image_size(self, i: int) -> tuple[int, int]:
        return self.scenes.images.shape[2], self.scenes.images.shape[1]

    def mask(self, i: int) -> np.ndarray:
        return self.scenes.masks[i]

    def objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.scenes.boxes[i], self.scenes.labels[i]


@functools.cache
def load_mnist_scenes() -> MnistScenes:
    """The embedded ``mnist-scenes`` set: MNIST-5k's digits split 70 / 10 / 20 (stratified,
    seed 0) into disjoint pools; each pool composes its split's scenes (seeded per split)."""
    from sklearn.model_selection import train_test_split

    from sls.data.embedded import load_mnist5k

    digits = load_mnist5k()
    everything = np.arange(len(digits.labels))
    rest, test = train_test_split(everything, test_size=SCENE_DIGIT_SHARE["test"], stratify=digits.labels,
                                  random_state=0)  # fmt: skip
    val_share = SCENE_DIGIT_SHARE["val"] / (1 - SCENE_DIGIT_SHARE["test"])
    train, val = train_test_split(rest, test_size=val_share, stratify=digits.labels[rest], random_state=0)
    parts, splits, start = [], {}, 0
    for seed, (name, pool) in enumerate((("train", train), ("val", val), ("test", test))):
        pool = np.sort(pool)
        part = compose_scenes(digits.images[pool], digits.labels[pool], SCENE_SIZES[name], side=SCENE_SIDE,
                              digits_per_scene=(2, 4), scales=SCENE_SCALES, grow=SCENE_GROW, seed=seed, classes=digits.classes)  # fmt: skip
        part.sources = [pool[s] for s in part.sources]
        parts.append(part)
        splits[name] = np.arange(start, start + len(part))
        start += len(part)
    scenes = Scenes(
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        boxes=[b for p in parts for b in p.boxes],
        labels=[lab for p in parts for lab in p.labels],
        instances=[m for p in parts for m in p.instances],
        sources=[s for p in parts for s in p.sources],
        classes=list(digits.classes),
    )
    return MnistScenes(scenes, splits, f"mnist-scenes (composed from {digits.source})")


DENSE_EMBEDDED = {"mnist-scenes": load_mnist_scenes}


def resize_target(mask: np.ndarray | None, boxes: np.ndarray | None, from_size: tuple[int, int],
                  img_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """A mask (nearest neighbour, labels never blended) and boxes (scaled per axis) of an
    image of ``from_size`` = (width, height), resized to ``img_size`` square as the image is."""
    width, height = from_size
    out_mask = out_boxes = None
    if mask is not None:
        if mask.shape != (height, width):
            raise DataError(f"a mask of {mask.shape[1]}x{mask.shape[0]} px belongs to an image of {width}x{height} px")
        tensor = torch.from_numpy(np.asarray(mask, dtype=np.int64))[None]
        if (width, height) != (img_size, img_size):
            tensor = F.resize(tensor, [img_size, img_size], interpolation=InterpolationMode.NEAREST_EXACT)
        out_mask = tensor[0]
    if boxes is not None:
        scale = torch.tensor([img_size / width, img_size / height] * 2, dtype=torch.float32)
        out_boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)) * scale
    return out_mask, out_boxes


class DenseDataset(Dataset):
    """Torch view of some samples of a dense source: ``(image tensor, target)`` with the
    image resized to ``img_size`` square and normalised (``transform``), and the target
    resized the same way: the mask for ``kind="segmentation"``, a ``{"boxes", "labels"}``
    dict for ``kind="detection"``."""

    def __init__(self, data, indices: np.ndarray, transform, img_size: int, kind: str) -> None:
        self.data, self.transform, self.img_size, self.kind = data, transform, int(img_size), kind
        self.indices = np.asarray(indices, dtype=np.int64)
        self.skipped: list[tuple[int, str]] = []
        if len(self.indices) == 0:
            raise DataError(f"{data.source}: no images in this split")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels[self.indices]

    def target(self, i: int):
        """Sample ``i``'s target alone, resized as :meth:`__getitem__` resizes it (no pixels decoded
        where the source knows its image size without them)."""
        j = int(self.indices[i])
        size = self.data.image_size(j) if hasattr(self.data, "image_size") else self.data.image(j).size
        if self.kind == "segmentation":
            return resize_target(self.data.mask(j), None, size, self.img_size)[0]
        boxes, labels = self.data.objects(j)
        return {"boxes": resize_target(None, boxes, size, self.img_size)[1],
                "labels": torch.as_tensor(labels, dtype=torch.int64)}  # fmt: skip

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        image = self.data.image(j)
        if self.kind == "segmentation":
            mask, _ = resize_target(self.data.mask(j), None, image.size, self.img_size)
            return self.transform(image), mask
        boxes, labels = self.data.objects(j)
        _, scaled = resize_target(None, boxes, image.size, self.img_size)
        return self.transform(image), {"boxes": scaled, "labels": torch.as_tensor(labels, dtype=torch.int64)}


def collate_dense(batch):
    """Stack the images; stack masks, or keep one target dict per image (detection)."""
    images = torch.stack([item[0] for item in batch])
    targets = [item[1] for item in batch]
    if isinstance(targets[0], torch.Tensor):
        return images, torch.stack(targets)
    return images, targets


__all__ = ["DENSE_EMBEDDED", "IGNORE_INDEX", "DenseDataset", "MnistScenes", "collate_dense", "load_mnist_scenes",
           "resize_target"]  # fmt: skip
