"""Task folders: the few tensors and the record that turn the shared backbone into a task.

A task folder holds ``task.safetensors`` (the PETL parameters of the kept blocks and
the head, nothing else) and ``record.json`` (how to rebuild the model: backbone name
and fingerprint, PETL method and hyper-parameters, k, ...). ``finetuned.safetensors``
keeps the PETL parameters of all N blocks before pruning, for analysing or pruning
again; the deployable task is the first two files. :func:`load_task`
rebuilds the pruned model from the shared backbone plus those two files and refuses
a backbone whose fingerprint differs from the record's.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save, save_file
from torch import nn

from sls._io import atomic_write, write_json
from sls.backbones import create_backbone, truncate
from sls.errors import TaskRecordError
from sls.petl import create_petl, trainable_state

RECORD_FILE = "record.json"
WEIGHTS_FILE = "task.safetensors"
FINETUNED_FILE = "finetuned.safetensors"
STAGES = {"pruned": WEIGHTS_FILE, "finetuned": FINETUNED_FILE}
RECORD_FORMAT = 1
TENSOR_METADATA = {"format": "sls"}


def save_tensors(path: Path, model: nn.Module) -> Path:
    """Write the model's trainable tensors (PETL and head) to ``path``, atomically."""
    state = trainable_state(model)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=TENSOR_METADATA))


def save_task(task_dir: str | Path, model: nn.Module, record: dict, *, finetuned: nn.Module | None = None) -> Path:
    """Write the pruned model's trainable tensors and the record into ``task_dir``.

    ``finetuned`` (the unpruned PETL model) is saved too when given. The tensors go
    first and the record last, each atomically, so a folder whose record exists
    always holds the tensors that record describes.
    """
    task_dir = Path(task_dir)
    if finetuned is not None:
        save_tensors(task_dir / FINETUNED_FILE, finetuned)
    save_tensors(task_dir / WEIGHTS_FILE, model)
    write_json(task_dir / RECORD_FILE, {"format": RECORD_FORMAT, **record})
    return task_dir


def task_tensor_bytes(model: nn.Module) -> int:
    """Size in bytes of the ``task.safetensors`` that :func:`save_task` writes for ``model``."""
    return len(save(trainable_state(model), metadata=TENSOR_METADATA))


def read_record(task_dir: str | Path) -> dict:
    """The task's record, validated enough to rebuild the model."""
    path = Path(task_dir) / RECORD_FILE
    if not path.is_file():
        raise TaskRecordError(f"{path} not found; is {task_dir} a task folder written by sls?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskRecordError(f"{path} is not valid JSON ({err})") from None
    for field in ("backbone", "petl", "depth", "num_classes"):
        if field not in record:
            raise TaskRecordError(f"{path} lacks the field {field!r}")
    return record


def load_task(
    task_dir: str | Path, *, weights: str | Path | None = None, stage: str = "pruned"
) -> tuple[nn.Module, dict]:
    """Rebuild a task's pruned model from the shared backbone and the task folder.

    Args:
        task_dir: a folder written by :func:`save_task`.
        weights: the backbone's weights file; default: the record's (the embedded
            model's cache for embedded models).
        stage: ``"pruned"`` (the task: k blocks) or ``"finetuned"`` (all N blocks
            with their PETL modules, before pruning).

    Returns:
        the pruned model in eval mode, and the record.

    Raises:
        TaskRecordError: the folder is incomplete, or the backbone's fingerprint
            differs from the one the task was trained on.
    """
    task_dir = Path(task_dir)
    record = read_record(task_dir)
    backbone = record["backbone"]
    if weights is None and backbone["weights"] not in ("timm",):
        from sls.backbones.embedded import EMBEDDED_MODELS

        if backbone["model"] not in EMBEDDED_MODELS:
            weights = backbone["weights"]
    model, info = create_backbone(
        backbone["model"],
        num_classes=record["num_classes"],
        weights=weights,
        img_size=backbone["img_size"],
        model_kwargs=backbone.get("model_kwargs"),  # absent from records written before it existed
    )
    check_fingerprint(info.fingerprint, record, task_dir, info.weights)
    if stage not in STAGES:
        raise TaskRecordError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    create_petl(record["petl"]["method"], **record["petl"]["hparams"]).apply(model)
    if stage == "pruned":
        truncate(model, int(record["depth"]))
    load_tensors(model, task_dir / STAGES[stage])
    model.eval()
    return model, record


def check_fingerprint(fingerprint: str, record: dict, task_dir: str | Path, weights: str) -> None:
    """Refuse a backbone whose tensors differ from the ones the task was trained on."""
    expected = record["backbone"]["fingerprint"]
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
