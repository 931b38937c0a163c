"""One registry pattern for the pluggable parts: criteria, PETL methods, retraining strategies.

A part is a class with a ``name``; a :class:`Registry` maps names to classes, and its
:meth:`~Registry.register` is the class decorator that adds one. Numpy-only on purpose:
:mod:`sls.criteria` must not pull torch in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from sls.errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by their ``name``.

    Args:
        kind: what the classes are, for messages (``"PETL method"``).
        check: called with each class before it is registered; raises to refuse it.
    """

    def __init__(self, kind: str, check: Callable[[T], None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under ``cls.name``; a name is taken once."""
        if cls.name in self._classes:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        if self._check is not None:
            self._check(cls)
        self._classes[cls.name] = cls
        return cls

    def get(self, name: str) -> T:
        """The class registered as ``name``.

        Raises:
            ConfigError: no class has that name; the message lists the names.
        """
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def __delitem__(self, name: str) -> None:
        """Unregister ``name`` (a test's temporary class)."""
        del self._classes[name]
