"""``medssl prepare`` throughput and the store container comparison.

Part 1 (prepare): generates ``--count`` small uncompressed DICOM files (default 10,000; the generator of
``benchmarks/ingest_throughput.py``: 16-bit MONOCHROME2, nested folders), writes a manifest of them and times
:func:`medssl.data.store.prepare_store` on the first half and on all of them, each in a fresh process: files/s,
seconds per 1,000 files (equal at both sizes when the cost is linear), the prepare process's peak RSS and the
largest worker's (flat when memory does not grow with the number of records), then an incremental rerun
with nothing changed.

Part 2 (container): the same ``--container-records`` images of ``--container-shape`` uint16 written to and
read back from the candidate containers: raw shard files read through ``numpy.memmap`` (medssl's store),
HDF5 through h5py (one dataset per image, and one flat byte dataset with offsets), and LMDB (when the
``lmdb`` package is installed, as MONAI's ``LMDBDataset`` uses it). Reports write MB/s, single-process random
reads (microseconds per image, decoded to a numpy array) and 4 concurrent reader processes (images/s; each
opens the container after ``fork``). Reads hit the page cache (warm), which is the steady state of a training
run whose store fits in RAM. Every figure is the best of ``--repeats`` (the machine may be shared).

Usage::

    python benchmarks/prepare_throughput.py --count 10000 --workers 2 [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_throughput import generate_export  # noqa: E402

from medssl.data.manifest import write_manifest  # noqa: E402

PREPARE_CHILD = """
import json, resource, sys, time
from medssl.data.store import prepare_store
manifest, store, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
summary = prepare_store(manifest, store, workers=workers, progress=False)
summary["wall_s"] = time.perf_counter() - start
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
summary["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(summary))
"""


def run_prepare(manifest: Path, store: Path, workers: int) -> dict:
    """``prepare_store`` in a fresh interpreter (so its peak RSS is its own); returns its summary."""
    proc = subprocess.run([sys.executable, "-c", PREPARE_CHILD, str(manifest), str(store), str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_prepare(folder: Path, count: int, size: int, workers: int, repeats: int) -> None:
    export = folder / "export"
    start = time.perf_counter()
    paths = generate_export(export, count, size)
    print(f"generated {len(paths)} DICOM files of {size}x{size} px in {time.perf_counter() - start:.1f} s")
    records = [{"id": f"bench-{i:07d}", "image": str(p), "source": "dicom", "split": "pretrain"}
               for i, p in enumerate(paths)]
    print(f"{'records':>8} {'files/s':>9} {'s/1000 files':>13} {'peak RSS MB':>12} {'worker RSS MB':>14} "
          f"{'disk MB':>8}")
    walls = []
    for n in (count // 2, count):
        manifest = folder / f"m{n}.jsonl"
        write_manifest(manifest, records[:n])
        best = None
        for r in range(repeats):
            store = folder / f"store{n}_{r}"
            result = run_prepare(manifest, store, workers)
            if best is None or result["wall_s"] < best["wall_s"]:
                best = result
            if r < repeats - 1:
                shutil.rmtree(store)
        print(f"{n:>8} {n / best['wall_s']:>9.0f} {1000 * best['wall_s'] / n:>13.2f} {best['peak_rss_mb']:>12.0f} "
              f"{best['worker_peak_rss_mb']:>14.0f} {best['disk_bytes'] / 1e6:>8.1f}")
        walls.append(best["wall_s"])
    print(f"time ratio {count} / {count // 2} records: {walls[1] / walls[0]:.2f} (linear cost: "
          f"{count / (count // 2):.2f})")
    again = run_prepare(manifest, store, workers)
    print(f"incremental rerun, nothing changed: {count} records in {again['wall_s']:.2f} s "
          f"({again['reused']} reused, {again['prepared']} decoded)")


# ---- container comparison -------------------------------------------------------------------------------


def _images(count: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 65536, shape, dtype=np.uint16)
    return [np.roll(base, i, axis=-1) for i in range(count)]


def write_raw(folder: Path, images: list[np.ndarray]) -> dict:
    index = []
    with open(folder / "shard.bin", "wb") as fh:
        for img in images:
            offset = fh.tell()
            fh.write(img.tobytes())
            fh.write(b"\0" * (-fh.tell() % 64))
            index.append((offset, img.nbytes, img.shape))
    return {"path": str(folder / "shard.bin"), "index": index}


def write_h5_datasets(folder: Path, images: list[np.ndarray]) -> dict:
    import h5py

    with h5py.File(folder / "per_image.h5", "w") as fh:
        for i, img in enumerate(images):
            fh.create_dataset(f"{i:07d}", data=img)
    return {"path": str(folder / "per_image.h5"), "shapes": [img.shape for img in images]}


def write_h5_flat(folder: Path, images: list[np.ndarray]) -> dict:
    import h5py

    sizes = [img.nbytes for img in images]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    with h5py.File(folder / "flat.h5", "w") as fh:
        data = fh.create_dataset("bytes", shape=(int(sum(sizes)),), dtype=np.uint8)
        for img, off in zip(images, offsets):
            data[int(off):int(off) + img.nbytes] = np.frombuffer(img.tobytes(), np.uint8)
    return {"path": str(folder / "flat.h5"),
            "index": [(int(o), img.nbytes, img.shape) for o, img in zip(offsets, images)]}


def write_lmdb(folder: Path, images: list[np.ndarray]) -> dict:
    import lmdb

    env = lmdb.open(str(folder / "db.lmdb"), map_size=2 * sum(i.nbytes for i in images) + (1 << 24))
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            txn.put(f"{i:07d}".encode(), img.tobytes())
    env.close()
    return {"path": str(folder / "db.lmdb"), "shapes": [img.shape for img in images]}


class Reader:
    """Opens a container (after fork, in the reading process) and reads image ``i`` as a numpy array."""

    def __init__(self, kind: str, meta: dict) -> None:
        self.kind, self.meta = kind, meta
        if kind == "raw memmap":
            with open(meta["path"], "rb") as fh:  # as medssl's store reader: a plain array over mmap
                self.map = np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        elif kind.startswith("hdf5"):
            import h5py

            self.fh = h5py.File(meta["path"], "r")
            self.data = self.fh["bytes"] if kind == "hdf5 flat" else None
        else:
            import lmdb

            self.env = lmdb.open(meta["path"], readonly=True, lock=False)
            self.txn = self.env.begin(buffers=True)

    def read(self, i: int) -> np.ndarray:
        if self.kind == "raw memmap":
            off, nbytes, shape = self.meta["index"][i]
            return self.map[off:off + nbytes].view(np.uint16).reshape(shape)
        if self.kind == "hdf5 flat":
            off, nbytes, shape = self.meta["index"][i]
            return self.data[off:off + nbytes].view(np.uint16).reshape(shape)
        if self.kind == "hdf5 datasets":
            return self.fh[f"{i:07d}"][()]
        return np.frombuffer(self.txn.get(f"{i:07d}".encode()), np.uint16).reshape(self.meta["shapes"][i])


def _read_all(kind: str, meta: dict, order: list[int], to_float: bool = False) -> float:
    """Seconds to read every image of ``order``: the array only, or also converted to float32 (as the loader)."""
    reader = Reader(kind, meta)
    start = time.perf_counter()
    total = 0.0
    for i in order:
        image = reader.read(i)
        total += float(image.astype(np.float32)[0, -1, -1] if to_float else image[0, -1, -1])
    return time.perf_counter() - start


def _read_proc(args: tuple) -> float:
    return _read_all(*args)


def bench_containers(folder: Path, count: int, shape: tuple[int, ...], repeats: int) -> None:
    images = _images(count, shape)
    mb = sum(i.nbytes for i in images) / 1e6
    writers = {"raw memmap": write_raw, "hdf5 datasets": write_h5_datasets, "hdf5 flat": write_h5_flat}
    try:
        import lmdb  # noqa: F401

        writers["lmdb"] = write_lmdb
    except ImportError:
        print("lmdb not installed: LMDB skipped (pip install lmdb to include it)")
    order = list(np.random.default_rng(1).permutation(count))
    print(f"\ncontainers: {count} images of {shape} uint16 ({mb:.0f} MB), warm page cache")
    print(f"{'container':>14} {'write MB/s':>11} {'random read us/img':>19} {'+ float32 us/img':>17} "
          f"{'4 readers img/s (float32)':>26}")
    ctx = mp.get_context("fork")
    for kind, writer in writers.items():
        sub = folder / kind.replace(" ", "_")
        sub.mkdir(parents=True)
        start = time.perf_counter()
        meta = writer(sub, images)
        write_s = time.perf_counter() - start
        _read_all(kind, meta, order)  # warm the page cache
        single = min(_read_all(kind, meta, order) for _ in range(repeats))
        single_float = min(_read_all(kind, meta, order, True) for _ in range(repeats))
        with ctx.Pool(4) as pool:
            concurrent = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                pool.map(_read_proc, [(kind, meta, order, True)] * 4)
                concurrent = min(concurrent, time.perf_counter() - start)
        print(f"{kind:>14} {mb / write_s:>11.0f} {1e6 * single / count:>19.1f} {1e6 * single_float / count:>17.1f} "
              f"{4 * count / concurrent:>26.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="DICOM files to generate (default 10000)")
    parser.add_argument("--size", type=int, default=64, help="DICOM image side in px (default 64)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare worker processes")
    parser.add_argument("--container-records", type=int, default=1000, help="images in part 2 (default 1000)")
    parser.add_argument("--container-shape", default="1,320,256", help="C,H,W of part 2 images (default 1,320,256)")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats, best kept (default 2)")
    parser.add_argument("--folder", help="work folder (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--skip-prepare", action="store_true", help="only the container comparison")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="medssl_prepare_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); {args.workers} prepare workers")
    try:
        if not args.skip_prepare:
            bench_prepare(folder, args.count, args.size, args.workers, args.repeats)
        shape = tuple(int(v) for v in args.container_shape.split(","))
        bench_containers(folder / "containers", args.container_records, shape, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
