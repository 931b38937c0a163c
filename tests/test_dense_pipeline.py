"""The dense task types through the whole pipeline: stages, record, task folder, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_scenes, write_mask_folder
from PIL import Image

from sls.cli import main
from sls.config import RunConfig
from sls.data.dense import DENSE_EMBEDDED
from sls.errors import ConfigError
from sls.experiment import Experiment, load_task
from sls.stages import run

SETTINGS = dict(model="test_vit", weights="random", img_size=64, epochs=2, retrain_epochs=1, lr=3e-3, batch_size=4,
                analysis_samples=60, perplexity=5.0, depth=3, score_all=True, throughput_batch=2, progress=False, cache=False)  # fmt: skip


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    data = tiny_scenes(n=16)
    data.splits = {"train": np.arange(10), "val": np.arange(10, 12), "test": np.arange(12, 16)}
    write_mask_folder(root, data)
    return root


@pytest.fixture(scope="module")
def segmentation_task(scenes_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "task"
    record = run(RunConfig(task="segmentation", data=str(scenes_folder), out=str(out), **SETTINGS))
    return out, record


def test_a_segmentation_run_records_its_metrics(segmentation_task):
    out, record = segmentation_task
    results = record.results
    assert record.config.task == "segmentation" and results["metric"] == "mIoU"
    assert record.classes == ["background", "a", "b", "c"]
    assert set(results["metrics"]) == {"full", "pruned_no_retrain", "pruned_retrained"}
    for key, metrics in results["metrics"].items():
        assert results["accuracy"][key] == metrics["mIoU"]
        assert 0 <= metrics["pixel_accuracy"] <= 1 and len(metrics["iou_per_class"]) == 4
    assert record.depth == 3 and len(record.scores) == 6
    assert results["measurements"]["pruned"]["flops"] < results["measurements"]["full"]["flops"]
    assert (out / "predictions.png").is_file()


def test_a_dense_task_folder_round_trips(segmentation_task):
    """The task rebuilt from the shared backbone and its tensors (head statistics included)
    scores exactly what the run recorded."""
    out, record = segmentation_task
    model, loaded = load_task(out)
    exp, _ = Experiment.from_record(out)
    assert exp.quality(model, exp.test_loader, "again", progress=False) == record.results["accuracy"]["pruned_retrained"]
    assert loaded.depth == 3


@pytest.mark.slow
def test_a_dense_run_resumes_to_the_same_result(segmentation_task, tmp_path, monkeypatch, scenes_folder):
    import sls.stages

    out, whole = segmentation_task
    config = RunConfig(task="segmentation", data=str(scenes_folder), out=str(tmp_path / "task"), **SETTINGS)
    real = sls.stages.stage_retrain

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sls.stages, "stage_retrain", killed)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(sls.stages, "stage_retrain", real)
    resumed = run(config)
    assert resumed.scores == whole.scores
    assert resumed.results["accuracy"] == whole.results["accuracy"]


@pytest.mark.slow
def test_detection_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(DENSE_EMBEDDED, "tiny-scenes", lambda: tiny_scenes(n=16))
    record = run(RunConfig(task="detection", data="tiny-scenes", out=str(tmp_path / "task"),
                           **{**SETTINGS, "epochs": 1}))  # fmt: skip
    results = record.results
    assert results["metric"] == "mAP" and record.classes == ["a", "b", "c"]
    assert {"mAP", "mAP50", "mAP75"} <= set(results["metrics"]["full"])
    assert results["accuracy"]["pruned_retrained"] == results["metrics"]["pruned_retrained"]["mAP"]
    assert (tmp_path / "task" / "predictions.png").is_file()


def test_classification_data_for_a_dense_task_is_one_line(tmp_path, capsys):
    code = main(["run", "--task", "segmentation", "--data", "mnist5k", "--model", "test_vit", "--weights", "random",
                 "--quiet", "--out", str(tmp_path / "t")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sls: error:") and "\n" not in err and "mnist5k" in err


def test_distill_is_refused_for_a_dense_task():
    with pytest.raises(ConfigError, match="distill"):
        RunConfig(task="segmentation", data="mnist-scenes", retrain_strategy="distill").validate()


def test_data_check_exits_2_on_a_bad_folder(scenes_folder, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(scenes_folder, bad)
    (bad / "masks" / "train" / "scene0.png").unlink()
    Image.fromarray(np.full((64, 64), 9, dtype=np.uint8)).save(bad / "masks" / "train" / "scene1.png")
    assert main(["data", "check", str(scenes_folder), "--task", "segmentation", "--quiet"]) == 0
    good = capsys.readouterr().out
    assert "background" in good
    assert main(["data", "check", str(bad), "--task", "segmentation", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "scene0" in captured.out + captured.err and "scene1" in captured.out + captured.err
    assert captured.err.count("\n") == 1


def test_predict_writes_masks_and_overlays(segmentation_task, scenes_folder, tmp_path):
    out, record = segmentation_task
    images = sorted((scenes_folder / "images" / "test").glob("*.png"))[:2]
    assert main(["predict", str(out), *map(str, images), "--out", str(tmp_path / "pred")]) == 0
    for image in images:
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png"))
        assert mask.shape == (64, 64) and mask.max() < 4
        assert (tmp_path / "pred" / f"{image.stem}.overlay.png").is_file()
    model, _ = load_task(out)
    assert isinstance(model(torch.zeros(1, 3, 64, 64)), torch.Tensor)


@pytest.mark.slow
def test_predict_writes_boxes_as_json(tmp_path, monkeypatch):
    monkeypatch.setitem(DENSE_EMBEDDED, "tiny-scenes", lambda: tiny_scenes(n=16))
    task = tmp_path / "task"
    run(RunConfig(task="detection", data="tiny-scenes", out=str(task), **{**SETTINGS, "epochs": 1}))
    image = tmp_path / "scene.png"
    Image.fromarray(tiny_scenes(n=16).scenes.images[14]).save(image)
    assert main(["predict", str(task), str(image), "--out", str(tmp_path / "pred")]) == 0
    found = json.loads((tmp_path / "pred" / "scene.json").read_text())
    assert set(found) == {"image", "width", "height", "boxes"}
    assert all(set(b) == {"box", "label", "class", "score"} for b in found["boxes"])


def test_the_feature_cache_tells_regions_from_cells(segmentation_task):
    """The samples a dense criterion scores are part of the cache key: cells after regions
    on the same fine-tuned model run the pass again, and score something else."""
    from sls.features import features_dir
    from sls.pipeline import score_blocks
    from sls.tasks import get_task

    out, record = segmentation_task
    exp, _ = Experiment.from_record(out, overrides={"cache": True, "score_all": True})
    regions = score_blocks(exp)
    cached = set(features_dir().glob("*.npz"))
    assert [float(v) for v in score_blocks(exp).scores_] == [float(v) for v in regions.scores_]
    assert set(features_dir().glob("*.npz")) == cached  # the second time from the cache
    assert [float(v) for v in regions.scores_] == record.scores
    exp.task = get_task("segmentation", samples="cells")
    cells = score_blocks(exp)
    assert len(set(features_dir().glob("*.npz")) - cached) == 1
    assert [float(v) for v in cells.scores_] != record.scores
