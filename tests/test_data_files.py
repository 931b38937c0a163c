"""User datasets on disk (VTAB-1k lists, image folders, CSV) and the bad-input matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sls.cli import main
from sls.data import ImageDataset, load_dataset, make_splits, make_transform
from sls.errors import DataError

TRANSFORM = make_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def write_image(path, label, mode="RGB", size=12):
    """A small image whose content depends on the label (stripes in one direction)."""
    rng = np.random.default_rng(hash(path.name) % 2**32)
    pixels = rng.integers(0, 60, size=(size, size)).astype(np.float64)
    if label % 2:
        pixels[::3] += 180
    else:
        pixels[:, ::3] += 180
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray((pixels * 257).astype(np.uint16)).save(path)
    elif mode == "RGBA":
        rgba = np.dstack([pixels] * 3 + [np.full_like(pixels, 128)]).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "L":
        Image.fromarray(pixels.astype(np.uint8), "L").save(path)
    else:
        Image.fromarray(np.dstack([pixels] * 3).astype(np.uint8)).save(path)


def make_vtab(root, n_train=8, n_val=4, n_test=6, classes=2):
    lines = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            label = i % classes
            rel = f"images/{split}_{i}.png"
            write_image(root / rel, label)
            rows.append(f"{rel} {label}")
        lines[split] = rows
    (root / "train800.txt").write_text("\n".join(lines["train800"]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines["val200"]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]) + "\n")
    (root / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


def test_vtab1k_lists(tmp_path):
    data = load_dataset(str(make_vtab(tmp_path)))
    splits = make_splits(data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 6)
    assert set(splits.val) <= set(splits.train)  # val200 is inside train800val200, as in VTAB-1k
    assert data.classes == ["0", "1"]
    image, label = ImageDataset(data, splits.test, TRANSFORM)[0]
    assert image.shape == (3, 16, 16) and label == 0


def test_image_folder_tree_and_train_test_folders(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        for i in range(10):
            write_image(tmp_path / "flat" / name / f"{i}.png", label)
            write_image(tmp_path / "split" / ("train" if i < 7 else "test") / name / f"{i}.png", label)
    flat = load_dataset(str(tmp_path / "flat"))
    assert flat.classes == ["cat", "dog"] and flat.splits is None and len(flat) == 20
    splits = make_splits(flat)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
    given = load_dataset(str(tmp_path / "split"))
    assert {k: len(v) for k, v in given.splits.items()} == {"train": 14, "test": 6}


def test_csv_with_names_and_splits(tmp_path):
    rows = ["path,label,split"]
    for i in range(8):
        write_image(tmp_path / f"{i}.png", i % 2)
        rows.append(f"{i}.png,{'odd' if i % 2 else 'even'},{'train' if i < 6 else 'test'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path / "data.csv"))
    assert data.classes == ["even", "odd"]
    np.testing.assert_array_equal(data.labels, [0, 1] * 4)
    assert len(data.splits["train"]) == 6 and len(data.splits["test"]) == 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "RGB"])
def test_grayscale_rgba_and_16_bit_images_just_work(tmp_path, mode):
    write_image(tmp_path / "a" / "x.png", 0, mode=mode)
    write_image(tmp_path / "b" / "y.png", 1, mode=mode)
    data = load_dataset(str(tmp_path))
    image = data.image(0)
    assert image.mode == "RGB" and image.size == (12, 12)
    # 16-bit values are scaled, not clipped: the stripes stay visible.
    pixels = np.asarray(image)[:, :, 0]
    assert pixels.max() > 150 and pixels.min() < 70


# The bad-input matrix -------------------------------------------------------------


def bad_vtab(tmp_path, edit):
    root = make_vtab(tmp_path / "vtab")
    edit(root)
    return root


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: (r / "test.txt").write_text("images/nope.png 0\n" + (r / "test.txt").read_text()),
         "nope.png: file not found"),
        (lambda r: (r / "test.txt").write_text(""), "the test split is empty"),
        (lambda r: (r / "val200.txt").write_text("images/val200_0.png zero\n"), "val200.txt:1: label 'zero' is not an integer"),
        (lambda r: (r / "test.txt").write_text((r / "test.txt").read_text() + "images/test_0.png 7\n"),
         "listed with two labels"),
        (lambda r: (r / "test.txt").write_text("images/test_1.png 5\n"), "no image has label 2, 3, 4"),
        (lambda r: (r / "test.txt").write_text("images/test_1.png -1\n"), "label -1 is negative"),
        (lambda r: (r / "images" / "test_0.png").write_bytes(b"not a png at all"), "test_0.png: not a readable image"),
        (lambda r: (r / "images" / "test_2.png").write_bytes((r / "images" / "test_2.png").read_bytes()[:40]),
         "test_2.png: not a readable image"),
    ],
)
def test_bad_vtab_inputs_name_the_file(tmp_path, edit, message):
    root = bad_vtab(tmp_path, edit)
    with pytest.raises(DataError, match=message):
        data = load_dataset(str(root))
        dataset = ImageDataset(data, make_splits(data).test, TRANSFORM)
        for i in range(len(dataset)):
            dataset[i]


def test_single_class_and_empty_folders(tmp_path):
    for i in range(4):
        write_image(tmp_path / "one" / "only" / f"{i}.png", 0)
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(str(tmp_path / "one"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))


def test_skip_bad_images_reports_instead_of_stopping(tmp_path):
    root = make_vtab(tmp_path)
    (root / "images" / "test_3.png").write_bytes(b"\x89PNG broken")
    data = load_dataset(str(root))
    dataset = ImageDataset(data, make_splits(data).test, TRANSFORM, skip_bad=True)
    assert len(dataset) == 5 and len(dataset.skipped) == 1
    assert "test_3.png" in dataset.skipped[0][1]
    assert all(dataset[i][0].shape == (3, 16, 16) for i in range(len(dataset)))


def test_data_check_command(tmp_path, capsys):
    root = make_vtab(tmp_path)
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "ok: every image reads" in out and "18 images, 2 classes" in out
    (root / "images" / "train800_1.png").write_bytes(b"junk")
    assert main(["data", "check", str(root)]) == 2
    captured = capsys.readouterr()
    assert "train800_1.png: not a readable image" in captured.out
    assert captured.err.strip() == f"sls: error: {root}: 1 unreadable image(s)"


def test_run_on_a_user_folder_with_a_bad_image(tmp_path, capsys):
    root = make_vtab(tmp_path / "data", n_train=80, n_val=20, n_test=20)
    (root / "images" / "train800_5.png").write_bytes(b"junk")
    args = ["run", "--model", "test_vit", "--weights", "random", "--data", str(root), "--img-size", "32",
            "--epochs", "1", "--analysis-samples", "all", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "fails")]) == 2
    assert "train800_5.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "fails" / "record.json").exists()
    assert main([*args, "--skip-bad-images", "--out", str(tmp_path / "t")]) == 0
    assert "sls: skipped" in capsys.readouterr().out
    record = json.loads((tmp_path / "t" / "record.json").read_text())
    assert record["data"]["analysed_train_samples"] == 99


def test_too_few_images_for_tsne_is_found_before_training(tmp_path, capsys):
    root = make_vtab(tmp_path / "data", n_train=60, n_val=20, n_test=20)
    args = ["run", "--model", "test_vit", "--weights", "random", "--data", str(root), "--img-size", "32",
            "--epochs", "1", "--analysis-samples", "all", "--quiet", "--out", str(tmp_path / "t")]  # fmt: skip
    assert main(args) == 2
    assert "needs more than 90 samples, got 80 training images" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def bomb_png(path, side=40000):
    """A PNG whose header claims side x side pixels (1.6 G at 40000): PIL's default limit
    refuses it at open, before decoding a byte (what a decompression bomb looks like)."""
    import struct
    import zlib

    write_image(path, 0)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_an_image_over_pils_pixel_limit_is_a_bad_image_not_a_crash(tmp_path, monkeypatch, capsys):
    root = make_vtab(tmp_path)
    bomb_png(root / "images" / "test_1.png")
    # Between PIL's limit and twice it PIL only warns and decodes; that is refused too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # the others have 144
    write_image(root / "images" / "test_2.png", 0, size=13)  # 169 pixels: over 150, under 300
    data = load_dataset(str(root))
    with pytest.raises(DataError, match=r"test_1.png: .*refused as a possible decompression bomb"):
        ImageDataset(data, make_splits(data).test, TRANSFORM)[next(
            i for i, j in enumerate(make_splits(data).test) if data.item_name(j).endswith("test_1.png"))]
    dataset = ImageDataset(data, make_splits(data).test, TRANSFORM, skip_bad=True)
    names = sorted(reason.split(":")[0].rsplit("/", 1)[-1] for _, reason in dataset.skipped)
    assert names == ["test_1.png", "test_2.png"] and len(dataset) == 4
    assert all("decompression bomb" in reason for _, reason in dataset.skipped)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    assert main(["data", "check", str(root)]) == 2  # only the bomb is bad now
    captured = capsys.readouterr()
    assert "test_1.png" in captured.out and "test_2.png" not in captured.out
    assert captured.err.strip() == f"sls: error: {root}: 1 unreadable image(s)"
