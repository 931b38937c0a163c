"""A user's images on disk: VTAB-1k lists, image-folder trees and CSV files.

- VTAB-1k (the NOAH layout of the PETL literature): a folder with ``train800.txt``,
  ``val200.txt``, ``train800val200.txt`` and ``test.txt``, lines ``relative/path label``.
  Training uses ``train800val200`` (the paper's recipe), validation ``val200`` (a
  subset of it, as in the published code) and test ``test``.
- An image-folder tree: one sub-folder per class (``root/cat/1.jpg``), split by sls;
  or ``root/train/<class>/...`` with ``root/val`` and/or ``root/test`` beside it.
- A CSV file with a header: ``path,label`` and optionally ``split`` (train, val or
  test); relative paths are relative to the CSV's folder; labels are integers or
  class names.

Every problem names the file (and line) at fault.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from sls.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VTAB_LISTS = {"train": "train800val200.txt", "val": "val200.txt", "test": "test.txt"}


@dataclass
class LabelledFiles:
    """Image files with integer labels.

    Attributes:
        paths: one path per sample.
        labels: ``(n,)`` int64 class indices.
        classes: class names, indexed by label.
        source: what was read (folder or file).
        splits: predefined split name -> sample indices, or None to let sls split.
    """

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    source: str
    splits: dict[str, np.ndarray] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.paths)

    def item_name(self, i: int) -> str:
        return str(self.paths[i])

    def content_key(self, indices: np.ndarray) -> str:
        """sha256 of the path, size, modification time and label of these samples (for caches)."""
        digest = hashlib.sha256()
        for i in indices:
            path = self.paths[int(i)]
            stat = path.stat() if path.exists() else None
            digest.update(f"{path.resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}|{self.labels[i]}\n".encode())
        return digest.hexdigest()

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB image; a file that cannot be decoded raises DataError."""
        return read_image(self.paths[i], listed_in=self.source, hint="fix or remove it, or pass --skip-bad-images")


class ImageTooLarge(DataError):
    """An image over the pixel limit (a possible decompression bomb)."""


def read_image(path: str | Path | IO[bytes], *, listed_in: str | None = None, hint: str = "",
               name: str | None = None, max_pixels: int | None = None) -> Image.Image:  # fmt: skip
    """An image file (or a binary file object, called ``name`` in errors) as 8-bit RGB; a
    missing or undecodable file raises DataError naming it, and so does one over the pixel
    limit, ``max_pixels`` or PIL's ``Image.MAX_IMAGE_PIXELS`` (where PIL only warns up to
    twice that), as :class:`ImageTooLarge`: a decompression bomb would take gigabytes to
    decode. The limit is checked from the header, before anything is decoded."""
    label = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLarge(f"{label}: {img.width}x{img.height} pixels, over the limit of {max_pixels}; "
                                        "refused as a possible decompression bomb")  # fmt: skip
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"{label}: {' '.join(str(err).split())[:200]}; refused as a possible decompression bomb "
                            "(raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)") from None  # fmt: skip
    except FileNotFoundError:
        where = f" (listed in {listed_in})" if listed_in else ""
        raise DataError(f"{label}: file not found{where}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL names the file in its message; a file object's name is its repr, an address
        reason = "no image format recognised" if isinstance(err, UnidentifiedImageError) else " ".join(str(err).split())
        raise DataError(f"{label}: not a readable image ({reason[:200]}){'; ' + hint if hint else ''}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and 32-bit integer images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if img.mode in ("I", "F") and values.max() <= 255 and values.min() >= 0:
            top = 255.0
        img = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def _integer_label(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not an integer") from None


def read_vtab1k(root: Path) -> LabelledFiles:
    """A VTAB-1k folder: the train800val200 / val200 / test lists."""
    missing = [name for name in VTAB_LISTS.values() if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root}: not a VTAB-1k folder, missing {', '.join(missing)}")
    paths: list[Path] = []
    labels: list[int] = []
    index: dict[Path, int] = {}
    splits: dict[str, list[int]] = {}
    for split, name in VTAB_LISTS.items():
        splits[split] = []
        for number, line in enumerate((root / name).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            where = f"{root / name}:{number}"
            if len(parts) != 2:
                raise DataError(f"{where}: expected 'relative/path label', got {line!r}")
            path, label = root / parts[0], _integer_label(parts[1], where)
            if path not in index:
                index[path] = len(paths)
                paths.append(path)
                labels.append(label)
            elif labels[index[path]] != label:
                raise DataError(f"{where}: {parts[0]} is listed with two labels ({labels[index[path]]} and {label})")
            splits[split].append(index[path])
        if not splits[split]:
            raise DataError(f"{root / name}: the {split} split is empty")
    labels_array = np.asarray(labels, dtype=np.int64)
    _check_label_range(labels_array, str(root))
    n_classes = int(labels_array.max()) + 1
    return LabelledFiles(paths, labels_array, [str(c) for c in range(n_classes)], str(root),
                         {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()})  # fmt: skip


def _check_label_range(labels: np.ndarray, where: str) -> None:
    if labels.min() < 0:
        raise DataError(f"{where}: label {int(labels.min())} is negative; labels must be 0..C-1")
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{where}: every image has label {int(present[0])}; a classifier needs at least 2 classes")
    absent = sorted(set(range(int(present.max()) + 1)) - set(present.tolist()))
    if absent:
        shown = ", ".join(str(a) for a in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise DataError(f"{where}: labels must be 0..C-1 with every class present, but no image has label "
                        f"{shown} while the largest label is {int(present.max())}")  # fmt: skip


def _class_tree(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    return paths, labels, classes


def read_image_folder(root: Path) -> LabelledFiles:
    """One sub-folder per class, or train/ (+ val/, test/) folders of class sub-folders."""
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:
        _, _, classes = _class_tree(split_dirs["train"])
        paths, labels, splits = [], [], {}
        for split, folder in split_dirs.items():
            split_paths, split_labels, split_classes = _class_tree(folder)
            unknown = sorted(set(split_classes) - set(classes))
            if unknown:
                raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not in {split_dirs['train']}")
            if not split_paths:
                raise DataError(f"{folder}: the {split} split holds no images")
            splits[split] = np.arange(len(paths), len(paths) + len(split_paths))
            paths += split_paths
            labels += [classes.index(split_classes[label]) for label in split_labels]
    else:
        paths, labels, classes = _class_tree(root)
        splits = None
    if not paths:
        raise DataError(f"{root}: no images found (expected one sub-folder of images per class)")
    labels_array = np.asarray(labels, dtype=np.int64)
    _check_label_range(labels_array, str(root))
    return LabelledFiles(paths, labels_array, classes, str(root), splits)


def read_csv(path: Path) -> LabelledFiles:
    """``path,label[,split]`` rows; labels are integers or class names."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{path}: expected a header with the columns path,label (and optionally split)")
    raw_labels = [row["label"].strip() for row in rows]
    numeric = all(label.lstrip("-").isdigit() for label in raw_labels)
    classes = None if numeric else sorted(set(raw_labels))
    paths, labels, split_of = [], [], []
    for number, (row, label) in enumerate(zip(rows, raw_labels), start=2):
        where = f"{path}:{number}"
        if not row["path"]:
            raise DataError(f"{where}: empty path")
        file = Path(row["path"])
        paths.append(file if file.is_absolute() else path.parent / file)
        labels.append(_integer_label(label, where) if numeric else classes.index(label))
        split = (row.get("split") or "").strip()
        if split not in ("", "train", "val", "test"):
            raise DataError(f"{where}: split {split!r} is not train, val or test")
        split_of.append(split)
    labels_array = np.asarray(labels, dtype=np.int64)
    _check_label_range(labels_array, str(path))
    splits = None
    if any(split_of):
        if not all(split_of):
            raise DataError(f"{path}: the split column is filled on some rows only")
        splits = {s: np.flatnonzero(np.asarray(split_of) == s) for s in ("train", "val", "test")}
        splits = {k: v for k, v in splits.items() if len(v)}
        if "train" not in splits or "test" not in splits:
            raise DataError(f"{path}: a split column needs train and test rows")
    if classes is None:
        classes = [str(c) for c in range(int(labels_array.max()) + 1)]
    return LabelledFiles(paths, labels_array, classes, str(path), splits)


def read_files(spec: str) -> LabelledFiles:
    """Dispatch on what ``spec`` is: a VTAB-1k folder, an image-folder tree or a CSV file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "test.txt").is_file() or (path / "train800val200.txt").is_file():
            return read_vtab1k(path)
        return read_image_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_csv(path)
    raise DataError(f"{spec}: not a dataset folder or a .csv file")


def find_bad_images(files: LabelledFiles, indices: np.ndarray) -> list[tuple[int, str]]:
    """(index, reason) of every listed image that is missing or cannot be decoded."""
    bad = []
    for i in indices:
        try:
            files.image(int(i))
        except DataError as err:
            bad.append((int(i), str(err)))
    return bad
