"""PNG / JPEG / TIFF reader at native bit depth (8 or 16 bit, or float TIFF).

PNG and JPEG are decoded with Pillow (installed with matplotlib), TIFF with tifffile (which also handles
16-bit, tiled and compressed TIFF via imagecodecs). Palette images become RGB, alpha is dropped, grayscale
stays one channel. The intensity range that later maps to [0, 1] is the full range of the integer dtype
(0-255, 0-65535) unless ``range_mode="minmax"``; for 16-bit files that hold 10-12-bit data (common for
X-ray exports) pass ``"minmax"`` or ``"percentile"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from medssl.errors import MedsslError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
RangeMode = Literal["dtype", "minmax", "percentile"]


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode == "LA":
            img = img.convert("L")
        elif img.mode == "1":
            img = img.convert("L")
        arr = np.asarray(img)
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # Pillow decodes 16-bit grayscale PNG as mode "I" (int32)
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        arr = tif.pages[0].asarray()
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return arr


def intensity_range(arr: np.ndarray, mode: RangeMode = "dtype", percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """(low, high) intensity range of an image: its dtype's full range, its min/max, or percentiles."""
    if mode == "dtype" and arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        return float(max(info.min, 0)), float(info.max)
    if mode == "percentile":
        low, high = np.percentile(arr, percentiles)
        return float(low), float(high)
    return float(arr.min()), float(arr.max())


def read_image_file(
    path: str | os.PathLike[str], *, range_mode: RangeMode = "dtype"
) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a PNG/JPEG/TIFF/BMP image.

    Returns:
        ``(array, (low, high))``: float32 ``(C, H, W)`` (C = 1 grayscale or 3 colour) in native units, and the
        intensity range that maps to [0, 1] (see the module docstring).
    """
    p = Path(path)
    if not p.is_file():
        raise MedsslError("image file not found", p)
    try:
        raw = _read_tiff(p) if p.suffix.lower() in (".tif", ".tiff") else _read_pil(p)
    except MedsslError:
        raise
    except Exception as exc:
        raise MedsslError(f"cannot decode image ({exc})", p) from exc
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.ndim != 3 or raw.shape[-1] not in (1, 3):
        raise MedsslError(f"unsupported image layout {raw.shape}: expected (H,W), (H,W,1) or (H,W,3)", p)
    rng = intensity_range(raw, range_mode)
    return np.ascontiguousarray(np.moveaxis(raw, -1, 0).astype(np.float32)), rng
