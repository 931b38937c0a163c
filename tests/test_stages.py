"""Stage commands over one task folder, resume after a kill, determinism, safe loading."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import sls.pipeline
import sls.retrain
import sls.stages
from sls.artifact import task_file
from sls.backbones import create_backbone
from sls.cli import main
from sls.config import RunConfig
from sls.errors import ConfigError, TaskRecordError
from sls.record import read_record
from sls.stages import run, stage_finetune, stage_prune

TINY = RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200, test_samples=100,
                 analysis_samples=None, epochs=5, retrain_epochs=2, lr=3e-2, batch_size=16, throughput_batch=8, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "task"
    return run(dataclasses.replace(TINY, out=str(out))).to_dict()


def same_outcome(a: dict, b: dict) -> None:
    assert a["scores"] == b["scores"]
    assert a["depth"] == b["depth"]
    assert a["results"]["accuracy"] == b["results"]["accuracy"]


def test_stage_commands_chain_to_the_same_result_as_run(uninterrupted, tmp_path, capsys):
    task = tmp_path / "task"
    args = ["--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32", "--train-samples",
            "200", "--test-samples", "100", "--analysis-samples", "all", "--epochs", "5", "--retrain-epochs", "2", "--lr", "0.03",
            "--batch-size", "16", "--quiet", "--out", str(task)]  # fmt: skip
    assert main(["finetune", *args]) == 0
    assert "next: sls prune" in capsys.readouterr().out
    assert main(["prune", str(task), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"k = {uninterrupted['depth']} of 6 blocks" in printed
    # The margin, by hand from the recorded scores: the stopping block k-1 and block k against T.
    scores, k, threshold = uninterrupted["scores"], uninterrupted["depth"], uninterrupted["threshold"]
    assert uninterrupted["selection_reason"] == "rule" and uninterrupted["passing_below"] == []
    margin = min(threshold - scores[k - 2], scores[k - 1] - threshold)
    assert uninterrupted["selection_margin"] == pytest.approx(margin)
    assert f"margin to T: {margin:.3f}" in printed
    assert main(["retrain", str(task), "--quiet"]) == 0
    assert main(["evaluate", str(task), "--quiet"]) == 0
    record = json.loads((task / "record.json").read_text())
    assert record["stages"] == ["finetune", "prune", "retrain", "evaluate"]
    same_outcome(record, uninterrupted)


@pytest.mark.slow  # the lean suite keeps CI's fresh clone under 10 minutes
def test_a_killed_run_resumes_from_its_last_stage(uninterrupted, tmp_path, monkeypatch):
    config = dataclasses.replace(TINY, out=str(tmp_path / "task"))
    stage_finetune(config)
    stage_prune(config.out, progress=False)
    pruned_file = task_file(read_record(tmp_path / "task"), tmp_path / "task")
    pruned_bytes = pruned_file.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sls.retrain, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    # The interrupted retraining left the folder as the prune stage wrote it.
    assert task_file(read_record(tmp_path / "task"), tmp_path / "task").read_bytes() == pruned_bytes
    assert json.loads((tmp_path / "task" / "record.json").read_text())["stages"] == ["finetune", "prune"]
    assert not [p for p in (tmp_path / "task").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = run(config).to_dict()
    same_outcome(resumed, uninterrupted)


def test_two_runs_with_the_same_seed_are_identical(uninterrupted, tmp_path):
    again = run(dataclasses.replace(TINY, out=str(tmp_path / "again"))).to_dict()
    same_outcome(again, uninterrupted)


@pytest.mark.slow  # the lean suite keeps CI's fresh clone under 10 minutes
def test_prune_over_several_tsne_starts_applies_the_rule_to_the_mean_scores(uninterrupted, tmp_path, capsys):
    import shutil

    from sls.report import depth_distribution
    from sls.select import select_depth

    task = tmp_path / "task"
    shutil.copytree(uninterrupted["config"]["out"], task)
    assert main(["prune", str(task), "--tsne-seeds", "3", "--quiet"]) == 0
    record = json.loads((task / "record.json").read_text())
    per_seed = record["depths_per_seed"]
    # The record's scores (the mean over starts), T and k agree: T and k are the rule on those scores.
    decision = select_depth(record["scores"], record["alpha"])
    assert record["tsne"]["seeds"] == len(per_seed) == 3
    assert (record["depth"], record["threshold"]) == (decision.depth, pytest.approx(decision.threshold))
    assert f"k over 3 t-SNE starts: {depth_distribution(per_seed)}" in capsys.readouterr().out
    # The first start is the one-seed run's; the jittered others move the mean a little.
    assert max(record["scores_std"]) > 0
    single = uninterrupted["scores"]
    assert record["scores"] != single and max(abs(a - b) for a, b in zip(record["scores"], single)) < 0.2
    assert uninterrupted["depths_per_seed"] == [uninterrupted["depth"]] and uninterrupted["tsne"]["seeds"] == 1
    assert main(["retrain", str(task), "--quiet"]) == 0 and main(["evaluate", str(task), "--quiet"]) == 0
    assert "k over 3 t-SNE starts" in capsys.readouterr().out  # in the summary table


def test_show_reports_a_task_at_any_stage_and_writes_nothing(uninterrupted, tmp_path, capsys):
    def contents(folder):
        return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}

    done = Path(uninterrupted["config"]["out"])
    before = contents(done)
    assert main(["show", str(done)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "throughput" in printed  # the run's own summary table
    scores = " ".join(f"{v:.3f}" for v in uninterrupted["scores"])
    threshold, depth = uninterrupted["threshold"], uninterrupted["depth"]
    assert f"sls scores, blocks 1..6: {scores}; T = {threshold:.3f}; k = {depth} of 6 blocks" in printed
    assert f"margin to T: {uninterrupted['selection_margin']:.3f}" in printed
    assert contents(done) == before

    halfway = tmp_path / "halfway"
    record = stage_finetune(dataclasses.replace(TINY, epochs=1, out=str(halfway))).to_dict()
    assert main(["show", str(halfway)]) == 0
    printed = capsys.readouterr().out
    assert f"stages done: finetune; test accuracy: full {100 * record['results']['accuracy']['full']:.1f}%" in printed
    assert f"next: sls prune {halfway}" in printed and "scores" not in printed
    assert main(["show", str(tmp_path)]) == 2
    assert "record.json not found" in capsys.readouterr().err


def test_zero_tsne_starts_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "task"
    assert main(["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--tsne-seeds", "0",
                 "--quiet", "--out", str(out)]) == 2  # fmt: skip
    assert "--tsne-seeds must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_another_run_is_refused(uninterrupted, tmp_path):
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(lr\)"):
        run(dataclasses.replace(TINY, out=uninterrupted["config"]["out"], lr=0.01))


def test_stages_out_of_order(tmp_path):
    with pytest.raises(TaskRecordError, match="record.json not found"):
        stage_prune(tmp_path, progress=False)
    stage_finetune(dataclasses.replace(TINY, epochs=1, out=str(tmp_path / "t")))
    with pytest.raises(TaskRecordError, match="is not pruned yet"):
        sls.stages.stage_retrain(tmp_path / "t", progress=False)


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "task"
    assert main(["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--quiet",
                 "--out", str(out)]) == 2  # fmt: skip
    assert f"cannot write the output folder {out}" in capsys.readouterr().err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    model, _ = create_backbone("test_vit", num_classes=3, weights="random")
    marker = tmp_path / "code-ran"
    state = model.state_dict() | {"payload": _RunsCode(str(marker))}
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="refused to load .*evil.pth: it is a pickle that needs .*mkdir.* safetensors"):
        create_backbone("test_vit", num_classes=3, weights=tmp_path / "evil.pth")
    assert not marker.exists()
    # A plain state dict saved by torch loads fine (weights_only=True).
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    _, info = create_backbone("test_vit", num_classes=3, weights=tmp_path / "plain.pth")
    assert info.weights.endswith("plain.pth")


def test_corrupt_weights_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ConfigError, match="junk.safetensors is not a readable checkpoint"):
        create_backbone("test_vit", num_classes=3, weights=tmp_path / "junk.safetensors")
