"""MedMNIST v2 (Yang et al. 2023) ``.npz`` files: keys ``{train,val,test}_{images,labels}``.

One record per image: ``source="npz"``, ``image`` = the ``.npz`` path, ``index`` = row in
``<npz_split>_images``, ``npz_split`` and ``split`` = train/val/test. ``label`` = the class index as a string
for single-label sets (labels shape (N,) or (N, 1)); for multi-label sets (ChestMNIST, labels (N, K)) ``labels``
lists the indices of the positive classes and ``label`` joins them with ``|`` (``""`` when none).
ROOT is the ``.npz`` file, or a folder holding exactly one. Array shapes are read from the ``.npy`` headers
inside the archive, so even the 224 px variants are not loaded into memory (only the labels are).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.adapters._common import AdapterContext
from medssl.errors import MedsslError

SPLITS = ("train", "val", "test")

#: MedMNIST subset name -> (DICOM-style modality, medssl preset); unknown names get (None, "generic").
SUBSETS = {
    "pathmnist": ("SM", "histology"),
    "chestmnist": ("DX", "xray"),
    "pneumoniamnist": ("DX", "xray"),
    "dermamnist": ("XC", "dermatoscopy"),
    "breastmnist": ("US", "ultrasound"),
    "bloodmnist": ("SM", "histology"),
    "tissuemnist": ("SM", "histology"),
    "octmnist": ("OPT", "generic"),
    "retinamnist": ("OP", "generic"),
    "organamnist": ("CT", "generic"),
    "organcmnist": ("CT", "generic"),
    "organsmnist": ("CT", "generic"),
}


def _find_npz(root: Path) -> Path:
    if root.is_file():
        return root
    if root.is_dir():
        found = sorted(root.glob("*.npz"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise MedsslError(f"several .npz files ({', '.join(p.name for p in found)}); name one", root)
    raise MedsslError("no MedMNIST .npz file (expected e.g. pneumoniamnist.npz)", root)


def _array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shape of each array in an ``.npz`` archive, from the ``.npy`` headers only."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, _ = read_header(fh)
                shapes[name[:-4]] = tuple(int(s) for s in shape)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MedsslError(f"not a readable .npz archive ({exc})", path) from exc
    return shapes


def _subset(path: Path) -> tuple[str | None, str]:
    stem = path.stem.lower()
    for name, value in SUBSETS.items():
        if stem.startswith(name):
            return value
    return None, "generic"


def adapt_medmnist(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of every image of each split present in the archive (at least one split required)."""
    path = _find_npz(root)
    shapes = _array_shapes(path)
    modality, preset = _subset(path)
    present = [s for s in SPLITS if f"{s}_images" in shapes or f"{s}_labels" in shapes]
    if not present:
        raise MedsslError(f"no MedMNIST arrays: expected keys {{train,val,test}}_{{images,labels}}, "
                          f"found {sorted(shapes)}", path)
    records: list[dict[str, Any]] = []
    with np.load(path) as archive:
        for split in present:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in shapes:
                    raise MedsslError(f"array '{key}' missing", path)
            shape = shapes[f"{split}_images"]
            labels = np.asarray(archive[f"{split}_labels"])
            if labels.shape[0] != shape[0] or labels.ndim > 2 or len(shape) < 3:
                raise MedsslError(f"'{split}_images' {shape} and '{split}_labels' {labels.shape} do not match "
                                  "(expected (N, H, W[, C]) and (N[, K]))", path)
            labels = labels.reshape(shape[0], -1)
            rgb = len(shape) == 4 and shape[-1] == 3
            rows, cols = (shape[1], shape[2]) if rgb or len(shape) == 3 else (shape[-2], shape[-1])
            multi = labels.shape[1] > 1
            for i in range(shape[0]):
                extra: dict[str, Any] = {}
                if multi:
                    positives = [str(k) for k in np.flatnonzero(labels[i])]
                    label, extra["labels"] = "|".join(positives), positives
                else:
                    label = str(int(labels[i, 0]))
                if len(shape) == 4 and not rgb:
                    extra["depth"] = int(shape[1])
                records.append(ctx.record(
                    path, key=f"{path.name}:{split}:{i}", label=label, modality=modality, preset=preset,
                    source="npz", split=split, index=i, npz_split=split, rows=int(rows), columns=int(cols),
                    photometric="RGB" if rgb else "MONOCHROME2", **extra,
                ))
    return records
