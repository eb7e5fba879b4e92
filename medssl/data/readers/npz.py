"""MedMNIST-style ``.npz`` reader: arrays ``{split}_images`` (N,H,W) or (N,H,W,3) uint8 and ``{split}_labels``.

Arrays are loaded once per (file, split) and kept in a small per-process cache, since a data loader reads
thousands of records from the same file.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from medssl.errors import MedsslError

NPZ_SPLITS: tuple[str, ...] = ("train", "val", "test")


def _load_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Arrays of one split, cached per (path, split, modification time) so a rewritten file is re-read."""
    p = Path(path)
    if not p.is_file():
        raise MedsslError("npz file not found", p)
    return _load_split_cached(path, split, p.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _load_split_cached(path: str, split: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray | None]:
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            key = f"{split}_images"
            if key not in npz.files:
                raise MedsslError(f"no array {key!r} in npz (has {sorted(npz.files)})", p)
            images = npz[key]
            labels = npz[f"{split}_labels"] if f"{split}_labels" in npz.files else None
    except MedsslError:
        raise
    except Exception as exc:
        raise MedsslError(f"cannot read npz ({exc})", p) from exc
    if images.ndim not in (3, 4):
        raise MedsslError(f"{split}_images has shape {images.shape}; expected (N,H,W) or (N,H,W,C)", p)
    return images, labels


def npz_split_info(path: str | os.PathLike[str], split: str) -> tuple[int, np.ndarray | None]:
    """Number of images and the label array (flattened to (N,) when one label per image) of one split."""
    images, labels = _load_split(os.fspath(path), split)
    if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return int(images.shape[0]), labels


def read_npz_image(
    path: str | os.PathLike[str], index: int, split: str = "train"
) -> tuple[np.ndarray, tuple[float, float]]:
    """One image of a MedMNIST npz as float32 ``(C, H, W)`` plus its dtype range (0-255 for uint8)."""
    images, _ = _load_split(os.fspath(path), split)
    if not 0 <= int(index) < images.shape[0]:
        raise MedsslError(f"index {index} out of range for {split}_images of {images.shape[0]} images", path)
    img = images[int(index)]
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    if images.dtype.kind in "ui":
        rng = (0.0, float(np.iinfo(images.dtype).max))
    else:
        rng = (float(images.min()), float(images.max()))
    return np.ascontiguousarray(img.astype(np.float32)), rng
