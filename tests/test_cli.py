"""The `sls` command: a tiny run end to end, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sls.cli import main

TINY = ["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
        "--train-samples", "200", "--test-samples", "100", "--analysis-samples", "all", "--epochs", "1",
        "--quiet"]  # fmt: skip


def test_run_writes_a_task_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "task"
    assert main([*TINY, "--out", str(out), "--petl", "adapter", "--petl-option", "bottleneck=4"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "throughput" in printed and str(out) in printed
    record = json.loads((out / "record.json").read_text())
    assert record["petl"] == {"method": "adapter", "hparams": {"bottleneck": 4, "scale": 1.0, "dropout": 0.0}}
    assert record["data"]["analysed_train_samples"] == 200


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


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "sls.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("sls ")
