"""One writer per folder: an advisory lock that names its holder and dies with it.

``folder_lock(folder)`` takes an exclusive ``flock`` on ``<folder>/.sls.lock`` and writes
the holder (pid, host, command, start time) into it. The kernel drops the lock when
its process ends, however it ends, so a lock file left by a killed process holds no
lock: the next writer takes it over, and says whose it was. A second writer gets a
:class:`~sls.errors.FolderLockedError` naming the holder. On NFS, Linux maps ``flock``
to POSIX byte-range locks, which the server arbitrates across machines (NFSv4, or v3
with its lock daemon; a ``local_lock=`` mount keeps them to one machine). Readers
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

from sls._io import fsync_dir
from sls.errors import ConfigError, FolderLockedError, SLSError

LOCK_FILE = ".sls.lock"
_held: dict[Path, int] = {}  # folder -> depth of nested holds in this process


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    except (TypeError, ValueError, OverflowError):
        since = "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')} (since {since}: {holder.get('command', '?')})"


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def holder(folder: str | Path) -> dict | None:
    """Who writes ``folder`` now (``{"pid", "host", ...}``), or None when nobody does.

    Reads the lock file without locking it, so asking never gets in a writer's way: an
    empty file is free (a release empties it); one naming a dead process of this host
    is stale; one naming another host is taken as held.
    """
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        found = _read_holder(fd)
    finally:
        os.close(fd)
    if not found.get("pid"):
        return None
    if found.get("host") == socket.gethostname() and not _alive(int(found["pid"])):
        return None
    return found


def _cannot_write(folder: Path, err: OSError) -> SLSError:
    return ConfigError(f"cannot write the folder {folder}: {err.strerror or err}; "
                       "check its permissions, or write another folder")  # fmt: skip


def _open_lock(folder: Path) -> int:
    """Open the lock file and take its flock; retried when the file was replaced meanwhile
    (a first writer that failed removes its empty folder, lock file included)."""
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # locked a file that is gone: take the one on disk now
        folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, wait: float = 0.0, what: str = "task folder") -> Iterator[dict | None]:
    """Hold the write lock of ``folder`` (created if needed) for the ``with`` block.

    Args:
        wait: seconds to wait for another holder to finish before giving up.

    Yields:
        the previous holder when its process had died without releasing (taken over), else None.

    Raises:
        FolderLockedError: another live process holds it.
        ConfigError: the folder cannot be created or written.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(folder, err) from None
    if created:
        fsync_dir(folder.parent)  # the new folder itself survives a power loss
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield None
        finally:
            _held[key] -= 1
        return
    deadline = time.monotonic() + wait
    fd = None
    while fd is None:
        try:
            fd = _open_lock(folder)
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise FolderLockedError(
                f"{folder} is being written by {describe_holder(holder(folder) or {})}; wait for it to finish "
                f"or write another {what} (its lock: {folder / LOCK_FILE})"
            ) from None
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                warnings.warn(f"{folder}: this file system cannot lock files ({err.strerror}); "
                              "make sure no other process writes it", stacklevel=3)  # fmt: skip
                fd = -1
            else:
                raise _cannot_write(folder, err) from None
    try:
        previous = _read_holder(fd) or None if fd >= 0 else None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(["sls", *sys.argv[1:]])[:200]}  # fmt: skip
        with contextlib.suppress(OSError):  # naming the holder is a courtesy: a full disk must not stop it
            if fd >= 0:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
        _held[key] = 1
        try:
            yield previous
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.ftruncate(fd, 0)  # nobody holds it: a reader finds it empty
                if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                    # A first write that failed before writing anything leaves no folder behind
                    # (a writer that opened the lock file meanwhile sees it replaced and retries).
                    (folder / LOCK_FILE).unlink()
                    folder.rmdir()
    finally:
        if fd >= 0:
            os.close(fd)  # closing drops the flock
