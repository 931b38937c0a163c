"""The typed, versioned task record: what ``record.json`` holds.

:class:`TaskRecord` is the one schema of a task folder's record: every command opens a
folder through :func:`read_record` (which also reads today's format 1), the stages
change its typed fields, and :meth:`TaskRecord.to_dict` writes the same flat JSON
layout as format 1, plus what format 2 adds:

- ``resolved``: the settings left to the data (input size, epochs) as the run used them;
- ``training``: per training stage, one row per epoch (mean loss, validation accuracy);
- ``finetune_check``: whether the fine-tune looks failed (near chance, loss barely fell);
- ``runs``: per stage executed, where it ran (device, precision, threads, processes).

Format 3 adds ``files``: the task's tensor files by kind (``task``, ``finetuned``), each
``{"file", "sha256", "bytes"}`` (see :mod:`sls.artifact`). Older records name the fixed
files ``task.safetensors`` and ``finetuned.safetensors``, without a hash.

Fields that only a later stage fills (the scores, the budget search, the retraining)
are None until then and left out of the JSON, so ``"scores" in record.json`` still
says whether the task was pruned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from sls import __version__
from sls.config import RunConfig, config_fields
from sls.errors import TaskRecordError

RECORD_FILE = "record.json"
RECORD_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
LEGACY_FILES = {"task": {"file": "task.safetensors"}, "finetuned": {"file": "finetuned.safetensors"}}
"""The tensor files of a record before format 3 (no hash to check them against)."""
_REQUIRED = ("backbone", "petl", "depth", "num_classes")
_BACKBONE_KEYS = ("model", "fingerprint", "num_blocks", "img_size", "mean", "std")
_OPTIONAL = ("criterion", "tsne", "alpha", "scores", "scores_std", "scored_blocks", "depths_per_seed", "threshold",
             "selected_depth",
             "selection_reason", "selection_margin", "passing_below", "depth_per_alpha", "budget_search",
             "retrain_strategy", "retrain_options", "retrain_epochs", "retrain_budget", "finetune_check")  # fmt: skip


@dataclass
class TaskRecord:
    """A task: how to rebuild its model from the shared backbone, and what was measured.

    Attributes:
        backbone: :meth:`sls.backbones.BackboneInfo.to_dict` (name, weights, fingerprint, ...).
        petl: ``{"method": name, "hparams": {...}}``.
        num_classes: classes of the head.
        depth: k, the blocks kept (N before pruning).
        config: the run's settings as given (``None`` where left to the data).
        resolved: the settings left to the data, as used (``img_size``, ``epochs``, ``retrain_epochs``).
        stages: the stages completed, in order.
        results: ``accuracy`` (full, pruned_no_retrain, pruned_retrained), ``throughput``,
            ``parameters``, ``storage_bytes``, ``seconds``.
        training: stage name -> one ``{"epoch", "loss", "val_accuracy"}`` row per epoch.
        runs: one ``{"stage", "device", "amp", "channels_last", "compile", "threads", "world_size", "seconds",
            "peak_rss_mb"}`` per stage run (peak_rss_mb: the process's peak resident memory by then).
        files: tensor file kind (``task``, ``finetuned``) -> ``{"file", "sha256", "bytes"}``.
    """

    backbone: dict
    petl: dict
    num_classes: int
    depth: int
    config: RunConfig
    classes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seed: int = 0
    stages: list[str] = field(default_factory=list)
    results: dict = field(default_factory=lambda: {"accuracy": {}})
    resolved: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    sls_version: str = __version__
    criterion: str | None = None
    tsne: dict | None = None
    alpha: float | None = None
    scores: list[float | None] | None = None
    scores_std: list[float | None] | None = None
    scored_blocks: list[int] | None = None
    """The blocks scored (1-based); ``scores`` holds None for the others (see ``--score-all``)."""
    depths_per_seed: list[int] | None = None
    threshold: float | None = None
    selected_depth: int | None = None
    selection_reason: str | None = None
    selection_margin: float | None = None
    passing_below: list[int] | None = None
    depth_per_alpha: list[dict] | None = None
    budget_search: dict | None = None
    retrain_strategy: str | None = None
    retrain_options: dict | None = None
    retrain_epochs: int | None = None
    retrain_budget: str | None = None
    finetune_check: dict | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.backbone["num_blocks"])

    @property
    def world_size(self) -> int | None:
        """Processes the training stages ran on (None before any, or in a format-1 record)."""
        trained = [run.get("world_size", 1) for run in self.runs if run.get("stage") in ("finetune", "retrain")]
        return trained[-1] if trained else None

    def setting(self, name: str):
        """A setting as the run used it: resolved where it was left to the data."""
        return self.resolved.get(name, getattr(self.config, name))

    def clear_selection(self) -> None:
        """Forget what pruning chose and what came after it (a new prune stage)."""
        for name in _OPTIONAL:
            if name != "finetune_check":
                setattr(self, name, None)
        self.training.pop("retrain", None)
        kept = {"accuracy": {"full": self.results["accuracy"].get("full")}}
        if "metric" in self.results:  # a dense task's full-model metrics stay with its fine-tune
            kept |= {"metric": self.results["metric"], "metrics": {"full": self.results.get("metrics", {}).get("full")}}
        self.results = kept

    def to_dict(self) -> dict:
        """The JSON layout of ``record.json`` (format 3)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["config"] = self.config.to_dict()
        for name in _OPTIONAL:
            if values[name] is None:
                del values[name]
        return {"format": RECORD_FORMAT, **values}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "record") -> TaskRecord:
        """Read formats 1 (before the typed record) to 3; refuse anything else in one line."""
        if not isinstance(raw, dict):
            raise TaskRecordError(f"{where} is not a task record (a JSON object)")
        version = raw.get("format", 1)
        if version not in READABLE_FORMATS:
            raise TaskRecordError(f"{where} has record format {version!r}; this sls reads formats "
                                  f"{', '.join(map(str, READABLE_FORMATS))}: upgrade sls")  # fmt: skip
        for name in _REQUIRED:
            if name not in raw:
                raise TaskRecordError(f"{where} lacks the field {name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        given = raw.get("config") or {}
        fields = config_fields()
        values["config"] = RunConfig(**{key: value for key, value in given.items() if key in fields})
        if "stages" not in raw:  # format 1 before the stages: a whole run, retrained unless told not to
            values["stages"] = ["finetune", "prune", *(["retrain"] if values["config"].retrain else []),
                                *(["evaluate"] if "throughput" in raw.get("results", {}) else [])]  # fmt: skip
        if version < 3:
            values["files"] = {kind: dict(entry) for kind, entry in LEGACY_FILES.items()}
        for kind, entry in values.get("files", {}).items():
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise TaskRecordError(f"{where} names a {kind} tensor file that is not a file of its folder: {name!r}")
            if version >= 3 and not (isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
                raise TaskRecordError(f"{where}: its {kind} tensor file entry lacks its sha256 or size")
        if version >= 3 and "task" not in values.get("files", {}):
            raise TaskRecordError(f"{where} names no task tensor file")
        try:
            record = _adapter().validate_python(values)
        except ValidationError as err:
            first = err.errors()[0]
            place = ".".join(map(str, first["loc"]))
            raise TaskRecordError(f"{where} does not hold a task record sls can read: {place}: {first['msg']}") from None
        missing = [key for key in _BACKBONE_KEYS if key not in record.backbone]
        if missing or "method" not in record.petl:
            raise TaskRecordError(f"{where} does not hold a task record sls can read: it lacks "
                                  f"{', '.join([*(f'backbone.{k}' for k in missing), *([] if 'method' in record.petl else ['petl.method'])])}")  # fmt: skip
        return record


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(TaskRecord)


def read_record(task_dir: str | Path) -> TaskRecord:
    """The task folder's record, typed; a missing, unreadable or foreign file is one line."""
    path = Path(task_dir) / RECORD_FILE
    if not path.is_file():
        raise TaskRecordError(f"{path} not found; is {task_dir} a task folder written by sls?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskRecordError(f"{path} is not valid JSON ({err})") from None
    try:
        return TaskRecord.from_dict(raw, str(path))
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise TaskRecordError(f"{path} does not hold a task record sls can read ({err})") from None
