"""Retraining strategies, distillation, the --max-drop depth search and several alphas."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sls.experiment
import sls.pipeline
import sls.retrain
import sls.stages
import sls.tasks.classification
from sls.backbones import create_backbone, truncate
from sls.cli import _config_from, build_parser, main
from sls.config import RunConfig
from sls.criteria import criterion_class
from sls.data import Splits
from sls.errors import ConfigError
from sls.experiment import Experiment, load_task
from sls.petl import create_petl
from sls.retrain import create_strategy, distillation_loss, list_strategies, search_depth
from sls.select import select_depth
from sls.stages import run, stage_finetune, stage_prune
from sls.tasks.classification import Classification
from sls.train import Schedule, accuracy

TINY = RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200, test_samples=100,
                 analysis_samples=None, epochs=5, retrain_epochs=1, lr=3e-2, batch_size=16, throughput_batch=8,
                 progress=False)  # fmt: skip
N_BLOCKS = 6  # test_vit


@pytest.fixture
def tuned(tiny_images):
    """A LoRA test_vit whose trainable tensors moved away from their initial values
    (standing in for fine-tuning), its initial trainable state, and a shuffled loader."""
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("lora").apply(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    images, labels = tiny_images
    loader = DataLoader(TensorDataset(images, labels), batch_size=20, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    return model.eval(), initial, loader


def _states(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def _retrain(name, pruned, teacher, initial, loader, **options):
    return create_strategy(name, **options).retrain(pruned, teacher=teacher, loader=loader, epochs=1,
                                                    schedule=Schedule(1e-2, 1e-4), initial_state=initial, progress=False)  # fmt: skip


def test_the_four_strategies_are_registered():
    assert list_strategies() == ["clr", "distill", "ft", "tfs"]
    with pytest.raises(ConfigError, match="unknown retraining strategy 'nope'; choose one of: clr, distill, ft, tfs"):
        create_strategy("nope")
    with pytest.raises(ConfigError, match="distill has no option tau; its options: ce_weight, feature_weight, tempera"):
        create_strategy("distill", tau=2)


@pytest.mark.parametrize("name", ["ft", "clr", "tfs", "distill"])
def test_each_strategy_trains_only_the_kept_petl_and_head(tuned, name):
    teacher, initial, loader = tuned
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned = truncate(copy.deepcopy(teacher), 3)
    frozen, trainable = _states(pruned)
    assert set(trainable) <= set(initial) and any("lora_" in n for n in trainable) and "head.weight" in trainable
    losses = _retrain(name, pruned, teacher, initial, loader, **({"feature_weight": 1.0} if name == "distill" else {}))
    assert len(losses) == 1 and math.isfinite(losses[0])
    after_frozen, after_trainable = _states(pruned)
    for n, value in frozen.items():  # the shared backbone never moves
        assert torch.equal(after_frozen[n], value), n
    for n in ("head.weight", "blocks.2.attn.qkv.lora_A.q.weight"):  # the kept blocks' PETL and the head train
        assert not torch.equal(after_trainable[n], trainable[n]), n
    for n, value in teacher.state_dict().items():  # the teacher (the unpruned task) is never changed
        assert torch.equal(value, teacher_before[n]), n
    assert not teacher.training


@pytest.mark.parametrize("name", ["ft", "clr", "tfs", "distill"])
def test_only_tfs_starts_from_the_initial_values(tuned, name, monkeypatch):
    teacher, initial, loader = tuned
    pruned = truncate(copy.deepcopy(teacher), 3)
    _, finetuned = _states(pruned)
    seen = {}

    def no_training(model, loader, **kwargs):
        seen.update(_states(model)[1])
        return [0.0]

    monkeypatch.setattr(sls.retrain, "train", no_training)
    _retrain(name, pruned, teacher, initial, loader)
    expected = initial if name == "tfs" else finetuned
    assert set(seen) == set(finetuned)
    for n, value in seen.items():
        assert torch.equal(value, expected[n]), n


class _RecordingAdamW(torch.optim.AdamW):
    rates: list[float] = []

    def step(self, closure=None):
        _RecordingAdamW.rates.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_ft_uses_a_small_constant_rate_and_clr_the_whole_schedule(tuned, monkeypatch):
    teacher, initial, loader = tuned
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    rates = {}
    for name in ("ft", "clr"):
        _RecordingAdamW.rates = []
        pruned = truncate(copy.deepcopy(teacher), 3)
        create_strategy(name).retrain(pruned, teacher=None, loader=loader, epochs=3, schedule=Schedule(1e-2, 0.0),
                                      initial_state=initial, progress=False)  # fmt: skip
        rates[name] = list(_RecordingAdamW.rates)
    assert len(rates["ft"]) == len(rates["clr"]) == 9  # the same budget: 3 epochs x 3 batches
    assert rates["ft"] == [pytest.approx(1e-4)] * 9  # the paper code's FT: the schedule's minimum, 0.01 x lr
    assert rates["clr"][0] == pytest.approx(1e-4) and max(rates["clr"]) == pytest.approx(1e-2, rel=0.05)
    assert rates["clr"][-1] < 0.5e-2  # warm-up, then cosine down


def test_distillation_loss_is_zero_exactly_when_student_and_teacher_agree():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 5
    for temperature in (1.0, 2.0, 4.0):
        assert distillation_loss(logits, logits.clone(), temperature).item() == 0.0
        assert distillation_loss(logits + torch.linspace(0, 1, 10), logits, temperature).item() > 0
    # The T^2 factor: for logits far from each other the loss is the KL times T^2.
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p = torch.softmax(teacher / 2, dim=1)
    kl = (p * (p.log() - torch.log_softmax(student / 2, dim=1))).sum()
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl.item())


def test_the_whole_distillation_objective_is_zero_for_an_unpruned_student(tuned, monkeypatch):
    teacher, initial, loader = tuned
    images, labels = next(iter(loader))
    losses = []

    def first_loss(model, loader, *, objective, **kwargs):
        losses.append(objective(images, labels).item())
        return losses[-1:]

    monkeypatch.setattr(sls.retrain, "train", first_loss)
    student = copy.deepcopy(teacher)  # all N blocks: the student agrees with the teacher
    _retrain("distill", student, teacher, initial, loader, feature_weight=1.0)
    student = truncate(copy.deepcopy(teacher), 3)
    _retrain("distill", student, teacher, initial, loader, feature_weight=1.0)
    assert losses[0] == 0.0 and losses[1] > 0


def _brute_force(curve, full, max_drop):
    return min(k for k in range(1, len(curve) + 1) if k == len(curve) or 100 * (full - curve[k - 1]) <= max_drop + 1e-9)


@pytest.mark.parametrize("max_drop", [0.0, 1.0, 3.0, 10.0, 100.0])
def test_search_finds_the_smallest_depth_within_budget_from_every_start(max_drop):
    n_blocks = 12
    rng = np.random.default_rng(0)
    for trial in range(20):
        curve = np.sort(rng.uniform(0.1, 0.95, size=n_blocks))  # accuracy rises with depth
        full = curve[-1] + rng.uniform(0, 0.03)
        answer = _brute_force(curve, full, max_drop)
        for start in range(1, n_blocks + 1):
            calls = []

            def evaluate(depth):
                calls.append(depth)
                return curve[depth - 1]

            found = search_depth(evaluate, start=start, n_blocks=n_blocks, full_accuracy=full, max_drop=max_drop)
            assert found.depth == answer, (trial, start)
            assert n_blocks not in calls and len(calls) == len(set(calls)) == found.evaluations
            assert found.evaluations <= 2 * math.ceil(math.log2(n_blocks)) + 1
            if start in (answer, answer - 1):  # SLS right or one block short: two retrainings at most
                assert found.evaluations <= 2


def test_search_costs_two_evaluations_when_sls_is_right():
    curve = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.96, 0.97]
    tried = search_depth(lambda k: curve[k - 1], start=6, n_blocks=8, full_accuracy=0.97, max_drop=2.0).tried
    assert tried == [(6, 0.95), (5, 0.9)]


@pytest.fixture(scope="module")
def finetuned_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrain") / "task"
    stage_finetune(dataclasses.replace(TINY, out=str(out)))
    return out


def _copy_task(task, tmp_path):
    import shutil

    return shutil.copytree(task, tmp_path / "task")


def test_budget_search_in_the_prune_stage_uses_the_validation_split(finetuned_task, tmp_path, monkeypatch):
    task = _copy_task(finetuned_task, tmp_path)
    curve = {1: 0.30, 2: 0.50, 3: 0.80, 4: 0.88, 5: 0.90, 6: 0.91}  # val accuracy per depth, the full model last
    splits_seen, retrainings = [], []
    real_retrain = sls.pipeline.retrain_pruned

    def fake_evaluate(task, model, loader, **kwargs):
        indices = set(loader.dataset.indices.tolist())
        splits_seen.append(("val" if indices <= val else "test" if indices <= test else "other", len(model.blocks)))
        return {"accuracy": curve[len(model.blocks)]}

    def counted_retrain(exp, pruned, *args, **kwargs):
        retrainings.append(len(pruned.blocks))
        return real_retrain(exp, pruned, *args, **kwargs)

    from sls.data import load_dataset, make_splits

    splits = make_splits(load_dataset("digits"), train_size=200, test_size=100)
    val, test = set(splits.val.tolist()), set(splits.test.tolist())
    monkeypatch.setattr(Classification, "evaluate", fake_evaluate)
    monkeypatch.setattr(sls.pipeline, "retrain_pruned", counted_retrain)
    record = stage_prune(task, max_drop=3.0, progress=False).to_dict()
    search = record["budget_search"]
    assert search["full"]["val_accuracy"] == 0.91 and search["split"] == "val"
    assert search["chosen_depth"] == record["depth"] == 4  # 0.88 is within 3 points of 0.91, 0.80 is not
    assert search["start_depth"] == record["selected_depth"]
    tried = [row["depth"] for row in search["tried"]]
    assert sorted(retrainings) == sorted(tried) and search["retrainings"] == len(tried) <= 4
    assert 3 in tried and 4 in tried  # the bracket around the answer was measured
    for row in search["tried"]:
        assert row["val_accuracy"] == curve[row["depth"]] and row["throughput"] > 0
        assert row["within_budget"] == (row["depth"] >= 4)
        # FLOPs per image of the deployed model: fewer blocks, fewer FLOPs, in proportion to the blocks cut.
        assert 0 < row["flops"] < search["full"]["flops"]
    by_depth = {row["depth"]: row["flops"] for row in search["tried"]}
    assert by_depth[4] - by_depth[3] == pytest.approx((search["full"]["flops"] - by_depth[4]) / 2)
    # Every accuracy that chose k was on the validation split; the test split only reports.
    # (Each retraining also measures its curve on the validation split, at the same depth.)
    collapsed = [key for key, _ in itertools.groupby(splits_seen)]
    assert collapsed[: len(tried) + 1] == [("val", 6)] + [("val", d) for d in tried]
    assert all(split == "test" for split, _ in collapsed[len(tried) + 1 :])
    assert (task / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((task / "record.json").read_text())["budget_search"] == search


def test_a_budget_search_retrains_the_chosen_depth_once_and_as_the_retrain_stage_would(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sls.stages import stage_retrain

    task = tmp_path / "task"
    retrainings = []
    real_retrain = sls.pipeline.retrain_pruned

    def counted_retrain(exp, pruned, *args, **kwargs):
        retrainings.append(len(pruned.blocks))
        return real_retrain(exp, pruned, *args, **kwargs)

    monkeypatch.setattr(sls.pipeline, "retrain_pruned", counted_retrain)
    monkeypatch.setattr(sls.stages, "retrain_pruned", counted_retrain)
    # The prune stage's search retrains, and run() does not retrain k again.
    record = run(dataclasses.replace(TINY, max_drop=100.0, out=str(task))).to_dict()
    search = record["budget_search"]
    k = record["depth"]
    assert len(retrainings) == search["retrainings"] == len(search["tried"]) and k in retrainings
    assert record["stages"] == ["finetune", "prune", "retrain", "evaluate"]
    assert [run_["stage"] for run_ in record["runs"]][-3:] == ["prune", "retrain", "evaluate"]
    # The curve of the chosen depth, its last validation accuracy the one that chose it.
    chosen = next(row for row in search["tried"] if row["depth"] == k)
    assert record["training"]["retrain"][-1]["val_accuracy"] == chosen["val_accuracy"]
    assert record["retrain_strategy"] == "clr" and record["retrain_epochs"] == 1
    searched = load_file(task / record["files"]["task"]["file"])
    # The retrain stage run again starts from the pruned fine-tune and gives the same tensors.
    again = stage_retrain(task, progress=False).to_dict()
    assert len(retrainings) == search["retrainings"] + 1
    retrained = load_file(task / again["files"]["task"]["file"])
    assert searched.keys() == retrained.keys()
    for name in searched:
        torch.testing.assert_close(retrained[name], searched[name], rtol=0, atol=0, msg=name)


def test_several_alphas_report_one_k_each_from_one_scoring(finetuned_task, tmp_path, monkeypatch, capsys):
    task = _copy_task(finetuned_task, tmp_path)
    criterion = criterion_class("sls")
    calls = []
    real_score = criterion.score

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(criterion, "score", counted)
    alphas = [0.3, 0.05, 0.6, 0.95]
    assert main(["prune", str(task), "--alpha", *map(str, alphas), "--quiet"]) == 0
    assert len(calls) == 1
    record = json.loads((task / "record.json").read_text())
    assert [row["alpha"] for row in record["depth_per_alpha"]] == alphas
    for row in record["depth_per_alpha"]:
        decision = select_depth(np.array(record["scores"]), row["alpha"])
        assert (row["depth"], row["threshold"]) == (decision.depth, pytest.approx(decision.threshold))
    assert record["depth"] == record["depth_per_alpha"][0]["depth"] and record["alpha"] == 0.3
    assert len({row["depth"] for row in record["depth_per_alpha"]}) > 1, "the alphas should give different k here"
    shown = ", ".join(f"alpha={row['alpha']:g}: k={row['depth']}" for row in record["depth_per_alpha"])
    assert f"k per alpha: {shown}" in capsys.readouterr().out


@pytest.mark.slow  # the lean suite keeps CI's fresh clone under 10 minutes
def test_a_budget_run_retrains_the_chosen_depth_as_the_search_did(tmp_path):
    # A budget every depth meets: the search walks down from SLS's k to 1 in doubling steps.
    config = dataclasses.replace(TINY, epochs=3, retrain_strategy="distill", max_drop=100.0, out=str(tmp_path / "t"))
    record = run(config).to_dict()
    search = record["budget_search"]
    assert record["depth"] == search["chosen_depth"] == 1 and search["tried"][-1]["depth"] == 1
    assert record["retrain_strategy"] == "distill" and search["retrain_strategy"] == "distill"
    assert record["retrain_epochs"] == 1 and "the same for every strategy" in record["retrain_budget"]
    # The task's own retraining (the retrain stage, another process in a resumed run)
    # reproduces the model the search measured at that depth.
    model, _ = load_task(tmp_path / "t")
    exp = Experiment.from_config(dataclasses.replace(config, progress=False))
    assert accuracy(model, exp.val_loader, progress=False) == search["tried"][-1]["val_accuracy"]
    data = record["data"]
    assert data["val_samples"] == len(exp.val_loader.dataset) == data["splits"]["val"]["size"] == 180
    assert "val" in data["used_for"] and "10% val" in data["split_rule"]


def test_a_budget_needs_a_validation_split(monkeypatch, tmp_path):
    def no_val(data, **kwargs):
        labels = np.asarray(data.labels)
        return Splits(train=np.arange(0, 1500), val=np.array([], dtype=np.int64), test=np.arange(1500, len(labels)))

    monkeypatch.setattr(sls.tasks.classification, "make_splits", no_val)
    with pytest.raises(ConfigError, match="--max-drop chooses k on a validation split, and digits has none"):
        stage_finetune(dataclasses.replace(TINY, max_drop=1.0, out=str(tmp_path / "t")))
    with pytest.raises(ConfigError, match="leave out --depth"):
        RunConfig(max_drop=1.0, depth=3).validate()
    with pytest.raises(ConfigError, match="--max-drop must be a number of points >= 0"):
        RunConfig(max_drop=-1.0).validate()


def test_command_line_options():
    args = build_parser().parse_args(["run", "--alpha", "0.3", "0.5", "--retrain-strategy", "distill",
                                      "--retrain-option", "temperature=4", "--max-drop", "1.5"])  # fmt: skip
    config = _config_from(args)
    assert (config.alpha, config.alphas, config.max_drop) == (0.3, [0.5], 1.5)
    assert (config.retrain_strategy, config.retrain_options) == ("distill", {"temperature": 4})
    config = _config_from(build_parser().parse_args(["run"]))
    assert (config.alpha, config.alphas, config.max_drop) == (0.3, [], None)
    assert main(["run", "--retrain-strategy", "distill", "--retrain-option", "tau=1", "--quiet"]) == 2
