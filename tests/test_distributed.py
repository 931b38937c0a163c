"""Two CPU processes on Gloo against one process: features, k, training, `sls run` under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import N_IMAGES, check, tiny_loader, tiny_model
from safetensors.torch import load_file

from sls import distributed
from sls.backbones import block_features
from sls.select import DepthSelector
from sls.stages import stage_prune

FEATURE_TOLERANCE = 1e-5
"""Gathered features against one process's. They come out bit-identical here; the shares
are batched differently, and a BLAS may pick other kernels for other batch sizes."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _process(rank: int, out: Path, port: int) -> None:
    # What torchrun sets for each process; sls.distributed.session reads it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    check(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """tests/distributed_worker.py:check in 2 processes; their output folder.

    Forked rather than launched, to skip two interpreter start-ups (tens of seconds on
    a small machine); the torchrun launch itself is tested end to end below.
    """
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        pytest.skip("forking the two processes needs a POSIX system")
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(_process, args=(out, _free_port()), nprocs=2, start_method="fork")
    return out


@pytest.fixture(scope="module")
def one_process():
    """The same features computed by this process alone."""
    return block_features(tiny_model(), tiny_loader(), progress=False)


def _features(path: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    with np.load(path) as stored:
        n_blocks = sum(1 for key in stored if key.removeprefix("block_").isdigit())
        return [stored[f"block_{i}"] for i in range(n_blocks)], stored["labels"], stored["block_input"]


def test_gathered_features_equal_one_process_in_order(two_processes, one_process):
    out, single = two_processes, one_process
    for rank in (0, 1):
        features, labels, block_input = _features(out / f"rank{rank}.features.npz")
        assert len(features) == len(single.features) == 6
        np.testing.assert_array_equal(labels, single.labels)  # same order: labels are i % 3
        np.testing.assert_array_equal(labels, np.arange(N_IMAGES) % 3)
        np.testing.assert_allclose(block_input, single.block_input, rtol=0, atol=FEATURE_TOLERANCE)
        for gathered, alone in zip(features, single.features):
            assert gathered.shape == alone.shape == (N_IMAGES, 64)  # the padding row is gone
            np.testing.assert_allclose(gathered, alone, rtol=0, atol=FEATURE_TOLERANCE)


def test_k_chosen_on_the_main_process_equals_one_process(two_processes, one_process):
    out, single = two_processes, one_process
    alone = DepthSelector(alpha=0.3).fit(single.features, single.labels)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["depth"] == ranks[1]["depth"] == alone.depth_
    assert ranks[0]["scores"] == ranks[1]["scores"]  # computed once, sent to the other process
    np.testing.assert_allclose(ranks[0]["scores"], alone.scores_, atol=1e-4)
    assert max(alone.scores_) > 0.1  # the classes separate: k is a real decision, not the SC_N <= 0 fallback


def test_one_data_parallel_epoch_leaves_the_same_parameters_on_both_processes(two_processes):
    out = two_processes
    trained = [load_file(str(out / f"rank{rank}.trained.safetensors")) for rank in (0, 1)]
    initial = {n: p.detach() for n, p in tiny_model().named_parameters() if p.requires_grad}
    assert trained[0].keys() == trained[1].keys() == initial.keys()
    for name in initial:
        torch.testing.assert_close(trained[0][name], trained[1][name], rtol=0, atol=0)
    assert any(not torch.equal(trained[0][n], initial[n]) for n in initial)  # it trained
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # summed over the processes
    # Global batch 16 split in two: ceil(ceil(101 / 2) / 8) = 7 steps, as 1 process's ceil(101 / 16).
    assert ranks[0]["steps"] == 7
    retrained = [load_file(str(out / f"rank{rank}.retrained.safetensors")) for rank in (0, 1)]
    assert retrained[0].keys() == retrained[1].keys() and len(retrained[0]) < len(initial)
    for name in retrained[0]:
        torch.testing.assert_close(retrained[0][name], retrained[1][name], rtol=0, atol=0)
    assert any(not torch.equal(retrained[0][n], trained[0][n]) for n in retrained[0])


@pytest.mark.slow
def test_sls_run_under_torchrun_matches_one_process_prune(tmp_path):
    task = tmp_path / "task"
    args = ["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
            "--train-samples", "150", "--test-samples", "61", "--analysis-samples", "all", "--epochs", "4",
            "--lr", "0.03", "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(task)]  # fmt: skip
    # Its own feature cache: the single-process prune below must compute its features.
    env = os.environ | {"OMP_NUM_THREADS": "1", "SLS_CACHE": str(tmp_path / "cache")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sls.cli"]
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("task folder:") == 1  # only rank 0 prints
    record = json.loads((task / "record.json").read_text())
    assert record["stages"] == ["finetune", "prune", "retrain", "evaluate"]
    assert record["scores"][-1] > 0  # k is a real decision here, not the SC_N <= 0 fallback
    # One process re-prunes the folder the two processes fine-tuned: same scores, k, accuracy.
    alone = stage_prune(shutil.copytree(task, tmp_path / "again"), progress=False).to_dict()
    assert alone["depth"] == record["depth"]
    assert alone["scored_blocks"] == record["scored_blocks"]
    np.testing.assert_allclose(np.array(alone["scores"], dtype=float), np.array(record["scores"], dtype=float),
                               atol=1e-4)  # fmt: skip (blocks not scored are None -> NaN in both)
    assert alone["results"]["accuracy"]["pruned_no_retrain"] == record["results"]["accuracy"]["pruned_no_retrain"]


def test_everything_is_a_plain_call_outside_a_process_group():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    loader = tiny_loader()
    shard, gather = distributed.ordered_shard(loader)
    assert shard is loader and gather(torch.ones(3)) is not None
    assert distributed.shuffled_shard(loader) is loader
    assert distributed.run_on_main(lambda x: x + 1, 1) == 2
    assert distributed.sum_over_processes(1.5, 2.0) == [1.5, 2.0]
    model = tiny_model()
    assert distributed.data_parallel(model) is model


@pytest.mark.slow
def test_stage_commands_under_torchrun_match_one_process(tmp_path):
    """One process fine-tunes; two processes prune and evaluate one copy, one process the other."""
    from sls.config import RunConfig
    from sls.stages import stage_evaluate, stage_finetune

    task = tmp_path / "task"
    stage_finetune(RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=150,
                             test_samples=61, analysis_samples=None, epochs=4, lr=0.03, batch_size=16,
                             device="cpu", progress=False, out=str(task)))  # fmt: skip
    two, one = shutil.copytree(task, tmp_path / "two"), shutil.copytree(task, tmp_path / "one")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sls.cli"]
    for stage in ("prune", "evaluate"):
        env = os.environ | {"OMP_NUM_THREADS": "1", "SLS_CACHE": str(tmp_path / f"cache-{stage}")}
        done = subprocess.run([*launch, stage, str(two), "--device", "cpu", "--quiet"], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if stage == "prune":
            assert done.stdout.count("next: sls retrain") == 1  # only rank 0 prints
    # Retraining on 2 processes a task fine-tuned on 1 would not reproduce it: one line, exit 2.
    done = subprocess.run([*launch, "retrain", str(two), "--device", "cpu", "--quiet"], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0 and "trained on 1 process(es) and this is 2" in done.stderr
    parallel = json.loads((two / "record.json").read_text())
    assert [(run["stage"], run["world_size"]) for run in parallel["runs"]] == [("finetune", 1), ("prune", 2),
                                                                              ("evaluate", 2)]  # fmt: skip
    stage_prune(one, progress=False)
    alone = stage_evaluate(one, progress=False).to_dict()
    assert parallel["scores"][-1] > 0  # k is a real decision here, not the SC_N <= 0 fallback
    assert parallel["depth"] == alone["depth"]
    np.testing.assert_allclose(parallel["scores"], alone["scores"], atol=1e-4)
    # Test accuracy over exactly the 61 test images (no padding duplicates), as one process counts it.
    assert parallel["results"]["accuracy"] == alone["results"]["accuracy"]
