"""One experiment builder and one record: generators left alone, devices honoured on resume,
compare and analyze, config files from the one schema, defaults sized to the data, failed
fine-tunes caught, world sizes checked."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

import sls.analyze
import sls.compare
from sls.analyze import AnalyzeConfig, analyze
from sls.cli import main
from sls.compare import compare
from sls.config import MIN_STEPS, RunConfig, auto_epochs, resolve
from sls.errors import ConfigError, TaskRecordError
from sls.experiment import Experiment
from sls.pipeline import check_finetune, finetune
from sls.record import TaskRecord, read_record
from sls.runtime import Runtime
from sls.stages import stage_finetune, stage_prune, stage_retrain

TINY = RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200, test_samples=100,
                 analysis_samples=None, epochs=3, retrain_epochs=2, lr=3e-2, batch_size=16, throughput_batch=8,
                 device="cpu", progress=False)  # fmt: skip
TINY_ARGS = ["--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32", "--train-samples",
             "200", "--test-samples", "100", "--analysis-samples", "all", "--epochs", "3", "--retrain-epochs", "2",
             "--lr", "0.03", "--batch-size", "16", "--throughput-batch", "8", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fine-tuned tiny task folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finetuned") / "task"
    stage_finetune(dataclasses.replace(TINY, out=str(out)))
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, finetuned):
    out = tmp_path_factory.mktemp("pruned") / "task"
    shutil.copytree(finetuned, out)
    stage_prune(out, progress=False)
    return out


def generator_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def test_building_and_training_leave_the_callers_generators_alone():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = generator_states()
    exp = Experiment.from_config(dataclasses.replace(TINY, epochs=1))
    finetune(exp)
    after = generator_states()
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    assert torch.equal(after[2], before[2])


@pytest.mark.slow
def test_a_task_made_on_cuda_resumes_on_the_cpu(finetuned, tmp_path, capsys):
    task = shutil.copytree(finetuned, tmp_path / "task")
    raw = json.loads((task / "record.json").read_text())
    raw["config"]["device"] = "cuda"  # as a GPU machine wrote it
    (task / "record.json").write_text(json.dumps(raw))
    if not torch.cuda.is_available():  # the recorded device is not a default a later stage must take
        assert main(["run", *TINY_ARGS, "--out", str(task), "--device", "cpu"]) == 0
    record = read_record(task)
    assert record.stages == ["finetune", "prune", "retrain", "evaluate"]
    assert [run["device"] for run in record.runs] == ["cpu"] * 4
    assert record.results["throughput"]["device"] == "cpu"


def test_resume_follows_a_new_device_and_a_wrong_one_is_one_line(finetuned, tmp_path, capsys):
    task = shutil.copytree(finetuned, tmp_path / "task")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where --device cuda must be refused")
    assert main(["run", *TINY_ARGS, "--out", str(task), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert read_record(task).stages == ["finetune"]  # nothing ran on the CPU behind the user's back


class _Placed(Exception):
    """Raised by a spy once it has seen where the model was put."""


def test_analyze_runs_the_model_where_the_runtime_says(pruned, monkeypatch):
    seen = []

    def spy(model, loader, **kwargs):
        seen.append(next(model.parameters()).device)
        raise _Placed

    monkeypatch.setattr(sls.analyze, "cached_block_features", spy)
    for task in (None, str(pruned)):
        config = AnalyzeConfig(model="test_vit", weights="random", task=task, data="digits", img_size=32,
                               samples=100, progress=False, out=None)  # fmt: skip
        with pytest.raises(_Placed):
            analyze(config, runtime=Runtime(device=torch.device("meta")))
    assert [device.type for device in seen] == ["meta", "meta"]


def test_compare_runs_the_models_where_the_runtime_says(pruned, monkeypatch):
    seen = []
    real = sls.compare.pruned_model

    def spy(exp, record, task_dir):
        seen.append((exp.runtime.device, next(exp.model.parameters()).device))
        raise _Placed

    monkeypatch.setattr(sls.compare, "pruned_model", spy)
    with pytest.raises(_Placed):
        compare(pruned, runtime=Runtime(device=torch.device("meta")), progress=False)
    assert seen == [(torch.device("meta"), torch.device("meta"))]
    assert real is not spy


def test_the_model_commands_take_device_and_amp(pruned, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for command in (["compare", str(pruned)], ["analyze", "--task", str(pruned), "--data", "digits"],
                    ["predict", str(pruned), "x.png"], ["prune", str(pruned)], ["retrain", str(pruned)],
                    ["evaluate", str(pruned)], ["demo"]):  # fmt: skip
        assert main([*command, "--device", "cuda", "--amp"]) == 2, command
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["export", str(pruned), "--format", "safetensors", "--device", "cuda"]) == 2  # traced on the CPU by default
    assert "CUDA is not available" in capsys.readouterr().err


def test_a_config_file_is_the_same_schema_as_the_options(tmp_path, capsys):
    from sls.cli import _config_from, build_parser

    (tmp_path / "run.yaml").write_text("model: test_vit\nweights: random\ndata: digits\nimg_size: 32\nlr: 3e-2\n"
                                       "alpha: 0.25\npetl_options: {r: 4}\n")  # YAML 1.1 reads 3e-2 as text
    from_file = _config_from(build_parser().parse_args(["run", "--config", str(tmp_path / "run.yaml"), "--lr", "0.01"]))
    by_hand = _config_from(build_parser().parse_args(["run", "--model", "test_vit", "--weights", "random", "--data",
                                                      "digits", "--img-size", "32", "--lr", "0.01", "--alpha", "0.25",
                                                      "--petl-option", "r=4"]))  # fmt: skip
    assert from_file == by_hand and from_file.lr == 0.01  # the command line wins over the file
    (tmp_path / "typo.yaml").write_text("model: test_vit\nlearning_rate: 0.1\n")
    assert main(["run", "--config", str(tmp_path / "typo.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown setting 'learning_rate'" in err
    (tmp_path / "bad.yaml").write_text("epochs: many\n")
    assert main(["run", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "epochs" in capsys.readouterr().err


def test_a_stage_config_file_sets_only_that_stages_settings(pruned, tmp_path, capsys):
    task = shutil.copytree(pruned, tmp_path / "task")
    (tmp_path / "prune.yaml").write_text("alpah: 0.5\n")
    assert main(["prune", str(task), "--config", str(tmp_path / "prune.yaml")]) == 2
    assert "did you mean alpha?" in capsys.readouterr().err
    (tmp_path / "prune.yaml").write_text("model: vit_base_patch16_224\n")
    assert main(["prune", str(task), "--config", str(tmp_path / "prune.yaml")]) == 2
    assert "sls prune cannot set 'model' (a setting of the fine-tune)" in capsys.readouterr().err
    (tmp_path / "prune.yaml").write_text("depth: 2\n")
    assert main(["prune", str(task), "--config", str(tmp_path / "prune.yaml"), "--quiet"]) == 0
    assert read_record(task).depth == 2
    written = (task / "config.yaml").read_text()
    assert "depth: 2" in written and "img_size: 32" in written


def test_the_resolved_config_is_written_and_runs_again(finetuned):
    import yaml

    written = yaml.safe_load((finetuned / "config.yaml").read_text())
    assert written["epochs"] == 3 and written["img_size"] == 32 and "out" not in written
    assert RunConfig(**written).lr == TINY.lr


def test_defaults_are_sized_to_the_data():
    config = RunConfig()
    assert (config.img_size, config.epochs, config.train_samples, config.test_samples) == (None, None, None, None)
    user = resolve(config, embedded_data=False, pretrained_size=518, n_train=450)
    assert user["img_size"] == 224  # DINOv2's 518, capped
    assert user["epochs"] * -(-450 // config.batch_size) >= MIN_STEPS and user["retrain_epochs"] == user["epochs"]
    assert resolve(config, embedded_data=True, pretrained_size=518, n_train=3500)["img_size"] == 84
    assert auto_epochs(100_000, 32) == 10 and auto_epochs(10, 32) == 100
    demo = RunConfig(**__import__("sls.recipes", fromlist=["apply_recipe"]).apply_recipe("demo", {}))
    assert (demo.img_size, demo.epochs, demo.retrain_epochs, demo.train_samples) == (84, 2, 2, 2000)


def test_a_fine_tune_near_chance_is_flagged_by_its_numbers():
    flat = [{"epoch": 1, "loss": 1.39, "val_accuracy": None}, {"epoch": 2, "loss": 1.00, "val_accuracy": None}]
    check = check_finetune(flat, 1 / 3, num_classes=3)  # the failure the issue measured
    assert not check["ok"] and len(check["problems"]) == 2
    learned = [{"epoch": 1, "loss": 0.9, "val_accuracy": 0.7}, {"epoch": 2, "loss": 0.3, "val_accuracy": 0.9}]
    assert check_finetune(learned, 0.88, num_classes=3)["ok"]


def test_a_failed_fine_tune_is_recorded_and_stops_pruning_unless_forced(tmp_path, capsys):
    out = tmp_path / "task"
    record = stage_finetune(dataclasses.replace(TINY, lr=1e-7, epochs=1, out=str(out)))
    assert not record.finetune_check["ok"]
    assert [set(row) for row in record.training["finetune"]] == [{"epoch", "loss", "val_accuracy"}]
    assert record.training["finetune"][0]["val_accuracy"] is not None  # digits has a validation split
    assert (out / "training.png").is_file()
    assert main(["prune", str(out), "--quiet"]) == 2
    assert "looks failed" in capsys.readouterr().err
    assert main(["prune", str(out), "--force", "--quiet"]) == 0
    assert read_record(out).stages == ["finetune", "prune"]


def test_a_training_stage_on_another_world_size_is_refused(pruned, tmp_path):
    task = shutil.copytree(pruned, tmp_path / "task")
    raw = json.loads((task / "record.json").read_text())
    raw["runs"][0]["world_size"] = 2  # fine-tuned under torchrun --nproc-per-node 2
    (task / "record.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="trained on 2 process"):
        stage_retrain(task, progress=False)


def test_a_format_1_record_reads_into_the_typed_record(pruned):
    raw = json.loads((pruned / "record.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("resolved", "training", "runs", "finetune_check")}
    old["format"] = 1
    record = TaskRecord.from_dict(old)
    assert record.depth == raw["depth"] and record.config.lr == TINY.lr and record.world_size is None
    del old["stages"]
    assert "prune" in TaskRecord.from_dict(old).stages
    with pytest.raises(TaskRecordError, match="record format 4"):
        TaskRecord.from_dict({**raw, "format": 4})


def test_the_command_line_wins_over_a_config_file_both_ways(tmp_path):
    from sls.cli import _config_from, build_parser

    (tmp_path / "run.yaml").write_text("amp: true\nretrain: false\npetl_options: {r: 4, alpha: 8}\n")
    config = _config_from(build_parser().parse_args(["run", "--config", str(tmp_path / "run.yaml"), "--no-amp",
                                                     "--retrain", "--petl-option", "r=16"]))  # fmt: skip
    assert (config.amp, config.retrain, config.petl_options) == (False, True, {"r": 16, "alpha": 8})


def test_written_config_runs_the_task_again(finetuned, tmp_path):
    from sls.cli import _config_from, build_parser

    again = _config_from(build_parser().parse_args(["run", "--config", str(finetuned / "config.yaml"), "--out",
                                                    str(tmp_path / "again")]))  # fmt: skip
    assert dataclasses.replace(again, out=None, progress=False) == dataclasses.replace(TINY, retrain_epochs=2, out=None)


def test_a_stage_option_meaning_all_is_applied_and_recorded(pruned, tmp_path):
    task = shutil.copytree(pruned, tmp_path / "task")
    stage_prune(task, analysis_samples=120, progress=False)
    assert read_record(task).data["analysed_train_samples"] == 120
    assert main(["prune", str(task), "--analysis-samples", "all", "--quiet"]) == 0  # None: every training image
    record = read_record(task)
    assert record.config.analysis_samples is None and record.data["analysed_train_samples"] == 200


def test_force_resumes_a_run_whose_fine_tune_looked_failed(tmp_path, capsys):
    args = [*TINY_ARGS, "--lr", "1e-7", "--epochs", "1", "--out", str(tmp_path / "task")]
    assert main(["run", *args]) == 2 and "looks failed" in capsys.readouterr().err
    assert main(["run", *args, "--force"]) == 0  # the same run, resumed: force is a permission, not a setting
    assert [run["stage"] for run in read_record(tmp_path / "task").runs] == ["finetune", "prune", "retrain", "evaluate"]
