"""The medssl manifest: one JSON object per line (JSONL), one record per image.

Fields (``MANIFEST_FIELDS``; documented in ``data_manifests/README.md``, schema in
``data_manifests/manifest.schema.json`` which mirrors :data:`MANIFEST_SCHEMA`):

- ``id`` (str, required, unique): pseudonymous record id.
- ``image`` (str): path of the image file; relative paths are relative to the manifest's folder. medssl writes
  it to the private map ``<manifest>.private.jsonl`` (:mod:`medssl.data.private_map`), never into the manifest,
  and merges it back on reading; a manifest line may hold it only in manifests written by hand or by older
  versions. Every record read has one.
- ``frame``, ``slice``, ``axis`` (int >= 0 or null): frame of a multi-frame object, slice index and axis of a
  volume.
- ``label`` (str or null).
- ``patient_id``, ``study_id``, ``series_id``, ``lesion_id`` (str or null): pseudonyms, never raw identifiers.
- ``modality``, ``photometric`` (str or null): DICOM Modality and PhotometricInterpretation (or null).
- ``rows``, ``columns`` (int >= 1 or null).
- ``split`` (``train`` | ``val`` | ``test`` | ``pretrain`` or null).
- ``source`` (str, required): reader kind, one of :data:`SOURCES`.
- ``burned_in`` (bool or null): DICOM BurnedInAnnotation (0028,0301).
- ``deidentified`` (bool or null): true when the ids are keyed pseudonyms made with a secret key of >= 128
  bits (:func:`medssl.data.deid.deidentification_status`).

Other keys are allowed and kept unchanged. Missing optional fields read as null. Labels are NFC-normalised
on reading (:func:`normalize_labels`). A manifest without records is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medssl.data.private_map import (
    PATH_FIELDS,
    private_map_path,
    read_private_map,
    split_private,
    write_private_map,
)
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
    "deidentified",
)
#: fields every record has once read (``image`` possibly from the private map)
REQUIRED_FIELDS: tuple[str, ...] = ("id", "image", "source")
#: fields every manifest line must hold (the JSON Schema's ``required``)
LINE_REQUIRED_FIELDS: tuple[str, ...] = ("id", "source")
SPLITS: tuple[str, ...] = ("train", "val", "test", "pretrain")
SOURCES: tuple[str, ...] = ("dicom", "nifti", "nrrd", "image", "npz", "wsi", "h5", "store")

_STRING_OR_NULL = ("label", "patient_id", "study_id", "series_id", "lesion_id", "modality", "photometric")
_INDEX_FIELDS = ("frame", "slice", "axis")
_SIZE_FIELDS = ("rows", "columns")

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://medssl.org/schemas/manifest-record.schema.json",
    "title": "medssl manifest record (one line of a JSONL manifest)",
    "type": "object",
    "required": list(LINE_REQUIRED_FIELDS),
    "additionalProperties": True,
    "properties": {
        "id": {"type": "string", "minLength": 1, "description": "pseudonymous record id, unique in the manifest"},
        "image": {
            "type": "string",
            "minLength": 1,
            "description": "image file path, relative to the manifest's folder; medssl keeps it in the private "
            "map <manifest>.private.jsonl and omits it here (only hand-written or older manifests hold it)",
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
        "deidentified": {"type": ["boolean", "null"],
                         "description": "true: ids are keyed pseudonyms (secret key >= 128 bits); false: they are not"},
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_problems(record: Any) -> list[str]:
    """Problems of one manifest line against the schema (:data:`MANIFEST_SCHEMA`; empty list when valid).

    ``image`` is optional here (it normally lives in the private map); :func:`validate_records` and
    :func:`read_manifest` require it of every complete record.
    """
    if not isinstance(record, Mapping):
        return [f"record is a {type(record).__name__}, not a JSON object"]
    problems = [f"missing required field '{name}'" for name in LINE_REQUIRED_FIELDS if name not in record]
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
    for name in ("burned_in", "deidentified"):
        value = record.get(name)
        if value is not None and not isinstance(value, bool):
            problems.append(f"field '{name}' must be true, false or null, got {value!r:.40}")
    return problems


def validate_records(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Schema problems of a list of records, each prefixed ``record N:`` (1-based), plus duplicate ids.

    Returns an empty list when every record is valid, has an ``image`` and a unique ``id``.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        problems.extend(f"record {number}: {p}" for p in record_problems(record))
        if isinstance(record, Mapping) and "image" not in record:
            problems.append(f"record {number}: missing required field 'image'")
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
    """Read and validate a JSONL manifest, merging its private map ``<manifest>.private.jsonl`` when present.

    Blank lines are ignored. Every record (after the merge) is checked against the schema; the first bad line
    raises :class:`MedsslError` naming the file and the 1-based line number. A record without ``image`` in
    both the manifest and the private map, and a manifest without records, are errors. Relative ``image``
    paths are resolved against the manifest's folder and returned as absolute strings. Missing optional
    fields become ``None``; labels are NFC-normalised (:func:`normalize_labels`).
    """
    path = Path(path)
    if not path.is_file():
        raise MedsslError("manifest not found", path)
    base = path.resolve().parent
    private = read_private_map(path)
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
        if isinstance(record, dict) and private is not None and record.get("id") in private.records:
            record.update(private.records[record["id"]])
        if isinstance(record, dict) and "image" not in record and isinstance(record.get("id"), str):
            where = (f"its private map {private.path.name} has no entry for it" if private is not None else
                     f"there is no private map {private_map_path(path).name} beside the manifest (copy it along)")
            raise MedsslError(f"line {number}: record {record['id']!r:.40} has no 'image' and {where}", path)
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
    if not records:
        raise MedsslError("empty manifest: it holds no records", path)
    return normalize_labels(records, path)


def normalize_labels(records: list[dict[str, Any]], where: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """NFC-normalise every string ``label`` of ``records`` in place (and return them).

    Two different labels that become equal (``"caf\\u00e9"`` and ``"cafe\\u0301"``) raise :class:`MedsslError`
    naming both (as escaped text), since they would otherwise silently count as one class or as two.
    """
    raw_of: dict[str, str] = {}
    for record in records:
        label = record.get("label")
        if not isinstance(label, str):
            continue
        normal = unicodedata.normalize("NFC", label)
        first = raw_of.setdefault(normal, label)
        if first != label:
            raise MedsslError(f"labels {ascii(first)} and {ascii(label)} differ only by Unicode normalisation "
                              "(NFC): make them one label", where)
        record["label"] = normal
    return records


def write_manifest(
    path: str | os.PathLike[str],
    records: Iterable[Mapping[str, Any]],
    *,
    private_files: Mapping[str, str] | None = None,
    private_dicomdirs: Mapping[str, Mapping[str, list[str]]] | None = None,
) -> None:
    """Write ``records`` as a JSONL manifest and their paths as its private map, both atomically.

    Records are validated first (a :class:`MedsslError` lists the first problems). The manifest holds every
    field except :data:`~medssl.data.private_map.PATH_FIELDS`; those go to ``<manifest>.private.jsonl``
    (mode 0600; paths inside the manifest's folder stored relative to it), together with ``private_files``
    and ``private_dicomdirs`` (see :func:`medssl.data.private_map.write_private_map`). The map is written
    first, so a crash never leaves a manifest whose ids the map lacks.
    """
    path = Path(path)
    records = list(records)
    problems = validate_records(records)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MedsslError(f"refusing to write an invalid manifest: {shown}", path)
    public, private = split_private(normalize_record(r) for r in records)
    write_private_map(private_map_path(path), private, private_files, private_dicomdirs)
    with atomic_open(path, "w") as fh:
        for out in public:
            for name in PATH_FIELDS:
                out.pop(name, None)
            fh.write(json.dumps(out, ensure_ascii=False, default=_json_default) + "\n")


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
    if not records:
        return ["empty manifest: no records"]
    if check_files:
        missing = sorted({r["image"] for r in records if not os.path.exists(r["image"])})
        problems.extend(f"missing image file: {p}" for p in missing)
    present = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    allowed = None if labels is None else list(dict.fromkeys(unicodedata.normalize("NFC", lab) for lab in labels))
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
_LOCATION_FIELDS = ("frame", "slice", "axis", "index", "npz_split", "h5_key", "x", "y", "level", "tile_size",
                    "store_offset")


def _image_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a record reads: its image path plus every location field (so npz/h5/tile records are distinct)."""
    return (record["image"],) + tuple(record.get(name) for name in _LOCATION_FIELDS)


def _describe(key: tuple[Any, ...]) -> str:
    image, *values = key
    extra = "".join(f" {n} {v}" for n, v in zip(_LOCATION_FIELDS, values) if v is not None)
    return f"{image}{extra}"
