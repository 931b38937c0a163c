"""PETL methods behind one registry.

A method is a :class:`PETLMethod` subclass registered with :func:`register_petl`.
``method.apply(model)`` inserts its modules into a timm model (ViT or Swin) in place
and leaves exactly its own parameters and the classifier head trainable. The per-task state
is then ``trainable_state(model)``: nothing of the frozen backbone.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from sls._registry import Registry
from sls.errors import ConfigError


class PETLMethod:
    """Base class: hyper-parameters in, modules inserted by :meth:`apply`.

    Subclasses set ``name``, ``defaults`` (every hyper-parameter with its default),
    ``counts`` (the hyper-parameters that are whole numbers >= 1: ranks, widths) and
    ``param_markers`` (substrings that name their parameters), and implement
    :meth:`insert`. Every value is checked against its default's kind before any
    model is touched: a count, a finite number (``dropout`` in [0, 1)), a list of
    names (a comma-separated string is split), or a string.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict]
    counts: ClassVar[tuple[str, ...]] = ()
    param_markers: ClassVar[tuple[str, ...]]
    legacy_defaults: ClassVar[dict] = {}

    def __init__(self, **hparams) -> None:
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ConfigError(
                f"{self.name} has no option {', '.join(sorted(unknown))}; "
                f"its options are {', '.join(sorted(self.defaults))}"
            )
        self.hparams = {**self.defaults, **{key: self._checked(key, value) for key, value in hparams.items()}}

    def _checked(self, key: str, value):
        default, where = self.defaults[key], f"{self.name} option {key}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in self.counts:
            if not number or value != int(value) or value < 1:
                raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}")
            return int(value)
        if isinstance(default, (int, float)):
            if not number or not math.isfinite(value):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            if key == "dropout" and not 0 <= value < 1:
                raise ConfigError(f"{where} must be in [0, 1), got {value!r}")
            return value
        if isinstance(default, list):
            names = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"{where} must be one or more names (e.g. qkv,fc1), got {value!r}")
            return list(names)
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value

    def insert(self, model: nn.Module) -> None:
        """Insert the method's modules into ``model`` (in place)."""
        raise NotImplementedError

    def is_petl_param(self, name: str) -> bool:
        return any(marker in name for marker in self.param_markers)

    def apply(self, model: nn.Module) -> nn.Module:
        """Insert the modules, then train only them and the head. Returns ``model``."""
        self.insert(model)
        head = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(self.is_petl_param(name) or name in head)
        if not any(self.is_petl_param(n) for n, _ in model.named_parameters()):
            raise ConfigError(f"{self.name} found no module to adapt in {type(model).__name__}")
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the inserted modules into the backbone's own layers (in place).

        Only re-parameterisable methods can; the merged model has the plain
        backbone's structure. Returns ``model``.

        Raises:
            ConfigError: the method cannot be merged.
        """
        raise ConfigError(f"{self.name} cannot be merged")


_METHODS: Registry[type[PETLMethod]] = Registry("PETL method")

register_petl = _METHODS.register
"""Class decorator registering a PETL method under ``cls.name``."""


def create_petl(name: str, **hparams) -> PETLMethod:
    """Instantiate the registered method ``name`` with ``hparams`` over its defaults."""
    return _METHODS.get(name)(**hparams)


def petl_from_record(petl: dict) -> PETLMethod:
    """The PETL method a task record names, built as the task was: a hyper-parameter
    the record lacks (it predates the option) takes the value the method had then
    (``legacy_defaults``), not today's default."""
    cls = _METHODS.get(petl["method"])
    return cls(**{**cls.legacy_defaults, **petl.get("hparams", {})})


def list_petl() -> list[str]:
    return _METHODS.names()


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters: ``head.*`` for a ViT, ``head.fc.*`` for Swin,
    both heads of a distilled DeiT (whose ``get_classifier`` returns two)."""
    classifier = model.get_classifier()
    modules = classifier if isinstance(classifier, tuple) else (classifier,)
    ids = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The per-task tensors: every trainable parameter (PETL modules and head, and the
    fresh final norm of a Swin cut before its last stage), and the buffers of a dense
    task's head (a BatchNorm's running statistics; ``model.task_buffer_prefixes``)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    prefixes = getattr(model, "task_buffer_prefixes", ())
    if prefixes:
        state |= {n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.startswith(prefixes)}
    return state


# Importing the modules registers the methods.
from sls.petl import adapter as _adapter  # noqa: E402,F401
from sls.petl import convpass as _convpass  # noqa: E402,F401
from sls.petl import lora as _lora  # noqa: E402,F401
from sls.petl import repadapter as _repadapter  # noqa: E402,F401
