"""The dense task types: transforms, features for the criteria, truncation, metrics, task folders."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_dense_model as tiny_model
from helpers import tiny_scenes
from torchvision.ops import box_iou

from sls.backbones import num_blocks, truncate
from sls.data import make_transform
from sls.data.dense import DenseDataset, collate_dense
from sls.data.scenes import IGNORE_INDEX
from sls.errors import ConfigError, DataError
from sls.petl import trainable_state
from sls.tasks import TaskType, get_task, list_tasks, register_task
from sls.tasks.dense import block_maps
from sls.tasks.detection import background_boxes, choose_rois, coco_map, roi_features
from sls.tasks.segmentation import cell_labels, choose_cells, confusion_matrix, segmentation_metrics

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# Transforms --------------------------------------------------------------------------------


def test_masks_and_boxes_survive_the_resize():
    data = tiny_scenes()
    dataset = DenseDataset(data, np.arange(len(data)), make_transform(32, MEAN, STD), 32, "segmentation")
    boxes_set = DenseDataset(data, np.arange(len(data)), make_transform(32, MEAN, STD), 32, "detection")
    for i in range(len(data)):
        image, mask = dataset[i]
        _, target = boxes_set[i]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
        # nearest neighbour: no label is invented by blending
        assert set(mask.unique().tolist()) <= set(np.unique(data.mask(i)).tolist())
        assert torch.equal(target["boxes"], torch.as_tensor(data.scenes.boxes[i]) / 2)
        for box, label in zip(target["boxes"], target["labels"]):
            x1, y1, x2, y2 = box.tolist()
            inside = mask[int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))]
            assert (inside == label + 1).any()  # the object's pixels are inside its box
        assert torch.equal(dataset.target(i), mask)  # the target alone is the same as with the image


def test_collate_keeps_one_target_dict_per_image():
    data = tiny_scenes()
    dataset = DenseDataset(data, np.arange(4), make_transform(32, MEAN, STD), 32, "detection")
    images, targets = collate_dense([dataset[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32) and len(targets) == 4 and set(targets[0]) == {"boxes", "labels"}


def test_a_mask_of_another_size_is_one_line():
    from sls.data.dense import resize_target

    with pytest.raises(DataError, match="belongs to an image of 10x8 px"):
        resize_target(np.zeros((9, 10), dtype=np.int64), None, (10, 8), 16)


# Features for the criteria -----------------------------------------------------------------


def test_cell_labels_by_hand():
    mask = torch.zeros(4, 4, dtype=torch.int64)
    mask[:2, :2] = 1  # cell 0: all class 1
    mask[:2, 2:] = torch.tensor([[2, 2], [0, IGNORE_INDEX]])  # cell 1: 2 of 3 labelled are class 2
    mask[2:, :2] = IGNORE_INDEX  # cell 2: all ignored
    mask[2:, 2:] = torch.tensor([[1, 2], [0, 3]])  # cell 3: no majority
    label, clean = cell_labels(mask, (2, 2), num_classes=4)
    assert label[:2].tolist() == [1, 2]
    assert clean.tolist() == [True, True, False, False]


def test_cells_are_class_balanced_and_seeded():
    labels = [torch.tensor([0, 0, 0, 0, 1, 2]), torch.tensor([0, 0, 0, 0, 0, 1])]
    clean = [torch.ones(6, dtype=torch.bool)] * 2
    chosen = choose_cells(labels, clean, samples=6)
    counts = np.bincount([label for _, _, label in chosen])
    assert counts.tolist() == [2, 2, 1]  # two of each, all of the rare class
    assert chosen == choose_cells(labels, clean, samples=6)
    assert len(choose_cells(labels, clean, samples=None)) == 12


def test_roi_features_line_up_with_their_boxes():
    # A map whose two channels are each cell's centre in pixels: a box's RoI feature is its centre.
    stride, cells = 8, 8
    centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride
    fmap = torch.stack([centres.expand(cells, cells), centres[:, None].expand(cells, cells)])[None]
    boxes = torch.tensor([[8.0, 16.0, 24.0, 48.0], [0.0, 0.0, 64.0, 64.0], [40.0, 8.0, 56.0, 16.0]])
    features = roi_features(fmap, [boxes], img_size=64)
    expected = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
    assert torch.allclose(features, expected, atol=1e-4)


def test_background_boxes_keep_clear_of_the_objects():
    objects = torch.tensor([[0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 60.0, 60.0]])
    found = background_boxes(objects, 64, count=20, rng=np.random.default_rng(0))
    assert len(found) > 0 and float(box_iou(found, objects).max()) < 0.1


def test_rois_include_a_background_class_so_one_class_still_scores():
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0])} for _ in range(5)]
    chosen = choose_rois(targets, num_classes=1, img_size=64, samples=None)
    assert sorted({label for _, _, label in chosen}) == [0, 1]


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_features_are_one_row_per_sample_and_block(task):
    data = tiny_scenes()
    kind, model, info = tiny_model(task)
    dataset = kind.dataset(data, data.splits["train"], make_transform(64, info.mean, info.std), 64)
    found = kind.block_features(model, kind.loader(dataset, batch_size=4), samples=30, progress=False)
    assert len(found.features) == 4
    assert all(f.shape == (len(found.labels), 192) for f in found.features)
    assert found.block_input.shape == found.features[0].shape
    again = kind.block_features(model, kind.loader(dataset, batch_size=3), samples=30, progress=False)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(found.features, again.features))  # batches do not matter
    assert np.array_equal(found.labels, again.labels)


# Truncation --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_truncation_keeps_the_kept_blocks_dense_outputs_bit_identical(task):
    _, model, _ = tiny_model(task)
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    full: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        block_maps(model.encoder, images, lambda i, fmap: full.__setitem__(i, fmap.clone()))
        head_before = copy.deepcopy(model.head.state_dict())
        cut = truncate(copy.deepcopy(model), 2)
        kept: dict[int, torch.Tensor] = {}
        block_maps(cut.encoder, images, lambda i, fmap: kept.__setitem__(i, fmap.clone()))
        expected_final = cut.encoder.norm(full[1].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(full[1].shape)
        final = cut.feature_map(images)
    assert num_blocks(cut) == 2 and sorted(kept) == [0, 1]
    assert torch.equal(kept[0], full[0]) and torch.equal(kept[1], full[1])
    assert torch.equal(final, expected_final)
    assert all(torch.equal(v, head_before[k]) for k, v in cut.head.state_dict().items())  # the trained head stays


def test_the_head_buffers_are_task_tensors():
    _, model, _ = tiny_model("segmentation")
    state = trainable_state(model)
    assert "head.norm.running_mean" in state and "head.classify.weight" in state
    assert not any(name.startswith("encoder.") and "lora" not in name for name in state)


def test_a_detector_trains_and_predicts_for_each_kind():
    data = tiny_scenes(n=6)
    for detector in ("fcos", "retinanet", "fasterrcnn"):
        kind, model, info = tiny_model("detection", detector=detector)
        dataset = kind.dataset(data, np.arange(4), make_transform(64, info.mean, info.std), 64)
        images, targets = collate_dense([dataset[i] for i in range(4)])
        model.train()
        loss = model(images, targets)
        loss.backward()
        assert torch.isfinite(loss) and model.head.backbone.pyramid.up.weight.grad is not None
        model.eval()
        with torch.no_grad():
            out = model(images)
        assert len(out) == 4 and all(set(d) == {"boxes", "scores", "labels"} for d in out)
        assert all(((d["labels"] >= 0) & (d["labels"] < 3)).all() for d in out)  # Faster R-CNN's shift undone


def test_unknown_detector_is_one_line():
    with pytest.raises(ConfigError, match="unknown detector 'yolo'"):
        get_task("detection", detector="yolo")


# Metrics -----------------------------------------------------------------------------------


def test_miou_against_scikit_learn():
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    target = torch.as_tensor(rng.integers(0, 4, size=(3, 20, 20)))
    target[0, :5] = IGNORE_INDEX
    predicted = torch.where(torch.as_tensor(rng.random((3, 20, 20))) < 0.7, target, torch.as_tensor(rng.integers(0, 4, (3, 20, 20))))
    predicted[target == IGNORE_INDEX] = 0
    keep = (target != IGNORE_INDEX).numpy().ravel()
    t, p = target.numpy().ravel()[keep], predicted.numpy().ravel()[keep]
    confusion = confusion_matrix(predicted, target, 4)
    assert np.array_equal(confusion.numpy(), sk_confusion(t, p, labels=range(4)))
    metrics = segmentation_metrics(confusion)
    assert metrics["mIoU"] == pytest.approx(jaccard_score(t, p, average="macro"))
    assert metrics["pixel_accuracy"] == pytest.approx(float((t == p).mean()))


def test_miou_skips_a_class_in_neither_labels_nor_predictions():
    confusion = torch.tensor([[5, 1, 0], [1, 3, 0], [0, 0, 0]])
    metrics = segmentation_metrics(confusion)
    assert metrics["iou_per_class"][2] is None
    assert metrics["mIoU"] == pytest.approx((5 / 7 + 3 / 5) / 2)


def test_a_mask_label_out_of_range_is_refused():
    with pytest.raises(DataError, match="outside 0..2"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 3], [1, 1]]), 3)


def _random_detections(seed: int, images: int = 6, classes: int = 3):
    rng = np.random.default_rng(seed)
    found, truth = [], []
    for _ in range(images):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 60, size=(n, 2))
        wh = rng.uniform(10, 40, size=(n, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        labels = torch.as_tensor(rng.integers(0, classes, n))
        truth.append({"boxes": boxes, "labels": labels})
        jitter = torch.as_tensor(rng.normal(0, 4, size=(n, 4)), dtype=torch.float32)
        extra = torch.tensor(np.concatenate([xy[:1] + 30, xy[:1] + 50], 1), dtype=torch.float32)
        found.append({"boxes": torch.cat([boxes + jitter, extra]), "scores": torch.as_tensor(rng.random(n + 1)),
                      "labels": torch.cat([labels, torch.as_tensor(rng.integers(0, classes, 1))])})  # fmt: skip
    return found, truth


def test_coco_map_against_faster_coco_eval():
    faster = pytest.importorskip("faster_coco_eval")
    from faster_coco_eval import COCO, COCOeval_faster

    found, truth = _random_detections(0)
    ours = coco_map(found, truth, 3)
    images = [{"id": i, "width": 100, "height": 100} for i in range(len(truth))]
    annotations = [{"id": len(images) * 10 + j + i * 10, "image_id": i, "category_id": int(lab),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
                   for i, t in enumerate(truth) for j, (b, lab) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist()))]  # fmt: skip
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(3)]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
                     for i, d in enumerate(found) for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())])  # fmt: skip
    evaluation = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert faster.__version__
    assert ours["mAP"] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert ours["mAP50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
    assert 0 < ours["mAP"] < ours["mAP50"] <= 1


def test_coco_map_by_hand():
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}]
    perfect = [{"boxes": truth[0]["boxes"], "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    assert coco_map(perfect, truth, 1)["mAP"] == pytest.approx(1.0)
    # IoU 0.58 (a 10x5.8 box inside the 10x10 one): a hit at IoU thresholds 0.50 and 0.55 only -> 2 of 10
    partial = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 5.8]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    result = coco_map(partial, truth, 1)
    assert result["mAP50"] == pytest.approx(1.0) and result["mAP"] == pytest.approx(0.2)
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert coco_map(none, truth, 1)["mAP"] == 0.0


# The registry ------------------------------------------------------------------------------


def test_a_fourth_task_type_is_one_registered_class():
    @register_task
    class Counting(TaskType):
        name = "counting-test"
        metric = "accuracy"

    try:
        assert "counting-test" in list_tasks()
        assert isinstance(get_task("counting-test"), Counting)
    finally:
        from sls.tasks import _TASKS

        del _TASKS["counting-test"]
    with pytest.raises(ConfigError, match="unknown task type 'counting-test'; choose one of: classification, "):
        get_task("counting-test")


# Export ------------------------------------------------------------------------------------


def test_a_segmentation_task_exports_to_onnx_with_the_same_logits(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from sls.export import export_model, read_export_metadata

    _, model, _ = tiny_model("segmentation")
    model.eval()
    path = export_model(model, tmp_path / "seg.onnx", "onnx", img_size=64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    assert logits.shape == (2, 4, 64, 64) and np.allclose(logits, expected, atol=1e-4)
    saved = export_model(model, tmp_path / "seg.safetensors", "safetensors", img_size=64)
    meta = read_export_metadata(saved)
    assert meta["task"] == "segmentation" and meta["num_classes"] == 4 and meta["loader"] == "sls"


def test_a_detection_task_exports_as_safetensors_only(tmp_path):
    from sls.export import export_model

    _, model, _ = tiny_model("detection")
    with pytest.raises(ConfigError, match="safetensors only"):
        export_model(model, tmp_path / "det.onnx", "onnx", img_size=64)
    assert export_model(model, tmp_path / "det.safetensors", "safetensors", img_size=64).is_file()


# Swin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_a_swin_dense_model_cut_before_its_last_stage_gets_a_head_of_the_kept_width(task):
    from sls.backbones import create_backbone
    from sls.petl import create_petl

    torch.manual_seed(0)
    encoder, _ = create_backbone("swin_tiny_patch4_window7_224", num_classes=0, weights="random", img_size=64,
                                 model_kwargs=dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=2))  # fmt: skip
    create_petl("lora").apply(encoder)
    model = get_task(task).build_model(encoder, 3, 64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
        cut = truncate(copy.deepcopy(model), 3)  # inside stage 2: 32 channels at stride 8
        after = cut(images)
    assert cut.feature_map(images).shape[1] == 32 == cut.head_width
    assert all(p.requires_grad for p in cut.head.parameters())
    if task == "segmentation":
        assert cut.head.norm.num_features == cut.head.classify.in_channels == 32
        assert before.shape == after.shape == (2, 3, 64, 64)
    else:
        assert cut.head.backbone.pyramid.up.in_channels == 32 and not cut.head.training
        assert len(after) == 2 and set(after[0]) == {"boxes", "scores", "labels"}
