"""One writer per folder: an advisory lock that names its holder and dies with it.

``folder_lock(folder)`` takes an exclusive ``flock`` on ``<folder>/.sls.lock`` and writes
the holder (pid, host, command, start time) into it. The kernel drops the lock when
its process ends, however it ends, so a lock file left by a killed process holds no
lock: the next writer takes it over, and says whose it was. A second writer gets a
:class:`~sls.errors.FolderLockedError` naming the holder. On NFS, Linux maps ``flock``
to POSIX byte-range locks, which the server arbitrates across machines. Readers
(``show``, ``predict``, ``export``) never lock: the record is replaced atomically and
names only files that are on disk.

The lock is re-entrant within a process (``run`` holds it across its stages).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from sls.errors import FolderLockedError

LOCK_FILE = ".sls.lock"
_held: dict[Path, int] = {}  # folder -> depth of nested holds in this process


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder['pid']} on {holder.get('host', '?')} (since {since}: {holder.get('command', '?')})"


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def holder(folder: str | Path) -> dict | None:
    """Who holds ``folder``'s lock now (``{"pid", "host", ...}``), or None when nobody does."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, wait: float = 0.0, what: str = "task folder") -> Iterator[dict | None]:
    """Hold the write lock of ``folder`` (created if needed) for the ``with`` block.

    Args:
        wait: seconds to wait for another holder to finish before giving up.

    Yields:
        the previous holder when its process had died without releasing (taken over), else None.

    Raises:
        FolderLockedError: another live process holds it.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield None
        finally:
            _held[key] -= 1
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FolderLockedError(
                        f"{folder} is being written by {describe_holder(_read_holder(fd))}; wait for it to finish "
                        f"or write another {what} (its lock: {folder / LOCK_FILE})"
                    ) from None
                time.sleep(0.2)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                warnings.warn(f"{folder}: this file system cannot lock files ({err.strerror}); "
                              "make sure no other process writes it", stacklevel=3)  # fmt: skip
                break
        previous = _read_holder(fd) or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(["sls", *sys.argv[1:]])[:200]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _held[key] = 1
        try:
            yield previous
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # nobody holds it: a reader finds it empty
                if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                    # A first write that failed before writing anything leaves no folder behind.
                    (folder / LOCK_FILE).unlink()
                    folder.rmdir()
    finally:
        os.close(fd)  # closing drops the flock
