"""Faults a user meets: a full disk, a file size limit, damaged or hostile files. Each is
one line naming the path and exit 2, and what was already saved stays usable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_transactions import QUICK

from sls.artifact import task_file
from sls.cli import main
from sls.experiment import load_task
from sls.record import read_record
from sls.stages import stage_finetune


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetuned") / "task"
    stage_finetune(dataclasses.replace(QUICK, out=str(folder)))
    return folder


def assert_still_the_finetuned_task(folder: Path) -> None:
    record = read_record(folder)
    assert record.stages == ["finetune"]
    for kind in record.files:
        assert task_file(record, folder, kind).is_file()
    load_task(folder, stage="finetuned")  # hashes checked: whole and usable
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system with almost no room left: a tmpfs mount (needs root; else skipped)."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / "small"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_full_disk_during_prune_is_one_line_and_the_finetune_stays(finetuned, small_tmpfs, capsys):
    pages = sum(math.ceil(p.stat().st_size / 4096) for p in finetuned.iterdir())
    disk = small_tmpfs((pages + 3) * 4096)  # the fine-tuned folder and three pages: no room for the pruned tensors
    folder = disk / "task"
    folder.mkdir()
    for path in finetuned.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    assert main(["prune", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"sls: error: could not write {folder}/") and "no space left" in err
    assert_still_the_finetuned_task(folder)


def test_a_file_size_limit_during_prune_is_one_line_and_the_finetune_stays(finetuned, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) whoever the user is."""
    folder = tmp_path / "task"
    folder.mkdir()
    for path in finetuned.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))"
    script = f"{limit}\nimport sys\nfrom sls.cli import main\nsys.exit(main(['prune', {str(folder)!r}, '--score-all', '--quiet']))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "SLS_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith(f"sls: error: could not write {folder}/task-") and "larger than this process may write" in err
    assert "the block features were not cached" in done.stderr  # the cache is skipped, not fatal
    assert_still_the_finetuned_task(folder)


def test_a_record_that_is_not_json_or_lacks_fields_is_one_line(finetuned, tmp_path, capsys):
    folder = tmp_path / "task"
    folder.mkdir()
    record = json.loads((finetuned / "record.json").read_text())
    for text, message in (("{broken", "is not valid JSON"), (json.dumps({**record, "depth": None} | {"petl": 3}),
                                                                "does not hold a task record"),
                          (json.dumps({k: v for k, v in record.items() if k != "backbone"}), "lacks the field 'backbone'"),
                          ("[1, 2]", "is not a task record")):  # fmt: skip
        (folder / "record.json").write_text(text)
        for command in (["show", str(folder)], ["prune", str(folder), "--quiet"], ["export", str(folder), "--format", "safetensors"]):
            assert main(command) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and str(folder / "record.json") in err and message in err, (command, err)
