"""DICOM pixel pipeline: decode one frame with pydicom and apply the display chain of DICOM PS3.3 C.11.

Order (each step only where the file asks for it):

1. decode (pydicom 3 decoders; JPEG baseline/lossless, JPEG-LS, JPEG 2000 and RLE go through the
   ``pylibjpeg`` plugins); ``YBR_FULL``/``YBR_FULL_422`` become RGB in the decoder, JPEG 2000 ``YBR_RCT``/
   ``YBR_ICT`` are returned as RGB by the codec;
2. ``PALETTE COLOR`` -> RGB through the palette LUTs (``pydicom.pixels.apply_color_lut``);
3. grayscale: modality LUT / rescale slope-intercept (``apply_modality_lut``), then the VOI stage, which sets the
   displayed intensity range: the file's VOI LUT, else its window centre/width (C.11.2.1.2, ``LINEAR``,
   ``LINEAR_EXACT`` or ``SIGMOID``), else a percentile window (default 0.5-99.5 %); ``window="percentile"``
   forces the percentile window and ``window="minmax"`` uses the frame's minimum and maximum;
4. ``MONOCHROME1`` inversion inside that range (so air is dark, bone bright, as in ``MONOCHROME2``).

The result keeps native units (no 8-bit quantisation): a float32 array ``(C, H, W)`` (C = 1 grayscale, 3 colour)
plus the ``(low, high)`` range that the later intensity scaling maps to [0, 1].
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medssl.errors import MedsslError

WindowMode = Literal["auto", "percentile", "minmax"]

DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DICOM element, as float."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def window_to_range(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply a DICOM window (PS3.3 C.11.2.1.2/3) and return values in [0, 1] with range (0, 1).

    Args:
        values: modality-LUT output (any shape).
        center, width: Window Center / Window Width (0028,1050)/(0028,1051).
        function: VOI LUT Function: ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.

    Computed in float32 at full resolution, in place on one float32 copy (``LINEAR``:
    ``(x - (c - 0.5)) / (w - 1) + 0.5`` as one multiply-add; the window clips, so it cannot move after the
    downsampling exactly; float64 was 3x slower for no visible difference: float32 resolves 1/2^24 of the window).
    """
    x = np.array(values, dtype=np.float32)  # a fresh copy: the caller's array is never modified
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        x -= np.float32(center)
        x *= np.float32(-4.0 / width)
        np.exp(x, out=x)
        x += np.float32(1.0)
        np.reciprocal(x, out=x)
    else:
        if function == "LINEAR_EXACT":
            if width <= 0:
                raise ValueError("LINEAR_EXACT window width must be > 0")
            scale, offset = 1.0 / width, -(center - width / 2.0) / width
        else:
            if width < 1:
                raise ValueError("LINEAR window width must be >= 1")
            scale, offset = 1.0 / (width - 1.0), 0.5 - (center - 0.5) / (width - 1.0)
        x *= np.float32(scale)
        x += np.float32(offset)
    np.clip(x, 0.0, 1.0, out=x)
    return x, (0.0, 1.0)


def _voi(
    gray: np.ndarray,
    ds: pydicom.Dataset,
    window: WindowMode,
    percentiles: tuple[float, float],
) -> tuple[np.ndarray, tuple[float, float]]:
    """VOI stage for one grayscale frame: returns (values, (low, high))."""
    if window == "auto":
        voi_seq = ds.get("VOILUTSequence")
        if voi_seq:
            lut_data = np.asarray(voi_seq[0].LUTData, dtype=np.float64)
            out = apply_voi(gray, ds, index=0).astype(np.float32)
            return out, (float(lut_data.min()), float(lut_data.max()))
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            return window_to_range(gray, _first(center), _first(width), str(ds.get("VOILUTFunction", "LINEAR")))
        window = "percentile"
    gray = gray.astype(np.float32)
    if window == "percentile":
        low, high = np.percentile(gray, percentiles)
    elif window == "minmax":
        low, high = gray.min(), gray.max()
    else:
        raise ValueError(f"unknown window mode {window!r}: use 'auto', 'percentile' or 'minmax'")
    return gray, (float(low), float(high))


def _read_dataset(path: str | os.PathLike[str]) -> pydicom.Dataset:
    """The whole dataset; files without the 128-byte preamble and ``DICM`` prefix (older exports) are read
    with ``force=True`` as the ingest's header scan reads them, so every record the ingest accepts can load."""
    try:
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise MedsslError(f"not a readable DICOM file ({exc})", path) from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta: use the encoding pydicom detected
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def read_dicom_frame(
    path: str | os.PathLike[str],
    frame: int | None = None,
    *,
    window: WindowMode = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Decode one frame of a DICOM image through the display pipeline described in the module docstring.

    Args:
        path: the DICOM file.
        frame: 0-based frame index for multi-frame objects; ``None`` = frame 0.
        window: VOI choice for grayscale images (``auto``: VOI LUT, else window, else percentile).
        percentiles: (low, high) percentiles in % for the percentile window.

    Returns:
        ``(array, (low, high))``: float32 ``(C, H, W)`` in native/windowed units, and the intensity range that
        maps to [0, 1]. Colour images: C = 3 and the range is the full range of their bit depth.
    """
    ds = _read_dataset(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedsslError("DICOM object has no pixel data", path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = 0 if frame is None else int(frame)
    if not 0 <= index < n_frames:
        raise MedsslError(f"frame {index} out of range: the object has {n_frames} frame(s)", path)
    try:
        arr = pixel_array(ds, index=index)
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise MedsslError(f"cannot decode pixel data (transfer syntax {getattr(ts, 'name', ts)}): {exc}", path) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else float(rgb.max())
        return np.moveaxis(rgb.astype(np.float32), -1, 0), (0.0, top)
    if samples == 3:
        bits = int(ds.get("BitsStored", 8))
        return np.moveaxis(arr.astype(np.float32), -1, 0), (0.0, float(2**bits - 1))
    if samples != 1:
        raise MedsslError(f"unsupported Samples per Pixel {samples}", path)

    gray = _modality_lut(arr, ds)
    values, (low, high) = _voi(gray, ds, window, percentiles)
    values = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1":
        if not values.flags.writeable or np.shares_memory(values, arr):
            values = values.copy()
        np.subtract(np.float32(low + high), values, out=values)  # in place, float32
    return values[None], (low, high)


def _modality_lut(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT stage: a Rescale Slope/Intercept is applied in float32 (pydicom's ``apply_modality_lut``
    computes it in float64; float32 is exact for stored integers below 2^24); a Modality LUT Sequence goes
    through pydicom; without either, the stored values are returned unchanged."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        return apply_modality_lut(arr, ds)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def count_frames(path: str | os.PathLike[str]) -> int:
    """Number of frames of a DICOM image, from its header only."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise MedsslError(f"not a readable DICOM file ({exc})", path) from exc
    return int(ds.get("NumberOfFrames", 1) or 1)
