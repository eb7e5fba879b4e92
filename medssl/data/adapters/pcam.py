"""PatchCamelyon (Veeling et al. 2018): 327,680 96x96 H&E patches from Camelyon16 slides, binary label.

Layout (the Zenodo files, gunzipped)::

    ROOT/camelyonpatch_level_2_split_{train,valid,test}_x.h5   dataset "x": (N, 96, 96, 3) uint8
    ROOT/camelyonpatch_level_2_split_{train,valid,test}_y.h5   dataset "y": (N, 1, 1, 1) uint8
    ROOT/camelyonpatch_level_2_split_{train,valid,test}_meta.csv  (optional: coord_y, coord_x, tumor_patch,
        center_tumor_patch, wsi)

One record per patch: ``source="h5"``, ``image`` = the ``_x.h5`` path, ``index`` = row in dataset ``h5_key``
(``"x"``), ``label`` = ``"0"``/``"1"`` (tumour in the central 32x32 region), ``split`` = train/val/test
(``valid`` -> ``val``). With the meta CSV, the source slide (``wsi``) becomes the patient pseudonym
(Camelyon16 has one slide per patient in most cases).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.adapters._common import AdapterContext
from medssl.errors import MedsslError

PREFIX = "camelyonpatch_level_2_split_"
SPLITS = (("train", "train"), ("valid", "val"), ("test", "test"))


def _h5_dataset(path: Path, key: str) -> Any:
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        hint = " (gunzip the .h5.gz file first)" if path.with_name(path.name + ".gz").exists() else ""
        raise MedsslError(f"not a readable HDF5 file{hint} ({exc})", path) from exc
    if key not in fh:
        keys = sorted(fh.keys())
        fh.close()
        raise MedsslError(f"HDF5 dataset '{key}' missing; found {keys}", path)
    return fh


def _slides(meta: Path, n: int) -> list[str] | None:
    if not meta.is_file():
        return None
    with open(meta, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "wsi" not in rows[0]:
        raise MedsslError("meta CSV lacks the 'wsi' column", meta)
    if len(rows) != n:
        raise MedsslError(f"meta CSV has {len(rows)} rows but the HDF5 files hold {n} patches", meta)
    return [r["wsi"] for r in rows]


def adapt_pcam(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of every patch of each split whose ``_x.h5`` and ``_y.h5`` are present (at least one split)."""
    records: list[dict[str, Any]] = []
    found = 0
    for name, split in SPLITS:
        x_path, y_path = root / f"{PREFIX}{name}_x.h5", root / f"{PREFIX}{name}_y.h5"
        if not x_path.exists() and not y_path.exists():
            gz = [p for p in (x_path, y_path) if p.with_name(p.name + ".gz").exists()]
            if gz:
                raise MedsslError("only the gzipped file is present: gunzip it first", gz[0].with_name(gz[0].name + ".gz"))
            continue
        for p in (x_path, y_path):
            if not p.is_file():
                raise MedsslError(f"PatchCamelyon {name} split is incomplete: file missing", p)
        found += 1
        with _h5_dataset(x_path, "x") as fx:
            shape = fx["x"].shape
        with _h5_dataset(y_path, "y") as fy:
            labels = np.asarray(fy["y"]).reshape(-1)
        if len(shape) != 4 or shape[0] != labels.shape[0]:
            raise MedsslError(f"dataset 'x' has shape {shape}, expected (N, H, W, 3) with N = {labels.shape[0]}"
                              " labels", x_path)
        slides = _slides(root / f"{PREFIX}{name}_meta.csv", shape[0])
        photometric = "RGB" if shape[-1] == 3 else "MONOCHROME2"
        for i, y in enumerate(labels.tolist()):
            records.append(ctx.record(
                x_path, key=f"{name}:{i}", label=str(int(y)), modality="SM", preset="histology", source="h5",
                split=split, patient=None if slides is None else slides[i], index=i, h5_key="x",
                rows=int(shape[1]), columns=int(shape[2]), photometric=photometric,
            ))
    if not found:
        raise MedsslError(f"no PatchCamelyon files: expected {PREFIX}{{train,valid,test}}_{{x,y}}.h5", root)
    return records
