"""What ``medssl ingest`` keeps between runs and writes, without source paths in any shareable file.

File and folder names of PACS/CD exports carry patient names, birth dates and MRNs, so:

- the state file ``<manifest>.state.json`` keys each file by its keyed pseudonym :func:`file_key`
  (``file-`` + HMAC-SHA-256 of its path relative to the export root) and holds its size, ``mtime_ns`` and
  de-identified header summary; the paths a DICOMDIR references are kept in the private map;
- the errors file names each file by the same pseudonym (``{"file", "status", "reason"}``);
- the paths (record images, files of the errors file, DICOMDIR references) go to the private map
  ``<manifest>.private.jsonl`` (mode 0600, :mod:`medssl.data.private_map`);
- the state's key check is an scrypt hash with a per-state random salt (:meth:`Pseudonymizer.key_check`), so
  it confirms a guessed key no faster than the KDF allows.

State files of older versions (``key_check`` an HMAC string, paths in clear) are migrated: they are ignored
(one warning line), every file is scanned again and the state is rewritten in this form.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from medssl.data.deid import Pseudonymizer
from medssl.data.manifest import write_manifest
from medssl.data.private_map import PrivateMap, read_private_map
from medssl.io import atomic_open, atomic_write_json

logger = logging.getLogger("medssl.data.ingest")

#: DICOMDIR cache fields that hold paths or file IDs (kept in the private map, not in the state file)
DICOMDIR_PRIVATE_FIELDS = ("found", "missing", "refused")


def relative_key(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators when inside it, else the absolute path."""
    if path.startswith(root + os.sep):
        return path[len(root) + 1 :].replace(os.sep, "/")
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def file_key(pseudonymizer: Pseudonymizer, path: str, root: str) -> str:
    """Keyed pseudonym of a file of the export: ``file-`` + HMAC-SHA-256(key, relative path)[:16]."""
    return str(pseudonymizer.pseudonym("file", relative_key(path, root)))


def load_state(path: str, pseudonymizer: Pseudonymizer, version: int,
               private: PrivateMap | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, key_check)``: previous scan results ``{"files", "dicomdirs"}`` (empty when absent, stale,
    unreadable, of another key or of an older format) and the key check to store with the new state.

    DICOMDIR entries get their paths back from the private map ``private``; an entry the map lacks is dropped
    (its DICOMDIR is read again).
    """
    empty: dict[str, Any] = {"files": {}, "dicomdirs": {}}
    if not os.path.isfile(path):
        return empty, pseudonymizer.key_check()
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        logger.warning("ignoring unreadable ingest state file %s", path)
        return empty, pseudonymizer.key_check()
    check = state.get("key_check") if isinstance(state, dict) else None
    if not isinstance(check, dict):
        logger.warning("ingest state %s has the old format (fast key check, paths in clear): rescanning every "
                       "file and rewriting it", path)
        return empty, pseudonymizer.key_check()
    if not pseudonymizer.matches_key_check(check):
        logger.info("ingest state %s was built with another key: rescanning every file", path)
        return empty, pseudonymizer.key_check()
    if state.get("version") != version:
        logger.info("ingest state %s was built by another version: rescanning every file", path)
        return empty, check
    dicomdirs = {}
    for key, entry in dict(state.get("dicomdirs", {})).items():
        extra = private.dicomdirs.get(key) if private is not None else None
        if extra is not None:
            dicomdirs[key] = {**entry, **extra}
    return {"files": dict(state.get("files", {})), "dicomdirs": dicomdirs}, check


def write_outputs(
    *,
    manifest_path: str,
    errors_path: str,
    state_path: str,
    root: str,
    pseudonymizer: Pseudonymizer,
    version: int,
    key_check: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    paths: Sequence[str],
    stats: Mapping[str, tuple[int, int] | None],
    results: Mapping[str, Any],
    dicomdirs: Mapping[str, Mapping[str, Any]],
) -> None:
    """Write the manifest with its private map, the errors file and the state file, all atomically.

    ``errors`` entries carry a ``path``; in the errors file it becomes ``file`` (:func:`file_key`) and the path
    goes to the private map. ``dicomdirs`` is keyed by :func:`file_key` and holds, besides size/mtime/error,
    :data:`DICOMDIR_PRIVATE_FIELDS` with paths relative to ``root`` or absolute.
    """
    files: dict[str, str] = {}
    public_errors = []
    for entry in errors:
        out = {k: v for k, v in entry.items() if k != "path"}
        if entry.get("path") is not None:
            fid = file_key(pseudonymizer, str(entry["path"]), root)
            files[fid] = str(entry["path"])
            out = {"file": fid, **out}
        public_errors.append(out)
    private_dirs: dict[str, dict[str, Any]] = {}
    public_dirs: dict[str, dict[str, Any]] = {}
    for key, entry in dicomdirs.items():
        private_dirs[key] = {name: entry.get(name, []) for name in DICOMDIR_PRIVATE_FIELDS}
        private_dirs[key]["found"] = [f if os.path.isabs(f) else os.path.join(root, f) for f in entry.get("found", [])]
        public_dirs[key] = {k: v for k, v in entry.items() if k not in DICOMDIR_PRIVATE_FIELDS}
    write_manifest(manifest_path, records, private_files=files, private_dicomdirs=private_dirs)
    with atomic_open(errors_path, "w") as fh:
        for entry in public_errors:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    files_state = {
        file_key(pseudonymizer, p, root): {"size": stats[p][0], "mtime_ns": stats[p][1], "result": results[p]}
        for p in paths
        if stats.get(p) is not None
    }
    atomic_write_json(state_path, {"version": version, "key_check": dict(key_check), "files": files_state,
                                   "dicomdirs": public_dirs}, indent=None)


def previous_private_map(manifest_path: str) -> PrivateMap | None:
    """The private map of the previous run (for its DICOMDIR cache), or ``None``; an unreadable one is ignored."""
    try:
        return read_private_map(manifest_path)
    except Exception:  # noqa: BLE001 - a damaged map only costs a rescan of the DICOMDIRs
        logger.warning("ignoring the unreadable private map beside %s", manifest_path)
        return None
