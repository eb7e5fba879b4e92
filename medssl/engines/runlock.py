"""``RunLock``: one writer per run folder.

A run holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` for as long as it writes to the folder; the file
holds the holder's ``{"pid", "host", "started"}`` (UTC, ISO 8601) so that a second run fails at once with one
line naming it. The kernel drops the lock when the holder exits for any reason (error, SIGINT, kill -9), so a
stale ``.lock`` file from a killed run never blocks: only a live holder does. Under ``torchrun`` only rank 0
takes the lock (the other ranks write nothing). ``flock`` is advisory and local: it does not stop a run on
another machine writing to the same network folder unless the file system propagates flock (NFSv4 does).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from medssl.errors import MedsslError

LOCK_NAME = ".lock"


class RunLock:
    """Context manager holding the exclusive lock of ``run_dir`` (created if missing).

    Raises:
        MedsslError: another live process holds the lock (the message names its pid, host and start time).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise MedsslError(f"run folder is in use by another run ({holder}); wait for it to finish or "
                              "use another --out", self.run_dir) from None
        except OSError:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking a flock file races with the next holder)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    """``pid P on host H since T`` from the lock file, or a generic phrase when it cannot be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    def show(key: str) -> str:  # one line, bounded: the file may have been edited
        return " ".join(str(info.get(key, "?")).split())[:64]

    return f"pid {show('pid')} on host {show('host')} since {show('started')}"
