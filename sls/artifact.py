"""Task folders: the few tensors and the record that turn the shared backbone into a task.

A task folder holds ``task.safetensors`` (the PETL parameters of the kept blocks and
the head, nothing else) and ``record.json`` (how to rebuild the model: backbone name
and fingerprint, PETL method and hyper-parameters, k, ...). ``finetuned.safetensors``
keeps the PETL parameters of all N blocks before pruning, for analysing or pruning
again; the deployable task is the first two files. :func:`sls.experiment.load_task`
rebuilds the pruned model from the shared backbone plus those two files and refuses
a backbone whose fingerprint differs from the record's (through
:meth:`sls.experiment.Experiment.from_record`).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save, save_file
from torch import nn

from sls._io import atomic_write, write_json
from sls.errors import TaskRecordError
from sls.petl import trainable_state
from sls.record import RECORD_FILE, TaskRecord, read_record

__all__ = ["RECORD_FILE", "TaskRecord", "read_record", "save_task", "load_tensors", "check_fingerprint"]

WEIGHTS_FILE = "task.safetensors"
FINETUNED_FILE = "finetuned.safetensors"
STAGE_FILES = {"pruned": WEIGHTS_FILE, "finetuned": FINETUNED_FILE}
TENSOR_METADATA = {"format": "sls"}


def save_tensors(path: Path, model: nn.Module) -> Path:
    """Write the model's trainable tensors (PETL and head) to ``path``, atomically."""
    state = trainable_state(model)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=TENSOR_METADATA))


def save_task(task_dir: str | Path, model: nn.Module, record: TaskRecord | dict, *,
              finetuned: nn.Module | None = None) -> Path:  # fmt: skip
    """Write the pruned model's trainable tensors and the record into ``task_dir``.

    ``finetuned`` (the unpruned PETL model) is saved too when given. The tensors go
    first and the record last, each atomically, so a folder whose record exists
    always holds the tensors that record describes. A plain ``dict`` record is read as
    :meth:`TaskRecord.from_dict` reads ``record.json`` (format 1 included).
    """
    task_dir = Path(task_dir)
    if isinstance(record, dict):
        record = TaskRecord.from_dict(record)
    if finetuned is not None:
        save_tensors(task_dir / FINETUNED_FILE, finetuned)
    save_tensors(task_dir / WEIGHTS_FILE, model)
    write_json(task_dir / RECORD_FILE, record.to_dict())
    return task_dir


def task_tensor_bytes(model: nn.Module) -> int:
    """Size in bytes of the ``task.safetensors`` that :func:`save_task` writes for ``model``."""
    return len(save(trainable_state(model), metadata=TENSOR_METADATA))


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


def load_tensors(model: nn.Module, path: Path) -> nn.Module:
    """Load a task's tensors into the model's trainable parameters; the names must match exactly."""
    if not path.is_file():
        raise TaskRecordError(f"{path} not found; the task folder is incomplete")
    state = load_file(str(path))
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise TaskRecordError(f"{path} does not match its record: missing {missing}, unexpected {extra}")
    model.load_state_dict(state, strict=False)
    return model
