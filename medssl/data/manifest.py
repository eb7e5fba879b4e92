"""The medssl manifest: one JSON object per line (JSONL), one record per image.

Fields (``MANIFEST_FIELDS``; documented in ``data_manifests/README.md``, schema in
``data_manifests/manifest.schema.json`` which mirrors :data:`MANIFEST_SCHEMA`):

- ``id`` (str, required, unique): pseudonymous record id.
- ``image`` (str, required): path of the image file; relative paths are relative to the manifest's folder.
- ``frame``, ``slice``, ``axis`` (int >= 0 or null): frame of a multi-frame object, slice index and axis of a
  volume.
- ``label`` (str or null).
- ``patient_id``, ``study_id``, ``series_id``, ``lesion_id`` (str or null): pseudonyms, never raw identifiers.
- ``modality``, ``photometric`` (str or null): DICOM Modality and PhotometricInterpretation (or null).
- ``rows``, ``columns`` (int >= 1 or null).
- ``split`` (``train`` | ``val`` | ``test`` | ``pretrain`` or null).
- ``source`` (str, required): reader kind, one of :data:`SOURCES`.
- ``burned_in`` (bool or null): DICOM BurnedInAnnotation (0028,0301).

Other keys are allowed and kept unchanged. Missing optional fields read as null.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.io import atomic_open

MANIFEST_FIELDS: tuple[str, ...] = (
    "id",
    "image",
    "frame",
    "slice",
    "axis",
    "label",
    "patient_id",
    "study_id",
    "series_id",
    "lesion_id",
    "modality",
    "photometric",
    "rows",
    "columns",
    "split",
    "source",
    "burned_in",
)
REQUIRED_FIELDS: tuple[str, ...] = ("id", "image", "source")
SPLITS: tuple[str, ...] = ("train", "val", "test", "pretrain")
SOURCES: tuple[str, ...] = ("dicom", "nifti", "nrrd", "image", "npz", "wsi", "h5")

_STRING_OR_NULL = ("label", "patient_id", "study_id", "series_id", "lesion_id", "modality", "photometric")
_INDEX_FIELDS = ("frame", "slice", "axis")
_SIZE_FIELDS = ("rows", "columns")

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://medssl.org/schemas/manifest-record.schema.json",
    "title": "medssl manifest record (one line of a JSONL manifest)",
    "type": "object",
    "required": list(REQUIRED_FIELDS),
    "additionalProperties": True,
    "properties": {
        "id": {"type": "string", "minLength": 1, "description": "pseudonymous record id, unique in the manifest"},
        "image": {
            "type": "string",
            "minLength": 1,
            "description": "image file path; relative paths are relative to the manifest's folder",
        },
        "frame": {"type": ["integer", "null"], "minimum": 0, "description": "frame index of a multi-frame object"},
        "slice": {"type": ["integer", "null"], "minimum": 0, "description": "slice index in a volume"},
        "axis": {"type": ["integer", "null"], "minimum": 0, "description": "volume axis the slice is taken along"},
        "label": {"type": ["string", "null"], "description": "class label"},
        "patient_id": {"type": ["string", "null"], "description": "patient pseudonym"},
        "study_id": {"type": ["string", "null"], "description": "study pseudonym"},
        "series_id": {"type": ["string", "null"], "description": "series pseudonym"},
        "lesion_id": {"type": ["string", "null"], "description": "lesion pseudonym (e.g. HAM10000 lesion_id)"},
        "modality": {"type": ["string", "null"], "description": "DICOM Modality (CR, DX, MR, US, ...)"},
        "photometric": {"type": ["string", "null"], "description": "DICOM PhotometricInterpretation"},
        "rows": {"type": ["integer", "null"], "minimum": 1, "description": "image height in pixels"},
        "columns": {"type": ["integer", "null"], "minimum": 1, "description": "image width in pixels"},
        "split": {"enum": [*SPLITS, None], "description": "dataset split"},
        "source": {"enum": list(SOURCES), "description": "reader kind"},
        "burned_in": {"type": ["boolean", "null"], "description": "DICOM BurnedInAnnotation (0028,0301)"},
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_problems(record: Any) -> list[str]:
    """Problems of one record against the manifest schema (empty list when valid)."""
    if not isinstance(record, Mapping):
        return [f"record is a {type(record).__name__}, not a JSON object"]
    problems = [f"missing required field '{name}'" for name in REQUIRED_FIELDS if name not in record]
    for name in ("id", "image"):
        value = record.get(name)
        if name in record and (not isinstance(value, str) or not value):
            problems.append(f"field '{name}' must be a non-empty string, got {value!r:.40}")
    for name in _STRING_OR_NULL:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(f"field '{name}' must be a string or null, got {type(value).__name__}")
    for name in _INDEX_FIELDS:
        value = record.get(name)
        if value is not None and (not _is_int(value) or value < 0):
            problems.append(f"field '{name}' must be an integer >= 0 or null, got {value!r:.40}")
    for name in _SIZE_FIELDS:
        value = record.get(name)
        if value is not None and (not _is_int(value) or value < 1):
            problems.append(f"field '{name}' must be an integer >= 1 or null, got {value!r:.40}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        problems.append(f"field 'split' must be one of {', '.join(SPLITS)} or null, got {split!r:.40}")
    if "source" in record and record.get("source") not in SOURCES:
        problems.append(f"field 'source' must be one of {', '.join(SOURCES)}, got {record.get('source')!r:.40}")
    burned = record.get("burned_in")
    if burned is not None and not isinstance(burned, bool):
        problems.append(f"field 'burned_in' must be true, false or null, got {burned!r:.40}")
    return problems


def validate_records(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Schema problems of a list of records, each prefixed ``record N:`` (1-based), plus duplicate ids.

    Returns an empty list when every record is valid and every ``id`` is unique.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        problems.extend(f"record {number}: {p}" for p in record_problems(record))
        rid = record.get("id") if isinstance(record, Mapping) else None
        if isinstance(rid, str) and rid:
            if rid in seen:
                problems.append(f"record {number}: duplicate id (first used by record {seen[rid]})")
            else:
                seen[rid] = number
    return problems


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` with every manifest field present (missing ones null) in schema order first."""
    out: dict[str, Any] = {name: record.get(name) for name in MANIFEST_FIELDS}
    out.update({k: v for k, v in record.items() if k not in out})
    return out


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a JSONL manifest.

    Blank lines are ignored. Every record is checked against the schema; the first bad line raises
    :class:`MedsslError` naming the file and the 1-based line number. Relative ``image`` paths are resolved
    against the manifest's folder and returned as absolute strings. Missing optional fields become ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsslError("manifest not found", path)
    base = path.resolve().parent
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MedsslError(f"not a UTF-8 text file ({exc.reason})", path) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MedsslError(f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})", path) from None
        problems = record_problems(record)
        if problems:
            raise MedsslError(f"line {number}: {'; '.join(problems)}", path)
        rid = record["id"]
        if rid in seen:
            raise MedsslError(f"line {number}: duplicate id (first used on line {seen[rid]})", path)
        seen[rid] = number
        record = normalize_record(record)
        image = record["image"]
        if not os.path.isabs(image):
            record["image"] = os.path.normpath(os.path.join(base, image))
        records.append(record)
    return records


def write_manifest(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` as a JSONL manifest atomically.

    Records are validated first (a :class:`MedsslError` lists the first problems). Image paths inside the
    manifest's folder are stored relative to it (with ``/`` separators), others as absolute paths.
    """
    path = Path(path)
    records = list(records)
    problems = validate_records(records)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MedsslError(f"refusing to write an invalid manifest: {shown}", path)
    base = path.parent.resolve()
    with atomic_open(path, "w") as fh:
        for record in records:
            out = normalize_record(record)
            out["image"] = _stored_image_path(out["image"], base)
            fh.write(json.dumps(out, ensure_ascii=False, default=_json_default) + "\n")


def _stored_image_path(image: str, base: Path) -> str:
    """``image`` relative to ``base`` (posix separators) when it lies inside it, else absolute."""
    absolute = os.path.normpath(image if os.path.isabs(image) else os.path.abspath(image))
    prefix = str(base).rstrip(os.sep) + os.sep
    if absolute.startswith(prefix):  # fast path, same result as Path.relative_to
        return absolute[len(prefix) :].replace(os.sep, "/")
    absolute = Path(absolute)
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the manifest file's bytes (for provenance records)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise MedsslError("manifest not found", path) from None
    return digest.hexdigest()


def check_records(
    records: Iterable[Mapping[str, Any]],
    *,
    labels: Iterable[str] | None = None,
    check_files: bool = True,
    group_keys: Iterable[str] = ("patient_id", "lesion_id"),
) -> list[str]:
    """Content problems of (schema-valid) records, as messages; an empty list means none found.

    Checks: image files that do not exist (``check_files``); labels outside ``labels`` (when given); empty
    classes (a class of ``labels``, or of the labels present, with no record overall, or missing from a split
    that has labelled records); duplicate images (same ``image``, ``frame``, ``slice`` and ``axis``); and
    leakage (a ``patient_id``/``lesion_id`` in more than one split).
    """
    from medssl.data.splits import leakage_problems

    records = list(records)
    problems: list[str] = []
    if check_files:
        missing = sorted({r["image"] for r in records if not os.path.exists(r["image"])})
        problems.extend(f"missing image file: {p}" for p in missing)
    present = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    allowed = None if labels is None else list(dict.fromkeys(labels))
    if allowed is not None:
        problems.extend(
            f"unknown label {label!r} ({sum(1 for r in records if r.get('label') == label)} records)"
            for label in present
            if label not in allowed
        )
        problems.extend(f"empty class {label!r}: no record has this label" for label in allowed if label not in present)
    classes = allowed if allowed is not None else present
    by_split: dict[str, set[str]] = {}
    for record in records:
        if record.get("split") is not None and record.get("label") is not None:
            by_split.setdefault(str(record["split"]), set()).add(str(record["label"]))
    for split, found in sorted(by_split.items()):
        problems.extend(
            f"empty class {label!r} in split {split}" for label in classes if label in present and label not in found
        )
    first: dict[tuple[Any, ...], str] = {}
    for record in records:
        key = _image_key(record)
        if key in first:
            problems.append(f"duplicate image: records {first[key]} and {record['id']} both read {_describe(key)}")
        else:
            first[key] = record["id"]
    problems.extend(leakage_problems(records, tuple(group_keys)))
    return problems


#: record fields that, with ``image``, say which pixels a record reads (frames, slices, container entries, tiles)
_LOCATION_FIELDS = ("frame", "slice", "axis", "index", "npz_split", "h5_key", "x", "y", "level", "tile_size")


def _image_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a record reads: its image path plus every location field (so npz/h5/tile records are distinct)."""
    return (record["image"],) + tuple(record.get(name) for name in _LOCATION_FIELDS)


def _describe(key: tuple[Any, ...]) -> str:
    image, *values = key
    extra = "".join(f" {n} {v}" for n, v in zip(_LOCATION_FIELDS, values) if v is not None)
    return f"{image}{extra}"
