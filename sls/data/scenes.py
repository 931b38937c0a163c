"""``mnist-scenes``: dense-labelled scenes composed from real MNIST digits, offline.

No installable package ships a multi-image segmentation or detection set, so, as the
M2NIST and MNIST-detection benchmarks do, scenes are composed from MNIST-5k digits on a
black canvas. Every label is exact because every pixel's origin is known:

- ``images``: ``(n, side, side)`` uint8, each digit resized (bilinear) to its scale and
  pasted where no other digit's box is (boxes never overlap);
- ``masks``: ``(n, side, side)`` int64 semantic labels: 0 background, ``c + 1`` for
  digit class c, :data:`IGNORE_INDEX` for the anti-aliased rim of a stroke (a pixel
  neither background nor ink: 0 < value < ``ink``), which belongs to no class cleanly;
- ``boxes``: per scene a ``(k, 4)`` float32 array of ``x1, y1, x2, y2`` pixel edges (the
  tight box of the digit's ink, x2 and y2 exclusive), ``labels`` the ``(k,)`` classes
  (0-9, the detector's own numbering), ``instances`` the ``(k, side, side)`` bool ink
  masks.

Deterministic: the same digits, ``seed`` and settings give the same scenes, bit for bit.
Digits stay at least ``min_scale`` pixels wide (the default 56 px is 4 patches of a /14
ViT at 224 px), so every digit covers whole patch cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from sls.errors import ConfigError

IGNORE_INDEX = 255
BACKGROUND = 0
DEFAULT_SCALES = (56, 70, 84, 112)


@dataclass
class Scenes:
    """Composed scenes and their exact labels (see the module docstring)."""

    images: np.ndarray
    masks: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    instances: list[np.ndarray]
    sources: list[np.ndarray]  # per scene, the index of each digit in the source set
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _place(rng: np.random.Generator, side: int, size: int, taken: list[tuple[int, int, int, int]],
           tries: int) -> tuple[int, int] | None:  # fmt: skip
    """A top-left corner for a ``size`` square that overlaps no taken square, or None."""
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        if all(x + size <= x1 or x2 <= x or y + size <= y1 or y2 <= y for x1, y1, x2, y2 in taken):
            return y, x
    return None


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` px in every direction (a square structuring element)."""
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(grown) > 0


def compose_scenes(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    n_scenes: int,
    *,
    side: int = 224,
    digits_per_scene: tuple[int, int] = (1, 4),
    scales: tuple[int, ...] = DEFAULT_SCALES,
    ink: int = 128,
    grow: int = 0,
    seed: int = 0,
    tries: int = 50,
    classes: list[str] | None = None,
) -> Scenes:
    """Compose ``n_scenes`` scenes from ``digits`` (``(m, h, w)`` uint8) and their labels.

    Args:
        digits: the source digits; each is used at most once over all scenes while any
            is unused (then the pool is reshuffled), so disjoint sources give disjoint splits.
        digit_labels: ``(m,)`` classes 0..C-1.
        n_scenes: scenes to make.
        side: canvas side in pixels.
        digits_per_scene: fewest and most digits per scene (both inclusive); a digit that
            finds no free place after ``tries`` draws is left out, never overlapped.
        scales: digit sides in pixels to draw from.
        ink: pixel value from which a resized digit's pixel counts as its class (below
            it and above 0: :data:`IGNORE_INDEX` in the mask).
        grow: with ``grow`` > 0 the mask labels the digit's region instead of its ink:
            the ink dilated by ``grow`` px (a square of ``2 * grow + 1``), inside the
            digit's own square, with a 2 px ring around it :data:`IGNORE_INDEX`. A model
            that predicts per patch cell cannot draw a stroke thinner than its cell; it can
            draw the region. Boxes and instance masks stay the ink's.
        seed: the draw.
        tries: placement draws per digit.
        classes: class names (default: the digits ``"0"``..``"9"``).

    Raises:
        ConfigError: settings that cannot make a scene (a scale above ``side``, an empty
            source, ``digits_per_scene`` out of order).
    """
    low, high = digits_per_scene
    if not 1 <= low <= high:
        raise ConfigError(f"digits_per_scene must be 1 <= fewest <= most, got {digits_per_scene}")
    if not scales or min(scales) < 1 or max(scales) > side:
        raise ConfigError(f"digit scales must be in 1..{side} px, got {scales}")
    if len(digits) == 0 or len(digits) != len(digit_labels):
        raise ConfigError("compose_scenes needs a non-empty set of digits with one label each")
    if not 0 < ink <= 255:
        raise ConfigError(f"ink must be in 1..255, got {ink}")
    if grow < 0:
        raise ConfigError(f"grow must be >= 0 pixels, got {grow}")
    rng = np.random.default_rng(seed)
    pool: list[int] = []
    images = np.zeros((n_scenes, side, side), dtype=np.uint8)
    masks = np.zeros((n_scenes, side, side), dtype=np.int64)
    boxes, labels, instances, sources = [], [], [], []
    for scene in range(n_scenes):
        taken: list[tuple[int, int, int, int]] = []
        scene_boxes, scene_labels, scene_instances, scene_sources = [], [], [], []
        for _ in range(int(rng.integers(low, high + 1))):
            size = int(rng.choice(scales))
            corner = _place(rng, side, size, taken, tries)
            if corner is None:
                continue
            if not pool:
                pool = rng.permutation(len(digits)).tolist()
            index = pool.pop()
            y, x = corner
            taken.append((x, y, x + size, y + size))
            resized = np.asarray(Image.fromarray(digits[index]).resize((size, size), Image.BILINEAR))
            images[scene, y : y + size, x : x + size] = resized
            inked = resized >= ink
            labelled, uncertain = inked, (resized > 0) & ~inked
            if grow:
                labelled = _dilate(inked, grow)
                uncertain = _dilate(inked, grow + 2) & ~labelled
            region = masks[scene, y : y + size, x : x + size]
            region[uncertain] = IGNORE_INDEX
            if not inked.any():  # a faint source digit: no ink to label, its rim ignored
                continue
            region[labelled] = int(digit_labels[index]) + 1
            instance = np.zeros((side, side), dtype=bool)
            instance[y : y + size, x : x + size] = inked
            rows, cols = np.nonzero(inked)
            scene_boxes.append([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
            scene_labels.append(int(digit_labels[index]))
            scene_instances.append(instance)
            scene_sources.append(index)
        boxes.append(np.asarray(scene_boxes, dtype=np.float32).reshape(-1, 4))
        labels.append(np.asarray(scene_labels, dtype=np.int64))
        instances.append(np.stack(scene_instances) if scene_instances else np.zeros((0, side, side), dtype=bool))
        sources.append(np.asarray(scene_sources, dtype=np.int64))
    # Default: the ten digits, whichever of them this pool holds.
    names = classes if classes is not None else [str(c) for c in range(max(10, int(digit_labels.max()) + 1))]
    return Scenes(images, masks, boxes, labels, instances, sources, list(names))
