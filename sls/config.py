"""The one run schema: :class:`RunConfig`. Command-line options, YAML keys and the
record's resolved config all come from its fields.

Each field carries its help text (and, where it differs from the usual, its flag) in
its metadata; :func:`sls.cli` builds the ``argparse`` options from them, and
:func:`settings_from_mapping` checks and converts a YAML mapping (``--config``,
``sls sweep``) against the same fields with pydantic's type adapters, so YAML 1.1's
``1e-3`` (a string) becomes a float and a key that does not exist is one line naming
the nearest valid one. Why pydantic's adapters over a dataclass rather than a pydantic
model: the schema stays a plain dataclass (``dataclasses.replace`` / ``asdict`` keep
working, no validation cost on every attribute set) and pydantic does only what it
does well, converting and checking values against the annotations.

``None`` in the schedule and size fields means "sized to the data" (see
:func:`resolve`): the embedded demo sets keep the demo's small settings, a user's own
data gets the model's input size and enough optimiser steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sls.errors import ConfigError

NORMALIZATIONS = ("model", "imagenet")
"""Input statistics: the model's pretrained config, or ImageNet's (the paper's VTAB code)."""

MIN_STEPS = 500
"""Optimiser steps a training with ``epochs`` left to the data gets at least (see :func:`auto_epochs`)."""
EPOCH_RANGE = (10, 100)
"""The fewest and most epochs :func:`auto_epochs` chooses."""
MAX_AUTO_IMG_SIZE = 224
"""Largest input side chosen for a user's data: DINOv2's config says 518 px (its last
pretraining stage), while its users, like the paper's VTAB runs, fine-tune at 224."""
DEMO_IMG_SIZE = 84
"""Input side chosen for the embedded 28 px / 8 px demo sets (6 x 6 patches of 14 px)."""

RUNTIME_KEYS = ("device", "amp", "channels_last", "compile")
"""Where and how the models run: any command may change them, a resumed run included."""
NOT_COMPARED = ("out", "progress", "force", "cache", "score_all", *RUNTIME_KEYS)
"""Settings that may differ between a run and its resumption (``force`` is a permission, not a setting)."""


def _opt(help: str, **cli) -> dict:
    return {"help": help, **cli}


@dataclass
class RunConfig:
    """Everything a run depends on; dumped resolved into the task record and ``config.yaml``.

    The defaults suit a user's own data: every image of each split, the model's input
    size (at most 224 px) and schedules sized to the data (:func:`resolve`). The demo's
    small settings are ``--recipe demo`` (what ``sls demo`` runs).

    Blocks are scored on at most ``analysis_samples`` training images (a stratified
    subset, in order): 1000 is what the paper's VTAB-1k runs score on; None scores
    every training image. ``max_drop`` (percentage points) replaces SLS's k by the
    smallest k whose retrained accuracy on at most ``val_samples`` validation images
    stays within that many points of the full model's; the test split is never used
    to choose.

    ``device``, ``amp`` and ``channels_last`` say where and how the models run
    (:class:`sls.runtime.Runtime`); they are not part of the task, so a resumed or
    re-evaluated task may change them. Under ``torchrun`` the run is data-parallel and
    ``batch_size`` stays the global batch.
    """

    model: str = field(default="embedded-dinov2-s", metadata=_opt(
        "embedded model name, timm model name or hf-hub:ORG/NAME"))
    weights: str | None = field(default=None, metadata=_opt(
        "local weights file for the timm model ('random' for random weights)"))
    model_kwargs: dict = field(default_factory=dict, metadata=_opt(
        "extra timm.create_model argument, e.g. depth=6 (repeatable; stored in the record)", flag="--model-option"))
    data: str = field(default="mnist5k", metadata=_opt(
        "mnist5k, fashion-mnist, digits, a VTAB-1k folder, an image-folder tree or a path,label CSV; for the dense "
        "tasks mnist-scenes, or an ADE20K, VOC2012, COCO or images/ + masks/ folder"))
    task: str = field(default="classification", metadata=_opt(
        "what the model predicts: a label per image, per pixel or boxes", choices="tasks"))
    task_options: dict = field(default_factory=dict, metadata=_opt(
        "task option, e.g. detector=retinanet or channels=128 (detection) (repeatable)", flag="--task-option"))
    petl: str = field(default="lora", metadata=_opt("PETL method", names="petl"))
    petl_options: dict = field(default_factory=dict, metadata=_opt(
        "PETL hyper-parameter, e.g. r=16 (repeatable)", flag="--petl-option"))
    img_size: int | None = field(default=None, metadata=_opt(
        f"input side in pixels; default: {DEMO_IMG_SIZE} for the embedded demo sets on the embedded model, else the "
        f"model's pretrained size capped at {MAX_AUTO_IMG_SIZE}", none="auto"))
    train_samples: int | None = field(default=None, metadata=_opt("training images, or 'all'", none="all"))
    test_samples: int | None = field(default=None, metadata=_opt("test images, or 'all'", none="all"))
    analysis_samples: int | None = field(default=1000, metadata=_opt(
        "training images the blocks are scored on, or 'all'", none="all"))
    epochs: int | None = field(default=None, metadata=_opt(
        f"fine-tuning epochs; default: enough for {MIN_STEPS} optimiser steps, {EPOCH_RANGE[0]} to {EPOCH_RANGE[1]} "
        "epochs", none="auto"))
    retrain_epochs: int | None = field(default=None, metadata=_opt(
        "retraining epochs after pruning; default: as many as the fine-tuning", none="auto"))
    retrain: bool = field(default=True, metadata=_opt("retrain after pruning (--no-retrain: prune only)"))
    retrain_strategy: str = field(default="clr", metadata=_opt(
        "how to retrain after pruning, for --retrain-epochs whatever the strategy", choices="strategies"))
    retrain_options: dict = field(default_factory=dict, metadata=_opt(
        "retraining option, e.g. temperature=4, ce_weight=0.5 (distill), lr_ratio=0.1 (ft) (repeatable)",
        flag="--retrain-option"))
    lr: float = field(default=3e-3, metadata=_opt("AdamW peak learning rate"))
    weight_decay: float = field(default=1e-4, metadata=_opt("AdamW weight decay"))
    warmup_epochs: float | None = field(default=None, metadata=_opt(
        "linear warm-up before the cosine decay; default: a tenth of the epochs"))
    min_lr: float | None = field(default=None, metadata=_opt("learning rate at the end of the cosine; default: lr / 100"))
    drop_path: float = field(default=0.0, metadata=_opt("stochastic depth rate of the backbone while training"))
    normalize: str = field(default="model", metadata=_opt(
        "input mean and std: the model's pretrained config, or ImageNet's", choices=NORMALIZATIONS))
    batch_size: int = field(default=32, metadata=_opt("training batch size (the global batch under torchrun)"))
    alpha: float = field(default=0.3, metadata=_opt(
        "threshold factor, T = alpha * SC_N; several values report k for each from one scoring, the first prunes",
        nargs="+", rest="alphas"))
    alphas: list[float] = field(default_factory=list, metadata=_opt("further alphas k is reported for", cli=False))
    max_drop: float | None = field(default=None, metadata=_opt(
        "choose the smallest k whose retrained validation accuracy is at most POINTS below the full model's, "
        "searching from SLS's k", metavar="POINTS"))
    val_samples: int | None = field(default=1000, metadata=_opt(
        "validation images --max-drop and the training curves measure on, or 'all'", none="all"))
    criterion: str = field(default="sls", metadata=_opt("layer criterion that chooses k", names="criteria"))
    tsne: str = field(default="sklearn", metadata=_opt(
        "t-SNE backend: sklearn (the paper's), opentsne (Barnes-Hut, exact neighbours), opentsne-fft (FFT "
        "gradients, approximate neighbours) or torchdr (TorchDR, on a GPU when there is one)",
        choices=("sklearn", "opentsne", "opentsne-fft", "torchdr")))
    perplexity: float = field(default=30.0, metadata=_opt("t-SNE perplexity"))
    tsne_seed: int = field(default=0, metadata=_opt("seed of the first t-SNE start"))
    tsne_seeds: int = field(default=1, metadata=_opt(
        "t-SNE starts to score the blocks with: the scores are their mean, T and k the rule on that mean",
        metavar="N"))
    depth: int | None = field(default=None, metadata=_opt(
        "keep exactly this many blocks instead of SLS's k (no block is scored unless --score-all)"))
    score_all: bool = field(default=False, metadata=_opt(
        "score every block; by default only those the rule reads are: block N, then down to the first block "
        "below T (all of them for several alphas or --tsne-seeds)"))
    force: bool = field(default=False, metadata=_opt(
        "prune even when the fine-tune looks failed (near chance, or its loss barely fell)"))
    seed: int = field(default=0, metadata=_opt("training seed"))
    throughput_batch: int = field(default=32, metadata=_opt("batch size of the throughput measurement"))
    skip_bad_images: bool = field(default=False, metadata=_opt(
        "leave out unreadable images (reported) instead of stopping"))
    device: str = field(default="auto", metadata=_opt(
        "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes its local GPU"))
    amp: bool = field(default=False, metadata=_opt(
        "mixed precision: autocast to bfloat16 (float16 on GPUs without it) for training, evaluation and "
        "throughput; block scores stay float32"))
    channels_last: bool = field(default=False, metadata=_opt("channels-last memory layout for the model and batches"))
    compile: bool = field(default=False, metadata=_opt(
        "torch.compile the models for training, evaluation and throughput (eager, with a warning, where the "
        "platform cannot compile)"))
    cache: bool = field(default=True, metadata=_opt(
        "read and write the block features in the feature cache (--no-cache: compute them afresh, store nothing)"))
    recipe: str | None = field(default=None, metadata=_opt("preset of these settings; an option given wins",
                                                           choices="recipes"))
    out: str | None = field(default=None, metadata=_opt("task folder (default: runs/<data>-<model>-<petl>-<time>)"))
    progress: bool = field(default=True, metadata=_opt("no progress bars", flag="--quiet"))

    @property
    def schedule(self):
        """The optimiser settings, the same for fine-tuning and retraining."""
        from sls.train import Schedule

        return Schedule(self.lr, self.weight_decay, self.warmup_epochs, self.min_lr)

    def validate(self) -> None:
        """Refuse values out of range or inconsistent with each other (one line each)."""
        from sls.petl import create_petl
        from sls.retrain import create_strategy

        for name in ("epochs", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.tsne_seeds < 1:
            raise ConfigError(f"--tsne-seeds must be >= 1, got {self.tsne_seeds}")
        if self.batch_size < 1 or self.throughput_batch < 1:
            raise ConfigError("batch sizes must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be from 0 to --lr ({self.lr:g}), got {self.min_lr:g}")
        self.check_warmup()
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels, got {self.img_size}")
        for name in ("train_samples", "test_samples", "analysis_samples", "val_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 or 'all', got {value}")
        for alpha in [self.alpha, *self.alphas]:
            if not math.isfinite(alpha) or alpha < 0:
                raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
        create_strategy(self.retrain_strategy, **self.retrain_options)
        create_petl(self.petl, **self.petl_options)
        from sls.tasks import get_task

        task = get_task(self.task, **self.task_options)
        if task.dense and self.retrain and self.retrain_strategy == "distill":
            raise ConfigError(f"the distill retraining strategy matches a classifier's logits; the {self.task} task "
                              "retrains with clr, ft or tfs")  # fmt: skip
        if self.max_drop is not None:
            if not math.isfinite(self.max_drop) or self.max_drop < 0:
                raise ConfigError(f"--max-drop must be a number of points >= 0, got {self.max_drop}")
            if self.depth is not None:
                raise ConfigError("--max-drop chooses the depth itself; leave out --depth")
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"--depth must be >= 1, got {self.depth}")

    def check_warmup(self) -> None:
        if self.warmup_epochs is None:
            return
        lengths = [e for e in (self.epochs, self.retrain_epochs if self.retrain else None) if e is not None]
        shortest = min(lengths) if lengths else math.inf
        if not 0 <= self.warmup_epochs < shortest:
            raise ConfigError(f"--warmup-epochs must be from 0 to fewer than the {shortest} epochs of the "
                              f"shortest training, got {self.warmup_epochs:g}")  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


@functools.cache
def field_types() -> dict[str, object]:
    """Each field's annotation, evaluated (the module uses postponed annotations)."""
    return typing.get_type_hints(RunConfig)


@functools.cache
def _adapter(name: str):
    from pydantic import TypeAdapter

    return TypeAdapter(field_types()[name])


def nearest(key: str, valid: typing.Iterable[str]) -> str:
    """``"; did you mean X?"`` for the valid key closest to ``key`` (empty if none is close)."""
    match = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else ""


def check_keys(mapping: dict, where: str, allowed: typing.Iterable[str], extra: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming the nearest valid key, a key that is neither a field in ``allowed`` nor ``extra``."""
    valid = [*allowed, *extra]
    for key in mapping:
        if key not in valid:
            raise ConfigError(f"{where}: unknown setting {key!r}{nearest(key, valid)}")


def convert(name: str, value, where: str):
    """``value`` as the field ``name`` wants it (pydantic's lax conversion: ``"1e-3"`` -> 0.001)."""
    from pydantic import ValidationError

    try:
        return _adapter(name).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{where}: {name}: {first['msg'].lower()}, got {value!r}") from None


def settings_from_mapping(mapping: dict, where: str, *, allowed: typing.Iterable[str] | None = None,
                          extra: tuple[str, ...] = ()) -> tuple[dict, dict]:  # fmt: skip
    """Split a YAML mapping into checked, converted RunConfig settings and its ``extra`` keys.

    Args:
        allowed: the fields this mapping may set (default: every field).
        extra: further keys the caller reads itself (a sweep task's ``name``).
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {mapping!r}")
    allowed = list(config_fields()) if allowed is None else list(allowed)
    check_keys(mapping, where, allowed, extra)
    settings = {key: convert(key, value, where) for key, value in mapping.items() if key in allowed}
    return settings, {key: mapping[key] for key in extra if key in mapping}


def read_yaml(path: str | Path, what: str):
    """The parsed contents of a YAML file; missing, unreadable or invalid is one line
    naming ``what`` it is (``config file``, ``sweep file``)."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


def read_config_file(path: str | Path, *, allowed: typing.Iterable[str] | None = None) -> dict:
    """The settings of a ``--config`` YAML file (the keys of a sweep's ``defaults``)."""
    mapping = read_yaml(path, "config file") or {}
    settings, _ = settings_from_mapping(mapping, str(path), allowed=allowed)
    return settings


def config_yaml(config: RunConfig, resolved: dict | None = None) -> str:
    """The resolved config as YAML, the run's own settings with ``sized to the data`` filled in."""
    import yaml

    values = config.to_dict() | {k: v for k, v in (resolved or {}).items() if k in config_fields()}
    for key in ("progress", "out", "force"):
        values.pop(key, None)
    return ("# the resolved settings of this task: `sls run --config config.yaml --out NEW` runs it again\n"
            + yaml.safe_dump(
        values, sort_keys=False))


def default_out_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # A hub name (hf-hub:org/name) holds a slash and a colon: one folder, not two.
    model = re.sub(r"[^\w.-]+", "_", config.model).strip("_")
    return Path("runs") / f"{config.data}-{model}-{config.petl}-{stamp}"


def auto_epochs(n_train: int, batch_size: int) -> int:
    """Epochs giving at least :data:`MIN_STEPS` optimiser steps, within :data:`EPOCH_RANGE`."""
    steps = max(1, math.ceil(n_train / batch_size))
    low, high = EPOCH_RANGE
    return int(min(high, max(low, math.ceil(MIN_STEPS / steps))))


def resolve(config: RunConfig, *, embedded_data: bool, pretrained_size: int, n_train: int,
            demo_img_size: int = DEMO_IMG_SIZE) -> dict:  # fmt: skip
    """The values of the settings left to the data (None), as used by the run.

    - ``img_size``: :data:`DEMO_IMG_SIZE` for the embedded demo sets on the embedded
      model (whole 14 px patches; ``demo_img_size`` for the scenes of the dense tasks), else the model's pretrained input size capped at
      :data:`MAX_AUTO_IMG_SIZE`;
    - ``epochs``: :func:`auto_epochs` of the training split at ``batch_size``;
    - ``retrain_epochs``: the fine-tuning's epochs.
    """
    img_size = config.img_size
    if img_size is None:
        demo = embedded_data and config.model.startswith("embedded-")
        img_size = demo_img_size if demo else min(int(pretrained_size), MAX_AUTO_IMG_SIZE)
    epochs = config.epochs if config.epochs is not None else auto_epochs(n_train, config.batch_size)
    retrain_epochs = config.retrain_epochs if config.retrain_epochs is not None else epochs
    resolved = {"img_size": int(img_size), "epochs": int(epochs), "retrain_epochs": int(retrain_epochs)}
    dataclasses.replace(config, **resolved).check_warmup()
    return resolved
