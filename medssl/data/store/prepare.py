"""``prepare_store``: decode every record of a manifest once into a prepared store (streaming, incremental,
resumable). Layout and codec: :mod:`medssl.data.store.layout`; overview: :mod:`medssl.data.store`.

Crash safety. Stored codes are appended to the current shard; every ``commit_every_records`` records (and at a
shard change and at the end) the shard is flushed and fsynced, then the records' index entries are appended to
``STORE/.journal.jsonl`` and fsynced. A killed run therefore leaves a journal whose entries all point at bytes
on disk; a rerun truncates the shard after the last journaled record and continues in manifest order, so the
result equals an uninterrupted run byte for byte. The end of a run writes ``index.json``, ``errors.jsonl`` and
``manifest.jsonl`` atomically (in that order) and removes the journal.

Memory: at most ``4 * workers`` chunks of ``CHUNK_RECORDS`` decoded images are in flight, whatever the number
of records; only the per-record index entries (~0.3 KB each) grow with the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medssl.data.dicom_scan import quiet_pydicom
from medssl.data.manifest import MANIFEST_FIELDS, read_manifest, record_problems
from medssl.data.private_map import PATH_FIELDS
from medssl.data.readers.dicom import DEFAULT_PERCENTILES
from medssl.data.readers.load import LoadRecordd
from medssl.data.store.layout import (
    ALIGN_BYTES,
    DEFAULT_MAX_SIZE_PX,
    DEFAULT_SHARD_SIZE_MB,
    ERRORS_NAME,
    INDEX_NAME,
    JOURNAL_NAME,
    LEVELS,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    STORE_FORMAT,
    STORE_VERSION,
    checksum,
    encode_pixels,
    load_index,
    record_key,
    shard_name,
)
from medssl.data.verify import _reason
from medssl.errors import MedsslError
from medssl.io import atomic_open, atomic_write_json

#: records per task sent to a worker process
CHUNK_RECORDS = 8
#: below this many records to decode, a process pool costs more than it saves
POOL_MIN_RECORDS = 16


def store_params(max_size_px: int) -> dict[str, Any]:
    """Preprocessing parameters that are part of every record key: codec version, longer side (px) and the
    reader options of :class:`~medssl.data.readers.load.LoadRecordd` as training uses them (its defaults)."""
    return {"version": STORE_VERSION, "max_size_px": int(max_size_px), "window": "auto",
            "percentiles": list(DEFAULT_PERCENTILES), "image_range": "dtype", "volume_range": "percentile"}


def _decode(record: dict[str, Any], max_size_px: int) -> dict[str, Any]:
    """One record through the reader and the codec: ``{"codes": array}`` or ``{"error": reason}``."""
    try:
        with quiet_pydicom():
            out = LoadRecordd(keys=("image",))(dict(record))
        codes = encode_pixels(out["image"], out["image_range"], max_size_px)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an errors-file entry of this record
        return {"error": f"cannot decode: {_reason(exc, record.get('image'))}"}
    return {"codes": codes, "sha256": checksum(codes)}


def _decode_chunk(chunk: list[dict[str, Any]], max_size_px: int) -> list[dict[str, Any]]:
    return [_decode(r, max_size_px) for r in chunk]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _aligned(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


class _ShardWriter:
    """Appends aligned records to ``shards/shard-NNNNN.bin``, starting a new shard past ``limit_bytes``."""

    def __init__(self, store: Path, limit_bytes: int, number: int, position: int) -> None:
        self.store, self.limit, self.number, self.pos = store, int(limit_bytes), number, position
        (store / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (store / SHARD_DIR).glob("shard-*.bin"):  # shards past the committed ones hold no record
            if stale.stem[6:].isdigit() and int(stale.stem[6:]) > number:
                stale.unlink()
        path = store / shard_name(number)
        self.fh = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 - closed in close()
        self.fh.truncate(position)
        self.fh.seek(position)

    def append(self, data: memoryview, before_roll: Callable[[], None]) -> tuple[str, int]:
        if self.pos > 0 and self.pos + len(data) > self.limit:
            before_roll()
            self.fh.close()
            self.number, self.pos = self.number + 1, 0
            self.fh = open(self.store / shard_name(self.number), "w+b")  # noqa: SIM115
        offset = self.pos
        self.fh.write(data)
        end = _aligned(offset + len(data))
        self.fh.write(b"\0" * (end - offset - len(data)))
        self.pos = end
        return shard_name(self.number), offset

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def _previous(store: Path) -> dict[str, dict[str, Any]]:
    """Entries of the last completed run (index + errors file) overridden by an interrupted run's journal."""
    entries: dict[str, dict[str, Any]] = {}
    if (store / INDEX_NAME).is_file():
        try:
            entries.update((e["id"], e) for e in load_index(store)["records"])
        except MedsslError:  # another store version or a damaged index: everything is prepared again
            return {}
    for name in (ERRORS_NAME, JOURNAL_NAME):
        path = store / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed run
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry.get("key"):
                entries[entry["id"]] = entry
    return entries


def _stat(path: str, cache: dict[str, tuple[int, int]]) -> tuple[int, int]:
    if path not in cache:
        try:
            st = os.stat(path)
            cache[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            cache[path] = (-1, -1)
    return cache[path]


def store_record(record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The prepared manifest's record: the source record without paths, pointing at its stored codes.

    Dropped: :data:`~medssl.data.private_map.PATH_FIELDS` and any extra (non-schema) field whose string value
    looks like a path (holds ``/`` or ``\\``). Set: ``source = "store"``, ``image`` = the shard (relative to the
    store), ``rows``/``columns`` = stored size, the ``store_*`` fields and ``prepared_source`` (reader kind).
    """
    out = {k: v for k, v in record.items() if k not in PATH_FIELDS and not (
        k not in MANIFEST_FIELDS and isinstance(v, str) and ("/" in v or "\\" in v))}
    levels = LEVELS[entry["dtype"]]
    out.update(source="store", image=entry["shard"], rows=entry["shape"][1], columns=entry["shape"][2],
               store_offset=entry["offset"], store_nbytes=entry["nbytes"], store_dtype=entry["dtype"],
               store_shape=list(entry["shape"]), store_range=[0, levels], prepared_source=record.get("source"))
    return out


def _results(todo: list[dict[str, Any]], max_size_px: int, workers: int) -> Iterator[dict[str, Any]]:
    """Decoded results in ``todo`` order, at most ``4 * workers`` chunks in flight."""
    if workers <= 1 or len(todo) < POOL_MIN_RECORDS:
        for record in todo:
            yield _decode(record, max_size_px)
        return
    chunks = [todo[i:i + CHUNK_RECORDS] for i in range(0, len(todo), CHUNK_RECORDS)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.submit(_decode_chunk, chunk, max_size_px))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield from pending.popleft().result()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_chunk, nxt, max_size_px))


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    with open(store / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MedsslError("another 'medssl prepare' is writing this store", store) from None
        yield


def prepare_store(
    manifest: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    max_size_px: int = DEFAULT_MAX_SIZE_PX,
    workers: int | None = None,
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB,
    progress: bool = True,
    commit_every_records: int = 64,
    on_record: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Prepare (or bring up to date) the store ``store`` from ``manifest``; returns the run's summary.

    Args:
        manifest: source manifest (its private map is read for the paths, never copied).
        store: output folder (created; a non-empty folder that is not a store is refused).
        max_size_px: longer side of the stored images in px (never enlarged).
        workers: decoding processes (default: CPU count).
        shard_size_mb: start a new shard once one would exceed this many MB (10^6 bytes).
        progress: tqdm bar on stderr.
        commit_every_records: journal commit interval (records).
        on_record: called with the number of records written so far in this run after each one (tests use it
            to interrupt a run).

    Summary keys: ``records``, ``prepared`` (decoded this run), ``reused`` (unchanged, not decoded),
    ``failed`` (in the errors file), ``removed`` (in the store before, not in the manifest), ``disk_bytes``,
    ``live_bytes``, ``stale_bytes`` (bytes of replaced or removed records), ``shards``, ``seconds``, ``store``.
    """
    if max_size_px < 1 or shard_size_mb <= 0 or (workers is not None and workers < 0):
        raise MedsslError(f"--max-size ({max_size_px}) and --shard-size ({shard_size_mb}) must be positive, "
                          f"--workers ({workers}) at least 0")
    start = time.perf_counter()
    records = read_manifest(manifest)
    out = Path(store)
    if out.resolve() == Path(manifest).resolve().parent and Path(manifest).name == MANIFEST_NAME:
        raise MedsslError("the store would overwrite its own source manifest: choose another -o folder", out)
    if out.exists() and not out.is_dir():
        raise MedsslError("store path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not ((out / INDEX_NAME).exists() or (out / JOURNAL_NAME).exists()):
        raise MedsslError("folder is not empty and is not a prepared store: choose a new folder", out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        return _prepare_locked(records, out, max_size_px, workers, shard_size_mb, progress,
                               commit_every_records, on_record, start)


def _prepare_locked(records: list[dict[str, Any]], out: Path, max_size_px: int, workers: int | None,
                    shard_size_mb: float, progress: bool, commit_every: int,
                    on_record: Callable[[int], None] | None, start: float) -> dict[str, Any]:
    params = store_params(max_size_px)
    old = _previous(out)
    stats: dict[str, tuple[int, int]] = {}
    keys = [record_key(r, *_stat(r["image"], stats), params) for r in records]
    ends: dict[str, int] = {}
    for entry in old.values():
        if "shard" in entry:
            ends[entry["shard"]] = max(ends.get(entry["shard"], 0), _aligned(entry["offset"] + entry["nbytes"]))
    sizes = {name: os.path.getsize(out / name) for name in ends if (out / name).is_file()}
    entries: list[dict[str, Any] | None] = []
    todo: list[int] = []
    for i, (record, key) in enumerate(zip(records, keys)):
        prev = old.get(record["id"])
        ok = prev is not None and prev.get("key") == key and (
            "error" in prev or prev["offset"] + prev["nbytes"] <= sizes.get(prev["shard"], -1))
        entries.append(dict(prev) if ok else None)  # type: ignore[arg-type]
        if not ok:
            todo.append(i)
    last = max(ends, default=shard_name(0))
    writer = _ShardWriter(out, int(shard_size_mb * 1e6), int(last[-9:-4]), ends.get(last, 0))
    journal = open(out / JOURNAL_NAME, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    pending_lines: list[str] = []

    def commit() -> None:
        writer.sync()
        journal.write("".join(pending_lines))
        journal.flush()
        os.fsync(journal.fileno())
        pending_lines.clear()

    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="prepare", unit="record",
               disable=None if progress else True)
    try:
        todo_records = [records[i] for i in todo]
        for done, (i, result) in enumerate(zip(todo, _results(todo_records, max_size_px, workers or os.cpu_count()
                                                             or 1)), start=1):
            entry: dict[str, Any] = {"id": records[i]["id"], "key": keys[i]}
            if "error" in result:
                entry["error"] = result["error"]
            else:
                codes = result["codes"]
                shard, offset = writer.append(memoryview(codes).cast("B"), commit)
                entry.update(shard=shard, offset=offset, nbytes=codes.nbytes, dtype=codes.dtype.name,
                             shape=list(codes.shape), sha256=result["sha256"])
            entries[i] = entry
            pending_lines.append(json.dumps(entry) + "\n")
            if len(pending_lines) >= commit_every:
                commit()
            bar.update(1)
            if on_record is not None:
                on_record(done)
        commit()
    finally:
        bar.close()
        writer.close()
        journal.close()
    return _finish(out, records, entries, old, params, len(todo), writer.number, start)


def _finish(out: Path, records: list[dict[str, Any]], entries: list[Any], old: Mapping[str, Any],
            params: Mapping[str, Any], decoded: int, last_shard: int, start: float) -> dict[str, Any]:
    good = [(r, e) for r, e in zip(records, entries) if "error" not in e]
    failed = [e for e in entries if "error" in e]
    shards = [shard_name(n) for n in range(last_shard + 1) if (out / shard_name(n)).is_file()]
    shard_bytes = {name: os.path.getsize(out / name) for name in shards}
    live = sum(e["nbytes"] for _, e in good)
    used = sum(_aligned(e["nbytes"]) for _, e in good)
    atomic_write_json(out / INDEX_NAME, {
        "format": STORE_FORMAT, "version": STORE_VERSION, "params": dict(params),
        "shards": [{"name": n, "bytes": b} for n, b in shard_bytes.items()],
        "records": [e for _, e in good]})
    with atomic_open(out / ERRORS_NAME, "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in failed)
    lines = []
    for number, (record, entry) in enumerate(good, start=1):
        rec = store_record(record, entry)
        problems = record_problems(rec)
        if problems:
            raise MedsslError(f"record {number}: {'; '.join(problems)}", out / MANIFEST_NAME)
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    with atomic_open(out / MANIFEST_NAME, "w") as fh:
        fh.writelines(lines)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    ids = {r["id"] for r in records}
    disk = sum(shard_bytes.values())
    summary = {"store": str(out), "records": len(records), "prepared": decoded, "reused": len(records) - decoded,
               "failed": len(failed), "removed": sum(1 for rid in old if rid not in ids), "disk_bytes": disk,
               "live_bytes": live, "stale_bytes": max(0, disk - used), "shards": len(shards),
               "seconds": round(time.perf_counter() - start, 3)}
    if not good:
        raise MedsslError(f"no record could be prepared ({len(failed)} failed; reasons in {ERRORS_NAME})", out)
    return summary


def format_prepare_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines of :func:`prepare_store`'s summary (counts and disk use in MB)."""
    mb = 1e6
    text = (f"prepared {summary['store']}: {summary['records']} records ({summary['prepared']} decoded, "
            f"{summary['reused']} unchanged, {summary['failed']} failed -> {ERRORS_NAME}, {summary['removed']} "
            f"removed) in {summary['seconds']:.1f} s\n"
            f"disk: {summary['disk_bytes'] / mb:.1f} MB in {summary['shards']} shard(s); "
            f"images {summary['live_bytes'] / mb:.1f} MB, stale {summary['stale_bytes'] / mb:.1f} MB")
    if summary["stale_bytes"] > summary["live_bytes"]:
        text += " (more stale than live: prepare into a new folder to reclaim it)"
    return text
