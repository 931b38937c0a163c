"""SLS against DepGraph on a tiny task (rows, storage, matched ratios, files), and the
deployment commands: `sls export` in every format and `sls predict` against the
library's model, a bad image and a wrong backbone refused with status 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("torch_pruning", reason="the DepGraph baseline needs torch-pruning")

from sls.artifact import task_file  # noqa: E402
from sls.backbones import create_backbone  # noqa: E402
from sls.baselines.depgraph import MAX_RATIO  # noqa: E402
from sls.cli import main  # noqa: E402
from sls.compare import compare, default_depths, ratio_at_throughput  # noqa: E402
from sls.config import RunConfig  # noqa: E402
from sls.data import make_transform  # noqa: E402
from sls.data.files import to_rgb  # noqa: E402
from sls.errors import ConfigError  # noqa: E402
from sls.experiment import load_task  # noqa: E402
from sls.export import deployable_model, read_export_metadata  # noqa: E402
from sls.petl import create_petl  # noqa: E402
from sls.record import read_record  # noqa: E402
from sls.stages import run  # noqa: E402

# The tiny run of test_pipeline: the top block separates the classes, so SLS prunes (k = 3 of 6).
TINY = dict(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200,
            test_samples=100, analysis_samples=None, epochs=5, retrain_epochs=2, lr=3e-2, batch_size=16, throughput_batch=8,
            progress=False)  # fmt: skip
RATIOS = (0.2, 0.4)
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed (pip install onnxruntime)"
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "task"
    record = run(RunConfig(**TINY, out=str(out))).to_dict()
    assert 1 <= record["depth"] < 6  # the comparison below needs a pruned task
    return out, record


@pytest.fixture(scope="module")
def compared(task):
    task_dir, _ = task
    return compare(task_dir, ratios=RATIOS, progress=False)


def rows_of(result, method):
    return [row for row in result["rows"] if row["method"] == method]


def test_rows_cover_the_full_model_sls_and_depgraph(task, compared):
    task_dir, record = task
    names = [row["model"] for row in compared["rows"]]
    k = record["depth"]
    assert names[:3] == ["full", f"SLS k={k} (task)", f"SLS k={k} no retrain"]
    assert {row["depth"] for row in rows_of(compared, "sls")} == set(default_depths(k, 6))
    depgraph = rows_of(compared, "depgraph")
    assert [row["matched"] for row in depgraph] == ["parameters", "throughput", "parameters", "throughput", None, None]
    assert [row["importance"] for row in depgraph] == ["taylor", "taylor", "magnitude", "magnitude", "taylor", "taylor"]
    assert [row["ratio"] for row in depgraph[2:4]] == [row["ratio"] for row in depgraph[:2]]
    assert [row["ratio"] for row in depgraph][4:] == list(RATIOS)
    full = compared["rows"][0]
    for row in compared["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["throughput"] > 0 and row["parameters"] > 0
        assert row["throughput_batch1"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert row["gflops"] > 0 and row["peak_memory_mb"] > 0
        assert row["flops_ratio"] == pytest.approx(full["gflops"] / row["gflops"])
    # Every SLS depth's FLOPs: the embedding, k blocks and the head, so they fall with k.
    sls_rows = sorted(rows_of(compared, "sls"), key=lambda row: row["depth"])
    assert all(a["gflops"] < b["gflops"] for a, b in zip(sls_rows, sls_rows[1:]) if a["depth"] < b["depth"])
    # The same test split as the run: the task's accuracies come back (LoRA merged for
    # timing may move an argmax by float rounding, hence one image of 100).
    accuracies = record["results"]["accuracy"]
    by_name = {row["model"]: row for row in compared["rows"]}
    assert by_name["full"]["accuracy"] == pytest.approx(accuracies["full"], abs=0.011)
    assert by_name[f"SLS k={k} (task)"]["accuracy"] == pytest.approx(accuracies["pruned_retrained"], abs=0.011)
    assert by_name[f"SLS k={k} no retrain"]["accuracy"] == pytest.approx(accuracies["pruned_no_retrain"], abs=0.011)
    # Without retraining, the like-for-like SLS figure is the task's k before retraining.
    assert compared["summary"]["sls_row"] == f"SLS k={k} no retrain"


def test_depgraph_keeps_far_more_bytes_per_task_than_sls(task, compared):
    task_dir, _ = task
    sls_task = compared["rows"][1]
    assert sls_task["storage_bytes"] == task_file(read_record(task_dir), task_dir).stat().st_size + (
        task_dir / "record.json"
    ).stat().st_size
    for row in rows_of(compared, "depgraph"):
        # The equal-speed ratio follows the timing (on this tiny model anywhere up to 0.9, where a
        # 64-wide model keeps a few channels: a toy, not a task); the other ratios are fixed.
        if row["matched"] != "throughput":
            assert row["storage_bytes"] > 10 * sls_task["storage_bytes"], row
    by_params = rows_of(compared, "depgraph")[0]
    assert compared["summary"]["storage_ratio_depgraph_over_sls"] == pytest.approx(
        by_params["storage_bytes"] / sls_task["storage_bytes"]
    )


def test_depgraph_storage_in_the_indices_accounting_is_about_sls_size(task, compared):
    sls_task = compared["rows"][1]
    for row in compared["rows"]:
        if row["method"] != "depgraph":
            assert row["storage_bytes_indices"] == row["storage_bytes"]
            continue
        # kept-channel indices + PETL at the pruned widths + head + record: a few kB more
        # than SLS at most, never the pruned backbone's size.
        assert sls_task["storage_bytes"] / 4 < row["storage_bytes_indices"] < 3 * sls_task["storage_bytes"], row
        if row["matched"] != "throughput":  # the timing-set ratio can reach a toy model (above)
            assert row["storage_bytes_indices"] < row["storage_bytes"] / 5, row
    summary = compared["summary"]
    by_params = rows_of(compared, "depgraph")[0]
    assert summary["storage_ratio_depgraph_indices_over_sls"] == pytest.approx(
        by_params["storage_bytes_indices"] / sls_task["storage_bytes"]
    )
    assert summary["storage_ratio_depgraph_indices_over_sls"] < 3 < summary["storage_ratio_depgraph_over_sls"]


def test_equal_parameter_ratio_removes_as_many_parameters_as_sls(compared):
    removed = compared["summary"]["parameters_removed"]
    # Every kept width is a multiple of 8: on the 64-wide test_vit one step of 8 residual
    # channels moves about a quarter of the parameters; the search ends on the nearer side.
    assert abs(removed["depgraph_equal_parameters"] - removed["sls"]) <= 0.15 * removed["full"]
    assert removed["sls"] > 0.3 * removed["full"]


def test_files_hold_the_returned_comparison(task, compared):
    task_dir, _ = task
    out = task_dir / "compare"
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json", "compare.png"]
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(compared))
    table = list(csv.DictReader((out / "compare.csv").open()))
    assert [row["model"] for row in table] == [row["model"] for row in compared["rows"]]
    assert [float(row["accuracy"]) for row in table] == pytest.approx([row["accuracy"] for row in compared["rows"]])
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_at_throughput_interpolates_the_measured_curve():
    ratios = [0.0, 0.2, 0.4, 0.6]
    assert ratio_at_throughput(ratios, [100, 120, 160, 200], 140) == pytest.approx(0.3)
    assert ratio_at_throughput(ratios, [100, 120, 160, 200], 90) == 0.0
    # A noisy dip (0.4 timed slower than 0.2) is ironed out: 0.2 holds 130 up to 0.4.
    assert ratio_at_throughput(ratios, [100, 130, 125, 230], 180) == pytest.approx(0.5)
    # Beyond every point: extrapolated from the last two, capped at MAX_RATIO.
    assert ratio_at_throughput(ratios, [100, 120, 160, 200], 220) == pytest.approx(0.7)
    assert ratio_at_throughput(ratios, [100, 120, 160, 200], 1000) == MAX_RATIO
    with pytest.raises(ValueError, match="starting at 0"):
        ratio_at_throughput([0.2, 0.4], [1, 2], 1.5)


def test_bad_ratio_is_refused_before_any_work(task, tmp_path):
    task_dir, _ = task
    with pytest.raises(ConfigError, match=r"ratios must be in \(0, 0.9\]"):
        compare(task_dir, ratios=[0.95], progress=False, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_compare_command_retrains_depgraph_with_the_task_budget(task, tmp_path, capsys):
    task_dir, record = task
    out = tmp_path / "cmp"
    args = ["compare", str(task_dir), "--ratios", "0.3", "--depths", "2", "--retrain", "--quiet", "--out", str(out),
            "--depgraph-heads", "whole"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "storage per task, DepGraph at equal parameters / SLS:" in printed and "equal throughput" in printed
    result = json.loads((out / "compare.json").read_text())
    assert result["settings"]["retrain_epochs"] == record["retrain_epochs"] == 2
    assert all(row["retrained"] for row in result["rows"] if row["method"] == "depgraph")
    # Whole heads: every DepGraph model's attention keeps 32-dim heads (test_vit's size).
    assert result["settings"]["depgraph_heads"] == "whole"
    # The DepGraph rows retrain with the task's own strategy, as the SLS rows do.
    assert result["settings"]["retrain_strategy"] == record["retrain_strategy"]
    assert result["settings"]["depgraph_retrain_strategies"] == [record["retrain_strategy"]]
    assert result["summary"]["sls_row"] == f"SLS k={record['depth']} (task)"


# Deployment: export and predict.


@pytest.fixture(scope="module")
def library_model(task):
    task_dir, _ = task
    model, record = load_task(task_dir)
    record = record.to_dict()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model, images, model(images)


def test_export_command_writes_the_safetensors_model(task, library_model, tmp_path):
    task_dir, record = task
    _, images, expected = library_model
    path = tmp_path / "model.safetensors"
    assert main(["export", str(task_dir), "--format", "safetensors", "--out", str(path)]) == 0
    metadata = read_export_metadata(path)
    assert (metadata["depth"], metadata["petl"]) == (record["depth"], [])  # dropped blocks gone, LoRA merged
    plain = timm.create_model(metadata["timm_name"], depth=metadata["depth"], num_classes=metadata["num_classes"],
                              img_size=metadata["img_size"])  # fmt: skip
    plain.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), expected, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_command_writes_the_torchscript_model(task, library_model, tmp_path):
    task_dir, _ = task
    _, images, expected = library_model
    path = tmp_path / "model.pt"
    assert main(["export", str(task_dir), "--format", "torchscript", "--out", str(path)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(images), expected, rtol=0, atol=1e-4)


@needs_onnxruntime
def test_export_command_writes_the_onnx_model(task, library_model, tmp_path):
    import onnxruntime

    task_dir, _ = task
    _, images, expected = library_model
    path = tmp_path / "model.onnx"
    assert main(["export", str(task_dir), "--format", "onnx", "--out", str(path)]) == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)


def test_export_defaults_to_the_task_folder(task, capsys):
    task_dir, _ = task
    assert main(["export", str(task_dir), "--format", "safetensors"]) == 0
    assert (task_dir / "export" / "model.safetensors").is_file()
    assert str(task_dir / "export" / "model.safetensors") in capsys.readouterr().out


def test_deployable_model_folds_repadapter_away():
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("repadapter").apply(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    images = torch.randn(4, 3, 32, 32, generator=generator)
    deployable = deployable_model(model.eval())
    assert not any(".repadapter." in name for name, _ in deployable.named_parameters())
    assert any(".repadapter." in name for name, _ in model.named_parameters())  # the input is untouched
    with torch.no_grad():
        torch.testing.assert_close(deployable(images), model(images), rtol=0, atol=1e-5)


def write_images(folder):
    """PNG files in three PIL modes and two sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, side) in enumerate([("L", 8), ("RGB", 40), ("RGBA", 16), ("L", 32)]):
        channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
        pixels = rng.integers(0, 256, size=(side, side, *channels), dtype=np.uint8)
        path = folder / f"image{i}.png"
        Image.fromarray(pixels, mode=mode).save(path)
        paths.append(path)
    return paths


def test_predict_prints_the_library_models_label_per_image(task, library_model, tmp_path, capsys):
    task_dir, record = task
    model = library_model[0]
    paths = write_images(tmp_path)
    backbone = record["backbone"]
    transform = make_transform(backbone["img_size"], backbone["mean"], backbone["std"], backbone["interpolation"])
    with torch.no_grad():
        probabilities = model(torch.stack([transform(to_rgb(Image.open(p))) for p in paths])).softmax(dim=-1)
    assert main(["predict", str(task_dir), *map(str, paths), "--batch-size", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths)
    for line, path, row in zip(lines, paths, probabilities):
        label = int(row.argmax())
        assert line == f"{path}: {record['classes'][label]} ({row[label].item():.3f})"


def test_predict_refuses_an_unreadable_image_in_one_line(task, tmp_path, capsys):
    task_dir, _ = task
    good = write_images(tmp_path)[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(task_dir), str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed for the good image either
    err = captured.err.strip()
    assert err.startswith("sls: error: ") and str(bad) in err and "not a readable image" in err and "\n" not in err


@pytest.mark.parametrize("command", [["predict", "IMAGE"], ["export", "--format", "onnx"]])
def test_a_task_for_another_backbone_is_refused(task, tmp_path, capsys, command):
    task_dir, _ = task
    other = tmp_path / "other-task"
    other.mkdir()
    tensors = task_file(read_record(task_dir), task_dir)
    shutil.copy(tensors, other)
    record = json.loads((task_dir / "record.json").read_text())
    record["backbone"]["fingerprint"] = "0" * 64
    (other / "record.json").write_text(json.dumps(record))
    image = write_images(tmp_path)[0]
    args = [command[0], str(other), *[str(image) if a == "IMAGE" else a for a in command[1:]]]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err
    assert "differ from those task" in err and "pass the right --weights" in err
    assert sorted(p.name for p in other.iterdir()) == ["record.json", tensors.name]  # no export written


@pytest.mark.slow
def test_another_retraining_budget_retrains_slss_k_with_it_too(task, tmp_path):
    task_dir, record = task
    out = tmp_path / "cmp"
    assert main(["compare", str(task_dir), "--ratios", "0.3", "--depths", "2", "--retrain-epochs", "1", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "compare.json").read_text())
    k = record["depth"]
    # The task was retrained for 2 epochs; the DepGraph rows for 1: the differences use SLS's k retrained for 1 too.
    assert result["summary"]["sls_row"] == f"SLS k={k} retrained 1 epoch(s)" and result["summary"]["retrain_epochs"] == 1
    by_name = {row["model"]: row for row in result["rows"]}
    assert by_name[f"SLS k={k} retrained 1 epoch(s)"]["retrained"] and by_name[f"SLS k={k} (task)"]["retrained"]


@pytest.mark.slow
def test_depgraph_can_retrain_every_weight_and_is_then_stored_whole(task, tmp_path):
    task_dir, _ = task
    result = compare(task_dir, ratios=(0.3,), depths=[2], retrain_epochs=1, depgraph_train="all", depgraph_lr=1e-3,
                     progress=False, out=tmp_path / "cmp")  # fmt: skip
    assert result["settings"]["depgraph_train"] == "all" and result["settings"]["depgraph_lr"] == 1e-3
    for row in rows_of(result, "depgraph"):
        # Its backbone trained: the task is its whole model in both accountings.
        assert row["retrained"] and row["storage_bytes_indices"] == row["storage_bytes"]
    with pytest.raises(ConfigError, match="depgraph_train must be 'petl' or 'all'"):
        compare(task_dir, depgraph_train="some", progress=False, out=tmp_path / "bad")
