"""``LoadRecordd``: one MONAI dictionary transform that reads any manifest record's pixels.

Dispatch on ``record["source"]`` (inferred from the file suffix when absent):

========  ==========================================  =====================================
source    reader                                      record keys used
========  ==========================================  =====================================
dicom     :func:`.dicom.read_dicom_frame`             ``frame``
nifti     :func:`.volume.read_volume_slice`           ``slice``, ``axis``, ``slice_mode``
nrrd      :func:`.volume.read_volume_slice`           ``slice``, ``axis``, ``slice_mode``
image     :func:`.image.read_image_file`              -
npz       :func:`.npz.read_npz_image`                 ``index``, ``npz_split`` (default train)
h5        :func:`.h5.read_h5_image`                   ``index``, ``h5_key`` (default ``x``)
wsi       :func:`.wsi.read_wsi_tile`                  ``x``, ``y``, ``tile_size``, ``level``
store     :func:`.store.read_store_record`            ``store_*`` (prepared manifest, see
                                                      :mod:`medssl.data.store`)
========  ==========================================  =====================================

Output: ``data[key]`` becomes a float32 numpy array ``(C, H, W)`` in native intensity units (C = 1 or 3;
3 for 2.5D volume slabs) and ``data[f"{key}_range"]`` the ``(low, high)`` intensities that the later scaling
(:class:`medssl.transforms.intensity.ScaleToUnitd`) maps to 0 and 1. The record's other keys pass through.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from medssl.data.readers.dicom import DEFAULT_PERCENTILES, WindowMode, read_dicom_frame
from medssl.data.readers.h5 import read_h5_image
from medssl.data.readers.image import IMAGE_SUFFIXES, RangeMode, read_image_file
from medssl.data.readers.npz import read_npz_image
from medssl.data.readers.volume import ITK_SUFFIXES, SliceMode, VolumeRange, read_volume_slice
from medssl.data.readers.wsi import read_wsi_tile
from medssl.errors import MedsslError

READ_SOURCES: tuple[str, ...] = ("dicom", "nifti", "nrrd", "image", "npz", "h5", "wsi", "store")


class RecordLoadError(MedsslError):
    """A record's pixels could not be read. ``str()`` is ``PATH: record 'ID' cannot be loaded (DETAIL)``.

    Attributes:
        record_id: the record's ``id``. detail: the reader's reason, without the path.
    """

    def __init__(self, reason: str, path: str | None = None, *, record_id: Any = None,
                 detail: str | None = None) -> None:
        super().__init__(reason, path)
        self.record_id = record_id
        self.detail = detail if detail is not None else reason


def record_load_error(record: Mapping[str, Any], key: str, exc: BaseException) -> RecordLoadError:
    """Wrap a reader's exception into a :class:`RecordLoadError` naming ``record["id"]`` and its file."""
    if isinstance(exc, RecordLoadError):
        return exc
    path = record.get(key)
    if isinstance(exc, MedsslError):
        detail = exc.reason
    else:
        text = " ".join(str(exc).split())[:300]
        detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return RecordLoadError(f"record {record.get('id')!r} cannot be loaded ({detail})",
                           path if isinstance(path, str) else None, record_id=record.get("id"), detail=detail)


def find_record_error(exc: BaseException | None) -> RecordLoadError | None:
    """The :class:`RecordLoadError` behind ``exc`` (MONAI wraps transform errors in ``RuntimeError``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RecordLoadError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def infer_source(path: str) -> str:
    """Reader kind from a file name: ``nifti``, ``nrrd``, ``npz``, ``h5``, ``wsi`` (.svs), ``image`` or ``dicom``."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "nrrd"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith((".svs", ".ndpi", ".scn")):
        return "wsi"
    if Path(name).suffix in IMAGE_SUFFIXES:
        return "image"
    return "dicom"


def read_record(
    record: Mapping[str, Any],
    key: str = "image",
    *,
    window: WindowMode = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    image_range: RangeMode = "dtype",
    volume_range: VolumeRange = "percentile",
    slice_mode: SliceMode = "2d",
) -> tuple[np.ndarray, tuple[float, float]]:
    """Read the pixels named by ``record[key]``; see the module docstring for keys and output."""
    path = record.get(key)
    if not isinstance(path, str) or not path:
        raise MedsslError(f"record {record.get('id')!r} has no {key!r} path")
    source = record.get("source") or infer_source(path)
    if source == "dicom":
        return read_dicom_frame(path, record.get("frame"), window=window, percentiles=percentiles)
    if source in ("nifti", "nrrd"):
        mode = record.get("slice_mode") or slice_mode
        return read_volume_slice(path, record.get("slice"), record.get("axis"), mode=mode, range_mode=volume_range)
    if source == "image":
        return read_image_file(path, range_mode=image_range)
    if source == "npz":
        if record.get("index") is None:
            raise MedsslError("npz record needs an 'index'", path)
        return read_npz_image(path, int(record["index"]), record.get("npz_split") or "train")
    if source == "h5":
        if record.get("index") is None:
            raise MedsslError("h5 record needs an 'index'", path)
        return read_h5_image(path, int(record["index"]), record.get("h5_key") or "x")
    if source == "wsi":
        if record.get("x") is None or record.get("y") is None:
            raise MedsslError("wsi record needs tile coordinates 'x' and 'y'", path)
        return read_wsi_tile(path, record["x"], record["y"], int(record.get("tile_size") or 224), int(record.get("level") or 0))
    if source == "store":  # a prepared manifest (medssl prepare): stored codes, range (0, 255 or 65535)
        from medssl.data.store.layout import read_store_record  # lazy: the store package imports this module

        return read_store_record(record)
    raise MedsslError(f"unknown source {source!r}: expected one of {', '.join(READ_SOURCES)}", path)


class LoadRecordd(MapTransform):
    """Read each key's image of a manifest record into a float32 ``(C, H, W)`` array in native units.

    Args:
        keys: record keys holding image paths (default ``("image",)``).
        window: DICOM VOI choice (``auto``: VOI LUT, else window centre/width, else percentile window;
            ``percentile``; ``minmax``).
        percentiles: DICOM percentile window in %, default (0.5, 99.5).
        image_range: PNG/JPEG/TIFF range (``dtype`` full range, ``minmax``, ``percentile``).
        volume_range: NIfTI/NRRD per-volume range (``percentile`` of non-zero voxels, or ``minmax``).
        slice_mode: volumes: ``2d`` one slice, ``2.5d`` three neighbouring slices as channels.
        allow_missing_keys: skip keys absent from the record.

    Adds ``f"{key}_range"`` = ``(low, high)`` for each key. A record that cannot be read raises
    :class:`RecordLoadError` naming its ``id`` and file (MONAI wraps it in ``RuntimeError``; see
    :func:`find_record_error`).
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable = ("image",),
        *,
        window: WindowMode = "auto",
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        image_range: RangeMode = "dtype",
        volume_range: VolumeRange = "percentile",
        slice_mode: SliceMode = "2d",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.options = {
            "window": window,
            "percentiles": tuple(percentiles),
            "image_range": image_range,
            "volume_range": volume_range,
            "slice_mode": slice_mode,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            try:
                array, rng = read_record(out, str(key), **self.options)
            except Exception as exc:  # noqa: BLE001 - any reader failure is named with its record
                raise record_load_error(out, str(key), exc) from exc
            out[key] = array
            out[f"{key}_range"] = rng
        return out
