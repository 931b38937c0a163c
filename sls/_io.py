"""Atomic file writes: a file appears complete under its name, or not at all."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from sls.errors import ConfigError, DiskFullError

_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "the file is larger than this process may write"}  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    An interruption leaves ``path`` as it was (absent or the previous version). The
    file gets the permissions a plain ``open(path, "w")`` would (``0o666`` less the
    umask, so a team on shared storage can read it; ``mkstemp`` alone gives ``0o600``),
    and it is flushed to disk before the rename, and the rename after it.

    Raises:
        DiskFullError: the disk (or quota, or file size limit) ran out; the temporary
            file is removed and ``path`` is as it was.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ConfigError(f"could not write {path}: {err.strerror}; check the folder's permissions, "
                              "or write elsewhere") from None  # fmt: skip
        if err.errno not in _FULL:
            raise
        raise DiskFullError(f"could not write {path}: {_FULL[err.errno]} ({err.strerror}); free some space and "
                            "run the command again (nothing under that name was changed)") from None  # fmt: skip
    finally:
        if tmp_path is not None:
            with suppress(OSError):
                tmp_path.unlink()
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def megabytes_from_env(variable: str, default: int) -> int:
    """``$variable`` megabytes as bytes (``default`` MB when unset); a value that is not a
    number warns once and gives the default."""
    text = os.environ.get(variable, str(default))
    try:
        return int(float(text) * 1024 * 1024)
    except (ValueError, OverflowError):
        warnings.warn(f"{variable}={text!r} is not a number; using {default}", stacklevel=3)
        return default * 1024 * 1024


def cache_dir() -> Path:
    """Return the folder that holds converted weights and cached features.

    Returns:
        ``$SLS_CACHE`` when set, else ``$XDG_CACHE_HOME/sls``, else ``~/.cache/sls``.
        The folder is not created here.
    """
    explicit = os.environ.get("SLS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sls"
