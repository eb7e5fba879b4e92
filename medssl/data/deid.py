"""De-identification: keyed pseudonyms for identifiers and a scrubber for free text.

Patient, study, series and instance identifiers become keyed hashes (HMAC-SHA256 with a secret key, truncated
to 16 hex digits = 64 bits, prefixed by kind: ``pat-``, ``stu-``, ``ser-``, ``img-``, ``les-``). The same key
gives the same pseudonym for the same identifier on every run and machine, so manifests built at different
times can be joined; without the key the identifiers cannot be recovered or confirmed by guessing.

The key comes from an environment variable (``MEDSSL_DEID_KEY`` by default). When it is missing or weaker
than :data:`MIN_KEY_BITS` (128 bits, counted by :func:`key_strength`), :meth:`Pseudonymizer.from_env` raises a
one-line error instead of silently going on; demos and tests may pass ``allow_insecure_default=True``
(``--allow-insecure-key``), which logs a warning and uses the key given, or a fixed, publicly known key when
none is set. Records built with such a key are marked ``"deidentified": false`` (:func:`deidentification_status`).

:meth:`Pseudonymizer.key_check` stores a check of the key that costs one scrypt evaluation
(:data:`KEY_CHECK_SCRYPT`) per guess, so a state file cannot confirm a guessed key faster than the KDF allows.

Nothing from :data:`PHI_TAGS` is ever written by medssl: the ingest keeps only the technical attributes of
an image and pseudonyms of the identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from medssl.errors import MedsslError

logger = logging.getLogger("medssl.data.deid")

DEFAULT_KEY_ENV = "MEDSSL_DEID_KEY"
INSECURE_DEMO_KEY = b"medssl-insecure-demo-key-do-not-use-for-real-data"
MIN_KEY_LENGTH = 16  # characters, in the hint of the "key missing" message (32 hex digits = 128 bits)
MIN_KEY_BITS = 128  # NIST SP 800-131A / 800-107: HMAC keys of at least 112 bits; we round up to the AES-128 level
MIN_DISTINCT_CHARACTERS = 6  # fewer distinct characters than this = obviously low-entropy (e.g. "0000...1")
PSEUDONYM_HEX_DIGITS = 16
#: scrypt parameters of the stored key check (RFC 7914): N = 2**16, r = 8, p = 1 -> 64 MiB and about 0.2 s per
#: evaluation on one CPU core (measured 0.18 s on the project's CI machine), i.e. per offline guess.
KEY_CHECK_SCRYPT: dict[str, int] = {"n": 2**16, "r": 8, "p": 1}
_SCRYPT_MAXMEM = 256 << 20
_HEX = re.compile(r"[0-9a-fA-F]+")

KIND_PREFIXES: dict[str, str] = {
    "patient": "pat-",
    "study": "stu-",
    "series": "ser-",
    "instance": "img-",
    "lesion": "les-",
    "record": "rec-",
}

# (tag, keyword): DICOM attributes that identify a person or institution. medssl never writes their values;
# the identifiers among them (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) only as pseudonyms.
PHI_TAGS: tuple[tuple[str, str], ...] = (
    ("(0010,0010)", "PatientName"),
    ("(0010,0020)", "PatientID"),
    ("(0010,0021)", "IssuerOfPatientID"),
    ("(0010,0030)", "PatientBirthDate"),
    ("(0010,0032)", "PatientBirthTime"),
    ("(0010,0040)", "PatientSex"),
    ("(0010,1000)", "OtherPatientIDs"),
    ("(0010,1001)", "OtherPatientNames"),
    ("(0010,1005)", "PatientBirthName"),
    ("(0010,1010)", "PatientAge"),
    ("(0010,1040)", "PatientAddress"),
    ("(0010,1060)", "PatientMotherBirthName"),
    ("(0010,2154)", "PatientTelephoneNumbers"),
    ("(0010,4000)", "PatientComments"),
    ("(0008,0050)", "AccessionNumber"),
    ("(0008,0080)", "InstitutionName"),
    ("(0008,0081)", "InstitutionAddress"),
    ("(0008,0090)", "ReferringPhysicianName"),
    ("(0008,1010)", "StationName"),
    ("(0008,1040)", "InstitutionalDepartmentName"),
    ("(0008,1048)", "PhysiciansOfRecord"),
    ("(0008,1050)", "PerformingPhysicianName"),
    ("(0008,1060)", "NameOfPhysiciansReadingStudy"),
    ("(0008,1070)", "OperatorsName"),
    ("(0008,0020)", "StudyDate"),
    ("(0008,0030)", "StudyTime"),
    ("(0020,0010)", "StudyID"),
    ("(0020,000D)", "StudyInstanceUID"),
    ("(0020,000E)", "SeriesInstanceUID"),
    ("(0008,0018)", "SOPInstanceUID"),
    ("(0018,1000)", "DeviceSerialNumber"),
    ("(0032,1032)", "RequestingPhysician"),
    ("(0040,A123)", "PersonName"),
)

_REDACTED = "<redacted>"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PERSON_NAME = re.compile(r"\S*\^\S*")
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")


def scrub_text(text: str, known_values: Iterable[str | None] = ()) -> str:
    """Remove values that may identify a person from a free-text message (e.g. an exception message).

    Redacts every occurrence of ``known_values`` (case-insensitive; values shorter than 2 characters are
    ignored), quoted substrings, DICOM person names (anything containing ``^``), UIDs (4+ dot-separated
    numbers) and runs of 6 or more digits (dates, IDs). DICOM tags such as ``(0028,0301)`` are kept.
    """
    values = sorted({str(v) for v in known_values if v is not None and len(str(v).strip()) >= 2}, key=len, reverse=True)
    for value in values:
        text = re.sub(re.escape(value.strip()), _REDACTED, text, flags=re.IGNORECASE)
    text = _QUOTED.sub(_REDACTED, text)
    text = _PERSON_NAME.sub(_REDACTED, text)
    text = _UID.sub(_REDACTED, text)
    return _LONG_NUMBER.sub(_REDACTED, text)


class Pseudonymizer:
    """Keyed pseudonyms: ``prefix + hex(HMAC-SHA256(key, kind + NUL + value))[:16]``.

    Args:
        key: the secret key (at least 128 bits as counted by :func:`key_strength`).

    ``insecure`` is True when the key is the public demo key or weaker than :data:`MIN_KEY_BITS`; the records
    then carry ``"deidentified": false`` (see :attr:`deidentified`).
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or not key:
            raise MedsslError("the de-identification key must be non-empty bytes")
        self._key = key
        self.demo = hmac.compare_digest(key, INSECURE_DEMO_KEY)
        self.weakness = key_weakness(key.decode("utf-8", errors="replace"))
        self.insecure = self.demo or self.weakness is not None

    @property
    def deidentified(self) -> bool:
        """True when pseudonyms made with this key count as de-identified (a secret key of >= 128 bits)."""
        return not self.insecure

    def key_check(self, salt: bytes | None = None) -> dict[str, Any]:
        """A stored check of the key: ``scrypt(key, salt, **KEY_CHECK_SCRYPT)`` with a random 16-byte salt.

        Confirming a guessed key against it costs one scrypt evaluation (64 MiB, ~0.2 s), not one HMAC.
        """
        salt = os.urandom(16) if salt is None else salt
        digest = hashlib.scrypt(self._key, salt=salt, maxmem=_SCRYPT_MAXMEM, dklen=32, **KEY_CHECK_SCRYPT)
        return {"kdf": "scrypt", **KEY_CHECK_SCRYPT, "salt": salt.hex(), "hash": digest.hex()}

    def matches_key_check(self, check: Any) -> bool:
        """True when ``check`` (from :meth:`key_check`, possibly another process) was made with this key."""
        if not isinstance(check, Mapping) or check.get("kdf") != "scrypt":
            return False
        try:
            salt = bytes.fromhex(str(check["salt"]))
            params = {name: int(check[name]) for name in KEY_CHECK_SCRYPT}
            digest = hashlib.scrypt(self._key, salt=salt, maxmem=_SCRYPT_MAXMEM, dklen=32, **params)
        except (KeyError, TypeError, ValueError, MemoryError):
            return False
        return hmac.compare_digest(digest.hex(), str(check.get("hash", "")))

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymizer(insecure={self.insecure})"

    @staticmethod
    def prefix(kind: str) -> str:
        """The pseudonym prefix of ``kind`` (``patient`` -> ``pat-``; other kinds -> ``<kind>-``)."""
        return KIND_PREFIXES.get(kind, f"{kind}-")

    def pseudonym(self, kind: str, value: str | None) -> str | None:
        """Pseudonym of ``value`` for identifier ``kind``; ``None`` for a missing or blank value.

        Surrounding whitespace and DICOM padding (NUL) are stripped first, so ``"12345 "`` and ``"12345"``
        map to the same pseudonym. Different kinds give unrelated pseudonyms for the same value.
        """
        if value is None:
            return None
        value = str(value).strip().strip("\x00").strip()
        if not value:
            return None
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return self.prefix(kind) + digest[:PSEUDONYM_HEX_DIGITS]

    @classmethod
    def from_env(cls, env_var: str = DEFAULT_KEY_ENV, *, allow_insecure_default: bool = False) -> Pseudonymizer:
        """Build from the secret in environment variable ``env_var`` (UTF-8 text, used as the HMAC key bytes).

        Raises :class:`MedsslError` (one line) when the variable is unset or empty, or when the key is weaker
        than :data:`MIN_KEY_BITS` (:func:`key_weakness`), unless ``allow_insecure_default``
        (``--allow-insecure-key``; demos, tests): then a warning is logged and the weak key, or the public demo
        key when none is set, is used, and records are marked not de-identified.
        """
        secret = os.environ.get(env_var, "")
        if not secret:
            if not allow_insecure_default:
                raise MedsslError(
                    f"de-identification key missing: set the environment variable {env_var} to a secret of at "
                    f"least {MIN_KEY_BITS} bits, e.g. export {env_var}=$(python -c "
                    "'import secrets; print(secrets.token_hex(32))'), and keep it to rebuild the same pseudonyms"
                )
            logger.warning(
                "%s is not set: using the PUBLIC demo key; pseudonyms are not secret (demo/test use only)", env_var
            )
            return cls(INSECURE_DEMO_KEY)
        weakness = key_weakness(secret)
        if weakness is not None:
            if not allow_insecure_default:
                raise MedsslError(f"{env_var} is refused: {weakness}; use e.g. $(python -c 'import secrets; "
                                  "print(secrets.token_hex(32))') or pass --allow-insecure-key (not de-identified)")
            logger.warning("%s is insecure (%s): records are marked not de-identified", env_var, weakness)
        return cls(secret.encode("utf-8"))


def key_strength(secret: str) -> int:
    """Nominal strength of a key in bits: 4 per character for a hex string (only ``0-9a-fA-F``, the form of
    ``secrets.token_hex``), otherwise 8 per UTF-8 byte. Low-entropy patterns are judged by :func:`key_weakness`."""
    if _HEX.fullmatch(secret):
        return 4 * len(secret)
    return 8 * len(secret.encode("utf-8"))


def key_weakness(secret: str) -> str | None:
    """Why ``secret`` is not an acceptable key, or ``None``.

    Refused: fewer than :data:`MIN_KEY_BITS` bits by :func:`key_strength`; fewer than
    :data:`MIN_DISTINCT_CHARACTERS` distinct characters; a repetition of a pattern of at most half its length
    (``"abcabcabc..."``); a run of consecutive or equal characters (``"0123456789abcdef"``).
    """
    bits = key_strength(secret)
    if bits < MIN_KEY_BITS:
        return f"it has {bits} bits (hex keys count 4 bits a character, others 8 bits a byte), fewer than {MIN_KEY_BITS}"
    distinct = len(set(secret))
    if distinct < MIN_DISTINCT_CHARACTERS:
        return f"it uses only {distinct} distinct characters (low entropy)"
    for period in range(1, len(secret) // 2 + 1):
        if len(secret) % period == 0 and secret == secret[:period] * (len(secret) // period):
            return f"it repeats a {period}-character pattern (low entropy)"
    steps = {ord(b) - ord(a) for a, b in zip(secret, secret[1:])}
    if len(steps) == 1 and steps <= {-1, 0, 1}:
        return "it is a run of consecutive characters (low entropy)"
    return None


def deidentification_status(records: Iterable[Mapping[str, Any]]) -> str:
    """``"de-identified"`` when every record says ``"deidentified": true``, ``"not de-identified"`` when any
    says false, ``"unknown"`` otherwise (e.g. manifests written before the field existed); for reports."""
    values = {record.get("deidentified") for record in records}
    if False in values:
        return "not de-identified"
    return "de-identified" if values == {True} else "unknown"


def records_deidentified(records: Iterable[Mapping[str, Any]]) -> bool:
    """True when every record is marked de-identified (:func:`deidentification_status`)."""
    return deidentification_status(records) == "de-identified"


def folder_pseudonymizer(env_var: str = DEFAULT_KEY_ENV) -> Pseudonymizer | None:
    """The pseudonymizer for record ids of folder/file inputs: from ``env_var`` when it is set, ``None`` when
    unset (ids then unkeyed). Records are marked ``"deidentified": false`` in both insecure cases: no key, or a
    key weaker than :data:`MIN_KEY_BITS` (used with a warning, since these inputs have no
    ``--allow-insecure-key`` to ask for)."""
    if not os.environ.get(env_var):
        return None
    return Pseudonymizer.from_env(env_var, allow_insecure_default=True)
