"""The --recipe presets, the schedule and model settings they set, and their plumbing."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from torchvision.transforms import Normalize

from sls.cli import _config_from, build_parser, main
from sls.config import RunConfig
from sls.errors import ConfigError
from sls.experiment import Experiment
from sls.petl import create_petl
from sls.recipes import VTAB_PRESETS, apply_recipe
from sls.record import TaskRecord
from sls.stages import changed_settings
from sls.sweep import load_sweep
from sls.train import cosine_schedule, train
from sls.vtab import VTAB1K_GROUPS, vtab_task

TINY = ["--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
        "--train-samples", "200", "--test-samples", "100", "--analysis-samples", "all", "--epochs", "1",
        "--force", "--quiet"]  # fmt: skip


def config_of(*argv: str) -> RunConfig:
    return _config_from(build_parser().parse_args(["run", *argv]))


def test_without_a_recipe_the_command_line_gives_runconfig_defaults():
    assert config_of() == RunConfig()


def test_the_vtab_recipe_sets_the_paper_recipe_and_given_options_win():
    config = config_of("--recipe", "vtab", "--data", "/data/vtab-1k/dtd", "--petl", "convpass", "--epochs", "30",
                       "--petl-option", "dropout=0.2")  # fmt: skip
    assert config.recipe == "vtab"
    assert (config.img_size, config.normalize, config.batch_size, config.seed) == (224, "imagenet", 64, 42)
    assert (config.lr, config.weight_decay, config.warmup_epochs, config.min_lr) == (1e-3, 1e-4, 10, 1e-5)
    assert (config.retrain_epochs, config.drop_path, config.throughput_batch) == (100, 0.1, 1)
    assert config.train_samples is config.test_samples is config.analysis_samples is None
    assert config.epochs == 30  # given, so not the recipe's 100
    # Convpass's published dtd settings, under the given dropout.
    assert config.petl_options == {"bottleneck": 8, "dropout": 0.2, "scale": 0.01, "conv_init": "xavier"}


def test_the_vtab_scale_follows_the_task_folder_and_its_aliases():
    for folder, petl in [("~/vtab-1k/svhn/", "convpass"), ("/x/VTAB-Oxford-IIIT-Pet", "repadapter"),
                         ("pets", "repadapter"), ("/x/smallnorb-azimuth", "repadapter")]:  # fmt: skip
        task = vtab_task(folder)
        assert apply_recipe("vtab", {"data": folder, "petl": petl})["petl_options"]["scale"] == (
            VTAB_PRESETS[petl][task]["scale"]
        )
    # Every preset is a VTAB-1k task and a valid set of options of its method.
    for petl, presets in VTAB_PRESETS.items():
        assert set(presets) <= set(VTAB1K_GROUPS)
        for options in presets.values():
            create_petl(petl, **options)
    # Methods without a per-task scale take only the training part.
    assert apply_recipe("vtab", {"data": "mnist5k", "petl": "lora"})["petl_options"] == {}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"data": "mnist5k", "petl": "convpass"}, "'mnist5k' is not one; give the scale with --petl-option scale=S"),
        ({"data": "/d/oxford_iiit_pet", "petl": "convpass"}, "no published convpass scale for VTAB-1k task oxford_iiit_pet"),
        ({"data": "/d/cifar", "petl": "repadapter"}, "no published repadapter scale for VTAB-1k task cifar"),
    ],
)  # fmt: skip
def test_a_task_without_a_published_scale_asks_for_one(settings, message):
    with pytest.raises(ConfigError, match=message):
        apply_recipe("vtab", settings)
    given = apply_recipe("vtab", {**settings, "petl_options": {"scale": 3.0}})
    assert given["petl_options"]["scale"] == 3.0


def test_unknown_recipe_is_refused():
    with pytest.raises(ConfigError, match="unknown recipe 'imagenet'; choose one of: demo, demo-detection, demo-segmentation, vtab"):
        apply_recipe("imagenet", {})


def test_count_options_take_all():
    config = config_of("--train-samples", "all", "--test-samples", "50", "--val-samples", "all")
    assert (config.train_samples, config.test_samples, config.val_samples) == (None, 50, None)


def learning_rates(epochs, steps, **kwargs) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=steps, **kwargs)
    rates = [optimizer.param_groups[0]["lr"]]
    for update in range(1, epochs * steps + 1):
        scheduler.step_update(update)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_cosine_schedule_warms_up_then_decays_to_the_final_rate():
    # The paper's shape, scaled down: 10 epochs of 4 updates, 1 warm-up epoch, down to 1e-5.
    rates = learning_rates(10, 4, warmup_epochs=1, min_lr=1e-5)
    assert rates[0] == pytest.approx(1e-5)  # warm-up starts at the final rate
    warm = rates[:5]
    assert all(b > a for a, b in zip(warm, warm[1:]))  # linear rise over 4 updates
    assert rates[2] - rates[1] == pytest.approx(rates[1] - rates[0])
    decay = rates[4:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert max(rates) <= 1e-3 + 1e-12 and max(rates) > 0.95e-3
    # timm's cosine at t updates, written out: min + (lr - min) * (1 + cos(pi t / T)) / 2
    t, total = 20, 40
    assert rates[t] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / total)) / 2)
    assert rates[-1] == pytest.approx(1e-5, rel=1e-3)
    # Defaults: a tenth of the epochs, down to lr / 100.
    default = learning_rates(10, 4)
    assert default[0] == pytest.approx(1e-5) and default[4] > default[3] and default[-1] == pytest.approx(1e-5, rel=1e-3)


def test_bad_schedule_settings_are_refused_before_any_training(tiny_images):
    for changes, message in [
        (dict(epochs=5, retrain_epochs=1, warmup_epochs=5), "--warmup-epochs must be from 0 to fewer than the 1 epochs"),
        (dict(epochs=20, retrain_epochs=5, warmup_epochs=10), "fewer than the 5 epochs of the shortest training"),
        (dict(min_lr=1.0), "--min-lr must be from 0 to --lr"),
        (dict(drop_path=1.0), r"--drop-path must be in \[0, 1\)"),
        (dict(normalize="cifar"), "--normalize must be one of model, imagenet"),
        (dict(petl="convpass", petl_options={"conv_init": "kaiming"}), "conv_init must be 'identity' or 'xavier'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(**changes).validate()
    images, labels = tiny_images
    loader = torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=20)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ConfigError, match="warm-up must last"):
        train(model, loader, epochs=2, lr=1e-3, warmup_epochs=2, progress=False)


@pytest.mark.slow  # the lean suite keeps CI's fresh clone under 10 minutes
def test_drop_path_and_imagenet_statistics_reach_the_model_and_the_record(tmp_path):
    config = RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200,
                       test_samples=100, drop_path=0.1, normalize="imagenet", progress=False)  # fmt: skip
    exp = Experiment.from_config(config)
    rates = [m.drop_prob for m in exp.model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1)  # timm's linear rule, up to the last block
    assert tuple(exp.backbone.mean) == IMAGENET_DEFAULT_MEAN and tuple(exp.backbone.std) == IMAGENET_DEFAULT_STD
    normalize = [t for t in exp.train_loader.dataset.transform.transforms if isinstance(t, Normalize)]
    assert tuple(normalize[0].mean) == IMAGENET_DEFAULT_MEAN and tuple(normalize[0].std) == IMAGENET_DEFAULT_STD
    out = tmp_path / "task"
    assert main(["run", *TINY, "--drop-path", "0.1", "--normalize", "imagenet", "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["drop_path"] == 0.1 and record["config"]["normalize"] == "imagenet"
    assert tuple(record["backbone"]["mean"]) == IMAGENET_DEFAULT_MEAN


def test_a_record_from_before_the_new_settings_still_resumes():
    config = RunConfig()
    old = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in ("warmup_epochs", "min_lr", "drop_path", "normalize", "recipe")}  # fmt: skip
    backbone = {"model": "test_vit", "fingerprint": "0" * 64, "num_blocks": 6, "img_size": 32, "mean": [0.5] * 3,
                "std": [0.5] * 3}  # fmt: skip
    record = TaskRecord.from_dict({"config": old, "backbone": backbone, "petl": {"method": "lora"}, "depth": 1,
                                   "num_classes": 2})  # fmt: skip
    assert changed_settings(config, record) == []
    assert changed_settings(dataclasses.replace(config, drop_path=0.1), record) == ["drop_path"]


def test_a_sweep_can_take_the_recipe(tmp_path):
    path = Path(tmp_path / "vtab.yaml")
    path.write_text("data_root: /data/vtab-1k\ndefaults: {recipe: vtab, model: test_vit, epochs: 20}\n"
                    "methods: [{name: cp, petl: convpass}, {name: ra, petl: repadapter}]\n"
                    "tasks: [dsprites_loc, {data: dtd, petl_options: {scale: 2}}]\n")  # fmt: skip
    tasks = {task.name: task.config for task in load_sweep(path).tasks}
    assert tasks["dsprites_loc-cp"].petl_options["scale"] == 100.0
    assert tasks["dsprites_loc-ra"].petl_options["scale"] == 5.0
    assert tasks["dtd-cp"].petl_options == {"bottleneck": 8, "dropout": 0.1, "scale": 2, "conv_init": "xavier"}
    assert all(c.recipe == "vtab" and c.epochs == 20 and c.lr == 1e-3 for c in tasks.values())
    path.write_text("defaults: {recipe: vtab, petl: repadapter}\ntasks: [mnist5k]\n")
    with pytest.raises(ConfigError, match="task 1: recipe vtab sets the repadapter scale per VTAB-1k task"):
        load_sweep(path)


def test_the_cli_refuses_a_recipe_task_without_a_scale_in_one_line(tmp_path, capsys):
    out = tmp_path / "task"
    assert main(["run", *TINY, "--recipe", "vtab", "--petl", "repadapter", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sls: error: recipe vtab sets the repadapter scale") and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_a_vtab_task_runs_end_to_end_under_the_recipe(tmp_path):
    from test_data_files import make_vtab

    data = make_vtab(tmp_path / "vtab-1k" / "dtd", n_train=100, n_val=20, n_test=20)
    out = tmp_path / "task"
    # The recipe, shortened for a CPU: two epochs each, one of warm-up, a tiny model at 32 px.
    argv = ["run", "--recipe", "vtab", "--model", "test_vit", "--weights", "random", "--data", str(data),
            "--petl", "convpass", "--img-size", "32", "--epochs", "2", "--retrain-epochs", "2",
            "--warmup-epochs", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    config = record["config"]
    assert config["recipe"] == "vtab" and (config["epochs"], config["img_size"]) == (2, 32)
    assert (config["lr"], config["min_lr"], config["drop_path"], config["seed"]) == (1e-3, 1e-5, 0.1, 42)
    assert (config["batch_size"], config["throughput_batch"], config["normalize"]) == (64, 1, "imagenet")
    assert record["petl"]["hparams"] == {"bottleneck": 8, "scale": 0.01, "dropout": 0.1, "conv_init": "xavier"}
    assert record["data"]["analysed_train_samples"] == 120  # all of train800val200
    assert tuple(record["backbone"]["mean"]) == IMAGENET_DEFAULT_MEAN
