"""Pseudonymizer and scrub_text: keyed, deterministic, separated by kind, no silent default key."""

from __future__ import annotations

import hashlib
import logging

import pytest

from medssl.data.deid import INSECURE_DEMO_KEY, PHI_TAGS, Pseudonymizer, scrub_text
from medssl.errors import MedsslError


def _reference_hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 written out from RFC 2104 (independent of the hmac module)."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


def test_pseudonym_is_rfc2104_hmac_with_kind_prefix():
    key = b"0123456789abcdef-secret"
    pz = Pseudonymizer(key)
    got = pz.pseudonym("patient", "PID-12345")
    assert got == "pat-" + _reference_hmac_sha256(key, b"patient\x00PID-12345")[:16]
    assert pz.pseudonym("study", "1.2.3").startswith("stu-")
    assert pz.pseudonym("series", "1.2.3").startswith("ser-")
    assert pz.pseudonym("instance", "1.2.3").startswith("img-")
    assert pz.pseudonym("lesion", "HAM_0001").startswith("les-")


def test_pseudonym_properties():
    a, b = Pseudonymizer(b"key-number-one-123"), Pseudonymizer(b"key-number-two-456")
    assert a.pseudonym("patient", "X1") == a.pseudonym("patient", " X1 \x00")  # DICOM padding ignored
    assert a.pseudonym("patient", "X1") != b.pseudonym("patient", "X1")  # depends on the key
    assert a.pseudonym("patient", "X1")[4:] != a.pseudonym("study", "X1")[4:]  # kinds separated
    assert a.pseudonym("patient", None) is None and a.pseudonym("patient", "  ") is None
    values = [f"P{i}" for i in range(2000)]
    assert len({a.pseudonym("patient", v) for v in values}) == len(values)
    assert "key-number" not in repr(a)


def test_from_env_requires_key(monkeypatch, caplog):
    monkeypatch.delenv("MEDSSL_TEST_KEY", raising=False)
    with pytest.raises(MedsslError, match="MEDSSL_TEST_KEY"):
        Pseudonymizer.from_env("MEDSSL_TEST_KEY")
    with caplog.at_level(logging.WARNING, logger="medssl"):
        demo = Pseudonymizer.from_env("MEDSSL_TEST_KEY", allow_insecure_default=True)
    assert demo.insecure and "PUBLIC demo key" in caplog.text
    assert demo.pseudonym("patient", "A") == Pseudonymizer(INSECURE_DEMO_KEY).pseudonym("patient", "A")
    monkeypatch.setenv("MEDSSL_TEST_KEY", "a-real-secret-of-enough-length")
    real = Pseudonymizer.from_env("MEDSSL_TEST_KEY")
    assert not real.insecure
    assert real.pseudonym("patient", "A") == Pseudonymizer(b"a-real-secret-of-enough-length").pseudonym("patient", "A")


def test_scrub_text_removes_identifying_values_and_keeps_tags():
    message = (
        "Invalid value for VR PN: 'Doe^Jane' in (0010,0010); UID 1.2.840.113619.2.55.3 "
        "born 19450317, accession ACC99812 at Saint Nowhere Hospital"
    )
    out = scrub_text(message, known_values=["ACC99812", "saint nowhere hospital", None, "x"])
    for secret in ("Doe", "Jane", "1.2.840.113619", "19450317", "ACC99812", "Nowhere"):
        assert secret.lower() not in out.lower()
    assert "(0010,0010)" in out and "Invalid value for VR PN" in out


def test_phi_tags_document_names_ids_dates_and_institutions():
    keywords = {k for _, k in PHI_TAGS}
    for needed in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                   "ReferringPhysicianName", "StudyInstanceUID", "SOPInstanceUID"):
        assert needed in keywords
