"""Errors a user can cause.

Every error a user can provoke (bad input, a missing asset, a wrong option) is an
:class:`SLSError`. The CLI prints its message on one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SLSError(Exception):
    """Base class of all user-facing errors; the message says what to do."""


class EmbeddedAssetError(SLSError):
    """An embedded asset (model or data file) is missing or does not match its hash."""


class UnknownModelError(SLSError):
    """A model name that neither the embedded set nor timm knows."""


class DataError(SLSError):
    """A dataset that cannot be read or is unusable for the requested step."""


class ConfigError(SLSError, ValueError):
    """An option value out of range or inconsistent with another (a ``ValueError``, as
    scikit-learn raises for a bad hyper-parameter)."""


class ScoreError(SLSError, ValueError):
    """Features or labels that a layer criterion cannot score (a ``ValueError``, as
    scikit-learn raises for bad input to ``fit``)."""


class TaskRecordError(SLSError):
    """A task folder that is missing, incomplete, or made for another backbone."""


class FolderLockedError(SLSError):
    """A task (or sweep) folder another process is writing."""


class DiskFullError(SLSError):
    """A write that ran out of space (or quota); nothing under the final name was changed."""
