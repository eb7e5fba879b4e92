"""Hostile and broken DICOM exports: path traversal, PHI in coded values, lying geometry, undecodable pixels.

Every file is a tiny DICOM built here with pydicom (8 x 8 pixels); the reference for "this file is broken" is
pydicom itself failing to decode it.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from medssl.cli import data_cmd
from medssl.data.deid import Pseudonymizer
from medssl.data.ingest import IngestOptions, ingest_dicom
from medssl.data.manifest import read_manifest
from medssl.data.private_map import read_errors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KEY = Pseudonymizer(b"hostile-test-key-0123456789abcdef")
SIDE = 8


def _dataset(rows: int = SIDE, columns: int = SIDE, bits: int = 16, syntax: str = ExplicitVRLittleEndian,
             **values) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = values.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "PAT1", "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, min(bits, 12), min(bits, 12) - 1, 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _native(path: Path, frames: int = 1, **kw) -> Path:
    """A native 16-bit image whose pixel data holds ``frames`` frames of 8 x 8 (whatever the header says)."""
    ds = _dataset(**kw)
    ds.PixelData = (np.arange(frames * SIDE * SIDE, dtype=np.uint16) % 4000).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_frame(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _jpeg(path: Path, fragments: list[bytes], syntax: str = JPEGBaseline8Bit, bot: bool = True, **kw) -> Path:
    ds = _dataset(bits=8, syntax=syntax, **kw)
    ds.BitsStored, ds.HighBit = 8, 7
    ds.PixelData = encapsulate(fragments, has_bot=bot)
    ds["PixelData"].VR = "OB"
    if len(fragments) > 1 and "NumberOfFrames" not in kw:
        ds.NumberOfFrames = len(fragments)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _short_offset_table(path: Path, **kw) -> Path:
    """Three frames in three fragments, but a Basic Offset Table with only two offsets."""
    path = _jpeg(path, [_jpeg_frame(3)] * 3, **kw)
    ds = pydicom.dcmread(path)
    data = ds.PixelData
    table_length = struct.unpack("<L", data[4:8])[0]
    assert table_length == 12
    ds.PixelData = data[:4] + struct.pack("<L", 8) + data[8:16] + data[8 + table_length :]
    ds.save_as(path, enforce_file_format=True)
    return path


def _decodes(path: Path) -> bool:
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    except Exception:  # noqa: BLE001 - any failure means pydicom cannot decode it either
        return False
    return True


def _ingest(root: Path, out: Path, **options):
    summary = ingest_dicom(root, out, pseudonymizer=KEY, options=IngestOptions(workers=1, progress=False, **options))
    return summary, read_manifest(out), read_errors(summary["errors_file"], out)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _dicomdir(path: Path, file_ids: list[list[str] | str]) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "HOSTILE"
    records = []
    for file_id in file_ids:
        record = Dataset()
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = file_id
        records.append(record)
    ds.DirectoryRecordSequence = records
    ds.save_as(path, enforce_file_format=True)


def test_dicomdir_references_outside_the_export_are_refused_unopened(tmp_path, monkeypatch):
    outside = _native(tmp_path / "outside.dcm", SOPInstanceUID="1.2.3.4.100")
    export = tmp_path / "export" / "CD"
    _native(export / "IMAGES" / "IM1", SOPInstanceUID="1.2.3.4.1")
    (export / "IMAGES" / "LINK").symlink_to(outside)  # a link inside the export to a file outside it
    depth = len(export.parts)
    _dicomdir(export / "DICOMDIR", [
        ["IMAGES", "IM1"],
        ["..", "..", "outside.dcm"],
        [".."] * depth + ["etc", "passwd"],
        "../../../../../../../../etc/passwd",
        "/etc/passwd",
        ["IMAGES", "LINK"],
    ])
    forbidden = {os.path.realpath(outside), "/etc/passwd"}
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(os.fspath(file)))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    summary, records, errors = _ingest(tmp_path / "export", tmp_path / "out" / "m.jsonl")
    monkeypatch.setattr(builtins, "open", real_open)

    assert not forbidden & set(opened)
    assert opened  # the spy saw the files that were read
    assert [Path(r["image"]).name for r in records] == ["IM1"]
    reasons = [e["reason"] for e in errors]
    assert sum(r.startswith("DICOMDIR reference leaves the export folder") for r in reasons) == 4
    assert sum("symbolic link" in r and "outside the export folder" in r for r in reasons) == 2  # ref + walk
    assert all(e["status"] in ("skip", "error") for e in errors)
    manifest_text = (tmp_path / "out" / "m.jsonl").read_text()
    assert "1.2.3.4.100" not in manifest_text and summary["records"] == 1


def test_phi_in_coded_header_values_becomes_null(tmp_path, capsys):
    export = tmp_path / "export"
    _native(export / "a", Modality="MRN123456 DOE^JOHN", BodyPartExamined="Doe^John", ViewPosition="MRN1234567890123456",
            ImageType=["ORIGINAL", "PRIMARY", "DOE^JOHN"], SOPInstanceUID="1.2.3.5.1")
    _native(export / "b", Modality="XYZZY", BodyPartExamined="chest", SOPInstanceUID="1.2.3.5.2")
    _native(export / "c", PhotometricInterpretation="DOE JOHN", SOPInstanceUID="1.2.3.5.3")
    manifest = tmp_path / "out" / "m.jsonl"
    summary_json = tmp_path / "out" / "summary.json"
    assert _cli(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress",
                 "--allow-insecure-key", "--summary-json", str(summary_json)]) == 0
    captured = capsys.readouterr()
    outputs = {"stdout": captured.out, "stderr": captured.err, "manifest": manifest.read_text(),
               "errors": (tmp_path / "out" / "m.errors.jsonl").read_text(), "summary": summary_json.read_text(),
               "state": Path(str(manifest) + ".state.json").read_text()}
    for where, text in outputs.items():
        for needle in ("MRN123456", "DOE", "JOHN", "XYZZY"):
            assert needle.lower() not in text.lower(), f"{needle} leaked into the {where}"
    by_name = {Path(r["image"]).name: r for r in read_manifest(manifest)}
    assert sorted(by_name) == ["a", "b", "c"]  # the records stay, without the invalid values
    assert (by_name["a"]["modality"], by_name["a"]["body_part"], by_name["a"]["view_position"]) == (None,) * 3
    assert (by_name["b"]["modality"], by_name["b"]["body_part"]) == (None, "CHEST")
    assert by_name["c"]["photometric"] is None and by_name["c"]["modality"] == "CT"
    errors = read_errors(tmp_path / "out" / "m.errors.jsonl", manifest)
    nulled = sorted((Path(e["path"]).name, e["reason"].split(" is not")[0]) for e in errors if e["status"] == "warning")
    assert nulled == [("a", "BodyPartExamined"), ("a", "Modality"), ("a", "ViewPosition"), ("b", "Modality"),
                      ("c", "PhotometricInterpretation")]
    assert "by modality: CT 1, unknown 2" in captured.out


def test_geometry_that_does_not_match_the_data_is_an_error(tmp_path):
    export = tmp_path / "export"
    good = _native(export / "good", SOPInstanceUID="1.2.3.6.1")
    good_jpeg = _jpeg(export / "good_jpeg", [_jpeg_frame(0), _jpeg_frame(1)], SOPInstanceUID="1.2.3.6.2")
    bad = {
        "bits": _native(export / "bits", BitsAllocated=12, SOPInstanceUID="1.2.3.6.3"),
        "huge": _native(export / "huge", rows=65535, columns=65535, SOPInstanceUID="1.2.3.6.4"),
        "frames": _native(export / "frames", NumberOfFrames=200000, SOPInstanceUID="1.2.3.6.5"),
        "short": _native(export / "short", NumberOfFrames=40, SOPInstanceUID="1.2.3.6.6"),
        "fragments": _jpeg(export / "fragments", [_jpeg_frame(2)] * 3, bot=False, NumberOfFrames=2000,
                           SOPInstanceUID="1.2.3.6.7"),
        "bot": _short_offset_table(export / "bot", SOPInstanceUID="1.2.3.6.8"),
        "video": _jpeg(export / "video", [_jpeg_frame(4)], syntax=MPEG2MPML, SOPInstanceUID="1.2.3.6.9"),
    }
    # unknown transfer syntax: same length as Explicit VR Little Endian's UID, so the file meta stays consistent
    raw = _native(tmp_path / "tmp.dcm", SOPInstanceUID="1.2.3.6.10").read_bytes()
    (export / "syntax").write_bytes(raw.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.99999.1.2.1\x00", 1))
    bad["syntax"] = export / "syntax"
    # a JPEG cut off in the middle of its only fragment
    whole = _jpeg(tmp_path / "whole.dcm", [_jpeg_frame(5)], SOPInstanceUID="1.2.3.6.11").read_bytes()
    (export / "truncated").write_bytes(whole[: len(whole) - 200])
    bad["truncated"] = export / "truncated"

    assert _decodes(good) and _decodes(good_jpeg)
    for name, path in bad.items():
        if name != "fragments":  # pydicom splits 3 fragments over the first 3 of 2000 frames without complaint
            assert not _decodes(path), name
        assert path.stat().st_size < 12_000

    summary, records, errors = _ingest(export, tmp_path / "m.jsonl")
    assert sorted(Path(r["image"]).name for r in records) == ["good", "good_jpeg", "good_jpeg"]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert set(reasons) == set(bad) and all(e["status"] == "error" for e in errors)
    assert reasons["bits"].startswith("invalid BitsAllocated")
    assert reasons["huge"].startswith("image too large") and "65535 x 65535" in reasons["huge"]
    assert reasons["frames"].startswith("too many frames") and summary["records"] == 3
    assert reasons["short"].startswith("pixel data shorter than the declared geometry")
    assert f"= {40 * SIDE * SIDE * 2}" in reasons["short"]  # 40 frames x 8 x 8 x 1 sample x 16 bits / 8
    assert reasons["fragments"].startswith("fewer fragments than frames") and "only 3 fragment" in reasons["fragments"]
    assert reasons["bot"].startswith("inconsistent Basic Offset Table")
    assert reasons["video"].startswith("undecodable transfer syntax") and "MPEG2" in reasons["video"]
    assert reasons["syntax"].startswith("unknown transfer syntax")
    assert reasons["truncated"].startswith("truncated file")


def _corrupt_jpeg_export(root: Path) -> tuple[Path, Path]:
    """A 20-frame JPEG that decodes and a JPEG whose header and fragments are fine but whose stream is not."""
    good = _jpeg(root / "cine", [_jpeg_frame(i) for i in range(20)], SOPInstanceUID="1.2.3.7.1")
    stream = bytearray(_jpeg_frame(99))
    sof = stream.index(b"\xff\xc0")
    stream[sof + 5 : sof + 9] = b"\x00\x00\x00\x00"  # SOF0 height and width 0: libjpeg and Pillow refuse it
    corrupt = _jpeg(root / "corrupt", [bytes(stream)], SOPInstanceUID="1.2.3.7.2")
    assert _decodes(good) and not _decodes(corrupt)
    return good, corrupt


def test_verify_decode_moves_undecodable_records_to_the_errors_file(tmp_path, capsys):
    _corrupt_jpeg_export(tmp_path / "export")
    common = ["--workers", "2", "--no-progress", "--allow-insecure-key"]
    assert _cli(["ingest", str(tmp_path / "export"), "-o", str(tmp_path / "plain.jsonl"), *common]) == 0
    records = read_manifest(tmp_path / "plain.jsonl")
    assert "corrupt" in {Path(r["image"]).name for r in records}  # the header alone cannot tell
    capsys.readouterr()
    manifest = tmp_path / "verified.jsonl"
    assert _cli(["ingest", str(tmp_path / "export"), "-o", str(manifest), *common, "--verify-decode"]) == 0
    out = capsys.readouterr().out
    kept = read_manifest(manifest)
    assert [Path(r["image"]).name for r in kept] == ["cine"] * 20
    errors = read_errors(tmp_path / "verified.errors.jsonl", manifest)
    failed = [e for e in errors if e["reason"].startswith("cannot decode")]
    corrupt_id = next(r["id"] for r in records if Path(r["image"]).name == "corrupt")
    assert [(Path(e["path"]).name, e["id"]) for e in failed] == [("corrupt", corrupt_id)]
    assert str(tmp_path) not in failed[0]["reason"]
    assert "decode verified: 1 record(s) failed" in out


def test_validate_decode_reports_and_writes_a_cleaned_manifest(tmp_path, capsys):
    _corrupt_jpeg_export(tmp_path / "export")
    manifest = tmp_path / "m.jsonl"
    _, records, _ = _ingest(tmp_path / "export", manifest)
    assert len(records) == 21
    corrupt_id = next(r["id"] for r in records if Path(r["image"]).name == "corrupt")
    assert _cli(["manifest", "validate", str(manifest), "--no-progress"]) == 0  # without --decode: looks fine
    capsys.readouterr()
    cleaned = tmp_path / "clean" / "m.jsonl"
    assert _cli(["manifest", "validate", str(manifest), "--decode", "--workers", "2", "--no-progress",
                 "-o", str(cleaned)]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and problems[0].startswith(f"problem: record {corrupt_id}: cannot decode")
    assert "decode: 20 of 21 records decode" in out
    kept = read_manifest(cleaned)
    assert [r["id"] for r in kept] == [r["id"] for r in records if r["id"] != corrupt_id]
    assert kept[0]["image"] == records[0]["image"]  # paths still resolve (private map beside the cleaned copy)
    entries = [json.loads(line) for line in (tmp_path / "clean" / "m.errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["status"]) for e in entries] == [(corrupt_id, "error")]
    assert _cli(["manifest", "validate", str(cleaned), "--decode", "--workers", "1", "--no-progress"]) == 0
    with pytest.raises(Exception, match="add --decode"):
        _cli(["manifest", "validate", str(manifest), "-o", str(tmp_path / "x.jsonl")])
