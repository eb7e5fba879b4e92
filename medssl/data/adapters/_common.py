"""Shared helpers of the public-dataset adapters: record construction, pseudonyms, CSV and folder checks.

Every adapter turns a published layout into manifest records (docs/architecture.md, "Manifest"): one dict per
image with the standard fields (``id``, ``image``, ``frame``, ``slice``, ``axis``, ``label``, ``patient_id``,
``study_id``, ``series_id``, ``lesion_id``, ``modality``, ``photometric``, ``rows``, ``columns``, ``split``,
``source``, ``burned_in``) plus adapter-specific extra keys (``dataset``, ``preset``, ``labels``, ``index``,
``npz_split``, ``h5_key``, ...). Image paths are absolute. Grouping ids (patient, lesion) are never written raw:
they go through :class:`medssl.data.deid.Pseudonymizer`.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

logger = logging.getLogger("medssl.data.adapters")

#: File suffixes (lower case) that count as 2D images in folder layouts.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: PIL mode -> DICOM-style photometric interpretation recorded in the manifest.
_PHOTOMETRIC = {
    "1": "MONOCHROME2",
    "L": "MONOCHROME2",
    "LA": "MONOCHROME2",
    "I": "MONOCHROME2",
    "I;16": "MONOCHROME2",
    "I;16B": "MONOCHROME2",
    "I;16L": "MONOCHROME2",
    "F": "MONOCHROME2",
    "RGB": "RGB",
    "RGBA": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "P": "PALETTE COLOR",
}


@dataclass
class AdapterContext:
    """What every adapter needs besides the dataset root.

    Attributes:
        dataset: registry name of the adapter (recorded in each record's ``dataset`` key).
        pseudonymizer: object with ``pseudonym(kind: str, value: str) -> str`` (medssl.data.deid.Pseudonymizer).
        probe_images: open each image header (PIL, no pixel decode) to fill ``rows``/``columns``/``photometric``
            and to fail early on unreadable files. Default True.
        on_missing: ``"error"`` (default) raises MedsslError for a listed image that is absent; ``"skip"`` drops
            it and logs the count.
        skipped: names of files dropped with ``on_missing="skip"`` (filled by the adapters).
        namespaced: prefix grouping ids with the dataset name before hashing (default True), so that patient
            "1" of one public dataset and patient "1" of another never share a pseudonym. The ``csv`` adapter
            turns it off: a hospital's own patient ids then get the same pseudonyms as in ``medssl ingest``
            manifests built with the same key (kind ``patient`` of the raw id).
    """

    dataset: str
    pseudonymizer: Any
    probe_images: bool = True
    on_missing: str = "error"
    skipped: list[str] = field(default_factory=list)
    namespaced: bool = True

    def pseudonym(self, kind: str, value: object) -> str | None:
        """Keyed pseudonym of a raw grouping id (``None`` stays ``None``); ``kind`` is e.g. ``"patient"``."""
        if value is None or str(value).strip() == "":
            return None
        raw = str(value).strip()
        return self.pseudonymizer.pseudonym(kind, f"{self.dataset}:{raw}" if self.namespaced else raw)

    def record(
        self,
        image: Path,
        *,
        key: str,
        label: str | None,
        modality: str,
        preset: str,
        source: str = "image",
        split: str | None = None,
        patient: object = None,
        lesion: object = None,
        study: object = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """One manifest record with every standard field.

        Args:
            image: absolute path of the image (or container file for ``npz``/``h5`` sources).
            key: a string unique within the dataset (relative path, plus index for containers); it is
                pseudonymised into the record ``id``.
            label: class name as a string, or None.
            modality: DICOM-style modality code (``US``, ``DX``, ``MR``, ``SM``, ``XC``).
            preset: medssl transform preset (``ultrasound``, ``xray``, ``mri``, ``histology``, ``dermatoscopy``).
            patient, lesion, study: raw grouping ids; stored only as pseudonyms.
            extra: further keys kept as they are (``labels``, ``index``, ...).
        """
        rec: dict[str, Any] = {
            "id": self.pseudonymizer.pseudonym("record", f"{self.dataset}:{key}"),
            "image": str(image),
            "frame": None,
            "slice": None,
            "axis": None,
            "label": None if label is None else str(label),
            "patient_id": self.pseudonym("patient", patient),
            "study_id": self.pseudonym("study", study),
            "series_id": None,
            "lesion_id": self.pseudonym("lesion", lesion),
            "modality": modality,
            "photometric": None,
            "rows": None,
            "columns": None,
            "split": split,
            "source": source,
            "burned_in": None,
            "dataset": self.dataset,
            "preset": preset,
        }
        if source == "image" and self.probe_images:
            rec.update(probe_image(image))
        rec.update(extra)
        return rec

    def missing(self, path: Path, what: str) -> None:
        """Handle a listed file that is absent: raise (default) or remember it as skipped."""
        if self.on_missing == "skip":
            self.skipped.append(path.name)
            return
        raise MedsslError(f"{what} listed in the dataset is missing (pass --skip-missing, or on_missing='skip', "
                          "to drop such entries)", path)

    def report_skipped(self) -> None:
        """Log how many listed files were dropped."""
        if self.skipped:
            logger.warning("%s: %d listed images missing and skipped (first: %s)", self.dataset,
                           len(self.skipped), self.skipped[0])


def probe_image(path: Path) -> dict[str, Any]:
    """Header-only read of a 2D image: ``{"rows", "columns", "photometric"}``; MedsslError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MedsslError(f"not a readable image ({exc})", path) from exc
    return {"rows": int(height), "columns": int(width), "photometric": _PHOTOMETRIC.get(mode, mode)}


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise MedsslError naming it and what was expected."""
    if not path.is_dir():
        raise MedsslError(f"expected folder not found ({what})", path)
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise MedsslError naming it and what was expected."""
    if not path.is_file():
        raise MedsslError(f"expected file not found ({what})", path)
    return path


def first_existing(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``root/candidate`` that exists; MedsslError listing all candidates otherwise."""
    for name in candidates:
        if (root / name).exists():
            return root / name
    raise MedsslError(f"{what} not found: expected one of {', '.join(candidates)}", root)


def read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a CSV (or tab-separated) file as dicts (header stripped of spaces and BOM); checks columns.

    Raises:
        MedsslError: missing file, empty file, or a required column absent (the message lists them).
    """
    require_file(path, "CSV table")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
            fh.seek(0)
            delimiter = "\t" if "\t" in first and "," not in first else ","  # Dataverse serves .tab files
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise MedsslError("empty CSV file", path)
            names = [h.strip() for h in header]
            rows = [dict(zip(names, (v.strip() for v in row))) for row in reader if any(v.strip() for v in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedsslError(f"not a readable CSV file ({exc})", path) from exc
    missing = [c for c in required if c not in names]
    if missing:
        raise MedsslError(f"missing column(s) {', '.join(repr(c) for c in missing)}; found {names}", path)
    return rows


def list_images(folder: Path, *, recursive: bool = False, exclude: re.Pattern[str] | None = None) -> list[Path]:
    """Image files of ``folder`` sorted by path (hidden files skipped), optionally recursive.

    Args:
        exclude: files whose stem matches this pattern (``re.search``) are skipped, e.g. BUSI masks.
    """
    pattern = "**/*" if recursive else "*"
    out = []
    for path in sorted(folder.glob(pattern)):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if exclude is not None and exclude.search(path.stem):
            continue
        out.append(path)
    return out


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder`` sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_images(root: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map file stem -> path for every file under ``root`` (recursive) with one of ``suffixes``.

    When the same stem occurs twice (e.g. Kaggle mirrors that hold each folder in two spellings), the first
    path in sorted order wins.
    """
    found: dict[str, Path] = {}
    lower = tuple(s.lower() for s in suffixes)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in lower and not path.name.startswith(".") and path.stem not in found:
            found[path.stem] = path
    return found
