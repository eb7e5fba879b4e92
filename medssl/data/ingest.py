"""PACS export ingestion: a folder of DICOM files (with or without DICOMDIR) -> a de-identified manifest.

Every file under the folder is read header-only (in a process pool), classified as an image, a skipped object
(non-image, no pixel data, DICOMDIR, duplicate, excluded by a filter) or an unreadable file, and either becomes
manifest records (one per image, or one per frame of a multi-frame object) or an entry of the errors file with
its reason. Identifiers are keyed pseudonyms (:mod:`medssl.data.deid`); no PHI value is written anywhere.
Source paths (export folders are named after patients) go only to the private map
``<manifest>.private.jsonl`` (:mod:`medssl.data.private_map`, :mod:`medssl.data.ingest_state`).

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
from medssl.data.dicom_scan import scan_files, walk_files
from medssl.data.dicomdir import dicomdir_references, is_dicomdir_name
from medssl.data.ingest_state import file_key, load_state, previous_private_map, relative_key, write_outputs
from medssl.data.private_map import private_map_path
from medssl.data.verify import decode_failures
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.data.ingest")

STATE_VERSION = 2  # 2: header values validated, geometry checked, DICOMDIR references confined to the export
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
        verify_decode: decode every record through the training loader (:mod:`medssl.data.verify`, in
            ``workers`` processes) and move the records that fail to the errors file.
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
    verify_decode: bool = False


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


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


_state_key = relative_key  # path relative to the export root (input of the keyed file pseudonyms)


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

    Writes ``manifest_path`` (JSONL, :mod:`medssl.data.manifest`; no source paths) with its private map
    ``<manifest>.private.jsonl`` (mode 0600: record id -> image path, file pseudonym -> path), the errors file
    (JSONL, one ``{"file", "status", "reason"}`` per skipped or unreadable file, ``file`` the keyed pseudonym of
    its path; default ``<manifest>.errors.jsonl``) and the state file ``<manifest>.state.json`` (files keyed
    by pseudonym, scrypt key check), all atomically (:mod:`medssl.data.ingest_state`).

    Summary keys: ``files_seen``, ``files_opened`` (files actually opened in this run), ``files_reused``
    (taken from the state file), ``images`` (instances kept), ``records``, ``by_modality`` (records per
    modality), ``patients``, ``studies``, ``series`` (distinct pseudonyms among records), ``errors`` (entries
    in the errors file), ``errors_by_reason``, ``values_nulled`` (header values that failed validation and were
    set to null: errors-file entries with status ``warning``), ``decode_failures`` (records removed by
    ``verify_decode``; ``None`` when not verified), plus the output paths.
    """
    options = options or IngestOptions()
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise MedsslError("input folder not found", root)
    manifest_path = os.path.abspath(os.fspath(manifest_path))
    errors_path = os.path.abspath(os.fspath(errors_path)) if errors_path else default_errors_path(manifest_path)
    state_path = state_path_for(manifest_path)
    frames = parse_frames(options.frames)
    state, key_check = load_state(state_path, pseudonymizer, STATE_VERSION, previous_private_map(manifest_path))

    outside: list[str] = []
    stats: dict[str, tuple[int, int] | None] = dict(
        walk_files(root, exclude=(manifest_path, errors_path, state_path, str(private_map_path(manifest_path))),
                   outside_links=outside))
    paths = list(stats)
    opened = 0
    errors: list[dict[str, Any]] = [
        {"path": link, "status": "error", "reason": "symbolic link to a file outside the export folder; not opened"}
        for link in outside
    ]
    new_dicomdirs: dict[str, Any] = {}
    known = set(paths)
    for path in [p for p in paths if is_dicomdir_name(p)]:
        key, stat = file_key(pseudonymizer, path, root), stats[path]
        cached = state["dicomdirs"].get(key)
        if cached is None or stat is None or [cached["size"], cached["mtime_ns"]] != list(stat):
            found, missing, refused, error = dicomdir_references(path, root)
            opened += 1
            cached = {"size": stat[0] if stat else -1, "mtime_ns": stat[1] if stat else -1,
                      "found": [_state_key(f, root) for f in found], "missing": missing,
                      "refused": [list(r) for r in refused], "error": error}
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
        errors.extend({"path": os.path.dirname(path) + os.sep + file_id, "status": "error", "reason": reason}
                      for file_id, reason in cached["refused"])
    paths.sort()

    results: dict[str, dict[str, Any]] = {}
    to_scan: list[str] = []
    for path in paths:
        stat = stats[path]
        cached = state["files"].get(file_key(pseudonymizer, path, root))
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
                           "reason": "duplicate SOPInstanceUID (same instance as "
                           f"{file_key(pseudonymizer, first_path[instance], root)})"})
            continue
        first_path[instance] = path
        reason = _filter_reason(header, options)
        chosen = _frames_of(header, frames) if reason is None else reason
        if isinstance(chosen, str):
            errors.append({"path": path, "status": "skip", "reason": chosen})
            continue
        records.extend(_records_for(path, header, instance, chosen))
        kept_images += 1
        errors.extend({"path": path, "status": "warning", "reason": w} for w in result.get("warnings") or [])

    decode_failed = None
    if options.verify_decode:
        failures = decode_failures(records, workers=options.workers, progress=options.progress,
                                   desc="verify decode")
        errors.extend({"path": records[i]["image"], "status": "error", "reason": reason, "id": records[i]["id"],
                       "frame": records[i]["frame"]} for i, reason in failures)
        bad = {i for i, _ in failures}
        records = [r for i, r in enumerate(records) if i not in bad]
        kept_images, decode_failed = len({r["image"] for r in records}), len(failures)

    for record in records:
        record["deidentified"] = pseudonymizer.deidentified
    write_outputs(manifest_path=manifest_path, errors_path=errors_path, state_path=state_path, root=root,
                  pseudonymizer=pseudonymizer, version=STATE_VERSION, key_check=key_check, records=records,
                  errors=errors, paths=paths, stats=stats, results=results, dicomdirs=new_dicomdirs)

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
        "values_nulled": sum(1 for e in errors if e["status"] == "warning"),
        "decode_failures": decode_failed,
        "deidentified": pseudonymizer.deidentified,
        "manifest": manifest_path,
        "private_map": str(private_map_path(manifest_path)),
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
        + (f" (including {summary['values_nulled']} invalid header values set to null)"
           if summary.get("values_nulled") else "")
        + "".join(f"\n  {v:6d}  {k}" for k, v in summary["errors_by_reason"].items()),
        *([] if summary.get("decode_failures") is None else
          [f"decode verified: {summary['decode_failures']} record(s) failed and moved to the errors file"]),
        f"manifest: {summary['manifest']}"
        + ("" if summary.get("deidentified", True) else " (NOT de-identified: weak or public key)"),
        *([f"private map (source paths; keep private): {summary['private_map']}"] if summary.get("private_map") else []),
        f"errors file: {summary['errors_file']}",
    ]
    return "\n".join(lines)
