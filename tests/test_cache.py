"""The feature cache: bounded with least-recently-used eviction, bypassable, listed and
cleared by `sls cache`, in the folder the environment names; never needed for a result."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sls.features
from sls.backbones import create_backbone
from sls.cli import main


@pytest.fixture
def model_and_loader():
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, DataLoader(TensorDataset(images, torch.arange(20) % 3), batch_size=8)


def cache_entry(model, loader, folder, split):
    sls.features.cached_block_features(model, loader, key_parts={"split": split}, cache=folder, progress=False)


def test_the_cache_keeps_under_its_cap_evicting_the_least_recently_used(model_and_loader, tmp_path, monkeypatch):
    model, loader = model_and_loader
    cache_entry(model, loader, tmp_path, "a")
    (entry_size,) = {e.bytes for e in sls.features.entries(tmp_path)}
    monkeypatch.setenv("SLS_CACHE_MAX_MB", str(2.5 * entry_size / 2**20))  # room for two entries
    cache_entry(model, loader, tmp_path, "b")
    a, b = sorted(sls.features.entries(tmp_path), key=lambda e: e.last_used)
    os.utime(a.path, (time.time() - 100, time.time() - 100))
    os.utime(b.path, (time.time() - 50, time.time() - 50))
    cache_entry(model, loader, tmp_path, "a")  # a hit: 'a' is now the most recently used
    cache_entry(model, loader, tmp_path, "c")  # over the cap: 'b' goes, not 'a'
    left = {e.path for e in sls.features.entries(tmp_path)}
    assert len(left) == 2 and a.path in left and b.path not in left
    assert sum(e.bytes for e in sls.features.entries(tmp_path)) <= sls.features.max_bytes()


def test_no_cache_reads_and_writes_nothing(model_and_loader, tmp_path, monkeypatch):
    model, loader = model_and_loader
    cache_entry(model, loader, tmp_path, "a")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    features, hit = sls.features.cached_block_features(model, loader, key_parts={"split": "a"}, cache=tmp_path,
                                                       use_cache=False, progress=False)  # fmt: skip
    assert not hit and {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_a_damaged_entry_is_named_recomputed_and_replaced(model_and_loader, tmp_path):
    model, loader = model_and_loader
    cache_entry(model, loader, tmp_path, "a")
    (entry,) = sls.features.entries(tmp_path)
    good = entry.path.read_bytes()
    entry.path.write_bytes(good[:200])
    with pytest.warns(UserWarning, match=f"the cached features {entry.path} are unreadable"):
        features, hit = sls.features.cached_block_features(model, loader, key_parts={"split": "a"}, cache=tmp_path,
                                                           progress=False)  # fmt: skip
    assert not hit and entry.path.read_bytes() == good  # computed again: the same features, stored whole


def test_a_cache_on_a_full_disk_is_skipped_with_a_warning(model_and_loader, tmp_path, monkeypatch):
    import errno

    model, loader = model_and_loader

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.warns(UserWarning, match="the block features were not cached: could not write .* no space left"):
        features, hit = sls.features.cached_block_features(model, loader, key_parts={"split": "a"}, cache=tmp_path,
                                                           progress=False)  # fmt: skip
    assert not hit and len(features.features) == 6 and list(tmp_path.iterdir()) == []


def test_sls_cache_lists_and_clears_the_folder_the_environment_names(model_and_loader, tmp_path, monkeypatch, capsys):
    model, loader = model_and_loader
    monkeypatch.delenv("SLS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "sls" / "features"
    assert sls.features.features_dir() == folder
    cache_entry(model, loader, None, "a")
    cache_entry(model, loader, None, "b")
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and str(folder) in out
    assert all(e.path.name in out for e in sls.features.entries(folder))
    assert main(["cache", "clear"]) == 0
    assert "removed 2 cached feature file(s)" in capsys.readouterr().out
    assert sls.features.entries(folder) == []
    monkeypatch.setenv("SLS_CACHE", str(tmp_path / "explicit"))
    assert sls.features.features_dir() == tmp_path / "explicit" / "features"


def test_run_and_prune_take_no_cache_and_a_later_stage_does_not_inherit_it(tmp_path, monkeypatch):
    import sls.pipeline

    seen = []
    original = sls.pipeline.cached_block_features
    monkeypatch.setattr(sls.pipeline, "cached_block_features",
                        lambda *a, **k: seen.append(k["use_cache"]) or original(*a, **k))  # fmt: skip
    out = tmp_path / "task"
    assert main(["run", "--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32",
                 "--train-samples", "60", "--test-samples", "30", "--epochs", "1", "--criterion", "cka",
                 "--depth", "3", "--score-all", "--no-retrain", "--force", "--no-cache", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    assert main(["prune", str(out), "--score-all", "--quiet"]) == 0  # where features go is not part of the task
    assert main(["prune", str(out), "--score-all", "--no-cache", "--quiet"]) == 0
    assert main(["prune", str(out), "--quiet"]) == 0  # a given depth scores nothing: no feature pass
    assert seen == [False, True, False]
