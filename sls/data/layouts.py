"""A user's dense-labelled sets on disk, read into the dense source interface of :mod:`sls.data.dense`.

Four layouts, detected from the folder by :func:`load_dense_dataset`:

- **ADE20K** (SceneParsing): ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; segmentation only, 150 classes.
- **VOC2012**: ``VOCdevkit/VOC2012/`` with ``JPEGImages/``, ``SegmentationClass/`` (palette
  PNGs), ``Annotations/`` (XML boxes) and ``ImageSets/{Segmentation,Main}/{train,val}.txt``;
  segmentation (21 classes, background first) and detection (20 classes).
- **COCO**: ``annotations/instances_{train,val}*.json`` and the images in ``train2017/`` and
  ``val2017/`` (or ``images/...``); detection only.
- **Folder pair**: ``images/`` and ``masks/`` with the same file names (masks PNG, one class
  index per pixel, 255 ignored), optionally split in ``train/`` + ``val/`` and/or ``test/``
  sub-folders; segmentation only.

Each layout's own train / val (or training / validation) parts are its train / test splits;
a copy with only one of the two gets ``splits = None`` and sls splits it.

Loading only indexes the set (lists the files, parses COCO's JSON once); each mask or XML
file is read when its sample is asked for, so a missing or broken annotation shows up on
that sample as a DataError naming the file. :func:`check_dense` reads every sample and
lists such problems.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from sls.data.files import IMAGE_SUFFIXES, read_image
from sls.data.scenes import IGNORE_INDEX
from sls.errors import ConfigError, DataError

TASKS = ("segmentation", "detection")
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # fmt: skip
"""The 20 VOC object classes (detection labels 0..19; segmentation labels 1..20 after background)."""
ADE_CLASSES = 150
MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"}
"""PIL modes of single-channel masks (``P``: palette indices, as VOC's masks are)."""


@dataclass(repr=False, eq=False)
class DenseFiles:
    """Images on disk, each with the annotation file that labels it (read lazily).

    Attributes:
        images: one image path per sample.
        annotations: per sample, the file holding its labels for ``task`` (a mask PNG, a VOC
            XML file, the COCO JSON file); it may be missing, which the sample then reports.
        source: the folder read.
        splits: the set's own split name -> sorted sample indices, or None to let sls split.
        task: the task the set was indexed for (VOC lists different images for each).
    """

    images: list[Path]
    annotations: list[Path]
    source: str
    splits: dict[str, np.ndarray] | None
    task: str

    layout: ClassVar[str] = "dense"
    tasks: ClassVar[tuple[str, ...]] = ()
    missing_task: ClassVar[str] = ""
    """Why a task outside ``tasks`` is unavailable, and what to use instead."""
    background: ClassVar[int | None] = None
    """The segmentation label of the background class, if the set has one."""

    def __len__(self) -> int:
        return len(self.images)

    def item_name(self, i: int) -> str:
        return str(self.images[i])

    def annotation_name(self, i: int, task: str | None = None) -> str:
        """The file that labels sample ``i`` (for messages)."""
        return str(self.annotations[i])

    def content_key(self, indices: Iterable[int]) -> str:
        """sha256 of the path, size and modification time of these samples' images and annotation files."""
        digest = hashlib.sha256()
        for i in indices:
            for path in (self.images[int(i)], self.annotations[int(i)]):
                try:
                    stat = path.stat()
                    size, mtime = stat.st_size, stat.st_mtime_ns
                except OSError:
                    size = mtime = None
                digest.update(f"{path.resolve()}|{size}|{mtime}\n".encode())
        return digest.hexdigest()

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB image; a missing or undecodable file raises DataError."""
        return read_image(self.images[i], listed_in=self.source)

    def classes_for(self, task: str) -> list[str]:
        """The class names of ``task``'s labels; a task this layout has no labels for raises DataError."""
        self._require(task)
        return self._classes(task)

    def mask(self, i: int) -> np.ndarray:
        """``(H, W)`` int64 labels ``0..C-1`` or 255 (ignored) of sample ``i``."""
        self._require("segmentation")
        return self._mask(i)

    def objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(n, 4)`` float32 ``x1, y1, x2, y2`` in pixels and labels ``(n,)`` int64 of sample ``i``."""
        self._require("detection")
        return self._objects(i)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Per image, in ``task``'s numbering, the class covering most of it (background only when
        nothing else is) or its most common object class; -1 when it has none or its annotation
        cannot be read. Bookkeeping only: computed on first use by reading every annotation file."""
        return np.array([self._main_class(i) for i in range(len(self))], dtype=np.int64)

    def _main_class(self, i: int) -> int:
        try:
            if self.task == "segmentation":
                return main_class_of_mask(self.mask(i), len(self.classes_for("segmentation")), self.background)
            return main_class_of_objects(self.objects(i)[1])
        except DataError:
            return -1

    def _require(self, task: str) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown dense task {task!r}; expected one of {', '.join(TASKS)}")
        if task not in self.tasks:
            raise DataError(f"{self.source}: {self.missing_task}")

    def _classes(self, task: str) -> list[str]:
        raise NotImplementedError

    def _mask(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def main_class_of_mask(mask: np.ndarray, n_classes: int, background: int | None) -> int:
    """The class covering most of ``mask`` (ignoring values out of 0..C-1); ``background`` only when
    no other class is present; -1 when no pixel is labelled."""
    values = mask[(mask >= 0) & (mask < n_classes)]
    counts = np.bincount(values.ravel(), minlength=n_classes)
    if counts.sum() == 0:
        return -1
    if background is not None and counts.sum() > counts[background]:
        counts[background] = 0
    return int(counts.argmax())


def main_class_of_objects(labels: np.ndarray) -> int:
    """The most common object class (the lowest on a tie), -1 when there is none."""
    labels = np.asarray(labels, dtype=np.int64)
    labels = labels[labels >= 0]
    return int(np.bincount(labels).argmax()) if len(labels) else -1


def read_mask(path: Path, image: Path) -> np.ndarray:
    """A single-channel mask PNG as ``(H, W)`` int64 (a palette PNG gives its indices); a missing,
    undecodable or multi-channel file raises DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in MASK_MODES:
                return np.asarray(img).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found (the mask of {image})") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable mask ({' '.join(str(err).split())[:200]})") from None
    raise DataError(f"{path}: a {mode} mask; expected a single-channel PNG of class indices or a palette PNG")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _split_ranges(sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Consecutive index ranges, one per split, in the order given."""
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = np.arange(start, start + size, dtype=np.int64)
        start += size
    return splits


def _two_splits(sizes: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The set's train / test ranges, or None (sls splits) when it has only one of them."""
    return _split_ranges(sizes) if all(sizes.get(name) for name in ("train", "test")) else None


# ADE20K ---------------------------------------------------------------------------------------


@dataclass(repr=False, eq=False)
class Ade20kFolder(DenseFiles):
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` with
    ``annotations/{training,validation}/*.png`` of the same stem. Mask value 0 ("other") is
    ignored (255) and value v in 1..150 is class v - 1. Training is the train split,
    validation the test split. Class names from ``objectInfo150.csv`` (or ``.txt``) when present."""

    classes: list[str] = field(default_factory=list)

    layout: ClassVar[str] = "ADE20K"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation",)
    missing_task: ClassVar[str] = "an ADE20K folder has masks only, no boxes; detection needs a VOC or COCO folder"

    def _classes(self, task: str) -> list[str]:
        return list(self.classes)

    def _mask(self, i: int) -> np.ndarray:
        raw = read_mask(self.annotations[i], self.images[i])
        mask = raw - 1
        mask[raw == 0] = IGNORE_INDEX
        return mask


def _ade_root(path: Path) -> Path | None:
    for candidate in (path / "ADEChallengeData2016", path):
        if any((candidate / "images" / s).is_dir() and (candidate / "annotations" / s).is_dir()
               for s in ("training", "validation")):  # fmt: skip
            return candidate
    return None


def _ade_class_names(root: Path) -> list[str]:
    """The 150 names of ``objectInfo150.csv`` / ``.txt`` (the first of each ';'-separated list),
    or ``class_0``..``class_149`` without one."""
    for name in ("objectInfo150.csv", "objectInfo150.txt"):
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        delimiter = "\t" if "\t" in text.partition("\n")[0] else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        if not rows or "Name" not in rows[0]:
            raise DataError(f"{path}: expected a header with a Name column (ADE20K's objectInfo150 table)")
        names = [(row["Name"] or "").split(";")[0].strip() for row in rows]
        if len(names) != ADE_CLASSES:
            raise DataError(f"{path}: lists {len(names)} classes; ADE20K has {ADE_CLASSES}")
        return names
    return [f"class_{c}" for c in range(ADE_CLASSES)]


def read_ade20k(root: Path, task: str) -> Ade20kFolder:
    """Index an ``ADEChallengeData2016`` folder (see :class:`Ade20kFolder`)."""
    images: list[Path] = []
    annotations: list[Path] = []
    sizes = {}
    for folder, split in (("training", "train"), ("validation", "test")):
        listed = _list_images(root / "images" / folder) if (root / "images" / folder).is_dir() else []
        images += listed
        annotations += [root / "annotations" / folder / p.relative_to(root / "images" / folder).with_suffix(".png")
                        for p in listed]  # fmt: skip
        sizes[split] = len(listed)
    if not images:
        raise DataError(f"{root}: no images in images/training or images/validation")
    return Ade20kFolder(images, annotations, str(root), _two_splits(sizes), task, _ade_class_names(root))


# VOC2012 --------------------------------------------------------------------------------------


@dataclass(repr=False, eq=False)
class VocFolder(DenseFiles):
    """PASCAL VOC2012: ``JPEGImages/<id>.jpg``; segmentation masks ``SegmentationClass/<id>.png``
    (palette PNGs: 0 background, 1..20 the classes, 255 the ignored boundary) over the ids of
    ``ImageSets/Segmentation``; boxes in ``Annotations/<id>.xml`` (1-based inclusive corners,
    converted to pixel edges; ``difficult`` objects left out) over the ids of ``ImageSets/Main``.
    The train list is the train split, the val list the test split."""

    root: Path = Path()

    layout: ClassVar[str] = "VOC2012"
    tasks: ClassVar[tuple[str, ...]] = TASKS
    background: ClassVar[int | None] = 0

    def _classes(self, task: str) -> list[str]:
        return ["background", *VOC_CLASSES] if task == "segmentation" else list(VOC_CLASSES)

    def annotation_name(self, i: int, task: str | None = None) -> str:
        return str(self._annotation(i, task or self.task))

    def _annotation(self, i: int, task: str) -> Path:
        stem = self.images[i].stem
        return self.root / "SegmentationClass" / f"{stem}.png" if task == "segmentation" else \
            self.root / "Annotations" / f"{stem}.xml"  # fmt: skip

    def _mask(self, i: int) -> np.ndarray:
        return read_mask(self._annotation(i, "segmentation"), self.images[i])

    def _objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return read_voc_objects(self._annotation(i, "detection"), self.images[i])


def read_voc_objects(path: Path, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """The non-difficult objects of a VOC XML file: boxes ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax,
    y2 = ymax`` (VOC counts pixels from 1, both corners inclusive) and labels 0..19."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found (the boxes of {image})") from None
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{path}: not readable XML ({' '.join(str(err).split())[:200]})") from None
    boxes, labels = [], []
    for number, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if (obj.findtext("difficult") or "0").strip() == "1":
            continue
        if name not in VOC_CLASSES:
            raise DataError(f"{path}: object {number} is a {name!r}, not one of the 20 VOC classes")
        try:
            xmin, ymin, xmax, ymax = (float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: object {number} ({name}) has no numeric bndbox xmin, ymin, xmax, ymax") from None
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(VOC_CLASSES.index(name))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def _voc_root(path: Path) -> Path | None:
    for candidate in (path / "VOCdevkit" / "VOC2012", path / "VOC2012", path):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def _read_id_list(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_voc(root: Path, task: str) -> VocFolder:
    """Index a VOC2012 folder for ``task`` (see :class:`VocFolder`)."""
    lists = root / "ImageSets" / ("Segmentation" if task == "segmentation" else "Main")
    if not (lists / "train.txt").is_file():
        raise DataError(f"{lists / 'train.txt'}: not found; a VOC2012 folder lists its {task} images there")
    images, sizes = [], {}
    for name, split in (("train", "train"), ("val", "test")):
        ids = _read_id_list(lists / f"{name}.txt") if (lists / f"{name}.txt").is_file() else []
        images += [root / "JPEGImages" / f"{stem}.jpg" for stem in ids]
        sizes[split] = len(ids)
    if not images:
        raise DataError(f"{lists}: train.txt and val.txt list no images")
    folder = "SegmentationClass" if task == "segmentation" else "Annotations"
    suffix = ".png" if task == "segmentation" else ".xml"
    annotations = [root / folder / f"{p.stem}{suffix}" for p in images]
    return VocFolder(images, annotations, str(root), _two_splits(sizes), task, root)


# COCO -----------------------------------------------------------------------------------------


@dataclass(repr=False, eq=False)
class CocoFolder(DenseFiles):
    """COCO instances: ``annotations/instances_train*.json`` (train split) and
    ``instances_val*.json`` (test split), parsed once; images under ``<root>/train2017/`` (the
    name after ``instances_``), else ``<root>/images/train2017/``, else ``<root>/images/``.
    Category ids map to 0..C-1 in sorted id order; boxes ``[x, y, w, h]`` become
    ``x, y, x + w, y + h``; ``iscrowd`` annotations are left out; images without annotations
    are kept with no boxes. Detection only."""

    classes: list[str] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    box_labels: list[np.ndarray] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    faults: dict[int, str] = field(default_factory=dict)
    """Sample -> the one-line problem of its annotations (raised when the sample is read)."""

    layout: ClassVar[str] = "COCO"
    tasks: ClassVar[tuple[str, ...]] = ("detection",)
    missing_task: ClassVar[str] = ("COCO segmentation from polygons is out of scope here; for segmentation use an "
                                   "ADE20K, VOC2012 or images/ + masks/ folder")  # fmt: skip

    def _classes(self, task: str) -> list[str]:
        return list(self.classes)

    def annotation_name(self, i: int, task: str | None = None) -> str:
        return f"{self.annotations[i]} (image id {self.image_ids[i]}, {self.images[i].name})"

    def _objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self.faults:
            raise DataError(self.faults[i])
        return self.boxes[i], self.box_labels[i]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Per image its most common object class, -1 when it has none (from the parsed JSON)."""
        return np.array([main_class_of_objects(lab) for lab in self.box_labels], dtype=np.int64)


def _load_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("categories"), list):  # fmt: skip
        raise DataError(f"{path}: not a COCO instances file (expected 'images', 'annotations' and 'categories' lists)")
    return data


def _coco_categories(data: dict, path: Path) -> dict[int, str]:
    try:
        return {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: every category needs an integer 'id' and a 'name'") from None


def _coco_image_folder(root: Path, json_path: Path) -> Path:
    split_name = json_path.stem.removeprefix("instances_")
    candidates = (root / split_name, root / "images" / split_name, root / "images")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DataError(f"{json_path}: no image folder; looked for {', '.join(str(c) for c in candidates)}")


def _coco_objects(annotations: list, path: Path, file_name: str,
                  index: dict[int, int]) -> tuple[np.ndarray, np.ndarray] | str:  # fmt: skip
    """Boxes and labels of one image's annotations, or the one-line problem with them."""
    boxes, labels = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        bbox, category = ann.get("bbox"), ann.get("category_id")
        if category not in index:
            return f"{path}: annotation {ann.get('id')} of {file_name} has category_id {category!r}, not in categories"
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return f"{path}: annotation {ann.get('id')} of {file_name} has bbox {bbox!r}, expected [x, y, w, h]"
        boxes.append([x, y, x + w, y + h])
        labels.append(index[category])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def _coco_jsons(root: Path) -> dict[str, Path]:
    """The train and val instances files (the last by name where several match, e.g. 2017 over 2014)."""
    found = {}
    for prefix, split in (("instances_train", "train"), ("instances_val", "test")):
        matches = sorted((root / "annotations").glob(f"{prefix}*.json"))
        if matches:
            found[split] = matches[-1]
    return found


def read_coco(root: Path, task: str) -> CocoFolder:
    """Index a COCO folder (see :class:`CocoFolder`); with only one of the two JSON files, sls splits it."""
    reader = CocoFolder([], [], str(root), None, task)
    categories: dict[int, str] | None = None
    sizes = {}
    for split, path in _coco_jsons(root).items():
        data = _load_json(path)
        these = _coco_categories(data, path)
        if categories is not None and these != categories:
            raise DataError(f"{path}: its categories differ from the train file's; both must list the same ones")
        categories = these
        index = {cid: label for label, cid in enumerate(sorted(categories))}
        folder = _coco_image_folder(root, path)
        per_image: dict[int, list] = {}
        try:
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            for im in images:
                per_image[int(im["id"])] = []
            for ann in data.get("annotations") or []:
                if ann["image_id"] not in per_image:
                    raise DataError(f"{path}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                                    "which is not in images")  # fmt: skip
                per_image[ann["image_id"]].append(ann)
            for im in images:
                objects = _coco_objects(per_image[int(im["id"])], path, im["file_name"], index)
                if isinstance(objects, str):
                    reader.faults[len(reader.images)] = objects
                    objects = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
                reader.images.append(folder / im["file_name"])
                reader.annotations.append(path)
                reader.image_ids.append(int(im["id"]))
                reader.boxes.append(objects[0])
                reader.box_labels.append(objects[1])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: an image or annotation lacks a field or has a bad one ({err!r})") from None
        sizes[split] = len(images)
    if not reader.images:
        raise DataError(f"{root / 'annotations'}: the instances files list no images")
    reader.classes = [categories[cid] for cid in sorted(categories)]
    reader.splits = _two_splits(sizes)
    return reader


# images/ + masks/ -----------------------------------------------------------------------------


@dataclass(repr=False, eq=False)
class MaskFolder(DenseFiles):
    """``images/`` and ``masks/`` with the same relative paths and stems (``images/a/1.jpg`` ->
    ``masks/a/1.png``): single-channel masks whose values are the class indices, 255 ignored.
    Split when ``images/train/`` and ``images/val/`` and/or ``images/test/`` exist (the masks in
    ``masks/train/`` ...), else sls splits. Class names from ``classes.txt`` (one per line);
    without it every mask is read once at load time to find the largest class index, and the
    classes are named ``class_0``... A class named ``background`` is the background."""

    classes: list[str] = field(default_factory=list)

    layout: ClassVar[str] = "images/ + masks/"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation",)
    missing_task: ClassVar[str] = ("an images/ + masks/ folder has masks only, no boxes; detection needs a VOC or "
                                   "COCO folder")  # fmt: skip

    @property
    def background(self) -> int | None:  # type: ignore[override]
        names = [c.lower() for c in self.classes]
        return names.index("background") if "background" in names else None

    def _classes(self, task: str) -> list[str]:
        return list(self.classes)

    def _mask(self, i: int) -> np.ndarray:
        return read_mask(self.annotations[i], self.images[i])


def _mask_index(masks: Path) -> dict[str, Path]:
    """Relative path without suffix -> mask file (a PNG preferred where several share a stem)."""
    index: dict[str, Path] = {}
    for path in _list_images(masks):
        key = path.relative_to(masks).with_suffix("").as_posix()
        if key not in index or path.suffix.lower() == ".png":
            index[key] = path
    return index


def _classes_from_masks(masks: list[Path], images: list[Path], root: Path) -> list[str]:
    largest = -1
    for mask_path, image in zip(masks, images):
        try:
            values = read_mask(mask_path, image)
        except DataError:
            continue  # check_dense reports it
        values = values[values != IGNORE_INDEX]
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError(f"{root}: no readable mask holds a class index; add a classes.txt (one class name per line)")
    return [f"class_{c}" for c in range(largest + 1)]


def read_mask_folder(root: Path, task: str) -> MaskFolder:
    """Index an ``images/`` + ``masks/`` folder (see :class:`MaskFolder`)."""
    image_root, mask_root = root / "images", root / "masks"
    split_dirs = [s for s in ("train", "val", "test") if (image_root / s).is_dir()]
    if "train" in split_dirs and len(split_dirs) > 1:
        per_split = {s: _list_images(image_root / s) for s in split_dirs}
        empty = [s for s, listed in per_split.items() if not listed]
        if empty:
            raise DataError(f"{image_root / empty[0]}: the {empty[0]} split holds no images")
        images = [p for listed in per_split.values() for p in listed]
        splits = _split_ranges({s: len(listed) for s, listed in per_split.items()})
    else:
        images, splits = _list_images(image_root), None
    if not images:
        raise DataError(f"{image_root}: no images found")
    index = _mask_index(mask_root)
    keys = [p.relative_to(image_root).with_suffix("").as_posix() for p in images]
    if not any(key in index for key in keys):
        raise DataError(f"{mask_root}: no mask has the name of an image in {image_root} (masks/<name>.png for "
                        "images/<name>.jpg)")  # fmt: skip
    masks = [index.get(key, mask_root / f"{key}.png") for key in keys]
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not classes:
            raise DataError(f"{names_file}: no class names (expected one per line)")
    else:
        classes = _classes_from_masks(masks, images, root)
    return MaskFolder(images, masks, str(root), splits, task, classes)


# detection and loading ------------------------------------------------------------------------

LAYOUTS = (
    ("ADE20K (ADEChallengeData2016/images/training)", _ade_root, Ade20kFolder, read_ade20k),
    ("VOC2012 (VOCdevkit/VOC2012/JPEGImages)", _voc_root, VocFolder, read_voc),
    ("COCO (annotations/instances_train*.json)",
     lambda p: p if _coco_jsons(p) else None, CocoFolder, read_coco),
    ("images/ + masks/",
     lambda p: p if (p / "images").is_dir() and (p / "masks").is_dir() else None, MaskFolder, read_mask_folder),
)  # fmt: skip


def load_dense_dataset(spec: str, task: str) -> DenseFiles:
    """The dense set in folder ``spec``, indexed for ``task`` ("segmentation" or "detection"):
    an ADE20K, VOC2012, COCO or images/ + masks/ folder (see the module docstring).

    Raises:
        ConfigError: an unknown task.
        DataError: no layout found, a layout without labels for ``task``, or an unreadable index.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown dense task {task!r}; expected one of {', '.join(TASKS)}")
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DataError(f"{spec}: not a folder; a dense set is an ADE20K, VOC2012, COCO or images/ + masks/ folder")
    for _, find_root, kind, read in LAYOUTS:
        root = find_root(path)
        if root is not None:
            if task not in kind.tasks:
                raise DataError(f"{root}: {kind.missing_task}")
            return read(root, task)
    looked_for = "; ".join(name for name, *_ in LAYOUTS)
    raise DataError(f"{path}: no dense layout found; looked for {looked_for}")


# checking -------------------------------------------------------------------------------------


@dataclass
class DenseReport:
    """What :func:`check_dense` found: per class the images it appears in, its objects (detection)
    or pixels (segmentation), and one line per problem, each naming its file."""

    source: str
    task: str
    classes: list[str]
    images: int
    images_per_class: list[int]
    objects_per_class: list[int] | None = None
    pixels_per_class: list[int] | None = None
    ignored_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 20) -> str:
        """A plain-text table of the classes, then the problems (the first ``max_problems``)."""
        amounts = self.pixels_per_class if self.task == "segmentation" else self.objects_per_class
        unit = "pixels" if self.task == "segmentation" else "objects"
        total = max(sum(amounts or []), 1)
        width = max([len("class"), *(len(c) for c in self.classes)])
        lines = [f"{self.source}: {self.task}, {self.images} images checked, {len(self.classes)} classes",
                 f"{'label':>5}  {'class':<{width}}  {'images':>8}  {unit:>12}  {'share':>6}"]  # fmt: skip
        for label, (name, count) in enumerate(zip(self.classes, self.images_per_class)):
            amount = amounts[label] if amounts else 0
            lines.append(f"{label:>5}  {name:<{width}}  {count:>8}  {amount:>12}  {amount / total:>6.1%}")
        if self.task == "segmentation":
            lines.append(f"ignored pixels (255): {self.ignored_pixels}")
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


def _annotation_name(data, i: int, task: str) -> str:
    name = getattr(data, "annotation_name", None)
    return name(i, task) if name is not None else data.item_name(i)


def _check_mask(mask: np.ndarray, n_classes: int, size: tuple[int, int] | None, where: str,
                image: str) -> tuple[np.ndarray, int, list[str]]:  # fmt: skip
    """Pixels per class, ignored pixels and the problems of one mask."""
    problems = []
    if size is not None and mask.shape != (size[1], size[0]):
        shown = "x".join(str(n) for n in mask.shape[::-1])
        problems.append(f"{where}: mask of {shown} px, but its image {image} is {size[0]}x{size[1]} px")
    valid = (mask >= 0) & (mask < n_classes)
    ignored = mask == IGNORE_INDEX
    bad = np.unique(mask[~valid & ~ignored])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        problems.append(f"{where}: mask values {shown} out of range (classes 0..{n_classes - 1}, 255 ignored)")
    return np.bincount(mask[valid].ravel(), minlength=n_classes), int(ignored.sum()), problems


def _check_objects(boxes: np.ndarray, labels: np.ndarray, n_classes: int, size: tuple[int, int] | None, where: str,
                   image: str) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Objects per class and the problems of one image's boxes."""
    boxes, labels = np.asarray(boxes, dtype=np.float64), np.asarray(labels)
    counts = np.zeros(n_classes, dtype=np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(labels):
        return counts, [f"{where}: boxes of shape {boxes.shape} with {len(labels)} labels; expected (n, 4) and n"]
    problems = []
    for k, (box, label) in enumerate(zip(boxes, labels)):
        shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        x1, y1, x2, y2 = box
        if not np.isfinite(box).all() or x2 <= x1 or y2 <= y1:
            problems.append(f"{where}: box {k} {shown} is empty or not finite (needs x2 > x1 and y2 > y1)")
        elif size is not None and (x1 < -1 or y1 < -1 or x2 > size[0] + 1 or y2 > size[1] + 1):
            problems.append(f"{where}: box {k} {shown} lies outside the {size[0]}x{size[1]} px image {image}")
        if not 0 <= int(label) < n_classes:
            problems.append(f"{where}: box {k} has label {int(label)}, out of range 0..{n_classes - 1}")
        else:
            counts[int(label)] += 1
    return counts, problems


def check_dense(data, task: str, *, limit: int | None = None, progress: bool = False) -> DenseReport:
    """Read every sample of a dense source (or the first ``limit``) for ``task`` and report its
    classes, per class the images it appears in and its pixels or objects, and every problem:
    a missing or unreadable image, mask or annotation file, a mask of another size than its
    image, a mask value out of range, a box outside its image or empty, a label out of range.

    Raises:
        DataError: the source has no labels for ``task``.
    """
    from tqdm.auto import tqdm

    classes = data.classes_for(task)
    n_classes = len(classes)
    count = len(data) if limit is None else max(0, min(int(limit), len(data)))
    report = DenseReport(data.source, task, list(classes), count, [0] * n_classes)
    images_per_class = np.zeros(n_classes, dtype=np.int64)
    amounts = np.zeros(n_classes, dtype=np.int64)
    for i in tqdm(range(count), desc="checking", unit="image", disable=not progress):
        image_name, where = data.item_name(i), _annotation_name(data, i, task)
        try:
            size = data.image(i).size
        except DataError as err:
            size = None
            report.problems.append(str(err))
        try:
            if task == "segmentation":
                present, ignored, problems = _check_mask(data.mask(i), n_classes, size, where, image_name)
                report.ignored_pixels += ignored
            else:
                present, problems = _check_objects(*data.objects(i), n_classes, size, where, image_name)
        except DataError as err:
            report.problems.append(str(err))
            continue
        report.problems += problems
        amounts += present
        images_per_class += present > 0
    report.images_per_class = images_per_class.tolist()
    if task == "segmentation":
        report.pixels_per_class = amounts.tolist()
    else:
        report.objects_per_class = amounts.tolist()
    return report


__all__ = ["Ade20kFolder", "CocoFolder", "DenseFiles", "DenseReport", "MaskFolder", "VocFolder", "check_dense",
           "load_dense_dataset", "read_mask", "read_voc_objects"]  # fmt: skip
