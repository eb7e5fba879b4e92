"""Private source maps: the link between a shareable manifest's pseudonymous ids and the files on this machine.

PACS and CD exports name folders and files after patients (``DOE^JOHN_19450314_MRN123456/IM0001``), so a
manifest written by medssl holds no source path. Paths go to a private map beside it,
``<manifest>.private.jsonl`` (file mode 0600, written atomically), one JSON object per line:

- ``{"id": <record id>, "image": <path>}``: where a record's pixels are (every field of :data:`PATH_FIELDS`);
- ``{"file": <file pseudonym>, "path": <path>}``: a file that the errors file names by its pseudonym;
- ``{"dicomdir": <file pseudonym>, "found": [<path>, ...], "missing": [<file id>, ...], ...}``: ingest's cache
  of the files a DICOMDIR references (and of the file IDs it could not or would not resolve).

Paths inside the map's folder are stored relative to it (``/`` separators), others absolute; reading returns
absolute paths. Every reader of a manifest (:func:`medssl.data.manifest.read_manifest`, hence
``records_from_path``) merges the map automatically; the map itself is never copied into run, evaluation or
report folders. Manifests without a map (written before it existed, or by hand) keep their ``image`` field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.io import atomic_open

PRIVATE_SUFFIX = ".private.jsonl"
#: record fields that hold a source path and therefore live in the private map, never in the manifest
PATH_FIELDS: tuple[str, ...] = ("image",)
PRIVATE_FILE_MODE = 0o600


def private_map_path(path: str | os.PathLike[str]) -> Path:
    """The private map beside a shareable file: ``work/cxr.jsonl`` -> ``work/cxr.jsonl.private.jsonl``."""
    return Path(os.fspath(path) + PRIVATE_SUFFIX)


@dataclass
class PrivateMap:
    """Contents of a private map, paths absolute: ``records`` id -> path fields, ``files`` pseudonym -> path,
    ``dicomdirs`` pseudonym -> ``{"found": [paths], ...}``."""

    path: Path
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    dicomdirs: dict[str, dict[str, Any]] = field(default_factory=dict)


def stored_path(path: str, base: Path) -> str:
    """``path`` relative to ``base`` (posix separators) when it lies inside it, else absolute."""
    absolute = os.path.normpath(path if os.path.isabs(path) else os.path.abspath(path))
    prefix = str(base).rstrip(os.sep) + os.sep
    if absolute.startswith(prefix):
        return absolute[len(prefix):].replace(os.sep, "/")
    try:
        return Path(absolute).relative_to(base).as_posix()
    except ValueError:
        return absolute


def _absolute(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def split_private(records: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """``(records without PATH_FIELDS, {id: {field: path}})``; records keep every other field."""
    public: list[dict[str, Any]] = []
    private: dict[str, dict[str, str]] = {}
    for record in records:
        out = dict(record)
        paths = {name: str(out.pop(name)) for name in PATH_FIELDS if out.get(name) is not None}
        if paths:
            private[str(record["id"])] = paths
        public.append(out)
    return public, private


def write_private_map(
    path: str | os.PathLike[str],
    records: Mapping[str, Mapping[str, str]],
    files: Mapping[str, str] | None = None,
    dicomdirs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the private map ``path`` atomically with mode 0600; paths are stored relative to its folder."""
    path = Path(path)
    base = path.parent.resolve()
    lines = [json.dumps({"id": rid, **{k: stored_path(v, base) for k, v in fields.items()}}, ensure_ascii=False)
             for rid, fields in records.items()]
    lines += [json.dumps({"file": fid, "path": stored_path(p, base)}, ensure_ascii=False)
              for fid, p in (files or {}).items()]
    lines += [json.dumps({"dicomdir": did, **entry, "found": [stored_path(p, base) for p in entry.get("found", [])]},
                         ensure_ascii=False)
              for did, entry in (dicomdirs or {}).items()]
    write_private_text(path, "".join(line + "\n" for line in lines))
    return path


def write_private_text(path: Path, text: str) -> None:
    """Atomic write readable by the owner only (the temporary file is created 0600 and never widened)."""
    with atomic_open(path, "w", file_mode=PRIVATE_FILE_MODE) as fh:
        fh.write(text)


def read_private_map(public_path: str | os.PathLike[str]) -> PrivateMap | None:
    """The private map beside ``public_path`` (paths made absolute), or ``None`` when there is none."""
    path = private_map_path(public_path)
    if not path.is_file():
        return None
    base = path.resolve().parent
    result = PrivateMap(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsslError(f"unreadable private map ({type(exc).__name__})", path) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MedsslError(f"line {number}: not valid JSON ({exc.msg})", path) from None
        if not isinstance(entry, dict):
            raise MedsslError(f"line {number}: not a JSON object", path)
        if isinstance(entry.get("id"), str):
            fields = {k: v for k, v in entry.items() if k in PATH_FIELDS}
            if not all(isinstance(v, str) and v for v in fields.values()):
                raise MedsslError(f"line {number}: path fields must be non-empty strings", path)
            result.records[entry["id"]] = {k: _absolute(v, base) for k, v in fields.items()}
        elif isinstance(entry.get("file"), str) and isinstance(entry.get("path"), str):
            result.files[entry["file"]] = _absolute(entry["path"], base)
        elif isinstance(entry.get("dicomdir"), str):
            found = entry.get("found", [])
            result.dicomdirs[entry["dicomdir"]] = {
                **{k: v for k, v in entry.items() if k != "dicomdir"},
                "found": [_absolute(str(p), base) for p in (found if isinstance(found, list) else [])],
            }
        else:
            raise MedsslError(f"line {number}: neither a record ('id'), a file ('file') nor a DICOMDIR entry", path)
    return result


def read_errors(errors_path: str | os.PathLike[str], manifest_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Entries of an ingest errors file with ``path`` restored from the manifest's private map (local use)."""
    found = read_private_map(manifest_path)
    files = found.files if found is not None else {}
    entries = []
    for line in Path(errors_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            if "path" not in entry and entry.get("file") in files:
                entry["path"] = files[entry["file"]]
            entries.append(entry)
    return entries
