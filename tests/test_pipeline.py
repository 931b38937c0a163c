"""The whole run on a tiny random ViT: task folder contents, consistency, determinism."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from torch.utils.data import DataLoader

from sls.config import RunConfig
from sls.data import ImageDataset, load_dataset, make_transform
from sls.experiment import load_task
from sls.select import select_depth
from sls.stages import run
from sls.train import accuracy

# Enough training for the top block to separate the classes, so SLS prunes (k = 3 here).
TINY = dict(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200,
            test_samples=100, analysis_samples=None, epochs=5, retrain_epochs=2, lr=3e-2, batch_size=16, throughput_batch=8,
            progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "task"
    return run(RunConfig(**TINY, out=str(out))).to_dict(), out


def test_task_folder_contents(tiny_run):
    record, out = tiny_run
    # Tensor files are named by their content's sha256; the lock file stays, holding no lock.
    assert sorted(re.sub(r"-[0-9a-f]{16}\.", "-HASH.", p.name) for p in out.iterdir()) == [
        ".sls.lock", "config.yaml", "finetuned-HASH.safetensors", "record.json", "scores.csv", "scores.png",
        "task-HASH.safetensors", "training.png",
    ]
    assert json.loads((out / "record.json").read_text())["depth"] == record["depth"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [float(r["score"]) for r in rows] == pytest.approx(record["scores"], abs=1e-6)
    assert [int(r["kept"]) for r in rows] == [int(b <= record["depth"]) for b in range(1, 7)]
    for field in ("backbone", "petl", "criterion", "alpha", "scores", "threshold", "depth", "seed", "data",
                  "results", "sls_version", "config"):
        assert field in record
    assert record["backbone"]["fingerprint"] and record["data"]["splits"]["train"]["size"] == 200


def test_record_is_consistent_with_the_rule_and_the_models(tiny_run):
    record, out = tiny_run
    assert record["scores"][-1] > 0 and 1 < record["depth"] < 6, "the tiny run should prune"
    decision = select_depth(np.array(record["scores"]), record["alpha"])
    assert record["threshold"] == pytest.approx(decision.threshold)
    assert record["depth"] == record["selected_depth"] == decision.depth
    params = record["results"]["parameters"]
    # A test_vit block: norms 2x128, qkv 64x192+192, proj 64x64+64, fc1 64x192+192, fc2 192x64+64
    # = 41,728 parameters. The models are counted as deployed: LoRA folded into qkv adds none.
    assert params["full"] - params["pruned"] == (6 - record["depth"]) * 41_728
    # FLOPs of the deployed models: the dropped blocks' share, 2 per multiply-add (5 tokens at 32 px;
    # per block 5 x 40,960 multiply-adds in the linears + 2 heads x 2 x 5 x 5 x 32 in attention).
    flops = {name: figures["flops"] for name, figures in record["results"]["measurements"].items()}
    assert flops["full"] - flops["pruned"] == (6 - record["depth"]) * 2 * (5 * 40_960 + 2 * 2 * 5 * 5 * 32)
    for value in record["results"]["accuracy"].values():
        assert 0.0 <= value <= 1.0
    assert record["results"]["throughput"]["full"] > 0 and record["results"]["throughput"]["pruned"] > 0


def test_saved_task_reproduces_the_reported_accuracy(tiny_run):
    record, out = tiny_run
    model, _ = load_task(out)
    data = load_dataset("digits")
    from sls.data import split_dataset

    splits = split_dataset(data.labels, train_size=200, test_size=100)
    bb = record["backbone"]
    loader = DataLoader(ImageDataset(data, splits.test, make_transform(32, bb["mean"], bb["std"])), batch_size=50)
    assert accuracy(model, loader, progress=False) == pytest.approx(record["results"]["accuracy"]["pruned_retrained"])


def test_same_seed_same_scores_and_k(tiny_run, tmp_path):
    record, _ = tiny_run
    again = run(RunConfig(**TINY, out=str(tmp_path / "again"))).to_dict()
    assert again["scores"] == record["scores"]
    assert again["depth"] == record["depth"]
    assert again["results"]["accuracy"] == record["results"]["accuracy"]


def test_forced_depth_and_no_retrain(tmp_path):
    record = run(RunConfig(**TINY | dict(epochs=1), depth=2, retrain=False, out=str(tmp_path / "t"))).to_dict()
    # A given depth scores no block: no feature pass, no t-SNE.
    assert record["selection_reason"] == "given"
    assert "scores" not in record and "selected_depth" not in record and "scored_blocks" not in record
    assert not (tmp_path / "t" / "scores.png").exists()
    assert record["depth"] == 2
    assert record["results"]["accuracy"]["pruned_retrained"] is None
    model, _ = load_task(tmp_path / "t")
    assert len(model.blocks) == 2
    # --score-all scores every block all the same, and k stays the one given.
    scored = run(RunConfig(**TINY | dict(epochs=1), depth=2, retrain=False, score_all=True,
                           out=str(tmp_path / "s"))).to_dict()  # fmt: skip
    assert scored["depth"] == 2 and scored["scored_blocks"] == list(range(1, 7))
    assert None not in scored["scores"] and scored["selected_depth"] >= 1


def test_a_run_builds_the_backbone_and_reads_the_data_once(tmp_path, monkeypatch):
    import sls.experiment
    from sls.tasks.classification import Classification

    builds, reads = [], []
    real_build, real_load = sls.experiment.create_backbone, Classification.load_data
    monkeypatch.setattr(sls.experiment, "create_backbone", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    monkeypatch.setattr(Classification, "load_data", lambda self, spec: reads.append(spec) or real_load(self, spec))
    record = run(RunConfig(**TINY | dict(epochs=1, retrain_epochs=1), out=str(tmp_path / "t"))).to_dict()
    assert record["stages"] == ["finetune", "prune", "retrain", "evaluate"]
    assert len(builds) == 1 and reads == ["digits"]
    assert all(run_["peak_rss_mb"] > 0 for run_ in record["runs"])  # what each stage held at most, by then
    # The stage commands, each its own command, build and read once each.
    from sls.stages import stage_evaluate

    stage_evaluate(tmp_path / "t", progress=False)
    assert len(builds) == 2 and len(reads) == 2
