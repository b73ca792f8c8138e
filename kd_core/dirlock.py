"""One writer per output directory: an advisory lock on a file inside it, ``.kd_lock`` (or, for an output published by
renaming a finished temporary directory into place, beside it: ``.<name>.kd_lock``).

``fcntl.flock`` rather than a lock file that merely exists: the kernel drops the lock when its process ends, however it
ends (kill -9, the OOM killer, a preempted node), so a killed run never blocks its own resume and nothing has to guess
whether a pid is still alive. The holder writes its pid, host, command and start time into the file, so that a refused
writer can name it; the content is informative only, the lock is the truth.

Release unlinks the file, then closes it. An acquirer may have opened the file just before that unlink and then lock an
inode no longer reachable by its name, while a third process creates a new file and locks that one too: so after
locking, an acquirer checks that its file is still the one at the path, and starts again if not.

Where ``flock`` is not available (not POSIX) or the file system refuses it (Lustre mounted without ``flock``), the
directory is written unlocked, after one warning: refusing every run there would be worse than the race.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK = ".kd_lock"

# errnos of a file system that does not implement flock (as opposed to a lock held by someone else).
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


class Busy(Exception):
    """The directory's lock is held by another process (or another open of it in this one); ``holder`` is what the
    holder wrote into the lock file (empty when it had not written yet)."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{path} is locked")
        self.path = path
        self.holder = holder

    def describe(self) -> str:
        """``pid 123 on host, distill train, since 2026-12-03 10:00:00``, or what is known of it."""
        h = self.holder
        if not h:
            return "another process"
        parts = [f"pid {h.get('pid', '?')}" + (f" on {h['host']}" if h.get("host") else ""), str(h.get("command", "?"))]
        if h.get("started"):
            parts.append(f"since {h['started']}")
        return ", ".join(parts)


def _read_holder(path: Path) -> dict[str, Any]:
    """The holder's record; it writes it right after locking, so an empty file is read again for a moment."""
    for _ in range(50):
        try:
            text = path.read_text()
        except OSError:
            return {}
        if text.strip():
            try:
                data = json.loads(text)
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
        time.sleep(0.02)
    return {}


class DirectoryLock:
    """The exclusive lock of one output directory, held by this process until :meth:`release`."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path  # the lock file
        self._fd = fd  # None: the file system does not lock; nothing is held

    @classmethod
    def acquire(cls, path: str | os.PathLike[str], command: str) -> DirectoryLock:
        """Locks the lock file ``path`` (created if absent; its directory must exist) for ``command``; raises
        :class:`Busy` naming the holder."""
        path = Path(path)
        if fcntl is None:
            return cls(path, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Busy(path, _read_holder(path)) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _UNSUPPORTED:
                    raise
                path.unlink(missing_ok=True)  # nothing locks here: leave no file to make the directory non-empty
                logger.warning(
                    "%s: the file system does not support flock (%s); writing without the one-writer lock",
                    path.parent,
                    err.strerror,
                )
                return cls(path, None)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and unlinked by its holder meanwhile: lock the file now at the path
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlinks the lock file, then unlocks it (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # the directory it was in is gone (a failed publish removed it)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None
