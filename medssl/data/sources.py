"""Turn a path into manifest records: a ``.jsonl`` manifest, a MedMNIST ``.npz``, a whole-slide image, a
NIfTI/NRRD volume, a single image, or a folder of images (one subfolder per class).

Record ids are stable: a hash of the path relative to the folder given (plus the index inside the file for
npz rows, volume slices and slide tiles), so the same data always gets the same ids wherever it is stored.
Since file and folder names of exports carry names, birth dates and MRNs, the hash is keyed when
``MEDSSL_DEID_KEY`` is set (HMAC-SHA-256, :class:`medssl.data.deid.Pseudonymizer`; records then carry
``"deidentified": true``); without a key it is a plain SHA-256, which anyone can confirm by guessing the path,
and records carry ``"deidentified": false``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.deid import Pseudonymizer, folder_pseudonymizer
from medssl.data.manifest import normalize_labels, read_manifest
from medssl.data.readers.image import IMAGE_SUFFIXES
from medssl.data.readers.load import infer_source
from medssl.data.readers.npz import NPZ_SPLITS, npz_split_info
from medssl.data.readers.volume import ITK_SUFFIXES, load_ras_volume
from medssl.data.readers.wsi import list_tile_records
from medssl.data.store.layout import INDEX_NAME, MANIFEST_NAME
from medssl.errors import MedsslError

FOLDER_SUFFIXES: frozenset[str] = IMAGE_SUFFIXES | {".dcm"}


def stable_id(prefix: str, *parts: object, pseudonymizer: Pseudonymizer | None = None) -> str:
    """``prefix-<16 hex>`` of the parts joined by ``:`` (relative paths in POSIX form): the keyed pseudonym
    ``pseudonymizer.pseudonym(prefix, text)`` (HMAC-SHA-256) when given, else the plain SHA-256 of the text."""
    text = ":".join(str(p) for p in parts)
    if pseudonymizer is not None:
        return str(pseudonymizer.pseudonym(prefix, text))
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _base_record(image: Path, source: str, rid: str, label: str | None = None,
                 pseudonymizer: Pseudonymizer | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "image": str(image),
        "frame": None,
        "slice": None,
        "axis": None,
        "label": label,
        "split": None,
        "source": source,
        "deidentified": pseudonymizer is not None and pseudonymizer.deidentified,
    }


def records_from_npz(path: Path, pseudonymizer: Pseudonymizer | None = None) -> list[dict[str, Any]]:
    """One record per image of each split present in a MedMNIST npz (``index``, ``npz_split``, ``label``)."""
    with np.load(path, allow_pickle=False) as npz:
        splits = [s for s in NPZ_SPLITS if f"{s}_images" in npz.files]
    if not splits:
        raise MedsslError("npz has no '<split>_images' array (MedMNIST layout: train/val/test_images)", path)
    records = []
    for split in splits:
        n, labels = npz_split_info(path, split)
        for i in range(n):
            rec = _base_record(path.resolve(), "npz", stable_id("npz", path.name, split, i, pseudonymizer=pseudonymizer),
                               pseudonymizer=pseudonymizer)
            label = None
            if labels is not None:
                value = labels[i]
                label = str(int(value)) if np.ndim(value) == 0 else ",".join(str(int(v)) for v in np.ravel(value))
            rec.update(label=label, split=split, index=i, npz_split=split)
            records.append(rec)
    return records


def records_from_volume(path: Path, axis: int = 2, pseudonymizer: Pseudonymizer | None = None) -> list[dict[str, Any]]:
    """One record per non-empty slice of a volume along RAS ``axis`` (default 2, axial)."""
    data, _ = load_ras_volume(os.fspath(path))
    nonempty = np.flatnonzero(np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1).any(axis=1))
    source = "nrrd" if path.name.lower().endswith(ITK_SUFFIXES) else "nifti"
    records = []
    for s in nonempty.tolist():
        rec = _base_record(path.resolve(), source, stable_id("vol", path.name, axis, s, pseudonymizer=pseudonymizer),
                           pseudonymizer=pseudonymizer)
        rec.update(slice=int(s), axis=axis)
        records.append(rec)
    return records


def records_from_folder(folder: Path, pseudonymizer: Pseudonymizer | None = None) -> list[dict[str, Any]]:
    """Records for every image below ``folder``: the first-level subfolder name is the label (None at the top).

    Ids are :func:`stable_id` of the relative path (keyed with ``pseudonymizer`` when given); labels are
    NFC-normalised (macOS file systems return decomposed names).
    """
    records = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in FOLDER_SUFFIXES:
                continue
            rel = p.relative_to(folder)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            rid = stable_id("img", rel.as_posix(), pseudonymizer=pseudonymizer)
            records.append(_base_record(p.resolve(), infer_source(name), rid, label, pseudonymizer))
    if not records:
        raise MedsslError(f"no images found (looked for {', '.join(sorted(FOLDER_SUFFIXES))})", folder)
    return normalize_labels(records, folder)


def records_from_path(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Manifest records for a path.

    - ``*.jsonl``: the manifest, validated (:func:`medssl.data.manifest.read_manifest`);
    - ``*.npz``: MedMNIST arrays, one record per image (``source="npz"``, ``index``, ``npz_split``);
    - ``*.svs`` (and other slide formats): tissue tiles of 224 px at level 0;
    - ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.mha``: one record per non-empty axial slice;
    - a prepared store (``medssl prepare``; a folder holding ``index.json``): its ``manifest.jsonl``;
    - an image file: one record; a folder: every image below it, labelled by first-level subfolder.

    Ids of inputs other than manifests are keyed with ``MEDSSL_DEID_KEY`` when it is set
    (:func:`medssl.data.deid.folder_pseudonymizer`; with a weak key records say not de-identified),
    plain hashes otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise MedsslError("path not found", p)
    if p.is_file() and p.name.lower().endswith(".jsonl"):
        return read_manifest(p)
    if p.is_dir() and (p / INDEX_NAME).is_file() and (p / MANIFEST_NAME).is_file():
        return read_manifest(p / MANIFEST_NAME)
    pz = folder_pseudonymizer()
    if p.is_dir():
        return records_from_folder(p, pz)
    name = p.name.lower()
    source = infer_source(name)
    if source == "npz":
        return records_from_npz(p, pz)
    if source == "wsi":
        return list_tile_records(p)
    if source in ("nifti", "nrrd"):
        return records_from_volume(p, pseudonymizer=pz)
    if source == "h5":
        raise MedsslError("HDF5 patch files need their dataset adapter (medssl.data.adapters.pcam)", p)
    return [_base_record(p.resolve(), source, stable_id("img", p.name, pseudonymizer=pz), pseudonymizer=pz)]
