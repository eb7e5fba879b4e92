"""Decode verification: read every record's pixels through the training loader and report the failures.

A header can be consistent while the pixel data is not (a corrupt JPEG stream, a codec error, a VOI LUT that
does not apply). :func:`decode_failures` therefore decodes each record with :class:`~medssl.data.readers.load.
LoadRecordd` (default options, the transform training and evaluation put first in their pipelines) in a
process pool, and checks the result the way training would use it: a float array ``(C, H, W)`` with C = 1
or 3 and only finite values. Used by ``medssl ingest --verify-decode`` and ``medssl manifest validate
--decode``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medssl.data.deid import scrub_text
from medssl.data.dicom_scan import quiet_pydicom
from medssl.data.manifest import write_manifest
from medssl.data.readers.load import LoadRecordd
from medssl.errors import MedsslError
from medssl.io import atomic_open

POOL_MIN_RECORDS = 16  # below this many records, a process pool costs more than it saves
MAX_REASON_CHARS = 300


def _reason(exc: BaseException, path: object) -> str:
    """One line without the file path (the caller reports the record) or values that could identify a person."""
    detail = getattr(exc, "detail", None)  # the loader's RecordLoadError: the reader's reason without the path
    if not isinstance(detail, str):
        detail = exc.reason if isinstance(exc, MedsslError) else f"{type(exc).__name__}: {exc}"
    if isinstance(path, str) and path:
        detail = detail.replace(path, "<file>")
    return " ".join(scrub_text(detail).split())[:MAX_REASON_CHARS]


def check_record(record: Mapping[str, Any]) -> str | None:
    """Why ``record``'s pixels cannot be used for training, or ``None`` when they decode to a usable array."""
    try:
        with quiet_pydicom():
            out = LoadRecordd(keys=("image",))(dict(record))
    except Exception as exc:  # noqa: BLE001 - every reader failure is a bad record, reported with its reason
        return f"cannot decode: {_reason(exc, record.get('image'))}"
    return pixel_problem(np.asarray(out["image"]))


def pixel_problem(array: np.ndarray) -> str | None:
    """Why a decoded array cannot be trained on (not ``(C, H, W)`` with C = 1 or 3, or not finite), or ``None``;
    shared with the store's codec (:func:`medssl.data.store.layout.encode_pixels`)."""
    if array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape) < 1:
        return f"decoded to an array of shape {tuple(array.shape)}, not (C, H, W) with C = 1 or 3"
    if not np.isfinite(array).all():
        return "decoded pixels contain NaN or infinite values"
    return None


def _check_batch(batch: list[tuple[int, Mapping[str, Any]]]) -> list[tuple[int, str]]:
    failures = []
    for index, record in batch:
        reason = check_record(record)
        if reason is not None:
            failures.append((index, reason))
    return failures


def decode_failures(
    records: Sequence[Mapping[str, Any]],
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decode",
) -> list[tuple[int, str]]:
    """``[(record index, reason)]`` of the records whose pixels do not decode, sorted by index.

    Args:
        records: manifest records with an ``image`` path (absolute, or relative to the working directory).
        workers: decoding processes (default: CPU count); 1 decodes in this process.
        progress: show a tqdm bar (stderr), one step per record.
        desc: the bar's label.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    items = list(enumerate(records))
    parallel = workers > 1 and len(items) >= POOL_MIN_RECORDS
    size = max(1, min(32, len(items) // (workers * 4))) if parallel else 8
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    failures: list[tuple[int, str]] = []
    bar = tqdm(total=len(items), desc=desc, unit="record", disable=None if progress and items else True)
    try:
        if parallel:
            with ProcessPoolExecutor(max_workers=min(workers, len(batches))) as pool:
                for batch, found in zip(batches, pool.map(_check_batch, batches)):
                    failures.extend(found)
                    bar.update(len(batch))
        else:
            for batch in batches:
                failures.extend(_check_batch(batch))
                bar.update(len(batch))
    finally:
        bar.close()
    return sorted(failures)


def decode_error_entries(records: Sequence[Mapping[str, Any]], failures: Sequence[tuple[int, str]]
                         ) -> list[dict[str, Any]]:
    """Errors-file entries ``{"id", "frame", "status": "error", "reason"}`` for :func:`decode_failures`' output
    (no path: the record id names the record, its path stays in the manifest's private map)."""
    return [{"id": records[i].get("id"), "frame": records[i].get("frame"), "status": "error", "reason": reason}
            for i, reason in failures]


def write_cleaned(
    output: str | os.PathLike[str],
    errors_path: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    failures: Sequence[tuple[int, str]],
) -> int:
    """Write ``records`` without the failed ones to ``output`` and the failures to ``errors_path``.

    Both files are written atomically (the errors file first, so a cleaned manifest never exists without its
    errors file). Returns the number of records kept.
    """
    bad = {i for i, _ in failures}
    kept = [r for i, r in enumerate(records) if i not in bad]
    with atomic_open(errors_path, "w") as fh:
        for entry in decode_error_entries(records, failures):
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    write_manifest(output, kept)
    return len(kept)
