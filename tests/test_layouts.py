"""Dense layouts on disk (ADE20K, VOC2012, COCO, images/ + masks/) and check_dense, on tiny synthetic sets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sls.data.layouts import check_dense, load_dense_dataset
from sls.errors import ConfigError, DataError

W, H = 32, 24


def write_rgb(path, seed=0, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path, mask, palette=False):
    """``mask`` as a PNG: mode "P" with a palette (as VOC's) or mode "L"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), "L")
    if palette:
        img = img.convert("P")  # a mode change keeps the values as palette indices
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    img.save(path)


def stripes(values, size=(W, H)):
    """A mask of horizontal bands, one per value."""
    mask = np.zeros((size[1], size[0]), dtype=np.int64)
    for k, band in enumerate(np.array_split(np.arange(size[1]), len(values))):
        mask[band] = values[k]
    return mask


# ADE20K -------------------------------------------------------------------------------------------


def make_ade(root):
    ade = root / "ADEChallengeData2016"
    raw = {"training": [stripes([0, 1, 2]), stripes([150, 3])], "validation": [stripes([1, 1, 0])]}
    for folder, masks in raw.items():
        for k, mask in enumerate(masks):
            write_rgb(ade / "images" / folder / f"ADE_{folder}_{k}.jpg", seed=k)
            write_mask(ade / "annotations" / folder / f"ADE_{folder}_{k}.png", mask)
    return ade, raw


def test_ade20k_shift_splits_and_names(tmp_path):
    ade, raw = make_ade(tmp_path)
    for spec in (tmp_path, ade):
        data = load_dense_dataset(str(spec), "segmentation")
        assert len(data) == 3 and data.source == str(ade)
        assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0, 1], "test": [2]}
    mask = data.mask(0)
    assert mask.dtype == np.int64 and mask.shape == (H, W)
    expected = np.where(raw["training"][0] == 0, 255, raw["training"][0] - 1)
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(data.mask(1))) == {149, 2}
    classes = data.classes_for("segmentation")
    assert classes[:2] == ["class_0", "class_1"] and len(classes) == 150
    assert data.image(0).mode == "RGB" and data.image(0).size == (W, H)
    assert data.item_name(0).endswith("ADE_training_0.jpg")
    assert data.labels.tolist() == [0, 2, 0]  # stripes [0,1,2] -> ignore,0,1: a tie goes to the lowest class
    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i + 1},0.1,1,1,name{i};alias{i}" for i in range(150)]
    (ade / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    named = load_dense_dataset(str(tmp_path), "segmentation")
    assert named.classes_for("segmentation")[:2] == ["name0", "name1"]
    with pytest.raises(DataError, match="no boxes"):
        load_dense_dataset(str(tmp_path), "detection")
    with pytest.raises(DataError, match="no boxes"):
        named.classes_for("detection")
    with pytest.raises(DataError, match="no boxes"):
        named.objects(0)


# VOC2012 ------------------------------------------------------------------------------------------

VOC_XML = """<annotation><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"""


def write_voc_xml(path, objects):
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(VOC_OBJECT.format(name=n, difficult=d, box=b) for n, b, d in objects)
    path.write_text(VOC_XML.format(w=W, h=H, objects=body))


def make_voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000001", "2007_000002", "2007_000003"]
    for k, stem in enumerate(ids):
        write_rgb(voc / "JPEGImages" / f"{stem}.jpg", seed=k)
    write_mask(voc / "SegmentationClass" / f"{ids[0]}.png", stripes([0, 15, 255]), palette=True)
    write_mask(voc / "SegmentationClass" / f"{ids[1]}.png", stripes([1, 0]), palette=True)
    write_voc_xml(voc / "Annotations" / f"{ids[0]}.xml", [("person", (1, 2, 10, 20), 0), ("dog", (5, 5, 8, 8), 1)])
    write_voc_xml(voc / "Annotations" / f"{ids[1]}.xml", [("aeroplane", (3, 1, 32, 24), 0), ("cat", (1, 1, 4, 4), 0)])
    write_voc_xml(voc / "Annotations" / f"{ids[2]}.xml", [("tvmonitor", (10, 10, 20, 20), 0)])
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(f"{ids[0]}\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{ids[1]}\n")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text(f"{ids[0]}\n{ids[1]}\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text(f"{ids[2]}\n")
    return voc


def test_voc_segmentation(tmp_path):
    voc = make_voc(tmp_path)
    assert Image.open(voc / "SegmentationClass" / "2007_000001.png").mode == "P"
    for spec in (tmp_path, voc):
        data = load_dense_dataset(str(spec), "segmentation")
        assert len(data) == 2 and {k: v.tolist() for k, v in data.splits.items()} == {"train": [0], "test": [1]}
    np.testing.assert_array_equal(data.mask(0), stripes([0, 15, 255]))
    classes = data.classes_for("segmentation")
    assert len(classes) == 21 and classes[0] == "background" and classes[15] == "person"
    assert data.classes_for("detection")[0] == "aeroplane" and len(data.classes_for("detection")) == 20
    assert data.labels.tolist() == [15, 1]  # the foreground class, not the larger background


def test_voc_detection_boxes(tmp_path):
    data = load_dense_dataset(str(make_voc(tmp_path)), "detection")
    assert len(data) == 3 and {k: v.tolist() for k, v in data.splits.items()} == {"train": [0, 1], "test": [2]}
    boxes, labels = data.objects(0)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(boxes, [[0, 1, 10, 20]])  # 1-based inclusive -> pixel edges; difficult dog left out
    assert labels.tolist() == [14]  # person, without background
    boxes, labels = data.objects(1)
    np.testing.assert_array_equal(boxes, [[2, 0, 32, 24], [0, 0, 4, 4]])
    assert labels.tolist() == [0, 7]
    assert data.labels.tolist() == [14, 0, 19]


# COCO ---------------------------------------------------------------------------------------------


def write_coco(root, split, images, annotations, categories, image_folder=None):
    folder = image_folder or root / split
    for k, (image_id, name) in enumerate(images):
        write_rgb(folder / name, seed=image_id)
    doc = {"images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in images],
           "annotations": annotations, "categories": categories}  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


COCO_CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def ann(ann_id, image_id, category, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": iscrowd}


def make_coco(root, image_folder=None):
    write_coco(root, "train2017", [(7, "b.jpg"), (3, "a.jpg"), (9, "empty.jpg")],
               [ann(1, 3, 90, [1, 2, 10, 5]), ann(2, 3, 5, [0, 0, 4, 4]), ann(3, 7, 1, [2.5, 3, 4, 6]),
                ann(4, 7, 90, [0, 0, 32, 24], iscrowd=1)], COCO_CATEGORIES,
               image_folder and image_folder / "train2017")  # fmt: skip
    write_coco(root, "val2017", [(11, "c.jpg")], [ann(5, 11, 5, [4, 4, 8, 8])], COCO_CATEGORIES,
               image_folder and image_folder / "val2017")  # fmt: skip
    return root


def test_coco_boxes_and_category_ids(tmp_path):
    data = load_dense_dataset(str(make_coco(tmp_path)), "detection")
    assert data.classes_for("detection") == ["person", "airplane", "toothbrush"]  # ids 1, 5, 90
    assert [p.name for p in data.images] == ["a.jpg", "b.jpg", "empty.jpg", "c.jpg"]  # sorted by image id
    assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0, 1, 2], "test": [3]}
    boxes, labels = data.objects(0)
    np.testing.assert_array_equal(boxes, [[1, 2, 11, 7], [0, 0, 4, 4]])
    assert labels.tolist() == [2, 1]
    boxes, labels = data.objects(1)  # the crowd annotation left out
    np.testing.assert_array_equal(boxes, [[2.5, 3, 6.5, 9]])
    assert labels.tolist() == [0]
    boxes, labels = data.objects(2)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    assert data.image(3).size == (W, H)
    assert data.labels.tolist() == [1, 0, -1, 1]
    with pytest.raises(DataError, match="polygons"):
        load_dense_dataset(str(tmp_path), "segmentation")
    with pytest.raises(DataError, match="polygons"):
        data.mask(0)


def test_coco_images_folder_fallback(tmp_path):
    data = load_dense_dataset(str(make_coco(tmp_path, image_folder=tmp_path / "images")), "detection")
    assert data.images[0] == tmp_path / "images" / "train2017" / "a.jpg"
    assert check_dense(data, "detection").ok


# images/ + masks/ ---------------------------------------------------------------------------------


def make_pair(root, splits=None, classes=("background", "road", "car")):
    masks = {}
    for split in splits or [""]:
        for k in range(2):
            name = f"{split}_{k}" if split else f"img{k}"
            write_rgb(root / "images" / split / f"{name}.jpg", seed=k)
            masks[name] = stripes([0, k + 1, 255])
            write_mask(root / "masks" / split / f"{name}.png", masks[name])
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return masks


def test_mask_folder_without_splits(tmp_path):
    masks = make_pair(tmp_path)
    data = load_dense_dataset(str(tmp_path), "segmentation")
    assert data.splits is None and len(data) == 2
    assert data.classes_for("segmentation") == ["background", "road", "car"]
    np.testing.assert_array_equal(data.mask(1), masks["img1"])
    assert data.labels.tolist() == [1, 2]
    with pytest.raises(DataError, match="no boxes"):
        data.classes_for("detection")
    (tmp_path / "classes.txt").unlink()  # then every mask is read once for the largest class index
    data = load_dense_dataset(str(tmp_path), "segmentation")
    assert data.classes_for("segmentation") == ["class_0", "class_1", "class_2"]


def test_mask_folder_with_splits(tmp_path):
    make_pair(tmp_path, splits=["train", "val", "test"])
    data = load_dense_dataset(str(tmp_path), "segmentation")
    assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0, 1], "val": [2, 3], "test": [4, 5]}
    assert [p.name for p in data.images[2:4]] == ["val_0.jpg", "val_1.jpg"]
    assert data.annotations[4] == tmp_path / "masks" / "test" / "test_0.png"


def test_unknown_layouts_and_tasks(tmp_path):
    with pytest.raises(DataError, match="looked for ADE20K.*VOC2012.*COCO.*images/ \\+ masks/"):
        load_dense_dataset(str(tmp_path), "segmentation")
    with pytest.raises(DataError, match="not a folder"):
        load_dense_dataset(str(tmp_path / "nothing"), "segmentation")
    with pytest.raises(ConfigError, match="unknown dense task"):
        load_dense_dataset(str(tmp_path), "classification")


def test_content_key_follows_the_annotation_file(tmp_path):
    make_pair(tmp_path)
    data = load_dense_dataset(str(tmp_path), "segmentation")
    before = data.content_key(np.arange(2))
    assert before == data.content_key([0, 1]) and before != data.content_key([0])
    stat = data.annotations[1].stat()
    os.utime(data.annotations[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data.content_key(np.arange(2)) != before


# check_dense --------------------------------------------------------------------------------------


def test_check_dense_pixel_counts(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(1)
    masks = [rng.choice([0, 1, 2, 3, 255], size=(H, W), p=[0.4, 0.3, 0.2, 0.0, 0.1]) for _ in range(3)]
    for k, mask in enumerate(masks):
        write_rgb(tmp_path / "images" / f"{k}.png", seed=k)
        write_mask(tmp_path / "masks" / f"{k}.png", mask)
    (tmp_path / "classes.txt").write_text("background\nsky\ntree\nboat\n")
    report = check_dense(load_dense_dataset(str(tmp_path), "segmentation"), "segmentation")
    stacked = np.stack(masks)
    assert report.ok and report.images == 3 and report.classes == ["background", "sky", "tree", "boat"]
    assert report.pixels_per_class == [int((stacked == c).sum()) for c in range(4)]
    assert report.images_per_class == [int(sum((m == c).any() for m in masks)) for c in range(4)]
    assert report.images_per_class[3] == 0 and report.ignored_pixels == int((stacked == 255).sum())
    assert report.objects_per_class is None
    text = report.format()
    assert "boat" in text and "no problems found" in text
    limited = check_dense(load_dense_dataset(str(tmp_path), "segmentation"), "segmentation", limit=1)
    assert limited.images == 1 and limited.pixels_per_class == [int((masks[0] == c).sum()) for c in range(4)]


def test_check_dense_finds_bad_segmentation_files(tmp_path):
    make_pair(tmp_path)  # img0, img1 fine
    for name in ("missing", "broken", "small", "value"):
        write_rgb(tmp_path / "images" / f"{name}.jpg")
    write_mask(tmp_path / "masks" / "broken.png", stripes([0, 1]))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    write_mask(tmp_path / "masks" / "small.png", stripes([1], size=(16, 16)))
    write_mask(tmp_path / "masks" / "value.png", stripes([0, 7, 255]))
    report = check_dense(load_dense_dataset(str(tmp_path), "segmentation"), "segmentation", progress=False)
    assert not report.ok and len(report.problems) == 4
    assert all("\n" not in p for p in report.problems)
    names = ("missing", "broken", "small", "value")
    by_file = {name: [p for p in report.problems if f"{name}." in p] for name in names}
    assert all(len(found) == 1 for found in by_file.values()), report.problems
    assert "missing.png: mask file not found" in by_file["missing"][0]
    assert "broken.jpg: not a readable image" in by_file["broken"][0]
    assert "small.png: mask of 16x16 px" in by_file["small"][0] and f"{W}x{H} px" in by_file["small"][0]
    assert "value.png: mask values 7 out of range" in by_file["value"][0]
    assert "4 problem(s)" in report.format()


def test_check_dense_finds_bad_boxes(tmp_path):
    voc = make_voc(tmp_path)
    write_voc_xml(voc / "Annotations" / "2007_000002.xml",
                  [("cat", (1, 1, 34, 10), 0), ("cat", (5, 5, 4, 9), 0), ("cat", (1, 1, 33, 25), 0)])  # fmt: skip
    (voc / "Annotations" / "2007_000003.xml").unlink()
    data = load_dense_dataset(str(tmp_path), "detection")
    report = check_dense(data, "detection")
    assert len(report.problems) == 3, report.problems
    outside, empty, missing = report.problems
    assert "2007_000002.xml: box 0 [0, 0, 34, 10] lies outside the 32x24 px image" in outside
    assert "2007_000002.xml: box 1 [4, 4, 4, 9] is empty" in empty
    assert "2007_000003.xml: annotation file not found" in missing
    assert report.objects_per_class[14] == 1 and report.objects_per_class[7] == 3  # the box within 1 px passes
    assert report.images_per_class[7] == 1 and report.pixels_per_class is None


def test_check_dense_flags_labels_out_of_range(tmp_path):
    write_rgb(tmp_path / "a.png")

    class OneImage:  # any dense source: check_dense needs only the interface
        source = str(tmp_path)

        def __len__(self):
            return 1

        def item_name(self, i):
            return str(tmp_path / "a.png")

        def image(self, i):
            return Image.open(tmp_path / "a.png").convert("RGB")

        def classes_for(self, task):
            return ["a", "b"]

        def objects(self, i):
            return np.array([[0, 0, 4, 4], [1, 1, 5, 5]], np.float32), np.array([1, 2])

    report = check_dense(OneImage(), "detection")
    assert report.problems == [f"{tmp_path / 'a.png'}: box 1 has label 2, out of range 0..1"]
    assert report.objects_per_class == [0, 1]
