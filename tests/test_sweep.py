"""`sls sweep`: the sweep file, skipping finished tasks, failures, shards, the summary."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

import sls.sweep
from sls.cli import main
from sls.errors import ConfigError, DataError
from sls.record import TaskRecord
from sls.sweep import VTAB1K_GROUPS, load_sweep, parse_shard, run_sweep, vtab_group

TINY = {"model": "test_vit", "weights": "random", "data": "digits", "img_size": 32, "train_samples": 100,
        "test_samples": 30, "analysis_samples": None, "epochs": 1, "retrain_epochs": 1, "perplexity": 10,
        "lr": 0.03, "batch_size": 16, "throughput_batch": 4, "device": "cpu", "force": True}  # fmt: skip


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_vtab_groups_cover_the_19_tasks_and_common_spellings():
    groups = list(VTAB1K_GROUPS.values())
    assert (len(groups), groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (19, 7, 4, 8)
    assert vtab_group("~/vtab-1k/cifar/") == vtab_group("CIFAR100") == "natural"
    assert vtab_group("Patch-Camelyon") == vtab_group("retinopathy") == "specialized"
    assert vtab_group("vtab-dsprites_loc") == vtab_group("smallnorb-azimuth") == "structured"
    assert vtab_group("digits") is None


def test_a_sweep_file_merges_defaults_methods_and_tasks(tmp_path):
    (tmp_path / "vtab" / "eurosat").mkdir(parents=True)
    path = write_yaml(tmp_path / "grid.yaml", """
defaults: {model: test_vit, weights: random, lr: 1e-3, petl: repadapter, petl_options: {scale: 1.0}}
data_root: %s
methods:
  - {name: ra, petl: repadapter}
  - {name: cp, petl: convpass, petl_options: {bottleneck: 4}}
tasks:
  - eurosat
  - {data: digits, name: toy, group: natural, petl_options: {scale: 10}, epochs: 3}
""" % (tmp_path / "vtab"))
    sweep = load_sweep(path, out=tmp_path / "out")
    assert [t.name for t in sweep.tasks] == ["eurosat-ra", "eurosat-cp", "toy-ra", "toy-cp"]
    assert [t.group for t in sweep.tasks] == ["specialized", "specialized", "natural", "natural"]
    eurosat_cp, toy_cp = sweep.tasks[1].config, sweep.tasks[3].config
    assert eurosat_cp.data == str(tmp_path / "vtab" / "eurosat")
    assert toy_cp.data == "digits"  # an embedded set is never looked up under data_root
    assert eurosat_cp.lr == 1e-3 and isinstance(eurosat_cp.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert eurosat_cp.petl == "convpass" and eurosat_cp.petl_options == {"scale": 1.0, "bottleneck": 4}
    assert toy_cp.petl_options == {"scale": 10, "bottleneck": 4} and toy_cp.epochs == 3
    assert toy_cp.out == str(tmp_path / "out" / "toy-cp")


def test_vtab_1k_expands_to_19_tasks_and_a_default_out(tmp_path):
    path = write_yaml(tmp_path / "vtab.yaml", "defaults: {model: test_vit}\ndata_root: /data/vtab-1k\ntasks: vtab-1k\n")
    sweep = load_sweep(path)
    assert len(sweep.tasks) == 19 and sweep.out == Path("runs") / "vtab"
    assert sweep.tasks[0].config.data == "/data/vtab-1k/cifar"
    assert {t.group for t in sweep.tasks} == {"natural", "specialized", "structured"}


@pytest.mark.parametrize(("text", "message"), [
    ("tasks: [digits, digits]", "several tasks are named digits"),
    ("tasks: [{data: digits, lrr: 1}]", "unknown setting"),
    ("tasks: [{data: digits, epochs: two}]", "epochs: input should be a valid integer"),
    ("tasks: [{data: digits, lr: fast}]", "lr: input should be a valid number"),
    ("tasks: [{data: digits, out: x}]", "unknown setting"),
    ("tasks: [{name: a/b, data: digits}]", "plain folder name"),
    ("task: [digits]", "unknown key"),
    ("tasks: [digits]\nmethods: [{petl: lora}]", "every method needs a name"),
    ("tasks: [{data: digits, epochs: 0}]", "--epochs"),
    ("tasks: [digits", "not valid YAML"),
])  # fmt: skip
def test_bad_sweep_files_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_yaml(tmp_path / "bad.yaml", text))


def test_shards_are_checked():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def fake_run(results: dict):
    """Stands for sls.stages.run: writes a complete record with the given results per task."""
    calls = []

    def run(config):
        name = Path(config.out).name
        calls.append(name)
        if name not in results:
            raise DataError(f"{name}: no such data")
        accuracy, depth, speedup, storage = results[name]
        backbone = {"model": config.model, "fingerprint": "0" * 64, "num_blocks": 12, "img_size": 224,
                    "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
        record = {"format": 1, "backbone": backbone, "petl": {"method": "lora"}, "num_classes": 3, "depth": depth,
                  "stages": ["finetune", "prune", "retrain", "evaluate"],
                  "config": dataclasses.asdict(config),
                  "results": {"accuracy": {"full": accuracy[0], "pruned_no_retrain": 0.1, "pruned_retrained": accuracy[1]},
                              "throughput": {"full": 100.0, "pruned": 100.0 * speedup}, "storage_bytes": {"task": storage}}}  # fmt: skip
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "record.json").write_text(json.dumps(record))
        return TaskRecord.from_dict(record)

    return run, calls


GRID = """
defaults: {model: test_vit, weights: random}
tasks:
  - {data: /data/cifar}
  - {data: /data/dtd}
  - {data: /data/eurosat}
  - {data: /data/kitti}
  - {data: /data/missing, group: structured}
"""


def test_summary_means_per_task_group_and_over_groups(tmp_path, monkeypatch):
    results = {"cifar": ((0.9, 0.8), 6, 2.0, 1000), "dtd": ((0.7, 0.7), 8, 1.5, 3000),
               "eurosat": ((0.95, 0.9), 4, 3.0, 2000), "kitti": ((0.6, 0.5), 10, 1.2, 4000)}  # fmt: skip
    run, calls = fake_run(results)
    monkeypatch.setattr(sls.sweep, "run", run)
    sweep = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID), out=tmp_path / "out", progress=False)
    report = run_sweep(sweep, log=lambda message: None)
    assert report.ran == ["cifar", "dtd", "eurosat", "kitti"] and list(report.failed) == ["missing"]
    rows = {(r["level"], r["group"], r["task"]): r for r in report.rows}
    natural = rows["group", "natural", ""]
    assert natural["full_accuracy"] == pytest.approx(0.8) and natural["pruned_accuracy"] == pytest.approx(0.75)
    assert natural["depth"] == 7 and natural["speedup"] == pytest.approx(1.75) and natural["storage_bytes"] == 2000
    structured = rows["group", "structured", ""]
    assert structured["status"] == "1/2 done" and structured["full_accuracy"] == pytest.approx(0.6)
    overall = rows["mean of groups", "natural+specialized+structured", ""]
    assert overall["full_accuracy"] == pytest.approx((0.8 + 0.95 + 0.6) / 3)
    assert rows["task", "structured", "missing"]["status"] == "failed"
    with (tmp_path / "out" / "summary.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(report.rows) == 5 + 3 + 1
    assert float(written[0]["speedup"]) == 2.0 and written[0]["task"] == "cifar"
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "4 of 5 tasks done, 1 failed" in markdown
    assert "| cifar | natural | lora | done | 90.0% | 80.0% | 6/12 | 2.00x | - | 1.0 kB |" in markdown
    assert "failed: missing: no such data" in markdown
    assert (tmp_path / "out" / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # Again: the four complete tasks are skipped outright, the failed one is tried again.
    calls.clear()
    again = run_sweep(sweep, log=lambda message: None)
    assert calls == ["missing"] and again.skipped == ["cifar", "dtd", "eurosat", "kitti"]


def test_shards_split_the_tasks_and_the_summary_covers_all(tmp_path, monkeypatch):
    run, calls = fake_run({"cifar": ((0.9, 0.8), 6, 2.0, 1000), "eurosat": ((0.9, 0.9), 4, 3.0, 2000)})
    monkeypatch.setattr(sls.sweep, "run", run)
    sweep = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID), out=tmp_path / "out", progress=False)
    report = run_sweep(sweep, shard=(0, 2), log=lambda message: None)
    assert calls == ["cifar", "eurosat", "missing"]
    statuses = {r["task"]: r["status"] for r in report.rows if r["level"] == "task"}
    assert statuses == {"cifar": "done", "dtd": "pending", "eurosat": "done", "kitti": "pending", "missing": "failed"}


def test_a_dry_run_lists_the_shard_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run, calls = fake_run({})
    monkeypatch.setattr(sls.sweep, "run", run)
    path = write_yaml(tmp_path / "grid.yaml", GRID)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] dtd (natural): new" in out and "[2/2] kitti (structured): new" in out and "cifar" not in out
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sls_sweep_runs_real_tasks_and_exits_2_when_one_fails(tmp_path, capsys):
    defaults = json.dumps(TINY)
    path = write_yaml(tmp_path / "tiny.yaml", f"""
defaults: {defaults}
tasks:
  - {{name: digits-a, group: natural}}
  - {{name: broken, data: {tmp_path / "nowhere"}}}
""")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "1 task(s) failed: broken" in captured.err
    record = json.loads((tmp_path / "out" / "digits-a" / "record.json").read_text())
    assert record["stages"] == ["finetune", "prune", "retrain", "evaluate"]
    with (tmp_path / "out" / "summary.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["task"] == "digits-a" and row["status"] == "done" and int(row["depth"]) == record["depth"]
    assert float(row["full_accuracy"]) == record["results"]["accuracy"]["full"]
    throughput = record["results"]["throughput"]
    assert float(row["speedup"]) == pytest.approx(throughput["pruned"] / throughput["full"])
    figures = record["results"]["measurements"]
    assert float(row["flops_ratio"]) == pytest.approx(figures["full"]["flops"] / figures["pruned"]["flops"])
    assert float(row["speedup_batch1"]) == pytest.approx(
        figures["pruned"]["throughput"]["1"] / figures["full"]["throughput"]["1"])
    assert int(row["storage_bytes"]) == record["results"]["storage_bytes"]["task"]
    # Run again: the finished task is skipped, the broken one fails again.
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "[1/2] digits-a (natural): already done, skipped" in capsys.readouterr().out


def test_a_task_that_crashes_does_not_end_the_sweep(tmp_path, monkeypatch):
    run, calls = fake_run({"cifar": ((0.9, 0.8), 6, 2.0, 1000), "eurosat": ((0.9, 0.9), 4, 3.0, 2000)})

    def out_of_memory_on_dtd(config):
        if config.out.endswith("dtd"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(config)

    monkeypatch.setattr(sls.sweep, "run", out_of_memory_on_dtd)
    sweep = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID), out=tmp_path / "out", progress=False)
    report = run_sweep(sweep, log=lambda message: None)
    assert report.failed["dtd"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "cifar" in report.ran and "eurosat" in report.ran  # the tasks after it ran


def test_a_failure_is_kept_for_every_shard_and_cleared_by_a_successful_retry(tmp_path, monkeypatch):
    results = {"cifar": ((0.9, 0.8), 6, 2.0, 1000), "eurosat": ((0.9, 0.9), 4, 3.0, 2000)}
    run, calls = fake_run(results)
    monkeypatch.setattr(sls.sweep, "run", run)
    sweep = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID), out=tmp_path / "out", progress=False)
    run_sweep(sweep, shard=(0, 2), log=lambda message: None)  # cifar, eurosat, missing (fails)
    calls.clear()
    other = run_sweep(sweep, shard=(1, 2), log=lambda message: None)  # dtd, kitti (both fail here)
    assert calls == ["dtd", "kitti"]
    statuses = {r["task"]: (r["status"], r["error"]) for r in other.rows if r["level"] == "task"}
    # The other shard's failure is in this shard's summary, with its error.
    assert statuses["missing"] == ("failed", "missing: no such data")
    assert statuses["dtd"] == ("failed", "dtd: no such data") and statuses["cifar"][0] == "done"
    assert "3 failed" in (tmp_path / "out" / "summary.md").read_text()
    # The data appears: a re-run retries only the failed tasks, and their failures are gone.
    results.update({"dtd": ((0.5, 0.5), 3, 1.5, 500), "kitti": ((0.5, 0.5), 3, 1.5, 500),
                    "missing": ((0.5, 0.5), 3, 1.5, 500)})  # fmt: skip
    calls.clear()
    again = run_sweep(sweep, log=lambda message: None)
    assert sorted(calls) == ["dtd", "kitti", "missing"] and sorted(again.skipped) == ["cifar", "eurosat"]
    assert not list((tmp_path / "out").glob("*/failed.json"))
    assert all(r["status"] == "done" for r in again.rows if r["level"] == "task")


def test_a_task_another_shard_is_writing_is_left_to_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    run, calls = fake_run({"cifar": ((0.9, 0.8), 6, 2.0, 1000), "dtd": ((0.9, 0.9), 4, 3.0, 2000),
                           "eurosat": ((0.9, 0.9), 4, 3.0, 2000), "kitti": ((0.9, 0.9), 4, 3.0, 2000),
                           "missing": ((0.9, 0.9), 4, 3.0, 2000)})  # fmt: skip
    monkeypatch.setattr(sls.sweep, "run", run)
    sweep = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID), out=tmp_path / "out", progress=False)
    hold = ("import sys, time\nfrom sls._lock import folder_lock\nwith folder_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "out" / "dtd")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        report = run_sweep(sweep, log=lambda message: None)
    finally:
        proc.kill()
        proc.wait()
    assert "dtd" not in calls and report.busy["dtd"].startswith(f"pid {proc.pid} on ")
    assert not report.failed
    statuses = {r["task"]: r["status"] for r in report.rows if r["level"] == "task"}
    assert statuses["dtd"] == "busy" and statuses["cifar"] == "done"
