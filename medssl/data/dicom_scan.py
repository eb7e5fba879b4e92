"""Header-only DICOM reads and folder walking for the ingest.

:func:`scan_file` reads a file's header up to, not into, its pixel data (pydicom ``read_partial`` with a stop
condition at the first pixel-data element and ``specific_tags``, so no PHI attribute is even decoded) and
returns a de-identified summary: identifiers come back only as keyed pseudonyms, coded values only when valid
(:mod:`medssl.data.dicom_values`), and an image only when its geometry matches its pixel data
(:mod:`medssl.data.dicom_geometry`).

:func:`walk_files` lists every file under a folder (any name, any depth) without following links out of it;
DICOMDIR references are resolved by :mod:`medssl.data.dicomdir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import Tag

from medssl.data.deid import Pseudonymizer, scrub_text
from medssl.data.dicom_geometry import geometry_problem
from medssl.data.dicom_values import valid_uid, validate_header_values

logger = logging.getLogger("medssl.data.dicom_scan")

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, FloatPixelData, DoubleFloatPixelData
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
MEDIA_STORAGE_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR (identified by its file meta)

# Attributes read from the header. No name, birth date, accession number, institution or physician is read.
HEADER_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "NumberOfFrames",
    "BodyPartExamined",
    "ViewPosition",
    "BurnedInAnnotation",
    "SeriesDescription",
)
_HEADER_TAGS = [Tag(k) for k in HEADER_KEYWORDS]

# SOP Class UID prefixes of objects that are not images (or not images to pretrain on).
NON_IMAGE_SOP_PREFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report / key object selection",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform (ECG, audio, hemodynamic)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "raw data / registration / segmentation / fiducials",
    "1.2.840.10008.5.1.4.1.1.67": "real world value mapping",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document (PDF, CDA, STL)",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT treatment record",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT plan",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT treatment record",
    "1.2.840.10008.5.1.4.1.1.481.7": "RT treatment summary record",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT plan",
    "1.2.840.10008.5.1.4.1.1.481.9": "RT treatment record",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR spectroscopy",
    "1.2.840.10008.5.1.4.1.1.68.": "surface model",
    "1.2.840.10008.5.1.4.1.1.77.1.5.": "ophthalmic non-image object",
    "1.2.840.10008.5.1.4.1.1.78.": "ophthalmic measurements",
    "1.2.840.10008.5.1.4.1.1.79.": "ophthalmic measurements",
    "1.2.840.10008.5.1.4.1.1.80.": "ophthalmic measurements",
    "1.2.840.10008.5.1.4.1.1.81.": "ophthalmic measurements",
    "1.2.840.10008.5.1.4.1.1.82.": "ophthalmic measurements",
    "1.2.840.10008.5.1.4.1.1.200.": "CT/XA protocol",
    "1.2.840.10008.5.1.4.34.": "RT second-generation non-image object",
    "1.2.840.10008.1.3.10": "media storage directory (DICOMDIR)",
}
# Modalities of non-image objects (RTIMAGE, a planar radiograph, is kept).
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {
        "SR", "KO", "PR", "SEG", "REG", "RWV", "FID", "DOC", "PLAN", "ECG", "EPS", "HD", "RESP", "AU", "BI",
        "IVOCT_MEAS", "M3D", "OPT_MEAS", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTTREAT", "RTSEGANN",
        "MPR", "LEN", "SMR", "TEXTUREMAP", "OSS", "STAIN",
    }
)
LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "survey", "scanogram")


_US_KEYWORDS = frozenset({"Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"})
_TAG_OF = {keyword: int(Tag(keyword)) for keyword in HEADER_KEYWORDS}


class _RawValues:
    """The top-level element values of a header, unconverted (``bytes``) where pydicom left them raw.

    One pass over ``Dataset.elements()`` (which does not convert values) instead of one pydicom lookup and
    value conversion per attribute: the header scan is dominated by such per-attribute costs.
    """

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.ds = ds
        self.values = {int(elem.tag): elem.value for elem in ds.elements()}
        self.little_endian = ds.original_encoding[1] is not False

    def get(self, keyword: str) -> Any:
        return self.values.get(_TAG_OF[keyword])


def _text(ds: _RawValues, keyword: str) -> str | None:
    """An ASCII-coded attribute (UI, CS, IS, DS, or a word-matched LO), stripped; ``None`` when absent/empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _identifier(ds: _RawValues, keyword: str) -> str | None:
    """A LO/UI identifier decoded with the dataset's character set (so pseudonyms match other tools')."""
    raw = ds.get(keyword)
    if isinstance(raw, bytes) and not raw.isascii():
        value = ds.ds.get(keyword)  # non-ASCII: decode with the Specific Character Set
    else:
        value = _text(ds, keyword)
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _int(ds: _RawValues, keyword: str) -> int | None:
    value = ds.get(keyword)
    if isinstance(value, bytes) and keyword in _US_KEYWORDS:
        if len(value) < 2:
            return None
        return int.from_bytes(value[:2], "little" if ds.little_endian else "big")
    if isinstance(value, bytes):
        value = value.decode("latin-1").split("\\")[0].strip().strip("\x00")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return None


def _decoded(value: Any) -> str:
    """A raw or converted UID value as a stripped string ('' when absent)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip().strip("\x00").strip()


def non_image_reason(sop_class: str | None, modality: str | None) -> str | None:
    """Why an object with this SOP Class UID / Modality is not an image to ingest, or ``None``."""
    if sop_class:
        for prefix, what in NON_IMAGE_SOP_PREFIXES.items():
            if sop_class.startswith(prefix):
                return f"non-image object ({what})"
    if modality and modality.upper() in NON_IMAGE_MODALITIES:
        return f"non-image object (modality {modality.upper()})"
    return None


@contextlib.contextmanager
def quiet_pydicom() -> Any:
    """Silence pydicom's value warnings while reading: they quote element values, which may be PHI."""
    pydicom_logger = logging.getLogger("pydicom")
    old_disabled, old_mode = pydicom_logger.disabled, pydicom_config.settings.reading_validation_mode
    pydicom_logger.disabled = True
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled = old_disabled
        pydicom_config.settings.reading_validation_mode = old_mode


def _read_header(path: str) -> tuple[pydicom.Dataset, dict[str, Any]]:
    """Parse the header of ``path`` up to the pixel data; returns the dataset and pixel-element facts."""
    pixel: dict[str, Any] = {}

    def stop_at_pixels(tag: Any, vr: str | None, length: int) -> bool:
        if int(tag) in PIXEL_TAGS:
            pixel["tag"] = int(tag)
            pixel["length"] = int(length)
            return True
        return False

    with open(path, "rb") as fh:
        try:
            ds = read_partial(fh, stop_when=stop_at_pixels, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            fh.seek(0)
            pixel.clear()
            ds = read_partial(fh, stop_when=stop_at_pixels, force=True, specific_tags=_HEADER_TAGS)
            if not ("SOPClassUID" in ds or "Modality" in ds or ("Rows" in ds and pixel)):
                raise InvalidDicomError("no DICOM preamble and no recognisable DICOM attributes") from None
        pixel["offset"] = fh.tell()
    return ds, pixel


def scan_file(path: str, pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    """Read one file's header and summarise it without PHI.

    Returns ``{"status": "image" | "skip" | "error", "reason": str | None, "header": dict | None}``. ``header``
    holds pseudonyms (``instance``, ``patient_id``, ``study_id``, ``series_id``) and technical attributes
    (modality, photometric, rows, columns, bits_stored, samples_per_pixel, number_of_frames, body_part,
    view_position, transfer_syntax, burned_in, derived, localizer); values are validated
    (:mod:`medssl.data.dicom_values`) and the geometry checked (:mod:`medssl.data.dicom_geometry`). An image's
    ``"warnings"`` lists the header values set to null, with reasons. Never raises for bad files.
    """
    with quiet_pydicom():
        return _scan_file(path, pseudonymizer)


def scan_files(paths: list[str], pseudonymizer: Pseudonymizer) -> list[dict[str, Any]]:
    """:func:`scan_file` over ``paths`` (same order) under one warning-silencing context (a worker's batch)."""
    with quiet_pydicom():
        return [_scan_file(path, pseudonymizer) for path in paths]


def _scan_file(path: str, pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    try:
        ds, pixel = _read_header(path)
    except InvalidDicomError:
        return {"status": "error", "reason": "not a DICOM file", "header": None}
    except (OSError, EOFError) as exc:
        return {"status": "error", "reason": f"unreadable: {type(exc).__name__}: {scrub_text(str(exc))}", "header": None}
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file, reported with its reason
        return {"status": "error", "reason": f"unreadable DICOM header: {type(exc).__name__}: {scrub_text(str(exc))}",
                "header": None}
    try:
        return _summarise(path, ds, pixel, pseudonymizer)
    except Exception as exc:  # noqa: BLE001 - malformed values in an otherwise readable header
        return {"status": "error", "reason": f"malformed DICOM header: {type(exc).__name__}: {scrub_text(str(exc))}",
                "header": None}


def _summarise(path: str, dataset: pydicom.Dataset, pixel: dict[str, Any], pz: Pseudonymizer) -> dict[str, Any]:
    meta = getattr(dataset, "file_meta", None)
    ds = _RawValues(dataset)
    meta_values = {int(e.tag): e.value for e in meta.elements()} if meta is not None else {}
    transfer_syntax = _decoded(meta_values.get(0x00020010))
    meta_class = _decoded(meta_values.get(0x00020002))
    sop_class = _text(ds, "SOPClassUID") or meta_class or None
    values, warnings_ = validate_header_values(
        {k: _text(ds, k) for k in ("Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation",
                                   "ImageType")},
        extra_modalities=NON_IMAGE_MODALITIES,
    )
    modality, image_type = values["modality"], values["image_type"]
    series_description = (_text(ds, "SeriesDescription") or "").lower()
    burned = _text(ds, "BurnedInAnnotation")
    header = {
        "instance": pz.pseudonym("instance", _identifier(ds, "SOPInstanceUID")),
        "patient_id": pz.pseudonym("patient", _identifier(ds, "PatientID")),
        "study_id": pz.pseudonym("study", _identifier(ds, "StudyInstanceUID")),
        "series_id": pz.pseudonym("series", _identifier(ds, "SeriesInstanceUID")),
        "modality": modality,
        "photometric": values["photometric"],
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "bits_stored": _int(ds, "BitsStored"),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "samples_per_pixel": _int(ds, "SamplesPerPixel"),
        "number_of_frames": _int(ds, "NumberOfFrames") or 1,
        "body_part": values["body_part"],
        "view_position": values["view_position"],
        "transfer_syntax": transfer_syntax if valid_uid(transfer_syntax) else None,
        "burned_in": None if burned is None else burned.upper() == "YES",
        "derived": bool(image_type) and image_type[0] == "DERIVED",
        "localizer": "LOCALIZER" in image_type
        or any(word in series_description for word in LOCALIZER_WORDS),
    }
    if sop_class == MEDIA_STORAGE_DIRECTORY_SOP_CLASS:
        return {"status": "skip", "reason": "DICOMDIR (media storage directory; its referenced files are scanned)",
                "header": None}
    reason = non_image_reason(sop_class, modality)
    if reason:
        return {"status": "skip", "reason": reason, "header": header}
    if not pixel.get("tag"):
        return {"status": "skip", "reason": "no pixel data", "header": header}
    if not header["rows"] or not header["columns"]:
        return {"status": "error", "reason": "pixel data without valid Rows/Columns", "header": header}
    if header["number_of_frames"] < 1:
        return {"status": "error", "reason": "NumberOfFrames < 1", "header": header}
    length = pixel.get("length", 0)
    deflated = transfer_syntax == DEFLATED_TRANSFER_SYNTAX  # file offsets are not dataset offsets
    if not deflated and length != UNDEFINED_LENGTH and pixel.get("offset", 0) + 8 + length > os.path.getsize(path):
        return {"status": "error", "reason": "truncated file (pixel data shorter than declared)", "header": header}
    if length == 0:
        return {"status": "error", "reason": "empty pixel data", "header": header}
    if transfer_syntax and header["transfer_syntax"] is None:
        return {"status": "error", "reason": "invalid transfer syntax: the UID is not a valid UID", "header": header}
    problem = geometry_problem(path, header, pixel, os.path.getsize(path))
    if problem:
        return {"status": "error", "reason": problem, "header": header}
    return {"status": "image", "reason": None, "header": header, "warnings": warnings_}


def is_inside(path: str, root_real: str) -> bool:
    """True when the real path of ``path`` (all symbolic links resolved) is ``root_real`` or below it."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_files(root: str, exclude: Iterable[str] = (), outside_links: list[str] | None = None
               ) -> dict[str, tuple[int, int]]:
    """Every regular file under ``root`` (any name, any depth): ``{absolute path: (size, mtime_ns)}``, sorted.

    Hidden folders (``.name``), our own temporary files (``.name.tmp``) and paths in ``exclude`` (e.g. the
    manifest being written) are skipped. Symbolic links to files inside ``root`` are followed (a link to a
    file already listed, or to another link's target, is dropped); links whose target lies outside ``root``
    are not followed (nothing outside the export is opened) and are appended to ``outside_links``; linked
    folders are not entered. Uses ``os.scandir`` so that each file costs one ``stat`` call.
    """
    root = os.path.abspath(root)
    root_real = os.path.realpath(root)
    excluded = {os.path.realpath(p) for p in exclude} | {os.path.abspath(p) for p in exclude}
    files: dict[str, tuple[int, int]] = {}
    links: list[str] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not name.startswith("."):
                        pending.append(entry.path)
                elif (name.startswith(".") and name.endswith(".tmp")) or entry.path in excluded:
                    continue
                elif entry.is_symlink():
                    links.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    files[entry.path] = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue
    targets: set[str] = set()
    for link in sorted(links):
        real = os.path.realpath(link)
        if not is_inside(real, root_real):
            if outside_links is not None and os.path.isfile(real):
                outside_links.append(link)
            continue
        if real in files or real in targets or real in excluded or not os.path.isfile(real):
            continue
        targets.add(real)
        st = os.stat(real)
        files[link] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(files.items()))
