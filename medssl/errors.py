"""Exceptions that medssl raises for bad input.

Every user-facing error names the file (when there is one) and the reason, so the CLI can print a single
line such as ``medssl: error: ckpt.pth: truncated file (unexpected end of zip archive)``.
"""

from __future__ import annotations

import os


class MedsslError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported format.

    Args:
        reason: what is wrong, in words a user can act on.
        path: the file or folder concerned, if any; it is prefixed to the message.
    """

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class UntrustedPickleError(MedsslError):
    """A checkpoint needs arbitrary Python classes to unpickle and the user did not pass ``--trust``."""


class OfflineError(MedsslError):
    """A file must be downloaded but the machine is offline; the message says which file to put where."""
