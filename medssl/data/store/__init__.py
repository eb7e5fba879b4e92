"""Prepared image store: every record decoded once, read back zero-copy by training, evaluation and bundles.

``medssl prepare MANIFEST -o STORE`` (:func:`prepare_store`) reads each record through the training reader
(:class:`~medssl.data.readers.load.LoadRecordd` with its default options) and the deterministic intensity and
size steps of the codec (:mod:`medssl.data.store.layout`: scale to [0, 1], longer side <= ``max_size_px``,
uint8/uint16 codes), and writes::

    STORE/
      shards/shard-00000.bin ...  raw C-order codes, each record 64-byte aligned (memory-mapped by readers)
      index.json                  format, version, params, shards and one entry per record:
                                  {id, key, shard, offset, nbytes, dtype, shape, sha256}
      manifest.jsonl              the source records (ids, labels, splits, patient/lesion ids ...) with
                                  source "store", image = the shard (relative), store_* location fields;
                                  no source paths (the source's private map is read, never copied)
      errors.jsonl                {id, key, error} of records that failed to decode (path-free reasons)

Any command reads ``STORE/manifest.jsonl`` like any manifest; :class:`LoadRecordd` dispatches ``source
"store"`` to :func:`read_store_record`.

Public API (other modules rely on these names):

- :func:`prepare_store` ``(manifest, store, *, max_size_px=320, workers=None, shard_size_mb=1000,
  progress=True, commit_every_records=64, on_record=None) -> summary dict``; :func:`format_prepare_summary`.
- :func:`read_store_array` ``(record) -> (read-only (C, H, W) uint8/uint16 view, (0, L))``: zero-copy codes
  for lean per-sample paths (``u = codes / L``); :func:`read_store_record`: float32 copy (the readers' contract).
- :func:`is_store_record` ``(record) -> bool``; :func:`store_dir` ``(path) -> Path | None``.
- :func:`validate_store` ``(path, *, checksums=True, progress=False) -> list[str]``.
- :func:`load_index`, :func:`encode_pixels`, :func:`resize_longer_side`, :data:`DEFAULT_MAX_SIZE_PX`,
  :data:`DEFAULT_SHARD_SIZE_MB`, :data:`LEVELS`.

Container choice (measured by ``benchmarks/prepare_throughput.py``; docs/prepared_store.md): plain shards read
through ``numpy.memmap`` beat HDF5 (h5py) and LMDB on random single-record reads and need no per-process open
handle that breaks across ``fork``; the page cache is shared by every DataLoader worker and torchrun rank.
"""

from collections.abc import Mapping
from typing import Any

from medssl.data.store.layout import (
    DEFAULT_MAX_SIZE_PX,
    DEFAULT_SHARD_SIZE_MB,
    LEVELS,
    encode_pixels,
    load_index,
    read_store_array,
    read_store_record,
    resize_longer_side,
    store_dir,
)
from medssl.data.store.prepare import format_prepare_summary, prepare_store
from medssl.data.store.validate import validate_store


def is_store_record(record: Mapping[str, Any]) -> bool:
    """True for a record of a prepared manifest (``source == "store"``)."""
    return record.get("source") == "store"


__all__ = [
    "DEFAULT_MAX_SIZE_PX",
    "DEFAULT_SHARD_SIZE_MB",
    "LEVELS",
    "encode_pixels",
    "format_prepare_summary",
    "is_store_record",
    "load_index",
    "prepare_store",
    "read_store_array",
    "read_store_record",
    "resize_longer_side",
    "store_dir",
    "validate_store",
]
