"""Atomic file output: write to a temporary file in the same folder, fsync, then ``os.replace``.

A crash or a full disk therefore never leaves a half-written manifest, report or checkpoint behind:
readers see either the old file or the complete new one. A full disk (``ENOSPC``/``EDQUOT``) is reported as
one :class:`~medssl.errors.MedsslError` line ``disk full writing PATH``, the previous file left intact.

Temporaries are named ``.<name>.<pid>@<host>.<random>.tmp``. A process killed mid-write (kill -9, power loss)
leaves one behind; the next atomic write of the same file removes those whose writer (same host, that pid) is
gone, and :func:`clean_stale_tmp` clears a whole folder (a pretraining run does this for its run folder at
start, while it holds the run lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from medssl.errors import MedsslError

#: errno values meaning "no room left": device full, or the user's disk quota exhausted
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]{1,32})\.[A-Za-z0-9_]+\.tmp$")


def _host_tag() -> str:
    """This machine's name reduced to ``[A-Za-z0-9-]`` (at most 32 characters), for temporary file names."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(folder: str | os.PathLike[str], *, name: str | None = None,
                    any_writer: bool = False) -> list[Path]:
    """Delete atomic-write temporaries left in ``folder`` by killed writers; returns the removed paths.

    Args:
        folder: the folder to clean (missing folder: nothing to do).
        name: only temporaries of this destination file name (default: all).
        any_writer: also remove temporaries of live or unknown writers (any ``.*.tmp``); only safe while the
            caller is known to be the folder's sole writer (e.g. a pretraining run holding its run lock).
            Default False: only files whose writer pid, on this host, no longer runs.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    host = _host_tag()
    removed = []
    for path in root.iterdir():
        entry = path.name
        if not (entry.startswith(".") and entry.endswith(".tmp")) or not path.is_file():
            continue
        match = _TMP_NAME.match(entry)
        if name is not None and (match is None or match.group("name") != name):
            continue
        stale = any_writer or (match is not None and match.group("host") == host
                               and not _pid_alive(int(match.group("pid"))))
        if stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, file_mode: int | None = None,
                **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically.

    Args:
        path: destination file. Its parent folder is created if needed.
        mode: ``"w"`` (text, UTF-8) or ``"wb"`` (binary).
        file_mode: permissions of the written file (e.g. ``0o600`` for a private file: the temporary file is
            created 0600 and never widened); None = the usual ``0666 & ~umask``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(dest.parent, name=dest.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}@{_host_tag()}.", suffix=".tmp",
                                   dir=dest.parent)
    except OSError as exc:
        full = _disk_full(dest, exc)
        if full is not None:
            raise full from exc
        raise
    try:
        if mode == "w":
            kwargs.setdefault("encoding", "utf-8")
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files: give the usual permissions, or keep a private file private
        os.chmod(tmp, (0o666 & ~_umask()) if file_mode is None else file_mode)
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(dest, exc)
        if full is not None:
            raise full from exc
        raise


def disk_full_error(dest: str | os.PathLike[str], exc: BaseException, *, note: str = "") -> MedsslError | None:
    """The one-line error ``disk full writing DEST (reason<note>)`` when ``exc`` (or its recorded cause) is
    ENOSPC/EDQUOT, else None."""
    cause = getattr(exc, "medssl_write_error", None) or exc
    if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
        return MedsslError(f"disk full writing {dest} ({os.strerror(cause.errno)}{note})")
    return None


def _disk_full(dest: Path, exc: BaseException) -> MedsslError | None:
    """:func:`disk_full_error` of an atomic write (the file it replaces is untouched)."""
    return disk_full_error(dest, exc, note="; the previous file is intact")


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (sorted keys off, trailing newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` to ``path`` atomically.

    torch's zip writer turns a failed ``write`` into ``RuntimeError: [enforce fail at inline_container.cc]``;
    the OS error is recorded on the way so that a full disk still reads ``disk full writing PATH``.
    """
    import torch

    with atomic_open(path, "wb") as fh:
        recorder = _RecordingWriter(fh)
        try:
            torch.save(obj, recorder)
        except RuntimeError as exc:
            if recorder.error is not None:
                exc.medssl_write_error = recorder.error  # type: ignore[attr-defined]
            raise


class _RecordingWriter:
    """File-like ``write``/``flush`` proxy remembering the last ``OSError`` of the underlying file."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _json_default(obj: Any) -> Any:
    """JSON encoder fallback for numpy scalars/arrays and paths."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
