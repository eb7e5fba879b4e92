"""No PHI: planted names, IDs, birth dates, accession numbers, institutions and UIDs never leave the ingest."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pydicom
import pydicom.data

from medssl.cli import data_cmd
from medssl.data.private_map import read_errors

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"

PHI = {
    "PatientName": "Quixotic^Zebulon^Marmaduke",
    "PatientID": "PID8675309QX",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC77441199",
    "InstitutionName": "Saint Hypothetical Infirmary",
    "ReferringPhysicianName": "Drumblewick^Hortensia",
    "PerformingPhysicianName": "Vantablack^Osgood",
    "StudyInstanceUID": "1.2.826.0.1.99887766.1",
    "SeriesInstanceUID": "1.2.826.0.1.99887766.2",
    "OtherPatientIDs": "OTHERID424242",
}


def _plant(source: str, dest: Path, sop_uid: str, **overrides) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(PYDICOM_FILES / source)
        for keyword, value in {**PHI, **overrides}.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = sop_uid
        ds.save_as(dest, enforce_file_format=False)


def _needles() -> list[str]:
    values = list(PHI.values()) + ["1.2.826.0.1.99887766.3", "1.2.826.0.1.99887766.4", "1.2.826.0.1.99887766.5"]
    parts = [p for v in PHI.values() if "^" in v for p in v.split("^")]
    return [v.lower() for v in values + parts]


def test_planted_phi_never_appears_in_outputs(tmp_path, capsys, caplog, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    _plant("CT_small.dcm", export / "a", "1.2.826.0.1.99887766.3")
    _plant("MR_small.dcm", export / "b", "1.2.826.0.1.99887766.4", BurnedInAnnotation="YES")
    _plant("rtplan.dcm", export / "c", "1.2.826.0.1.99887766.5")  # non-image -> errors file
    # a truncated copy (error path) and a copy whose UI value is invalid, which pydicom would warn about, quoting it
    (export / "d").write_bytes((export / "a").read_bytes()[:3000])
    raw = (export / "b").read_bytes().replace(b"1.2.826.0.1.99887766.4", b"PID8675309QX.Quixotic0")  # same length
    (export / "e").write_bytes(raw)

    monkeypatch.setenv("MEDSSL_TEST_DEID_KEY", "phi-test-key-0123456789")
    manifest = tmp_path / "out" / "m.jsonl"
    summary_json = tmp_path / "out" / "summary.json"
    import argparse

    parser = argparse.ArgumentParser()
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", str(export), "-o", str(manifest), "--deid-key-env", "MEDSSL_TEST_DEID_KEY",
                              "--workers", "1", "--summary-json", str(summary_json)])
    with caplog.at_level(logging.DEBUG):
        assert args.func(args) == 0
    captured = capsys.readouterr()

    outputs = {
        "manifest": manifest.read_text(),
        "errors": (tmp_path / "out" / "m.errors.jsonl").read_text(),
        "state": Path(str(manifest) + ".state.json").read_text(),
        "summary": summary_json.read_text(),
        "stdout": captured.out,
        "stderr": captured.err,
        "logs": caplog.text,
    }
    for where, text in outputs.items():
        for needle in _needles():
            assert needle not in text.lower(), f"{needle!r} leaked into the {where}"
    records = [json.loads(line) for line in outputs["manifest"].splitlines()]
    assert len(records) >= 2 and {r["patient_id"] for r in records} == {records[0]["patient_id"]}
    assert records[0]["patient_id"].startswith("pat-")
    errors = read_errors(tmp_path / "out" / "m.errors.jsonl", manifest)  # paths from the private map
    assert {Path(e["path"]).name for e in errors} >= {"c", "d"}
    assert any(r["burned_in"] is True for r in records)
