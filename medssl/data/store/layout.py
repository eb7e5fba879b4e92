"""Prepared-store layout, pixel codec and zero-copy reader (see :mod:`medssl.data.store` for the overview).

Pixel codec (what one stored record holds). The reader's output ``x`` (float32 ``(C, H, W)`` in native units)
and its range ``(low, high)`` go through the deterministic part of the training pipeline that precedes any
channel handling:

1. ``u = clip((x - low) / (high - low), 0, 1)`` in float32 (exactly
   :func:`medssl.transforms.intensity.to_unit_range`; a degenerate range gives zeros);
2. resized, only when larger, so that the longer side is at most ``max_size_px``: bilinear, antialiased,
   ``align_corners=False`` (the filter of :func:`medssl.transforms.intensity.resize_shorter_side`), then
   clipped to [0, 1]; new size ``(max(1, round(H * s)), max(1, round(W * s)))`` with ``s = max_size_px /
   max(H, W)``; channel count kept (1 grayscale, 3 colour or 2.5D slab), except that a 3-channel image
   whose channels are identical (grayscale saved as RGB, e.g. most BUSI PNGs) is stored as its one channel,
   as :class:`~medssl.transforms.intensity.ScaleToUnitd` (``gray_if_equal``) hands it to training;
3. quantised to ``q = rint(u * L)``: ``uint8`` with ``L = 255`` when the source is 8-bit (``x`` integral,
   range (0, 255): PNG/JPEG, 8-bit slides, so the values are stored exactly), else ``uint16`` with
   ``L = 65535`` (12-16-bit DICOM and every float result: windowed DICOM, NIfTI/NRRD slices). Since ``u`` is
   bounded, 16-bit fixed point has a uniform step of 1.5e-5, finer than float16's 4.9e-4 near 1, at the same
   size; the rounding error is at most ``0.5 / L``.

The record's range becomes ``(0, L)``, so :class:`~medssl.transforms.intensity.ScaleToUnitd` maps the stored
codes back to ``u`` and everything after the reader runs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl.data.verify import pixel_problem
from medssl.errors import MedsslError

STORE_FORMAT = "medssl-prepared-store"
#: bump when the codec or the layout changes (part of every record key, so a new version re-prepares)
STORE_VERSION = 1
INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.jsonl"
ERRORS_NAME = "errors.jsonl"
JOURNAL_NAME = ".journal.jsonl"
LOCK_NAME = ".prepare.lock"
SHARD_DIR = "shards"
#: every record starts at a multiple of this many bytes in its shard (cache-line / SIMD alignment)
ALIGN_BYTES = 64
#: default longer side (px): 224-px views cut by RandomResizedCrop from a 320-px image need no upsampling for
#: crops down to (224/320)^2 = 49 % of a square image's area, and 4:3 images keep a 240-px shorter side
#: (>= 224, so the evaluation centre crop is never enlarged); our choice, sized for 224-px training.
DEFAULT_MAX_SIZE_PX = 320
#: default shard size (MB = 10^6 bytes): ~4,000 single-channel 320-px uint16 images per shard, a few files per
#: store, each far below any file-system limit
DEFAULT_SHARD_SIZE_MB = 1000
#: quantisation levels per dtype
LEVELS = {"uint8": 255, "uint16": 65535}
#: store-record fields (besides ``image`` = the shard file, relative to the store)
STORE_FIELDS = ("store_offset", "store_nbytes", "store_dtype", "store_shape", "store_range", "prepared_source")


def shard_name(number: int) -> str:
    """``shards/shard-00003.bin``: relative path of shard ``number`` inside a store."""
    return f"{SHARD_DIR}/shard-{number:05d}.bin"


def store_dir(path: str | os.PathLike[str]) -> Path | None:
    """The store folder when ``path`` is a store (or its ``manifest.jsonl``/``index.json``), else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name in (MANIFEST_NAME, INDEX_NAME):
        if (folder / INDEX_NAME).is_file():
            return folder
    return None


def to_unit(x: np.ndarray, low: float, high: float) -> torch.Tensor:
    """Step 1 of the codec: ``clip((x - low) / (high - low), 0, 1)`` as a float32 tensor (zeros if high <= low)."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if not high > low:
        return torch.zeros_like(t)
    return ((t - float(low)) / (float(high) - float(low))).clamp_(0.0, 1.0)


def resize_longer_side(t: torch.Tensor, max_size_px: int) -> torch.Tensor:
    """Step 2 of the codec: shrink (never enlarge) ``(C, H, W)`` so ``max(H, W) <= max_size_px``."""
    h, w = t.shape[-2:]
    if max(h, w) <= max_size_px:
        return t
    scale = max_size_px / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(t[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def store_dtype_for(x: np.ndarray, low: float, high: float) -> str:
    """``uint8`` for 8-bit sources (integral values, range (0, 255)), else ``uint16`` (see the codec)."""
    if float(low) == 0.0 and float(high) == 255.0 and x.size and float(x.min()) >= 0 and float(x.max()) <= 255:
        if np.array_equal(x, np.rint(x)):
            return "uint8"
    return "uint16"


def encode_pixels(x: np.ndarray, rng: tuple[float, float], max_size_px: int) -> np.ndarray:
    """The stored ``(C, H', W')`` uint8/uint16 codes of a reader output ``x`` with range ``rng`` (the codec)."""
    x = np.asarray(x)
    problem = pixel_problem(x)
    if problem:
        raise MedsslError(problem)
    if x.shape[0] == 3 and np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2]):
        x = x[:1]
    low, high = float(rng[0]), float(rng[1])
    dtype = store_dtype_for(x, low, high)
    unit = resize_longer_side(to_unit(x, low, high), int(max_size_px)).numpy()
    return np.ascontiguousarray(np.rint(unit * LEVELS[dtype]).astype(dtype))


def checksum(data: bytes | memoryview | np.ndarray) -> str:
    """Hex SHA-256 of a record's stored bytes (the per-record checksum of the index)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray)
                          else data).hexdigest()


def record_key(record: Mapping[str, Any], size_bytes: int, mtime_ns: int, params: Mapping[str, Any]) -> str:
    """Hex SHA-256 of what decides a record's stored pixels: its id, source kind and location fields, the source
    file's size (bytes) and modification time (ns), and the preprocessing ``params``. The path itself is not
    part of the key, so the key (which the store keeps) reveals nothing about folder names."""
    location = {name: record.get(name) for name in LOCATION_FIELDS}
    text = json.dumps({"id": record.get("id"), "source": record.get("source"), "location": location,
                       "size": int(size_bytes), "mtime_ns": int(mtime_ns), "params": dict(params)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: record fields that select pixels inside a source file (all readers)
LOCATION_FIELDS = ("frame", "slice", "axis", "slice_mode", "index", "npz_split", "h5_key", "x", "y", "level",
                   "tile_size")

_MAPS: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}


def _shard_map(path: str, end: int) -> np.ndarray:
    """A read-only memory map of a whole shard as a uint8 array, cached per process and re-opened when the file
    changed (a plain ndarray over ``mmap``: slicing it costs ~0.2 us, a ``numpy.memmap`` slice ~5 us)."""
    try:
        st = os.stat(path)
    except OSError:
        raise MedsslError("store shard not found (copy the whole store folder)", path) from None
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _MAPS.get(path)
    if hit is None or hit[0] != stamp:
        if st.st_size == 0:
            raise MedsslError("store shard is empty", path)
        with open(path, "rb") as fh:
            hit = (stamp, np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8))
        _MAPS[path] = hit
    if end > hit[1].shape[0]:
        raise MedsslError(f"record extends to byte {end} past the shard's end ({hit[1].shape[0]} bytes): "
                          "the store is truncated; run 'medssl manifest validate' on it", path)
    return hit[1]


def read_store_array(record: Mapping[str, Any]) -> tuple[np.ndarray, tuple[float, float]]:
    """Stored codes of a store record, zero-copy: a read-only ``(C, H, W)`` uint8/uint16 view into the
    memory-mapped shard (pages shared by every worker and rank on the machine) and the range ``(0, L)``.

    ``record["image"]`` is the shard's absolute path (as :func:`medssl.data.manifest.read_manifest` returns it).
    """
    path = record.get("image")
    try:
        offset, nbytes = int(record["store_offset"]), int(record["store_nbytes"])
        dtype = np.dtype(str(record["store_dtype"]))
        shape = tuple(int(v) for v in record["store_shape"])
        low, high = (float(v) for v in record["store_range"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MedsslError(f"store record {record.get('id')!r} lacks a valid {exc} field", path) from None
    if not isinstance(path, str) or dtype.name not in LEVELS or len(shape) != 3 \
            or nbytes != shape[0] * shape[1] * shape[2] * dtype.itemsize or offset < 0:
        raise MedsslError(f"store record {record.get('id')!r} has an inconsistent location", path)
    data = _shard_map(path, offset + nbytes)[offset:offset + nbytes]
    return data.view(dtype).reshape(shape), (low, high)


def read_store_record(record: Mapping[str, Any]) -> tuple[np.ndarray, tuple[float, float]]:
    """:func:`read_store_array` as the readers' contract: a float32 ``(C, H, W)`` copy and its range."""
    array, rng = read_store_array(record)
    return array.astype(np.float32), rng


def load_index(store: str | os.PathLike[str]) -> dict[str, Any]:
    """The store's ``index.json`` (format checked); :class:`MedsslError` naming the file otherwise."""
    path = Path(store) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedsslError("not a prepared store: index.json missing", path.parent) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsslError(f"unreadable store index ({type(exc).__name__})", path) from None
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT or not isinstance(index.get("records"), list):
        raise MedsslError(f"not a {STORE_FORMAT} index", path)
    if index.get("version") != STORE_VERSION:
        raise MedsslError(f"store version {index.get('version')!r}, this medssl reads {STORE_VERSION}: "
                          "prepare it again", path)
    return index
