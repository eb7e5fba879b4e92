"""Generic layouts: one folder per class, and a CSV table plus an image folder.

Folder per class::

    ROOT/<class>/**/*.{png,jpg,jpeg,tif,tiff,bmp}
    or ROOT/{train,val,test}/<class>/...   (also ``valid``/``validation``/``training``/``testing``)

CSV + folder: the user names the file column, the label column and optionally a group column (patient or
lesion id, pseudonymised) and a split column; file names are resolved against ``image_root`` (default: the
CSV's folder) and may lack their extension (``suffix`` is then appended).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, list_images, read_csv, require_dir, subfolders
from medssl.errors import MedsslError

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test", "pretrain": "pretrain"}


def _class_folder_records(base: Path, split: str | None, ctx: AdapterContext, modality: str | None,
                          preset: str) -> list[dict[str, Any]]:
    classes = subfolders(base)
    if not classes:
        raise MedsslError("no class sub-folders (expected ROOT/<class>/<images>)", base)
    records = []
    for cls_dir in classes:
        for path in list_images(cls_dir, recursive=True):
            key = path.relative_to(_key_root(base, split)).as_posix()
            records.append(ctx.record(path, key=key, label=cls_dir.name, modality=modality, preset=preset,
                                      split=split))
    return records


def _key_root(base: Path, split: str | None) -> Path:
    """The dataset root a record key is relative to (the parent of a split folder)."""
    return base.parent if split is not None else base


def adapt_folder(root: Path, ctx: AdapterContext, *, modality: str | None = None,
                 preset: str = "generic") -> list[dict[str, Any]]:
    """Records of a folder-per-class tree, optionally under split folders; ``label`` = class folder name."""
    require_dir(root, "dataset root")
    tops = subfolders(root)
    if tops and all(t.name.lower() in SPLIT_NAMES for t in tops):
        records = []
        for top in tops:
            records.extend(_class_folder_records(top, SPLIT_NAMES[top.name.lower()], ctx, modality, preset))
    else:
        records = _class_folder_records(root, None, ctx, modality, preset)
    if not records:
        raise MedsslError("no images found in the class folders", root)
    return records


def adapt_csv(root: Path, ctx: AdapterContext, *, csv_path: str | Path | None = None, image_column: str,
              label_column: str | None = None, group_column: str | None = None, group_kind: str = "patient",
              split_column: str | None = None, image_root: str | Path | None = None, suffix: str = "",
              modality: str | None = None, preset: str = "generic") -> list[dict[str, Any]]:
    """Records of a CSV table naming the images.

    Args:
        root: the CSV file, or a folder holding it (then ``csv_path`` names it, relative to ``root``).
        image_column: column holding the image file name or relative path.
        label_column: column holding the class label (None: unlabelled).
        group_column: column holding the grouping id; stored as the ``group_kind`` pseudonym
            (``"patient"`` -> ``patient_id``, ``"lesion"`` -> ``lesion_id``, ``"study"`` -> ``study_id``).
        split_column: column holding train/val/test (also ``valid``, ``training``, ``testing``); empty = null.
        image_root: folder the file names are relative to (default: the CSV's folder).
        suffix: extension appended to file names that have none (e.g. ``".png"``).
    """
    if group_kind not in ("patient", "lesion", "study"):
        raise MedsslError(f"group_kind must be patient, lesion or study, not {group_kind!r}")
    table = Path(root) / csv_path if csv_path is not None else Path(root)
    if table.is_dir():
        raise MedsslError("name the CSV file (csv_path) inside this folder", table)
    required = [c for c in (image_column, label_column, group_column, split_column) if c]
    rows = read_csv(table, required)
    base = Path(image_root) if image_root is not None else table.parent
    if not base.is_absolute() and image_root is not None:
        base = table.parent / base
    records = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        name = row[image_column]
        if not name:
            raise MedsslError(f"line {number}: empty {image_column!r}", table)
        if suffix and not Path(name).suffix:
            name += suffix
        if name in seen:
            raise MedsslError(f"line {number}: image {name!r} already listed on line {seen[name]}", table)
        seen[name] = number
        path = base / name
        if not path.is_file():
            ctx.missing(path, f"image (CSV line {number})")
            continue
        split = None
        if split_column and row[split_column]:
            split = SPLIT_NAMES.get(row[split_column].lower())
            if split is None:
                raise MedsslError(f"line {number}: unknown split {row[split_column]!r} in {split_column!r}", table)
        group = {group_kind: row[group_column]} if group_column else {}
        label = row[label_column] if label_column and row[label_column] != "" else None
        records.append(ctx.record(path.resolve(), key=name, label=label, modality=modality,
                                  preset=preset, split=split, **group))
    ctx.report_skipped()
    if not records:
        raise MedsslError("the CSV lists no images", table)
    return records
