"""Export a manifest as a MONAI datalist JSON.

Layout: ``{"labels": [sorted class names], "training": [...], "validation": [...], "test": [...]}`` plus a
``"pretrain"`` list when records have that split. Records with split ``train`` go to ``training`` (and so do
unassigned records, split null), ``val`` to ``validation``, ``test`` to ``test``. Each entry is the manifest
record with ``label_index``, the label's position in ``labels`` (null for unlabelled records).

Like a manifest, the datalist holds no source path: the ``image`` paths go to its private map
``<datalist>.private.jsonl`` (mode 0600, :mod:`medssl.data.private_map`), and :func:`load_datalist` merges
them back (what ``monai.data.load_decathlon_datalist`` returns, plus the paths). With ``with_paths=True``
(``manifest export --with-paths``) the entries keep ``image`` (relative to the datalist's folder when inside
it, so MONAI's default ``base_dir`` resolves it) and the datalist itself is written private (mode 0600).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medssl.data.private_map import (
    private_map_path,
    read_private_map,
    split_private,
    write_private_map,
    write_private_text,
)
from medssl.errors import MedsslError
from medssl.io import atomic_write_text

SPLIT_TO_DATALIST_KEY: dict[str | None, str] = {
    "train": "training",
    None: "training",
    "val": "validation",
    "test": "test",
    "pretrain": "pretrain",
}


def records_to_datalist(records: Iterable[Mapping[str, Any]], base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The datalist dict for ``records`` with image paths (where records have one) relative to ``base_dir``
    when inside it."""
    records = list(records)
    labels = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    index = {label: i for i, label in enumerate(labels)}
    base = Path(os.path.abspath(base_dir))
    datalist: dict[str, Any] = {"labels": labels, "training": [], "validation": [], "test": []}
    for record in records:
        entry = dict(record)
        if entry.get("image") is not None:
            image = Path(os.path.abspath(str(entry["image"])))
            try:
                entry["image"] = image.relative_to(base).as_posix()
            except ValueError:
                entry["image"] = str(image)
        label = entry.get("label")
        entry["label_index"] = None if label is None else index[str(label)]
        datalist.setdefault(SPLIT_TO_DATALIST_KEY[entry.get("split")], []).append(entry)
    return datalist


def write_datalist(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]], *,
                   with_paths: bool = False) -> dict[str, int]:
    """Write the MONAI datalist of ``records`` to ``path`` atomically; returns the entry count per list.

    Without ``with_paths`` the entries have no ``image`` and the paths go to ``<path>.private.jsonl``; with it
    the datalist keeps them and is itself written with mode 0600.
    """
    records = list(records)
    if with_paths:
        datalist = records_to_datalist(records, Path(path).parent)
        write_private_text(Path(path), json.dumps(datalist, indent=1, ensure_ascii=False) + "\n")
    else:
        public, private = split_private(records)
        write_private_map(private_map_path(path), private)
        datalist = records_to_datalist(public, Path(path).parent)
        atomic_write_text(path, json.dumps(datalist, indent=1, ensure_ascii=False) + "\n")
    return {key: len(value) for key, value in datalist.items() if key != "labels"}


def load_datalist(path: str | os.PathLike[str], data_list_key: str = "training") -> list[dict[str, Any]]:
    """Entries of list ``data_list_key`` of a datalist with absolute ``image`` paths (merged from its private
    map, or joined to the datalist's folder as ``monai.data.load_decathlon_datalist`` does)."""
    path = Path(path)
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedsslError(f"not a readable datalist JSON ({type(exc).__name__})", path) from None
    if not isinstance(datalist, dict) or not isinstance(datalist.get(data_list_key, []), list):
        raise MedsslError(f"no list {data_list_key!r} in the datalist", path)
    private = read_private_map(path)
    entries = []
    for entry in datalist.get(data_list_key, []):
        entry = dict(entry)
        if private is not None and entry.get("id") in private.records:
            entry.update(private.records[entry["id"]])
        if "image" not in entry:
            raise MedsslError(f"entry {entry.get('id')!r:.40} has no image and no private map entry", path)
        entry["image"] = os.path.normpath(os.path.join(path.resolve().parent, entry["image"]))
        entries.append(entry)
    return entries
