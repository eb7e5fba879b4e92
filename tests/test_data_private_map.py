"""No identifiers in the paths of shareable files (issue 12, item 2).

A PACS-like export whose folder and file names carry a patient's name, birth date and MRN goes through
``medssl ingest`` -> ``manifest split`` -> ``pretrain`` -> ``evaluate`` -> ``report``: none of these strings may
appear in any file except the private map ``<manifest>.private.jsonl`` (mode 0600), nor on stdout/stderr or in
the logs, while the manifest still loads with the real file paths. Every file is searched as bytes (binary ones
too: checkpoints, safetensors, TensorBoard events, feature caches, plots).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medssl.cli import main
from medssl.data.private_map import private_map_path, read_errors
from medssl.data.sources import records_from_path

NAME, BIRTH, MRN = "DOE^JOHN", "19450314", "MRN123456"
#: searched in every byte of every file (case-insensitive): long enough that random bytes (weights, features,
#: compressed plots) never hold them by chance, and covering the ways a name, date or MRN is re-formatted
BYTE_NEEDLES = tuple(n.lower().encode() for n in (NAME, "DOE JOHN", "JOHN DOE", "DOE_JOHN", "DOE, JOHN", BIRTH,
                                                   "1945-03-14", "14.03.1945", MRN, "123456"))
#: the name parts alone, searched where bytes decode as text (not next to other letters, so "does" is no hit)
NAME_PARTS = re.compile(r"(?<![a-z])(doe|john)(?![a-z])", re.IGNORECASE)
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
KEY = "5f1c0e4a9b7d2c3e8a6f4b1d0c9e7a2b"  # 128 bits, hex


def _write_cr(path: Path, pixels: np.ndarray, patient_id: str, patient_name: str, study_uid: str) -> None:
    """A small valid CR image (16-bit, 12 bits stored) with PHI in its header, as a PACS export holds it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, BIRTH
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _export(root: Path) -> dict[str, str]:
    """6 patients x 4 images; patient 0 is DOE^JOHN. Returns {absolute file path: class label}."""
    rng = np.random.default_rng(0)
    labels: dict[str, str] = {}
    patients = [(NAME, MRN)] + [(f"PAT^NUMBER{i}", f"ID00000{i}") for i in range(1, 6)]
    for p, (name, pid) in enumerate(patients):
        study = generate_uid()
        folder = root / f"{name}_{BIRTH}_{pid}" / f"STUDY_{BIRTH}"
        for i in range(4):
            label = "bright" if (p + i) % 2 else "dark"
            base = 3000 if label == "bright" else 600
            pixels = np.clip(base + rng.normal(0, 200, (32, 32)), 0, 4095)
            path = folder / f"IM_{pid}_{i:04d}.dcm"
            _write_cr(path, pixels, pid, name, study)
            labels[str(path)] = label
    (root / f"{NAME}_{BIRTH}_{MRN}" / "notes.txt").write_text("not a DICOM file")  # -> errors file
    return labels


def _assert_clean(where: str, data: str | bytes) -> None:
    """No identifier in ``data``: :data:`BYTE_NEEDLES` in any bytes, :data:`NAME_PARTS` where they are text."""
    raw = data.encode() if isinstance(data, str) else data
    lowered = raw.lower()
    for needle in BYTE_NEEDLES:
        assert needle not in lowered, f"{needle!r} leaked into {where}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # binary: the long needles above cover names, dates and MRNs in paths and headers
        return
    hit = NAME_PARTS.search(text)
    assert hit is None, f"{hit.group(0)!r} leaked into {where}"


def _files_bytes(folder: Path, skip: set[Path] = frozenset()) -> dict[str, bytes]:
    """Every file below ``folder``: its path relative to ``folder`` (checked on its own) and its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path not in skip:
            rel = str(path.relative_to(folder))
            out[f"{folder.name}/{rel}"] = path.read_bytes()
            out[f"the name of {folder.name}/{rel}"] = rel.encode()
    return out


@pytest.fixture()
def ingested(tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("MEDSSL_DEID_KEY", KEY)
    export = tmp_path / "export"
    labels = _export(export)
    work = tmp_path / "work"
    manifest = work / "cxr.jsonl"
    with caplog.at_level(logging.DEBUG):
        assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress",
                     "--summary-json", str(work / "summary.json")]) == 0
    captured = capfd.readouterr()
    return export, labels, work, manifest, captured, caplog.text


def test_ingest_keeps_paths_only_in_the_private_map(ingested):
    export, labels, work, manifest, captured, logs = ingested
    private = private_map_path(manifest)
    assert private.stat().st_mode & 0o777 == 0o600
    assert NAME in private.read_text() and MRN in private.read_text()
    for where, text in {**_files_bytes(work, {private}), "stdout": captured.out, "stderr": captured.err,
                        "logs": logs}.items():
        _assert_clean(where, text)
    assert {p.name for p in work.iterdir()} == {"cxr.jsonl", "cxr.jsonl.private.jsonl", "cxr.errors.jsonl",
                                                "cxr.jsonl.state.json", "summary.json"}
    # the manifest still loads (as the engines read it) with the real file paths resolved
    records = records_from_path(manifest)
    assert sorted(r["image"] for r in records) == sorted(labels)
    assert all(r["deidentified"] is True for r in records)
    first = records[0]
    with pydicom.dcmread(first["image"]) as ds:
        assert (ds.Rows, ds.Columns) == (first["rows"], first["columns"])
    # the errors file names the text file by a keyed pseudonym; the path comes back from the private map
    errors = read_errors(work / "cxr.errors.jsonl", manifest)
    assert [Path(e["path"]).name for e in errors] == ["notes.txt"] and errors[0]["file"].startswith("file-")
    # the state file keys files by pseudonym and checks the key with scrypt, not a fast HMAC
    state = json.loads((work / "cxr.jsonl.state.json").read_text())
    assert state["key_check"]["kdf"] == "scrypt" and state["key_check"]["n"] >= 2**14
    assert all(k.startswith("file-") for k in state["files"])


def test_private_map_survives_a_rerun_and_a_moved_manifest(ingested, tmp_path):
    export, labels, work, manifest, _, _ = ingested
    before = manifest.read_text()
    assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress"]) == 0
    assert manifest.read_text() == before
    summary = json.loads((work / "summary.json").read_text())
    assert summary["records"] == len(labels) and summary["deidentified"] is True
    # a manifest copied without its private map cannot silently lose its images
    lonely = tmp_path / "elsewhere" / "cxr.jsonl"
    lonely.parent.mkdir()
    lonely.write_text(before)
    with pytest.raises(Exception, match=r"no 'image'.*private map"):
        records_from_path(lonely)


def test_pretrain_evaluate_and_report_leave_no_identifier_in_their_folders(ingested, capfd):
    export, labels, work, manifest, _, _ = ingested
    # join labels by record id (as a user would, from the private map's paths) and split by patient
    private = {e["id"]: e["image"] for e in map(json.loads, private_map_path(manifest).read_text().splitlines())
               if "id" in e}
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in lines:
        record["label"] = labels[str(manifest.parent / private[record["id"]])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    split = work / "cxr_split.jsonl"
    assert main(["manifest", "split", str(manifest), "-o", str(split), "--ratios", "0.5,0.17,0.33",
                 "--group", "patient_id"]) == 0
    assert private_map_path(split).is_file()
    run, evals = work / "runs" / "p1x", work / "evals" / "p1x"
    tiny = ["--arch", "resnet18", "--small-stem", "--widen-factor", "0.25", "--image-size", "32"]
    assert main(["pretrain", "--data", str(split), "--method", "simclr", "--init", "random", *tiny,
                 "--iterations", "2", "--batch-size", "8", "--modality", "xray", "--workers", "0",
                 "--knn-every", "0", "--no-progress", "--out", str(run)]) == 0
    assert main(["evaluate", "--backbone", str(run / "backbone.safetensors"), "--data", str(split), "--name", "P1X",
                 "--protocol", "linear", "--fractions", "1.0", "--trials", "1", "--epochs", "2",
                 "--batch-size", "8", "--bootstrap", "1000", "--out", str(evals)]) == 0
    reports = work / "reports"
    assert main(["report", str(evals), "-o", str(reports), "--pretrain-runs", str(run)]) == 0
    captured = capfd.readouterr()
    scanned = {**_files_bytes(run), **_files_bytes(evals), **_files_bytes(reports)}
    kinds = {Path(name).suffix for name in scanned if not name.startswith("the name of")}
    assert {".safetensors", ".pt", ".json", ".jsonl", ".csv", ".md", ".png", ".npy"} <= kinds, kinds
    assert any("tfevents" in name for name in scanned)
    for where, data in {**scanned, "stdout": captured.out, "stderr": captured.err}.items():
        _assert_clean(where, data)
    for folder in (run, evals, reports):
        assert not list(folder.rglob("*.private.jsonl"))
    predictions = (evals / "predictions.csv").read_text()
    assert {line.split(",")[0] for line in predictions.splitlines()[1:]} <= {r["id"] for r in lines}


def test_folder_ids_are_keyed_pseudonyms(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(2):
            (folder / label / f"{MRN}_{i}.png").write_bytes(b"\x89PNG")
    monkeypatch.delenv("MEDSSL_DEID_KEY", raising=False)
    plain = records_from_path(folder)
    unkeyed = {"img-" + hashlib.sha256(f"{label}/{MRN}_{i}.png".encode()).hexdigest()[:16]
               for label in "ab" for i in range(2)}
    assert {r["id"] for r in plain} == unkeyed and all(r["deidentified"] is False for r in plain)
    ids = {}
    for key in (KEY, "0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"):
        monkeypatch.setenv("MEDSSL_DEID_KEY", key)
        records = records_from_path(folder)
        ids[key] = [r["id"] for r in records]
        assert not set(ids[key]) & unkeyed and all(r["deidentified"] is True for r in records)
    assert not set(ids[KEY]) & set(ids["0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"])
    assert len(set(ids[KEY])) == 4


def test_old_manifests_with_inline_paths_still_load(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"x")
    manifest = tmp_path / "old.jsonl"
    manifest.write_text(json.dumps({"id": "r0", "image": "x.png", "source": "image", "label": "a"}) + "\n")
    assert not private_map_path(manifest).exists()
    assert [r["image"] for r in records_from_path(manifest)] == [os.path.normpath(image)]
