"""The `sls` command: a tiny run end to end, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sls.cli import main

TINY = ["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
        "--train-samples", "200", "--test-samples", "100", "--analysis-samples", "all", "--epochs", "1",
        "--force", "--quiet"]  # fmt: skip
# --force: one epoch on random weights is a mechanics test; the near-chance check has tests of its own.


def test_run_writes_a_task_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "task"
    assert main([*TINY, "--out", str(out), "--petl", "adapter", "--petl-option", "bottleneck=4"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "throughput" in printed and str(out) in printed
    record = json.loads((out / "record.json").read_text())
    assert record["petl"] == {"method": "adapter", "hparams": {"bottleneck": 4, "scale": 0.1, "dropout": 0.1,
                                                               "activation": "relu", "placement": "parallel"}}
    assert "GFLOPs per image" in printed and "latency (batch 1" in printed
    assert record["data"]["analysed_train_samples"] == 200
    # The summary is followed by the rule's margin to T when the rule fired (one epoch on
    # random weights may leave SC_N <= 0: tests/test_stages.py checks the margin line on a
    # task where it fires).
    if record["selection_reason"] == "rule":
        assert f"margin to T: {record['selection_margin']:.3f}" in printed
    else:
        assert "margin to T" not in printed and record.get("selection_margin") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--data", "cifar"], "unknown dataset 'cifar'"),
        (["--depth", "9"], "--depth 9 is out of range: the model has blocks 1..6"),
        (["--petl", "prefix"], "unknown PETL method 'prefix'"),
        (["--petl-option", "rank=4"], "lora has no option rank"),
        (["--alpha", "-1"], "alpha must be a finite number >= 0"),
        (["--weights", "/nonexistent/w.safetensors"], "weights file /nonexistent/w.safetensors does not exist"),
        (["--train-samples", "5"], "cannot hold all 10 classes"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, extra, message):
    out = tmp_path / "task"
    assert main([*TINY, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sls: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "sls.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("sls ")


ANALYZE = ["analyze", "--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
           "--samples", "200", "--quiet"]  # fmt: skip


def test_analyze_writes_scores_and_reuses_cached_features(tmp_path, capsys):
    first = tmp_path / "first"
    assert main([*ANALYZE, "--criterion", "sls,cka,block-influence", "--seeds", "2", "--out", str(first)]) == 0
    assert "features computed and cached" in capsys.readouterr().out
    assert sorted(p.name for p in first.iterdir()) == ["scores.csv", "scores.json", "scores.png", "tsne.png"]
    summary = json.loads((first / "scores.json").read_text())
    assert [c["criterion"] for c in summary["criteria"]] == ["sls", "cka", "block-influence"]
    sls_result = summary["criteria"][0]
    assert len(sls_result["scores_per_seed"]) == 2 and len(sls_result["depths_per_seed"]) == 2
    rows = (first / "scores.csv").read_text().splitlines()
    assert rows[0] == "criterion,block,score,std,kept" and len(rows) == 1 + 3 * 6

    second = tmp_path / "second"
    assert main([*ANALYZE, "--criterion", "silhouette", "--out", str(second)]) == 0
    assert "features from the cache" in capsys.readouterr().out
    assert json.loads((second / "scores.json").read_text())["feature_cache_hit"] is True
    assert not (second / "tsne.png").exists()


@pytest.mark.slow  # the lean suite keeps CI's fresh clone under 10 minutes
def test_analyze_a_task_uses_its_finetuned_model(tmp_path, capsys):
    task = tmp_path / "task"
    assert main([*TINY, "--out", str(task)]) == 0
    record = json.loads((task / "record.json").read_text())
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert main([*ANALYZE[:1], "--task", str(task), "--data", "digits", "--samples", "200", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "scores.json").read_text())
    assert len(summary["criteria"][0]["scores"]) == record["backbone"]["num_blocks"]
    # The run scored the same 200 training images of the same fine-tuned model: same features, same scores.
    assert summary["feature_cache_hit"] is True
    scored = [i for i, score in enumerate(record["scores"]) if score is not None]  # the run scored the needed blocks
    assert [i + 1 for i in scored] == record["scored_blocks"]
    assert [summary["criteria"][0]["scores"][i] for i in scored] == pytest.approx([record["scores"][i] for i in scored])


def test_analyze_refuses_unknown_criterion_before_any_work(tmp_path, capsys):
    assert main([*ANALYZE, "--criterion", "sls,nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown criterion 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_model_options_reach_timm_and_the_record(tmp_path, capsys):
    out = tmp_path / "task"
    assert main([*TINY, "--out", str(out), "--model-option", "depth=3", "--model-option", "embed_dim=32"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["backbone"]["num_blocks"] == 3 and len(record["scores"]) == 3
    assert record["backbone"]["model_kwargs"] == {"depth": 3, "embed_dim": 32}
    assert main([*TINY, "--out", str(tmp_path / "bad"), "--model-option", "depth"]) == 2
    assert "--model-option wants KEY=VALUE, got 'depth'" in capsys.readouterr().err
