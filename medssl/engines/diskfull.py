"""A full disk while appending a run's logs (``metrics.jsonl``, TensorBoard event files) as one line
``disk full writing PATH (No space left on device)``, like :mod:`medssl.io` does for atomic writes.

Appends are not atomic: the lines written before the error stay; a partial last line of ``metrics.jsonl`` is
dropped when the run resumes (:meth:`medssl.engines.handlers.MetricsJsonl.truncate_after`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.io import disk_full_error


def raise_if_disk_full(path: str | Path, exc: BaseException) -> None:
    """Raise ``MedsslError("disk full writing PATH (...)")`` from ``exc`` when it is ENOSPC/EDQUOT; else
    return."""
    error = disk_full_error(path, exc) if isinstance(exc, OSError) else None
    if error is not None:
        raise error from exc


class _KeptErrors:
    """The event file's record writer as its background thread sees it: an ``OSError`` is kept for the main
    thread instead of being raised in the thread (where Python would print a traceback and TensorBoard would
    only re-raise it at some later call); records after it are dropped."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.error is None:
            try:
                self.inner.write(data)
            except OSError as exc:
                self.error = exc

    def flush(self) -> None:
        try:
            self.inner.flush()
        except OSError as exc:
            self.error = self.error or exc

    def close(self) -> None:
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed


class DiskFullGuardedWriter:
    """Proxy of a TensorBoard ``SummaryWriter`` (``torch.utils.tensorboard``) whose full disk is one line
    ``disk full writing EVENT_FILE``.

    The writer appends to its event file from a background thread. With TensorBoard's own writer (the one
    torch uses) that thread's record writer is wrapped so an ``OSError`` is kept, not raised there; every call
    through this proxy (``add_scalar``, ``flush``, ...) then raises it in the main thread, ENOSPC/EDQUOT as a
    :class:`MedsslError` naming the event file. :meth:`close` flushes first, since the writer's own ``close``
    drops an error of the last writes. Other writers (tensorboardX) keep their own thread; their errors are
    translated when they surface in a call.
    """

    def __init__(self, writer: Any, log_dir: str | Path) -> None:
        self._writer = writer
        event_writer = getattr(getattr(writer, "file_writer", None), "event_writer", None)
        self.event_file = Path(getattr(event_writer, "_file_name", None) or log_dir)
        self._kept: _KeptErrors | None = None
        async_writer = getattr(event_writer, "_async_writer", None)
        worker = getattr(async_writer, "_worker", None)
        inner = getattr(async_writer, "_writer", None)
        if inner is not None and getattr(worker, "_record_writer", None) is inner:
            self._kept = _KeptErrors(inner)
            async_writer._writer = worker._record_writer = self._kept

    def _check(self) -> None:
        if self._kept is not None and self._kept.error is not None:
            error, self._kept.error = self._kept.error, None
            raise_if_disk_full(self.event_file, error)
            raise error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_writer", "_kept"):  # not delegated (copy/pickle probe these)
            raise AttributeError(name)
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check()
            try:
                result = attr(*args, **kwargs)
            except OSError as exc:
                raise_if_disk_full(self.event_file, exc)
                raise
            self._check()
            return result

        return guarded

    def close(self) -> None:
        """Flush (raising a kept error), then close the writer in any case."""
        try:
            self.__getattr__("flush")()
        finally:
            self._writer.close()
