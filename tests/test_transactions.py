"""Task folders as transactions: a crash at any write boundary of any stage, then a
resume, ends exactly as an uninterrupted run; a second writer is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re

import pytest

import sls._io
from sls.artifact import task_file
from sls.config import RunConfig
from sls.record import read_record
from sls.stages import run

# A small task that prunes (depth 3 of 6) and retrains; cka scores need no t-SNE.
QUICK = RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=60, test_samples=30,
                  analysis_samples=None, epochs=1, retrain_epochs=1, lr=3e-2, batch_size=16, throughput_batch=2,
                  criterion="cka", depth=3, score_all=True, force=True, cache=False, progress=False)  # fmt: skip
# No feature cache: a cache warm or cold would shift the write boundaries between runs.


class Crash(BaseException):
    """The process dying: nothing in sls catches it."""


class Boundaries:
    """Counts every write boundary (an atomic rename, a file removal in the task folder)
    and kills the run at the chosen one, before or after it takes effect."""

    def __init__(self, crash_at: int | None = None, after: bool = False):
        self.crash_at, self.after, self.seen, self.names = crash_at, after, 0, []
        self._replace, self._unlink = os.replace, pathlib.Path.unlink

    def _boundary(self, name: str, do) -> None:
        index, self.seen = self.seen, self.seen + 1
        self.names.append(name)
        if index != self.crash_at:
            return do()
        if self.after:
            do()
        raise Crash(name)

    def replace(self, src, dst):
        def do():
            self._replace(src, dst)

        if self.seen == self.crash_at and not self.after:  # a kill leaves the temporary file behind
            os.link(src, f"{src}.killed.tmp")
        self._boundary(pathlib.Path(dst).name, do)

    def unlink(self, path, missing_ok=False):
        if path.name.endswith(".tmp") or not path.exists():  # cleaning up after a write, not a change
            return self._unlink(path, missing_ok=missing_ok)
        self._boundary(f"unlink {path.name}", lambda: self._unlink(path, missing_ok=missing_ok))

    def install(self, monkeypatch):
        monkeypatch.setattr(sls._io.os, "replace", self.replace)
        monkeypatch.setattr(pathlib.Path, "unlink", lambda path, missing_ok=False: self.unlink(path, missing_ok))


def outcome(folder: pathlib.Path) -> dict:
    """What a finished task folder holds, less what differs between any two runs
    (timings, throughput figures, where it was written)."""
    record = json.loads((folder / "record.json").read_text())
    for run_ in record["runs"]:
        run_.pop("seconds")
    record["results"].pop("throughput")
    for figures in record["results"]["measurements"].values():  # FLOPs, parameters and peak memory stay
        figures.pop("throughput")
        figures.pop("latency_ms")
    record["config"].pop("out")
    names = sorted(p.name for p in folder.iterdir())
    for name in ("config.yaml", "training.png", "scores.csv", "scores.png"):
        assert (folder / name).stat().st_size > 0, name
    return {"record": record, "files": names, "config.yaml": (folder / "config.yaml").read_text(),
            "scores.csv": (folder / "scores.csv").read_text()}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole") / "task"
    counter = Boundaries()
    with pytest.MonkeyPatch.context() as patch:
        counter.install(patch)
        run(dataclasses.replace(QUICK, out=str(folder)))
    return outcome(folder), counter.names


def crash_then_resume(folder: pathlib.Path, index: int, after: bool, monkeypatch) -> str:
    config = dataclasses.replace(QUICK, out=str(folder))
    boundaries = Boundaries(index, after)
    with monkeypatch.context() as patch:
        boundaries.install(patch)
        with pytest.raises(Crash) as crashed:
            run(config)
    if (folder / "record.json").is_file():  # what a reader sees meanwhile is whole and consistent
        record = read_record(folder)
        for kind in record.files:
            path = task_file(record, folder, kind)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == record.files[kind]["sha256"]
    run(config)
    return str(crashed.value)


def test_the_write_boundaries_are_what_the_stages_write(uninterrupted):
    _, names = uninterrupted
    written = [re.sub(r"-[0-9a-f]{16}", "", n) for n in names if n.endswith(".safetensors")]
    # finetune writes both files; prune and retrain their task file; evaluate reuses it.
    assert written == ["finetuned.safetensors", "task.safetensors", "task.safetensors", "unlink task.safetensors",
                       "task.safetensors", "unlink task.safetensors"]  # fmt: skip
    assert names.count("record.json") == 4  # one commit per stage
    assert any(n.startswith("unlink task-") for n in names)  # the superseded tensors, after the record


@pytest.mark.slow
def test_a_crash_just_after_a_stages_tensors_or_record_land_then_resume_equals_an_uninterrupted_run(
        uninterrupted, tmp_path, monkeypatch):  # fmt: skip
    """The lean suite's share: the windows between a stage's tensors and its record (where
    a resume used to retrain retrained tensors) and between a record and its views."""
    expected, names = uninterrupted
    tensors = [i for i, name in enumerate(names) if name.startswith("task-")]  # finetune's, prune's, retrain's
    records = [i for i, name in enumerate(names) if name == "record.json"]
    for index in [*tensors, *records[1:3]]:  # ... and prune's and retrain's records, before their views
        folder = tmp_path / f"crash-{index}"
        where = crash_then_resume(folder, index, True, monkeypatch)
        assert where == names[index] and outcome(folder) == expected, f"crash at write {index} ({where})"


@pytest.mark.slow
@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
def test_a_crash_at_every_write_boundary_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path,
                                                                                 monkeypatch, after):  # fmt: skip
    expected, names = uninterrupted
    assert len(names) >= 20
    for index in range(len(names)):
        folder = tmp_path / f"crash-{index}"
        where = crash_then_resume(folder, index, after, monkeypatch)
        assert where == names[index] and outcome(folder) == expected, f"crash at write {index} ({where})"


HOLD = """
import sys, time
from sls._lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding a task folder's lock; killed at the end."""
    import subprocess
    import sys

    started = []

    def hold(folder: pathlib.Path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        started.append(proc)
        return proc

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_readers_go_on(tmp_path, holder, capsys):
    import socket

    from sls.cli import main

    folder = tmp_path / "task"
    run(dataclasses.replace(QUICK, out=str(folder)))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".sls.lock"}
    proc = holder(folder)
    args = ["--model", "test_vit", "--weights", "random", "--data", "digits", "--img-size", "32", "--quiet"]
    for command in (["run", *args, "--out", str(folder)], ["prune", str(folder), "--quiet"],
                    ["evaluate", str(folder), "--quiet"], ["finetune", *args, "--out", str(folder)]):  # fmt: skip
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"sls: error: {folder} is being written by pid {proc.pid} on "
                                                  f"{socket.gethostname()}"), err  # fmt: skip
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".sls.lock"} == before
    assert main(["show", str(folder)]) == 0  # readers never need the lock
    assert main(["export", str(folder), "--format", "safetensors", "--out", str(tmp_path / "model.safetensors")]) == 0
    capsys.readouterr()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, holder, capsys):
    folder = tmp_path / "task"
    proc = holder(folder)
    proc.kill()
    proc.wait()
    assert json.loads((folder / ".sls.lock").read_text())["pid"] == proc.pid  # left behind, holding nothing
    record = run(dataclasses.replace(QUICK, out=str(folder)))
    assert record.stages == ["finetune", "prune", "retrain", "evaluate"]
    assert f"took over the lock of pid {proc.pid}" in capsys.readouterr().err
    assert (folder / ".sls.lock").read_text() == ""  # released


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from sls.cli import main

    if os.geteuid() == 0:
        pytest.skip("root writes through permissions")
    folder = tmp_path / "task"
    run(dataclasses.replace(QUICK, out=str(folder), retrain=False))
    folder.chmod(0o555)
    try:
        assert main(["evaluate", str(folder), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"cannot write the output folder {folder}" in err
    finally:
        folder.chmod(0o755)


def test_a_stage_command_on_a_missing_folder_creates_nothing(tmp_path, capsys):
    from sls.cli import main

    assert main(["prune", str(tmp_path / "typo" / "a" / "b"), "--quiet"]) == 2
    assert "record.json not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cleaning_up_leaves_other_programs_temporary_files(tmp_path):
    from sls.artifact import collect_garbage

    folder = tmp_path / "task"
    run(dataclasses.replace(QUICK, out=str(folder), retrain=False))
    mine, theirs = folder / ".record.json.x1y2.tmp", folder / ".model.onnx.abcd.tmp"
    mine.write_text("half")
    theirs.write_text("someone else's")
    assert collect_garbage(folder, read_record(folder)) == [mine.name]
    assert theirs.exists() and not mine.exists()


def test_a_format_2_folder_gets_hashed_at_its_next_commit(tmp_path):
    from sls.stages import stage_evaluate

    folder = tmp_path / "task"
    run(dataclasses.replace(QUICK, out=str(folder), retrain=False))
    raw = json.loads((folder / "record.json").read_text())
    record = read_record(folder)
    for kind, legacy in (("task", "task.safetensors"), ("finetuned", "finetuned.safetensors")):
        task_file(record, folder, kind).rename(folder / legacy)
    raw["format"] = 2
    del raw["files"]
    (folder / "record.json").write_text(json.dumps(raw))
    stage_evaluate(folder, progress=False)
    files = json.loads((folder / "record.json").read_text())["files"]
    assert files["finetuned"]["file"] == "finetuned.safetensors"  # kept under its name, now with its hash
    assert files["finetuned"]["sha256"] == hashlib.sha256((folder / "finetuned.safetensors").read_bytes()).hexdigest()
    assert files["task"]["file"].startswith("task-") and not (folder / "task.safetensors").exists()
