"""DICOMDIR references, resolved only inside the export folder.

A DICOMDIR's Referenced File ID (0004,1500) is a list of path components below the DICOMDIR's folder
(PS3.10 8.5 and PS3.11: uppercase letters, digits and underscore, at most 8 characters each). A hostile or
broken export may use components such as ``..``, ``/etc/passwd`` or a symbolic link that leads elsewhere.
:func:`dicomdir_references` refuses, without opening or even looking up the file:

- components that are empty, ``.`` or ``..``, or contain a path separator (``/`` or ``\\``) or a NUL;

and, after a case-insensitive lookup below the DICOMDIR's folder, any file whose real path (every symbolic
link resolved) lies outside the export root. A refused reference becomes an error record with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.tag import Tag

from medssl.data.deid import scrub_text
from medssl.data.dicom_scan import is_inside, quiet_pydicom

_ESCAPED = "escaped"


def unsafe_component_reason(parts: Iterable[str]) -> str | None:
    """Why a Referenced File ID's components could leave the DICOMDIR's folder, or ``None``."""
    for part in parts:
        if part in ("", ".", ".."):
            return f"a '{part}' component" if part else "an empty component"
        if "/" in part or "\\" in part or "\x00" in part:
            return "a component containing a path separator or NUL (absolute or nested path)"
    return None


def _resolve_case_insensitive(base: Path, parts: Iterable[str], root_real: str) -> Path | str | None:
    """Resolve a DICOMDIR file ID (components, upper case by the standard) under ``base``, any case.

    Returns the path, ``None`` when it does not exist, or ``"escaped"`` as soon as a component's real path
    leaves ``root_real`` (so no folder outside the export is even listed).
    """
    current = base
    for part in parts:
        candidate = current / part
        if candidate.exists():
            current = candidate
        else:
            try:
                matches = [p for p in current.iterdir() if p.name.upper() == part.upper()]
            except OSError:
                return None
            if not matches:
                return None
            current = matches[0]
        if not is_inside(str(current), root_real):
            return _ESCAPED
    return current if current.is_file() else None


def _components(file_id: object) -> list[str]:
    values = file_id if isinstance(file_id, (list, tuple, pydicom.multival.MultiValue)) else str(file_id).split("\\")
    return [str(v).strip() for v in values]


def dicomdir_references(
    dicomdir: str, root: str | None = None
) -> tuple[list[str], list[str], list[tuple[str, str]], str | None]:
    """Files referenced by a DICOMDIR, resolved inside the export root ``root`` (default: its folder).

    Returns ``(existing paths, missing file IDs, refused [(file ID, reason)], error reason or None)``. File
    IDs are the components joined with ``/``; refused ones are never opened (see the module docstring).
    """
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(dicomdir, force=True, specific_tags=[Tag("DirectoryRecordSequence")])
    except Exception as exc:  # noqa: BLE001 - a bad DICOMDIR is reported, the folder walk still runs
        return [], [], [], f"unreadable DICOMDIR: {type(exc).__name__}: {scrub_text(str(exc))}"
    base = Path(dicomdir).parent
    root_real = os.path.realpath(root if root is not None else base)
    found: list[str] = []
    missing: list[str] = []
    refused: list[tuple[str, str]] = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = _components(file_id)
        while parts and parts[-1] == "":
            parts.pop()  # trailing padding
        if not parts:
            continue
        shown = "/".join(parts)
        unsafe = unsafe_component_reason(parts)
        if unsafe:
            refused.append((shown, f"DICOMDIR reference leaves the export folder ({unsafe}); not opened"))
            continue
        resolved = _resolve_case_insensitive(base, parts, root_real)
        if resolved is None:
            missing.append(shown)
        elif resolved == _ESCAPED:
            refused.append((shown, "DICOMDIR reference is a symbolic link to a place outside the export folder; "
                                   "not opened"))
        else:
            found.append(str(resolved))
    return found, missing, refused, None


def is_dicomdir_name(path: str) -> bool:
    """True for files named like a DICOMDIR (``DICOMDIR``, any case, optionally with a suffix)."""
    return os.path.basename(path).upper().startswith("DICOMDIR")
