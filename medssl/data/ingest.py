"""PACS export ingestion: a folder of DICOM files (with or without DICOMDIR) -> a de-identified manifest.

Every file under the folder is read header-only (in a process pool), classified as an image, a skipped object
(non-image, no pixel data, DICOMDIR, duplicate, excluded by a filter) or an unreadable file, and either becomes
manifest records (one per image, or one per frame of a multi-frame object) or an entry of the errors file with
its reason. Identifiers are keyed pseudonyms (:mod:`medssl.data.deid`); no PHI value is written anywhere.

Incremental: a state file beside the manifest (``<manifest>.state.json``) remembers, for each file, its size,
``mtime_ns`` and de-identified header summary, so a rerun opens only new or changed files
(``summary["files_opened"]`` counts the files actually opened).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from medssl.data.deid import Pseudonymizer
from medssl.data.dicom_scan import dicomdir_references, is_dicomdir_name, scan_files, walk_files
from medssl.data.manifest import write_manifest
from medssl.errors import MedsslError
from medssl.io import atomic_open, atomic_write_json

logger = logging.getLogger("medssl.data.ingest")

STATE_VERSION = 1
POOL_MIN_FILES = 64  # below this many files to open, a process pool costs more than it saves


@dataclass
class IngestOptions:
    """Filters and execution settings of :func:`ingest_dicom`.

    Attributes:
        workers: header-reading processes (default: CPU count); 1 reads in this process.
        modalities: keep only these DICOM Modality values (upper case), e.g. ``("CR", "DX")``; empty = all.
        body_parts: keep only these BodyPartExamined values (case-insensitive); empty = all.
        views: keep only these ViewPosition values (case-insensitive); empty = all.
        exclude_derived: drop images whose ImageType starts with DERIVED.
        exclude_localizers: drop localizer/scout images (ImageType LOCALIZER or such a series description).
        exclude_burned_in: drop images with BurnedInAnnotation (0028,0301) = YES.
        frames: for multi-frame objects, ``"all"`` (one record per frame), ``"first"`` or a frame index.
        progress: show a tqdm progress bar (stderr).
    """

    workers: int | None = None
    modalities: Sequence[str] = ()
    body_parts: Sequence[str] = ()
    views: Sequence[str] = ()
    exclude_derived: bool = False
    exclude_localizers: bool = False
    exclude_burned_in: bool = False
    frames: str | int = "all"
    progress: bool = True


def parse_frames(value: str | int) -> str | int:
    """Validate a ``--frames`` value: ``all``, ``first`` or a non-negative frame index."""
    if isinstance(value, int) or str(value).strip().isdigit():
        return int(value)
    text = str(value).strip().lower()
    if text not in ("all", "first"):
        raise MedsslError(f"--frames must be 'all', 'first' or a frame number, not {value!r}")
    return text


def default_errors_path(manifest_path: str) -> str:
    """``scans/m.jsonl`` -> ``scans/m.errors.jsonl``."""
    base = manifest_path[: -len(".jsonl")] if manifest_path.endswith(".jsonl") else manifest_path
    return base + ".errors.jsonl"


def state_path_for(manifest_path: str) -> str:
    """The incremental state file beside the manifest: ``<manifest>.state.json``."""
    return manifest_path + ".state.json"


def _load_state(path: str, key_check: str | None) -> dict[str, Any]:
    """Previous scan results ``{"files": {...}, "dicomdirs": {...}}``; empty when absent, stale or unreadable."""
    empty: dict[str, Any] = {"files": {}, "dicomdirs": {}}
    if not os.path.isfile(path):
        return empty
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        logger.warning("ignoring unreadable ingest state file %s", path)
        return empty
    if state.get("version") != STATE_VERSION or state.get("key_check") != key_check:
        logger.info("ingest state %s was built with another version or key: rescanning every file", path)
        return empty
    return {"files": dict(state.get("files", {})), "dicomdirs": dict(state.get("dicomdirs", {}))}


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _state_key(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators when inside it, else the absolute path."""
    if path.startswith(root + os.sep):
        return path[len(root) + 1 :].replace(os.sep, "/")
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def _reason_category(reason: str) -> str:
    """Short category of a reason for the summary (the text before the first ':' or '(')."""
    for sep in (":", "("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def _scan_all(paths: list[str], pseudonymizer: Pseudonymizer, options: IngestOptions) -> list[dict[str, Any]]:
    """Header summaries of ``paths`` (same order), in batches, in a process pool when it pays off."""
    scan = functools.partial(scan_files, pseudonymizer=pseudonymizer)
    workers = options.workers or os.cpu_count() or 1
    parallel = workers > 1 and len(paths) >= POOL_MIN_FILES
    size = max(1, min(128, len(paths) // (workers * 8))) if parallel else 64
    batches = [paths[i : i + size] for i in range(0, len(paths), size)]
    bar = tqdm(total=len(paths), desc="ingest", unit="file", disable=None if options.progress and paths else True)
    results: list[dict[str, Any]] = []
    try:
        if not parallel:
            for batch in batches:
                results.extend(scan(batch))
                bar.update(len(batch))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for batch_results in pool.map(scan, batches):
                    results.extend(batch_results)
                    bar.update(len(batch_results))
    finally:
        bar.close()
    return results


def _frames_of(header: dict[str, Any], frames: str | int) -> list[int | None] | str:
    """Frame indices to emit for an image, or the reason it has none."""
    count = int(header.get("number_of_frames") or 1)
    if count <= 1:
        if isinstance(frames, int) and frames > 0:
            return f"frame {frames} requested but the image has 1 frame"
        return [None]
    if frames == "all":
        return list(range(count))
    if frames == "first":
        return [0]
    if frames >= count:
        return f"frame {frames} requested but the image has {count} frames"
    return [frames]


def _filter_reason(header: dict[str, Any], options: IngestOptions) -> str | None:
    """Why ``--modality``/``--body-part``/``--view``/``--exclude-*`` drops this image, or ``None``."""
    if options.modalities and (header.get("modality") or "") not in {m.upper() for m in options.modalities}:
        return f"excluded by --modality (modality {header.get('modality') or 'missing'})"
    if options.body_parts and (header.get("body_part") or "") not in {b.upper() for b in options.body_parts}:
        return f"excluded by --body-part (body part {header.get('body_part') or 'missing'})"
    if options.views and (header.get("view_position") or "") not in {v.upper() for v in options.views}:
        return f"excluded by --view (view {header.get('view_position') or 'missing'})"
    if options.exclude_derived and header.get("derived"):
        return "excluded by --exclude-derived (ImageType DERIVED)"
    if options.exclude_localizers and header.get("localizer"):
        return "excluded by --exclude-localizers (localizer/scout image)"
    if options.exclude_burned_in and header.get("burned_in"):
        return "excluded by --exclude-burned-in (BurnedInAnnotation YES)"
    return None


def _records_for(path: str, header: dict[str, Any], instance: str, frames: list[int | None]) -> list[dict[str, Any]]:
    multi = frames != [None]
    return [
        {
            "id": instance if frame is None else f"{instance}-f{frame:05d}",
            "image": path,
            "frame": frame,
            "label": None,
            "patient_id": header.get("patient_id"),
            "study_id": header.get("study_id"),
            "series_id": header.get("series_id"),
            "modality": header.get("modality"),
            "photometric": header.get("photometric"),
            "rows": header.get("rows"),
            "columns": header.get("columns"),
            "bits_stored": header.get("bits_stored"),
            "body_part": header.get("body_part"),
            "view_position": header.get("view_position"),
            "transfer_syntax": header.get("transfer_syntax"),
            "number_of_frames": header.get("number_of_frames") if multi else 1,
            "burned_in": header.get("burned_in"),
            "source": "dicom",
            "split": None,
        }
        for frame in frames
    ]


def ingest_dicom(
    root: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    *,
    pseudonymizer: Pseudonymizer,
    errors_path: str | os.PathLike[str] | None = None,
    options: IngestOptions | None = None,
) -> dict[str, Any]:
    """Ingest every DICOM file under ``root`` into a manifest; returns the summary (also logged).

    Writes ``manifest_path`` (JSONL, :mod:`medssl.data.manifest`), the errors file (JSONL, one
    ``{"path", "status", "reason"}`` per skipped or unreadable file; default ``<manifest>.errors.jsonl``) and
    the state file ``<manifest>.state.json``, all atomically.

    Summary keys: ``files_seen``, ``files_opened`` (files actually opened in this run), ``files_reused``
    (taken from the state file), ``images`` (instances kept), ``records``, ``by_modality`` (records per
    modality), ``patients``, ``studies``, ``series`` (distinct pseudonyms among records), ``errors`` (entries
    in the errors file), ``errors_by_reason``, plus the output paths.
    """
    options = options or IngestOptions()
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise MedsslError("input folder not found", root)
    manifest_path = os.path.abspath(os.fspath(manifest_path))
    errors_path = os.path.abspath(os.fspath(errors_path)) if errors_path else default_errors_path(manifest_path)
    state_path = state_path_for(manifest_path)
    frames = parse_frames(options.frames)
    key_check = pseudonymizer.pseudonym("record", "medssl-ingest-key-check")
    state = _load_state(state_path, key_check)

    stats: dict[str, tuple[int, int] | None] = dict(walk_files(root, exclude=(manifest_path, errors_path, state_path)))
    paths = list(stats)
    opened = 0
    errors: list[dict[str, Any]] = []
    new_dicomdirs: dict[str, Any] = {}
    known = set(paths)
    for path in [p for p in paths if is_dicomdir_name(p)]:
        key, stat = _state_key(path, root), stats[path]
        cached = state["dicomdirs"].get(key)
        if cached is None or stat is None or [cached["size"], cached["mtime_ns"]] != list(stat):
            found, missing, error = dicomdir_references(path)
            opened += 1
            cached = {"size": stat[0] if stat else -1, "mtime_ns": stat[1] if stat else -1,
                      "found": [_state_key(f, root) for f in found], "missing": missing, "error": error}
        new_dicomdirs[key] = cached
        if cached["error"]:
            errors.append({"path": path, "status": "error", "reason": cached["error"]})
        for ref in cached["found"]:
            ref_path = ref if os.path.isabs(ref) else os.path.join(root, ref)
            ref_path = os.path.normpath(ref_path)
            if ref_path not in known and os.path.isfile(ref_path):
                known.add(ref_path)
                paths.append(ref_path)
                stats[ref_path] = _stat(ref_path)
        errors.extend({"path": os.path.join(os.path.dirname(path), m), "status": "error",
                       "reason": "referenced by DICOMDIR but missing"} for m in cached["missing"])
    paths.sort()

    results: dict[str, dict[str, Any]] = {}
    to_scan: list[str] = []
    for path in paths:
        stat = stats[path]
        cached = state["files"].get(_state_key(path, root))
        if cached is not None and stat is not None and [cached["size"], cached["mtime_ns"]] == list(stat):
            results[path] = cached["result"]
        else:
            to_scan.append(path)
    for path, result in zip(to_scan, _scan_all(to_scan, pseudonymizer, options)):
        results[path] = result
    opened += len(to_scan)

    records: list[dict[str, Any]] = []
    first_path: dict[str, str] = {}
    kept_images = 0
    for path in paths:
        result = results[path]
        if result["status"] != "image":
            errors.append({"path": path, "status": result["status"], "reason": result["reason"]})
            continue
        header = result["header"]
        instance = header.get("instance") or pseudonymizer.pseudonym("instance", "path:" + _state_key(path, root))
        if instance in first_path:
            errors.append({"path": path, "status": "skip",
                           "reason": f"duplicate SOPInstanceUID (same instance as {first_path[instance]})"})
            continue
        first_path[instance] = path
        reason = _filter_reason(header, options)
        chosen = _frames_of(header, frames) if reason is None else reason
        if isinstance(chosen, str):
            errors.append({"path": path, "status": "skip", "reason": chosen})
            continue
        records.extend(_records_for(path, header, instance, chosen))
        kept_images += 1

    write_manifest(manifest_path, records)
    with atomic_open(errors_path, "w") as fh:
        for entry in errors:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    files_state = {
        _state_key(p, root): {"size": stats[p][0], "mtime_ns": stats[p][1], "result": results[p]}
        for p in paths
        if stats.get(p) is not None
    }
    atomic_write_json(state_path, {"version": STATE_VERSION, "key_check": key_check, "files": files_state,
                                   "dicomdirs": new_dicomdirs}, indent=None)

    summary = {
        "files_seen": len(paths),
        "files_opened": opened,
        "files_reused": len(paths) - len(to_scan),
        "images": kept_images,
        "records": len(records),
        "by_modality": dict(sorted(Counter(r["modality"] or "unknown" for r in records).items())),
        "patients": len({r["patient_id"] for r in records if r["patient_id"]}),
        "studies": len({r["study_id"] for r in records if r["study_id"]}),
        "series": len({r["series_id"] for r in records if r["series_id"]}),
        "errors": len(errors),
        "errors_by_reason": dict(Counter(_reason_category(e["reason"]) for e in errors).most_common()),
        "manifest": manifest_path,
        "errors_file": errors_path,
    }
    logger.info("ingest summary: %s", json.dumps(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`ingest_dicom`'s result."""
    lines = [
        f"files: {summary['files_seen']} seen, {summary['files_opened']} opened, {summary['files_reused']} "
        "unchanged since the last run",
        f"records: {summary['records']} from {summary['images']} images; patients {summary['patients']}, "
        f"studies {summary['studies']}, series {summary['series']}",
        "by modality: " + (", ".join(f"{k} {v}" for k, v in summary["by_modality"].items()) or "none"),
        f"skipped or unreadable: {summary['errors']}"
        + "".join(f"\n  {v:6d}  {k}" for k, v in summary["errors_by_reason"].items()),
        f"manifest: {summary['manifest']}",
        f"errors file: {summary['errors_file']}",
    ]
    return "\n".join(lines)
