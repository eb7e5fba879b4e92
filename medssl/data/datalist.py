"""Export a manifest as a MONAI datalist JSON (``monai.data.load_decathlon_datalist`` reads it).

Layout: ``{"labels": [sorted class names], "training": [...], "validation": [...], "test": [...]}`` plus a
``"pretrain"`` list when records have that split. Records with split ``train`` go to ``training`` (and so do
unassigned records, split null), ``val`` to ``validation``, ``test`` to ``test``. Each entry is the manifest
record (``image`` relative to the datalist's folder when inside it, so MONAI's default ``base_dir`` resolves
it) with ``label_index``, the label's position in ``labels`` (null for unlabelled records).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medssl.io import atomic_write_text

SPLIT_TO_DATALIST_KEY: dict[str | None, str] = {
    "train": "training",
    None: "training",
    "val": "validation",
    "test": "test",
    "pretrain": "pretrain",
}


def records_to_datalist(records: Iterable[Mapping[str, Any]], base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The datalist dict for ``records`` with image paths relative to ``base_dir`` when inside it."""
    records = list(records)
    labels = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    index = {label: i for i, label in enumerate(labels)}
    base = Path(os.path.abspath(base_dir))
    datalist: dict[str, Any] = {"labels": labels, "training": [], "validation": [], "test": []}
    for record in records:
        entry = dict(record)
        image = Path(os.path.abspath(str(entry["image"])))
        try:
            entry["image"] = image.relative_to(base).as_posix()
        except ValueError:
            entry["image"] = str(image)
        label = entry.get("label")
        entry["label_index"] = None if label is None else index[str(label)]
        datalist.setdefault(SPLIT_TO_DATALIST_KEY[entry.get("split")], []).append(entry)
    return datalist


def write_datalist(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Write the MONAI datalist of ``records`` to ``path`` atomically; returns the entry count per list."""
    datalist = records_to_datalist(records, Path(path).parent)
    atomic_write_text(path, json.dumps(datalist, indent=1, ensure_ascii=False) + "\n")
    return {key: len(value) for key, value in datalist.items() if key != "labels"}
