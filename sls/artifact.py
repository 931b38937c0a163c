"""Task folders: the few tensors and the record that turn the shared backbone into a task.

A task folder holds the task's tensors (the PETL parameters of the kept blocks and the
head, nothing else), ``record.json`` (how to rebuild the model: backbone name and
fingerprint, PETL method and hyper-parameters, k, ...) and, for analysing or pruning
again, the fine-tuned tensors of all N blocks. :func:`sls.experiment.load_task`
rebuilds the pruned model from the shared backbone plus the record and the task's
tensors, and refuses a backbone whose fingerprint differs from the record's.

Tensor files are content addressed: ``task-<sha256[:16]>.safetensors`` and
``finetuned-<...>.safetensors``, and the record names each with its full sha256 and
size (``record.files``). A stage writes its tensors under their own names first, the
record last (both atomically, see :mod:`sls._io`), and only then removes the files no
record names any more. So whenever the process dies, the record on disk names files
that are on disk, whole, with the content it describes; a file damaged afterwards is
found by its hash when it is loaded, and named.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from sls._io import atomic_write, write_json
from sls.errors import TaskRecordError
from sls.petl import trainable_state
from sls.record import RECORD_FILE, TaskRecord, read_record

__all__ = ["RECORD_FILE", "TaskRecord", "read_record", "save_task", "load_tensors", "check_fingerprint",
           "task_file", "collect_garbage"]  # fmt: skip

TENSOR_METADATA = {"format": "sls"}
_TENSOR_FILE = re.compile(r"^(task|finetuned)(-[0-9a-f]{16})?\.safetensors$")
_OWN_TEMPORARY = re.compile(r"^\.(record\.json|config\.yaml|scores\.csv|(training|scores|budget|predictions)\.png|"
                            r"(task|finetuned)(-[0-9a-f]{16})?\.safetensors)\..+\.tmp$")
"""Temporary files of sls's own writes into a task folder (see :func:`sls._io.atomic_write`)."""


def _serialise(model: nn.Module) -> bytes:
    return save(trainable_state(model), metadata=TENSOR_METADATA)


def save_tensors(task_dir: Path, kind: str, model: nn.Module) -> dict:
    """Write the model's trainable tensors (PETL and head) into ``task_dir`` under a
    name made from their sha256, atomically; a file of that content already there is
    kept. Returns the record's entry: ``{"file", "sha256", "bytes"}``."""
    data = _serialise(model)
    digest = hashlib.sha256(data).hexdigest()
    path = Path(task_dir) / f"{kind}-{digest[:16]}.safetensors"
    if not (path.is_file() and _sha256(path) == digest):
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return {"file": path.name, "sha256": digest, "bytes": len(data)}


def save_task(task_dir: str | Path, model: nn.Module, record: TaskRecord | dict, *,
              finetuned: nn.Module | None = None) -> Path:  # fmt: skip
    """Write the pruned model's trainable tensors and then the record into ``task_dir``.

    ``finetuned`` (the unpruned PETL model) is saved too when given; otherwise the
    record keeps naming the fine-tuned file it named. Files the new record no longer
    names are removed after it is on disk. A plain ``dict`` record is read as
    :meth:`TaskRecord.from_dict` reads ``record.json`` (format 1 included).
    """
    task_dir = Path(task_dir)
    if isinstance(record, dict):
        record = TaskRecord.from_dict(record)
    files = dict(record.files)
    for kind, entry in list(files.items()):  # a folder from before the hashes: hash what it holds now
        path = task_dir / entry["file"]
        if "sha256" not in entry:
            if path.is_file():
                files[kind] = {"file": entry["file"], "sha256": _sha256(path), "bytes": path.stat().st_size}
            else:
                del files[kind]
    if finetuned is not None:
        files["finetuned"] = save_tensors(task_dir, "finetuned", finetuned)
    files["task"] = save_tensors(task_dir, "task", model)
    record.files = files
    write_json(task_dir / RECORD_FILE, record.to_dict())
    collect_garbage(task_dir, record)
    return task_dir


def collect_garbage(task_dir: Path, record: TaskRecord) -> list[str]:
    """Remove the tensor files ``record`` does not name and the temporary files a killed
    write of sls left (nobody else's); the caller holds the folder's lock. Returns the
    names removed."""
    named = {entry["file"] for entry in record.files.values()}
    removed = []
    for path in Path(task_dir).iterdir():
        stale = _TENSOR_FILE.match(path.name) and path.name not in named
        if stale or _OWN_TEMPORARY.match(path.name):
            with suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.name)
    return removed


def task_file(record: TaskRecord, task_dir: str | Path, kind: str = "task") -> Path:
    """The path of the record's ``kind`` tensor file."""
    if kind not in record.files:
        raise TaskRecordError(f"{task_dir} holds no {kind} tensors (its record names none)")
    return Path(task_dir) / record.files[kind]["file"]


def task_tensor_bytes(model: nn.Module) -> int:
    """Size in bytes of the task tensor file that :func:`save_task` writes for ``model``."""
    return len(_serialise(model))


def record_weights(record: TaskRecord) -> str | None:
    """The backbone weights a task was trained on: the file the record names, or None
    for timm's pretrained source and the embedded models (their own cache)."""
    from sls.backbones.embedded import EMBEDDED_MODELS

    backbone = record.backbone
    if backbone["weights"] == "timm" or backbone["model"] in EMBEDDED_MODELS:
        return None
    return backbone["weights"]


def check_fingerprint(fingerprint: str, record: TaskRecord, task_dir: str | Path, weights: str) -> None:
    """Refuse a backbone whose tensors differ from the ones the task was trained on."""
    expected = record.backbone["fingerprint"]
    if fingerprint != expected:
        raise TaskRecordError(
            f"the backbone weights ({weights}) differ from those task {task_dir} was trained on "
            f"(fingerprint {fingerprint[:12]} != {expected[:12]}); pass the right --weights"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tensors(model: nn.Module, task_dir: str | Path, record: TaskRecord, kind: str = "task") -> nn.Module:
    """Load the record's ``kind`` tensors into the model's trainable parameters.

    The file's sha256 must be the record's (records before format 3 name no hash) and
    its tensor names exactly the model's trainable ones; otherwise the error names the file.
    """
    path = task_file(record, task_dir, kind)
    entry = record.files[kind]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        try:
            rewritten = read_record(task_dir).files.get(kind) != entry
        except TaskRecordError:
            rewritten = False
        if rewritten:  # a writer committed a new stage while this read the old record
            raise TaskRecordError(f"{task_dir} was rewritten (a stage finished) while it was being read; "
                                  "run the command again") from None  # fmt: skip
        raise TaskRecordError(f"{path} not found; the task folder is incomplete") from None
    if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise TaskRecordError(f"{path} is damaged: its sha256 is not the one its record names "
                              f"({len(data)} bytes, the record says {entry.get('bytes', '?')}); restore it or re-run "
                              f"the stage that wrote it")  # fmt: skip
    try:
        state = load(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise TaskRecordError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())[:120]})") from None
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise TaskRecordError(f"{path} does not match its record: missing {missing}, unexpected {extra}")
    model.load_state_dict(state, strict=False)
    return model
