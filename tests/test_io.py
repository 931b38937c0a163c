"""Task files on shared storage: readable by the team as the umask allows, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from sls._io import atomic_write, write_json, write_text


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask_022):
    for path in (write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {"k": 1}),
                 atomic_write(tmp_path / "c.bin", lambda tmp: tmp.write_bytes(b"\0"))):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert stat.S_IMODE(reference.stat().st_mode) == 0o644
    os.umask(0o077)  # a private umask is honoured too
    assert stat.S_IMODE(write_text(tmp_path / "private.txt", "x").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_task_folder_is_readable_by_others(tmp_path, umask_022):
    from sls.config import RunConfig
    from sls.stages import stage_finetune

    out = tmp_path / "task"
    stage_finetune(RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=100,
                             test_samples=30, epochs=1, batch_size=32, device="cpu", progress=False, out=str(out)))  # fmt: skip
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name
