"""HDF5 patch arrays (PatchCamelyon layout): dataset ``h5_key`` of shape (N, H, W[, C]); one record = one row."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medssl.errors import MedsslError


def read_h5_image(
    path: str | os.PathLike[str], index: int, key: str = "x"
) -> tuple[np.ndarray, tuple[float, float]]:
    """Row ``index`` of dataset ``key`` as float32 ``(C, H, W)`` plus its dtype range (0-255 for uint8)."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise MedsslError("HDF5 file not found", p)
    try:
        with h5py.File(p, "r") as fh:
            if key not in fh:
                raise MedsslError(f"HDF5 dataset {key!r} missing; found {sorted(fh.keys())}", p)
            ds = fh[key]
            if not 0 <= int(index) < ds.shape[0]:
                raise MedsslError(f"index {index} out of range for dataset {key!r} of {ds.shape[0]} rows", p)
            img = np.asarray(ds[int(index)])
    except MedsslError:
        raise
    except Exception as exc:
        raise MedsslError(f"cannot read HDF5 ({exc})", p) from exc
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    top = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else float(img.max())
    return np.ascontiguousarray(img.astype(np.float32)), (0.0 if img.dtype.kind in "ui" else float(img.min()), top)
