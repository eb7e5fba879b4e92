"""3D volume reader (NIfTI via nibabel; NRRD/MHA/MHD via SimpleITK) with reorientation to RAS and slice sampling.

Every volume is brought to the closest canonical RAS orientation first (``nibabel.as_closest_canonical``;
SimpleITK images are converted from their LPS direction/spacing/origin to a RAS affine), so array axis 0 runs
Left->Right, axis 1 Posterior->Anterior and axis 2 Inferior->Superior, whatever the file's storage order. ``axis`` therefore means 0 = sagittal, 1 = coronal, 2 = axial planes, and a given
``(axis, slice)`` shows the same anatomy for files that store the same scan in different orders.

Sampling: ``mode="2d"`` gives one slice ``(1, H, W)``; ``mode="2.5d"`` gives the slice and its two neighbours as
channels ``(3, H, W)`` (edge slices repeat). Intensities stay in native units; the range that later maps to
[0, 1] is computed per volume (default: 0.5-99.5 percentiles of the non-zero voxels, the usual MRI
normalisation, so all slices of one volume share one scale).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from medssl.errors import MedsslError

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
SliceMode = Literal["2d", "2.5d"]
VolumeRange = Literal["percentile", "minmax"]


def _itk_to_nifti(path: Path) -> nib.Nifti1Image:
    """Read a volume with SimpleITK and wrap it as a NIfTI image with the equivalent RAS affine."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3:
        raise MedsslError(f"expected a 3D volume, got {img.GetDimension()}D", path)
    data = sitk.GetArrayFromImage(img)  # (z, y, x)[, components]
    if data.ndim == 4:
        data = data[..., 0]
    data = np.transpose(data, (2, 1, 0))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    affine[:2, :] *= -1.0  # LPS (ITK) -> RAS (NIfTI)
    return nib.Nifti1Image(data, affine)


def load_ras_volume(path: str) -> tuple[np.ndarray, tuple[str, str, str]]:
    """Load a 3D volume reoriented to RAS; cached for the last two files (keyed by path and modification time).

    Returns:
        ``(data, codes)``: float32 array (X, Y, Z) in RAS order and the axis codes of the file as stored.
    """
    p = Path(path)
    if not p.is_file():
        raise MedsslError("volume file not found", p)
    return _load_ras_cached(os.fspath(path), p.stat().st_mtime_ns)


@lru_cache(maxsize=2)
def _load_ras_cached(path: str, mtime_ns: int) -> tuple[np.ndarray, tuple[str, str, str]]:
    p = Path(path)
    name = p.name.lower()
    try:
        img = _itk_to_nifti(p) if name.endswith(ITK_SUFFIXES) else nib.load(str(p))
        codes = nib.aff2axcodes(img.affine)
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except MedsslError:
        raise
    except Exception as exc:
        raise MedsslError(f"cannot read volume ({exc})", p) from exc
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise MedsslError(f"expected a 3D volume, got shape {data.shape}", p)
    return data, codes


def volume_range(data: np.ndarray, mode: VolumeRange = "percentile", percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """Per-volume intensity range: percentiles of the non-zero voxels (all voxels if none), or min/max."""
    if mode == "minmax":
        return float(data.min()), float(data.max())
    nonzero = data[data != 0]
    low, high = np.percentile(nonzero if nonzero.size else data, percentiles)
    return float(low), float(high)


@lru_cache(maxsize=4)
def _cached_range(path: str, mode: str, mtime_ns: int) -> tuple[float, float]:
    return volume_range(load_ras_volume(path)[0], mode)  # type: ignore[arg-type]


def read_volume_slice(
    path: str | os.PathLike[str],
    slice_index: int | None = None,
    axis: int | None = None,
    *,
    mode: SliceMode = "2d",
    range_mode: VolumeRange = "percentile",
) -> tuple[np.ndarray, tuple[float, float]]:
    """One RAS slice (or 2.5D slab) of a volume.

    Args:
        path: NIfTI/NRRD/MHA file.
        slice_index: index along ``axis`` in the RAS-reoriented volume; ``None`` = the middle slice.
        axis: 0 sagittal, 1 coronal, 2 axial (default 2), in RAS space.
        mode: ``"2d"`` -> (1, H, W); ``"2.5d"`` -> (3, H, W) with slices s-1, s, s+1.
        range_mode: per-volume range, see :func:`volume_range`.

    Returns:
        ``(array, (low, high))``: float32 slice(s) with the two remaining RAS axes as (H, W) in increasing order,
        and the per-volume intensity range.
    """
    key = os.fspath(path)
    data, _ = load_ras_volume(key)
    ax = 2 if axis is None else int(axis)
    if ax not in (0, 1, 2):
        raise MedsslError(f"axis must be 0, 1 or 2, not {axis}", path)
    n = data.shape[ax]
    s = n // 2 if slice_index is None else int(slice_index)
    if not 0 <= s < n:
        raise MedsslError(f"slice {s} out of range along axis {ax} (size {n})", path)
    if mode == "2d":
        indices = [s]
    elif mode == "2.5d":
        indices = [max(s - 1, 0), s, min(s + 1, n - 1)]
    else:
        raise ValueError(f"unknown slice mode {mode!r}: use '2d' or '2.5d'")
    # basic indexing (a view), not np.take: np.take along an axis of the F-ordered RAS array costs ~0.1 s a slice
    slab = np.stack([data[(slice(None),) * ax + (i,)] for i in indices], axis=0)
    return np.ascontiguousarray(slab, dtype=np.float32), _cached_range(key, range_mode, os.stat(key).st_mtime_ns)


def volume_shape(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Shape (X, Y, Z) of the RAS-reoriented volume."""
    return tuple(load_ras_volume(os.fspath(path))[0].shape)  # type: ignore[return-value]
