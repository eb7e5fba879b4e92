"""PACS ingest on pydicom's and pydicom-data's test files, DICOMDIR exports, odd names, incremental reruns."""

from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.fileset import FileSet

import medssl.data.dicom_scan as dicom_scan
from medssl.data.deid import Pseudonymizer
from medssl.data.ingest import IngestOptions, ingest_dicom
from medssl.data.manifest import read_manifest
from medssl.data.private_map import read_errors

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
KEY = Pseudonymizer(b"test-key-0123456789abcdef")


def _pydicom_data_folder() -> Path | None:
    """Folder of the pydicom-data package's files (package ``data_store``), if installed."""
    try:
        import data_store
    except ImportError:
        return None
    folder = Path(data_store.__file__).parent / "data"
    return folder if folder.is_dir() else None


def _ingest(root, out, **options):
    options.setdefault("progress", False)
    options.setdefault("workers", 1)
    summary = ingest_dicom(root, out, pseudonymizer=KEY, options=IngestOptions(**options))
    # the errors file names files by pseudonym; their paths come back from the private map beside the manifest
    errors = read_errors(summary["errors_file"], out)
    return summary, read_manifest(out), errors


def _header(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


@pytest.fixture(scope="module")
def test_file_export(tmp_path_factory):
    """pydicom's bundled test files plus the pydicom-data files, copied into one export folder."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(PYDICOM_FILES, root / "pydicom_test_files")
    extra = _pydicom_data_folder()
    if extra is not None:
        shutil.copytree(extra, root / "pydicom_data")
    return root


def test_every_test_file_is_in_manifest_or_errors(test_file_export, tmp_path):
    summary, records, errors = _ingest(test_file_export, tmp_path / "m.jsonl", workers=2)
    all_files = {str(p) for p in test_file_export.rglob("*") if p.is_file()}
    in_manifest = {r["image"] for r in records}
    in_errors = {e["path"] for e in errors}
    assert all_files == in_manifest | in_errors
    assert not in_manifest & in_errors
    assert all(e["reason"] and e["status"] in ("skip", "error") for e in errors)
    assert summary["files_seen"] == len(all_files) and summary["records"] == len(records)
    assert summary["errors"] == len(errors)
    if _pydicom_data_folder() is not None:
        assert summary["files_seen"] > 200

    # every record agrees with an independent full-header read of its file
    frames_per_file = Counter(r["image"] for r in records)
    for record in records:
        ds = _header(record["image"])
        assert (record["rows"], record["columns"]) == (int(ds.Rows), int(ds.Columns))
        assert record["modality"] == (str(ds.get("Modality", "")).upper() or None)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        assert frames_per_file[record["image"]] == (n_frames if n_frames > 1 else 1)
        assert record["patient_id"] is None or record["patient_id"].startswith("pat-")
    multi = [r for r in records if r["image"].endswith("color3d_jpeg_baseline.dcm")]
    if multi:
        assert [r["frame"] for r in multi] == list(range(int(_header(multi[0]["image"]).NumberOfFrames)))
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert reasons["rtplan.dcm"].startswith("non-image object")
    assert reasons["rtstruct.dcm"].startswith("non-image object")
    assert reasons["test-SR.dcm"].startswith("non-image object")
    assert reasons["README.txt"] == "not a DICOM file"
    assert reasons["MR_truncated.dcm"].startswith("truncated file")
    assert reasons["MR_small_RLE.dcm"].startswith("duplicate SOPInstanceUID")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


def test_dicomdir_only_export(tmp_path):
    src = PYDICOM_FILES / "dicomdirtests"
    export = tmp_path / "CDROM"
    export.mkdir()
    shutil.copy(src / "DICOMDIR", export / "DICOMDIR")
    for patient in ("77654033", "98892001", "98892003"):
        shutil.copytree(src / patient, export / patient)
    fileset = FileSet(pydicom.dcmread(export / "DICOMDIR"))
    referenced = {str(Path(instance.path)) for instance in fileset}
    assert len(referenced) > 20
    victim = sorted(referenced)[0]
    os.remove(victim)  # a referenced file the export lost
    summary, records, errors = _ingest(export, tmp_path / "out" / "m.jsonl")
    assert {r["image"] for r in records} == referenced - {victim}
    reasons = {e["path"]: e["reason"] for e in errors}
    assert reasons[str(export / "DICOMDIR")].startswith("DICOMDIR")
    assert reasons[victim] == "referenced by DICOMDIR but missing"
    assert summary["patients"] == len({i.PatientID for i in fileset})
    assert summary["studies"] == len({i.StudyInstanceUID for i in fileset})


def test_arbitrary_file_names_and_depths(tmp_path):
    export = tmp_path / "export"
    names = ["IM0001", "no extension", "weird.name.tmpx", "a/b/c/d/e/deep.img", "UPPER/MIXED-case.DCM", "x"]
    sources = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "rtplan.dcm", "README.txt"]
    for name, source in zip(names, sources):
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PYDICOM_FILES / source, export / name)
    _, records, errors = _ingest(export, tmp_path / "m.jsonl")
    assert sorted(Path(r["image"]).name for r in records) == sorted(["IM0001", "no extension", "weird.name.tmpx",
                                                                      "deep.img"])
    assert sorted(Path(e["path"]).name for e in errors) == ["MIXED-case.DCM", "x"]


def test_rerun_opens_only_new_or_changed_files(tmp_path, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    for source in ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "README.txt"]:
        shutil.copy(PYDICOM_FILES / source, export / source)
    opened: list[str] = []
    real_read_header = dicom_scan._read_header
    monkeypatch.setattr(dicom_scan, "_read_header", lambda path: opened.append(path) or real_read_header(path))
    manifest = tmp_path / "m.jsonl"
    first, records, _ = _ingest(export, manifest)
    assert first["files_opened"] == len(opened) == 5
    text = manifest.read_text()
    opened.clear()
    again, _, _ = _ingest(export, manifest)
    assert again["files_opened"] == 0 and opened == [] and again["files_reused"] == 5
    assert manifest.read_text() == text
    # a new file and a changed file are opened, nothing else
    shutil.copy(PYDICOM_FILES / "SC_rgb_jpeg.dcm", export / "new.dcm")
    stat = os.stat(export / "CT_small.dcm")
    os.utime(export / "CT_small.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third, records3, _ = _ingest(export, manifest)
    assert sorted(Path(p).name for p in opened) == ["CT_small.dcm", "new.dcm"]
    assert third["files_opened"] == 2 and len(records3) == len(records) + 1
    # another key invalidates the state (its pseudonyms would differ)
    opened.clear()
    ingest_dicom(export, manifest, pseudonymizer=Pseudonymizer(b"another-key-0123456789"),
                 options=IngestOptions(workers=1, progress=False))
    assert len(opened) == 6


def _planted_copy(source: str, dest: Path, **values) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(PYDICOM_FILES / source)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest)


def test_filters_frames_and_flags(tmp_path):
    export = tmp_path / "export"
    _planted_copy("CT_small.dcm", export / "derived", ImageType=["DERIVED", "SECONDARY"], SOPInstanceUID="1.2.3.1")
    _planted_copy("CT_small.dcm", export / "localizer", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                  SOPInstanceUID="1.2.3.2")
    _planted_copy("CT_small.dcm", export / "burned", BurnedInAnnotation="YES", SOPInstanceUID="1.2.3.3")
    _planted_copy("CT_small.dcm", export / "plain", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
                  BurnedInAnnotation="NO", SOPInstanceUID="1.2.3.4", BodyPartExamined="CHEST")
    _planted_copy("MR_small.dcm", export / "mr", SOPInstanceUID="1.2.3.5")
    shutil.copy(Path(pydicom.data.get_testdata_file("emri_small.dcm")), export / "multiframe")
    _, records, _ = _ingest(export, tmp_path / "all.jsonl")
    by_name = {Path(r["image"]).name: r for r in records}
    assert by_name["burned"]["burned_in"] is True and by_name["plain"]["burned_in"] is False
    assert by_name["mr"]["burned_in"] is None
    assert sum(1 for r in records if Path(r["image"]).name == "multiframe") == 10

    _, records, errors = _ingest(export, tmp_path / "filtered.jsonl", modalities=["CT"], exclude_derived=True,
                                 exclude_localizers=True, exclude_burned_in=True)
    assert [Path(r["image"]).name for r in records] == ["plain"]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert "--exclude-derived" in reasons["derived"] and "--exclude-localizers" in reasons["localizer"]
    assert "--exclude-burned-in" in reasons["burned"] and "--modality" in reasons["mr"]

    _, records, _ = _ingest(export, tmp_path / "chest.jsonl", body_parts=["chest"])
    assert [Path(r["image"]).name for r in records] == ["plain"]
    _, records, errors = _ingest(export, tmp_path / "frame3.jsonl", frames=3, modalities=["MR"])
    assert [(Path(r["image"]).name, r["frame"]) for r in records] == [("multiframe", 3)]
    assert "frame 3 requested" in {Path(e["path"]).name: e["reason"] for e in errors}["mr"]
    _, records, _ = _ingest(export, tmp_path / "first.jsonl", frames="first", modalities=["MR"])
    assert sorted((Path(r["image"]).name, r["frame"]) for r in records) == [("mr", None), ("multiframe", 0)]
