"""Integrity check of a prepared store (``medssl manifest validate STORE``): index vs shards vs manifest.

Checks: the index's format and version; each shard exists with the size the index records; each record's
extent is aligned, inside its shard, consistent with its dtype and shape, and overlaps no other record; each
record's SHA-256 matches its stored bytes (``checksums=True``); the store's manifest lists exactly the indexed
records, each pointing at the same shard, offset, size, dtype and shape; no unfinished run's journal is left.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medssl.data.manifest import read_manifest
from medssl.data.store.layout import (
    ALIGN_BYTES,
    JOURNAL_NAME,
    LEVELS,
    MANIFEST_NAME,
    checksum,
    load_index,
    store_dir,
)
from medssl.errors import MedsslError


def _extent_problem(entry: Mapping[str, Any], sizes: Mapping[str, int]) -> str | None:
    try:
        shape = [int(v) for v in entry["shape"]]
        nbytes, offset, dtype = int(entry["nbytes"]), int(entry["offset"]), str(entry["dtype"])
    except (KeyError, TypeError, ValueError):
        return "index entry lacks shard/offset/nbytes/dtype/shape"
    if dtype not in LEVELS or len(shape) != 3 or nbytes != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return f"dtype {dtype} and shape {shape} do not make {nbytes} bytes"
    if entry.get("shard") not in sizes:
        return f"shard {entry.get('shard')!r} is not listed in the index or missing"
    if offset < 0 or offset % ALIGN_BYTES or offset + nbytes > sizes[entry["shard"]]:
        return f"extent {offset}+{nbytes} is misaligned or outside {entry['shard']} ({sizes[entry['shard']]} bytes)"
    return None


def validate_store(path: str | os.PathLike[str], *, checksums: bool = True, progress: bool = False) -> list[str]:
    """Problems of the store at ``path`` (the folder or its ``manifest.jsonl``) as messages; empty when sound."""
    store = store_dir(path)
    if store is None:
        raise MedsslError("not a prepared store (no index.json beside the manifest)", path)
    index = load_index(store)
    problems: list[str] = []
    if (store / JOURNAL_NAME).exists():
        problems.append(f"an interrupted 'medssl prepare' left {JOURNAL_NAME}: run it again to finish the store")
    sizes: dict[str, int] = {}
    for shard in index.get("shards", []):
        file = store / str(shard.get("name"))
        if not file.is_file():
            problems.append(f"shard {shard.get('name')} is missing")
            continue
        sizes[shard["name"]] = file.stat().st_size
        if sizes[shard["name"]] != shard.get("bytes"):
            problems.append(f"shard {shard['name']} is {sizes[shard['name']]} bytes, the index says {shard.get('bytes')}")
    maps = {name: np.memmap(store / name, dtype=np.uint8, mode="r") for name, size in sizes.items() if size}
    extents: dict[str, list[tuple[int, int, str]]] = {}
    by_id: dict[str, Mapping[str, Any]] = {}
    for entry in tqdm(index["records"], desc="validate", unit="record", disable=None if progress else True):
        rid = entry.get("id")
        if rid in by_id:
            problems.append(f"record {rid}: indexed twice")
        by_id[rid] = entry
        problem = _extent_problem(entry, sizes)
        if problem is not None:
            problems.append(f"record {rid}: {problem}")
            continue
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        extents.setdefault(entry["shard"], []).append((offset, offset + nbytes, rid))
        if checksums and checksum(maps[entry["shard"]][offset:offset + nbytes]) != entry.get("sha256"):
            problems.append(f"record {rid}: checksum mismatch (stored bytes changed since prepare)")
    for shard, spans in extents.items():
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                problems.append(f"records {first} and {second} overlap in {shard}")
    problems += _manifest_problems(store, by_id)
    return problems


def _manifest_problems(store: Path, by_id: Mapping[str, Mapping[str, Any]]) -> list[str]:
    try:
        records = read_manifest(store / MANIFEST_NAME)
    except MedsslError as exc:
        return [str(exc)]
    problems = []
    seen = set()
    for record in records:
        rid = record["id"]
        seen.add(rid)
        entry = by_id.get(rid)
        if entry is None:
            problems.append(f"manifest record {rid} is not in the index")
            continue
        expected = (os.path.normpath(store.resolve() / entry["shard"]), entry["offset"], entry["nbytes"],
                    entry["dtype"], list(entry["shape"]))
        found = (os.path.normpath(Path(record["image"]).resolve()), record.get("store_offset"),
                 record.get("store_nbytes"), record.get("store_dtype"), list(record.get("store_shape") or []))
        if record.get("source") != "store" or found != expected:
            problems.append(f"manifest record {rid} does not point at its indexed bytes")
    problems += [f"indexed record {rid} is missing from {MANIFEST_NAME}" for rid in by_id if rid not in seen]
    return problems
