"""Key strength and the stored key check (issue 12, item 4): weak keys refused, the state's check costs a KDF."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
from pathlib import Path

import pydicom.data
import pytest

from medssl.cli import main
from medssl.data.deid import (
    KEY_CHECK_SCRYPT,
    Pseudonymizer,
    deidentification_status,
    key_strength,
    key_weakness,
)
from medssl.data.manifest import read_manifest
from medssl.errors import MedsslError

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _export(root: Path) -> Path:
    root.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_FILES / name, root / name)
    return root


def test_key_strength_counts_hex_by_nibbles_and_text_by_bytes():
    assert key_strength("abc") == 12  # hex: 4 bits a character
    assert key_strength(secrets.token_hex(16)) == 128
    assert key_strength("correct horse!") == 8 * 14  # not hex: 8 bits a UTF-8 byte
    assert key_strength("\u00e9" * 3) == 48  # two UTF-8 bytes each
    assert "fewer than 128" in key_weakness("abc")
    assert key_weakness(secrets.token_hex(16)) is None and key_weakness(secrets.token_urlsafe(24)) is None
    # obviously low-entropy keys of nominally enough bits
    assert "distinct characters" in key_weakness("a" * 40)
    assert "pattern" in key_weakness("secret1-" * 4)
    assert "consecutive" in key_weakness("ABCDEFGHIJKLMNOPQRSTU")


def test_three_character_key_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    export = _export(tmp_path / "export")
    monkeypatch.setenv("MEDSSL_DEID_KEY", "abc")
    manifest = tmp_path / "m.jsonl"
    assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MEDSSL_DEID_KEY" in err[0] and "128" in err[0] and "abc" not in err[0]
    assert not manifest.exists()
    with pytest.raises(MedsslError, match="refused"):
        Pseudonymizer.from_env("MEDSSL_DEID_KEY")
    # --allow-insecure-key: accepted, but every record says it is not de-identified, and so does the summary
    assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress",
                 "--allow-insecure-key"]) == 0
    assert "NOT de-identified" in capsys.readouterr().out
    records = read_manifest(manifest)
    assert records and deidentification_status(records) == "not de-identified"
    assert deidentification_status([dict(r, deidentified=True) for r in records]) == "de-identified"
    assert deidentification_status([{"id": "x"}]) == "unknown"


def test_state_key_check_is_salted_scrypt(tmp_path, caplog):
    export = _export(tmp_path / "export")
    key = secrets.token_hex(16).encode()
    pz = Pseudonymizer(key)
    from medssl.data.ingest import IngestOptions, ingest_dicom

    states = []
    for name in ("a.jsonl", "b.jsonl"):
        ingest_dicom(export, tmp_path / name, pseudonymizer=pz, options=IngestOptions(workers=1, progress=False))
        states.append(json.loads((tmp_path / (name + ".state.json")).read_text()))
    check = states[0]["key_check"]
    # independent recomputation: scrypt(key, stored salt, stored parameters), at least the documented cost
    assert check["kdf"] == "scrypt" and {k: check[k] for k in ("n", "r", "p")} == KEY_CHECK_SCRYPT
    assert 128 * check["r"] * check["n"] >= 32 << 20  # >= 32 MiB of memory per guess
    expected = hashlib.scrypt(key, salt=bytes.fromhex(check["salt"]), n=check["n"], r=check["r"], p=check["p"],
                              maxmem=256 << 20, dklen=32)
    assert check["hash"] == expected.hex()
    assert states[1]["key_check"]["salt"] != check["salt"]  # a random salt per state file
    # the old check (one HMAC) appears nowhere in the state
    old = "rec-" + hmac.new(key, b"record\x00medssl-ingest-key-check", hashlib.sha256).hexdigest()[:16]
    assert old not in json.dumps(states[0])
    assert pz.matches_key_check(check) and not Pseudonymizer(secrets.token_hex(16).encode()).matches_key_check(check)


def test_old_state_file_is_migrated_with_a_rescan(tmp_path, caplog):
    from medssl.data.ingest import IngestOptions, ingest_dicom

    export = _export(tmp_path / "export")
    pz = Pseudonymizer(secrets.token_hex(16).encode())
    manifest = tmp_path / "m.jsonl"
    state_path = tmp_path / "m.jsonl.state.json"
    state_path.write_text(json.dumps({"version": 1, "key_check": "rec-0123456789abcdef", "files": {
        "CT_small.dcm": {"size": 1, "mtime_ns": 1, "result": {"status": "skip", "reason": "x", "header": None}}},
        "dicomdirs": {}}))
    with caplog.at_level(logging.WARNING, logger="medssl"):
        summary = ingest_dicom(export, manifest, pseudonymizer=pz, options=IngestOptions(workers=1, progress=False))
    assert summary["files_opened"] == 2 and summary["records"] == 2
    assert "old format" in caplog.text
    state = json.loads(state_path.read_text())
    assert state["key_check"]["kdf"] == "scrypt" and "CT_small.dcm" not in state_path.read_text()
