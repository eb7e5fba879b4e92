"""Whole-slide images (pyramidal TIFF / Aperio SVS) via tifffile: tile reading and tissue-tile listing.

Only the tiles of the TIFF page that overlap a requested region are read and decoded (JPEG/JPEG 2000/LZW via
imagecodecs), so a 100,000 px slide never has to fit in memory. Tissue detection: Otsu's threshold
(scikit-image) on the grayscale of the slide's smallest image (lowest pyramid level or the SVS thumbnail);
tissue is darker than the bright glass background.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from medssl.errors import MedsslError

WSI_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".scn")


def _open(path: str):
    import tifffile

    p = Path(path)
    if not p.is_file():
        raise MedsslError("slide file not found", p)
    try:
        return tifffile.TiffFile(p)
    except Exception as exc:
        raise MedsslError(f"cannot open slide as TIFF ({exc})", p) from exc


def slide_levels(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level of the slide's main image series (level 0 = full resolution)."""
    with _open(os.fspath(path)) as tif:
        return [tuple(int(v) for v in lvl.shape[:2]) for lvl in tif.series[0].levels]  # type: ignore[misc]


def _whole_page(path: str, level: int) -> np.ndarray:
    """Whole (untiled) page of a level, cached per (path, level, modification time)."""
    return _whole_page_cached(path, level, os.stat(path).st_mtime_ns)


@lru_cache(maxsize=4)
def _whole_page_cached(path: str, level: int, mtime_ns: int) -> np.ndarray:
    with _open(path) as tif:
        return tif.series[0].levels[level].asarray()


def read_region(
    path: str | os.PathLike[str], x: int, y: int, width: int, height: int, level: int = 0
) -> np.ndarray:
    """Pixels of a rectangle of one pyramid level, as uint8/uint16 ``(height, width, C)``.

    ``x, y`` are the top-left corner in that level's pixel grid; parts outside the slide are filled with
    white (255 / dtype max), the colour of empty glass.
    """
    key = os.fspath(path)
    with _open(key) as tif:
        levels = tif.series[0].levels
        if not 0 <= level < len(levels):
            raise MedsslError(f"level {level} out of range: slide has {len(levels)} level(s)", key)
        page = levels[level].pages[0] if hasattr(levels[level], "pages") else levels[level]
        page = page.keyframe if hasattr(page, "keyframe") else page
        h_img, w_img = int(page.imagelength), int(page.imagewidth)
        samples = int(page.samplesperpixel)
        fill = np.iinfo(page.dtype).max if page.dtype.kind in "ui" else 1.0
        out = np.full((height, width, samples), fill, dtype=page.dtype)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w_img), min(y + height, h_img)
        if x0 >= x1 or y0 >= y1:
            return out
        if not page.is_tiled:
            full = _whole_page(key, level)
            full = full[..., None] if full.ndim == 2 else full
            out[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1]
            return out
        tw, th = int(page.tilewidth), int(page.tilelength)
        tiles_across = -(-w_img // tw)
        fh = tif.filehandle
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * tiles_across + tx
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                tile = np.asarray(tile).reshape(th, tw, samples)
                gx0, gy0 = tx * tw, ty * th
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + tw), min(y1, gy0 + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
    return out


def read_wsi_tile(
    path: str | os.PathLike[str], x: int, y: int, tile_size: int, level: int = 0
) -> tuple[np.ndarray, tuple[float, float]]:
    """A square tile as float32 ``(C, tile_size, tile_size)`` and its dtype range (0-255 for 8-bit slides)."""
    region = read_region(path, int(x), int(y), int(tile_size), int(tile_size), int(level))
    if region.shape[-1] == 4:
        region = region[..., :3]
    top = float(np.iinfo(region.dtype).max) if region.dtype.kind in "ui" else float(region.max())
    return np.ascontiguousarray(np.moveaxis(region, -1, 0).astype(np.float32)), (0.0, top)


def _smallest_image(tif) -> np.ndarray:
    """The smallest RGB image of the slide: last pyramid level, or the SVS thumbnail if smaller."""
    candidates = [tif.series[0].levels[-1]]
    candidates += [s for s in tif.series[1:] if s.name.lower() == "thumbnail"]
    best = min(candidates, key=lambda s: int(np.prod(s.shape[:2])))
    return best.asarray()


def tissue_mask(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Boolean tissue mask at the slide's smallest resolution and Otsu's threshold on grayscale in [0, 1]."""
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu

    with _open(os.fspath(path)) as tif:
        thumb = _smallest_image(tif)
    if thumb.ndim == 3 and thumb.shape[-1] >= 3:
        gray = rgb2gray(thumb[..., :3])
    else:
        gray = np.squeeze(thumb).astype(np.float64)
        gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-12)
    threshold = float(threshold_otsu(gray))
    return gray < threshold, threshold


def list_tile_records(
    path: str | os.PathLike[str],
    *,
    tile_size: int = 224,
    level: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.5,
) -> list[dict]:
    """Records for the tissue tiles of a slide (non-overlapping by default).

    A tile is kept when at least ``min_tissue`` of its footprint on the tissue mask is tissue.

    Args:
        path: slide file.
        tile_size: tile side in pixels of ``level``.
        level: pyramid level to tile.
        stride: step between tiles (default ``tile_size``).
        min_tissue: minimum tissue fraction in [0, 1].

    Returns:
        Manifest records with ``source="wsi"``, ``image`` (absolute path), ``level``, ``x``, ``y``
        (top-left in the level's grid), ``tile_size``, ``tissue_fraction`` and a stable ``id``.
    """
    p = Path(path).resolve()
    levels = slide_levels(p)
    if not 0 <= level < len(levels):
        raise MedsslError(f"level {level} out of range: slide has {len(levels)} level(s)", p)
    height, width = levels[level]
    mask, _ = tissue_mask(p)
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    step = int(stride or tile_size)
    records = []
    for y in range(0, height - tile_size + 1, step):
        for x in range(0, width - tile_size + 1, step):
            my0, mx0 = int(y * sy), int(x * sx)
            my1 = max(int(np.ceil((y + tile_size) * sy)), my0 + 1)
            mx1 = max(int(np.ceil((x + tile_size) * sx)), mx0 + 1)
            frac = float(mask[my0:my1, mx0:mx1].mean())
            if frac < min_tissue:
                continue
            digest = hashlib.sha256(f"{p.name}:{level}:{x}:{y}:{tile_size}".encode()).hexdigest()[:16]
            records.append(
                {
                    "id": f"wsi-{digest}",
                    "image": str(p),
                    "source": "wsi",
                    "level": level,
                    "x": x,
                    "y": y,
                    "tile_size": tile_size,
                    "tissue_fraction": round(frac, 4),
                    "frame": None,
                    "slice": None,
                    "axis": None,
                    "label": None,
                }
            )
    return records
