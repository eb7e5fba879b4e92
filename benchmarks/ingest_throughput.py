"""Ingest throughput: ``medssl`` ingest vs a plain ``pydicom.dcmread`` loop over the same generated export.

Generates an export of small uncompressed DICOM files (default 10,000; 64x64 16-bit MONOCHROME2, several
modalities, patients / studies / series varied, file names without extensions in nested folders), then times
in the same run:

1. a plain loop ``pydicom.dcmread(path)`` over every file (what a naive script does);
2. the same loop with ``stop_before_pixels=True`` (a header-only plain loop);
3. ``ingest_dicom`` with ``--workers`` processes (fresh: no state file);
4. the incremental rerun of the same ingest (state file present, no file changed).

Each timing is the best of ``--repeats`` interleaved runs (the machine may be shared). Prints files/s for each
and the speed-ups of (3) over (1) and (2). Usage::

    python benchmarks/ingest_throughput.py --count 10000 --workers 2 [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medssl.data.deid import Pseudonymizer
from medssl.data.ingest import IngestOptions, ingest_dicom

MODALITIES = ("CR", "DX", "CT", "MR", "US")
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
}


def generate_export(folder: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``count`` small DICOM files under ``folder``: ~10 images per series, ~3 series per study."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    paths = []
    patient = study = series = None
    for index in range(count):
        if index % 30 == 0:
            patient = f"BENCH{index // 30:06d}"
            study = generate_uid()
        if index % 10 == 0:
            series = generate_uid()
            modality = MODALITIES[(index // 10) % len(MODALITIES)]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = f"Synthetic^Patient{patient}"
        ds.PatientID = patient
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = modality
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "CHEST"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = folder / patient / f"S{index // 10:06d}" / f"IM{index:07d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def time_plain_loop(paths: list[Path], header_only: bool) -> float:
    """Seconds for ``pydicom.dcmread`` over ``paths`` (touching the pixel bytes unless header-only)."""
    start = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
        if not header_only:
            _ = len(ds.PixelData)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="files to generate (default 10000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="ingest worker processes")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--folder", help="where to generate (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated export")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats, best kept (default 2)")
    args = parser.parse_args()

    folder = Path(args.folder or tempfile.mkdtemp(prefix="medssl_ingest_bench_"))
    export = folder / "export"
    try:
        start = time.perf_counter()
        paths = generate_export(export, args.count, args.size)
        print(f"generated {len(paths)} files of {args.size}x{args.size} px in {time.perf_counter() - start:.1f} s "
              f"({sum(p.stat().st_size for p in paths) / 1e6:.1f} MB) under {export}")
        pz = Pseudonymizer(b"benchmark-key-0123456789")
        options = IngestOptions(workers=args.workers, progress=False)
        manifest = folder / "manifest.jsonl"
        plain = plain_header = ingest_s = float("inf")
        for _ in range(args.repeats):  # interleaved, best of N: the machine may be shared
            plain = min(plain, time_plain_loop(paths, header_only=False))
            plain_header = min(plain_header, time_plain_loop(paths, header_only=True))
            Path(str(manifest) + ".state.json").unlink(missing_ok=True)
            start = time.perf_counter()
            summary = ingest_dicom(export, manifest, pseudonymizer=pz, options=options)
            ingest_s = min(ingest_s, time.perf_counter() - start)
        start = time.perf_counter()
        rerun = ingest_dicom(export, manifest, pseudonymizer=pz, options=options)
        rerun_s = time.perf_counter() - start
        n = len(paths)
        print(f"cpu cores: {os.cpu_count()}, ingest workers: {args.workers}")
        print(f"plain pydicom.dcmread loop:              {n / plain:9.1f} files/s ({plain:.2f} s)")
        print(f"plain dcmread(stop_before_pixels) loop:  {n / plain_header:9.1f} files/s ({plain_header:.2f} s)")
        print(f"medssl ingest (fresh, {args.workers} workers):         {n / ingest_s:9.1f} files/s ({ingest_s:.2f} s; "
              f"{summary['records']} records, {summary['patients']} patients, {summary['errors']} errors)")
        print(f"medssl ingest rerun (incremental):       {n / rerun_s:9.1f} files/s ({rerun_s:.2f} s; "
              f"{rerun['files_opened']} files opened)")
        print(f"speed-up of ingest over the plain loop: {plain / ingest_s:.2f}x "
              f"(over the header-only loop: {plain_header / ingest_s:.2f}x; rerun: {plain / rerun_s:.1f}x)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
