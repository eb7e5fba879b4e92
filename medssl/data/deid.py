"""De-identification: keyed pseudonyms for identifiers and a scrubber for free text.

Patient, study, series and instance identifiers become keyed hashes (HMAC-SHA256 with a secret key, truncated
to 16 hex digits = 64 bits, prefixed by kind: ``pat-``, ``stu-``, ``ser-``, ``img-``, ``les-``). The same key
gives the same pseudonym for the same identifier on every run and machine, so manifests built at different
times can be joined; without the key the identifiers cannot be recovered or confirmed by guessing.

The key comes from an environment variable (``MEDSSL_DEID_KEY`` by default). When it is missing,
:meth:`Pseudonymizer.from_env` raises a clear error instead of silently using a default; demos and tests may
pass ``allow_insecure_default=True``, which logs a warning and uses a fixed, publicly known key.

Nothing from :data:`PHI_TAGS` is ever written by medssl: the ingest keeps only the technical attributes of
an image and pseudonyms of the identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable

from medssl.errors import MedsslError

logger = logging.getLogger("medssl.data.deid")

DEFAULT_KEY_ENV = "MEDSSL_DEID_KEY"
INSECURE_DEMO_KEY = b"medssl-insecure-demo-key-do-not-use-for-real-data"
MIN_KEY_LENGTH = 16
PSEUDONYM_HEX_DIGITS = 16

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
        key: the secret key (at least 16 bytes recommended).

    ``insecure`` is True when the key is the public demo key.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or not key:
            raise MedsslError("the de-identification key must be non-empty bytes")
        self._key = key
        self.insecure = hmac.compare_digest(key, INSECURE_DEMO_KEY)

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
        """Build from the secret in environment variable ``env_var`` (UTF-8 text).

        Raises :class:`MedsslError` when the variable is unset or empty, unless ``allow_insecure_default``
        (demos, tests), in which case a warning is logged and the public demo key is used. A key shorter than
        16 characters is accepted with a warning.
        """
        secret = os.environ.get(env_var, "")
        if not secret:
            if not allow_insecure_default:
                raise MedsslError(
                    f"de-identification key missing: set the environment variable {env_var} to a secret of at "
                    f"least {MIN_KEY_LENGTH} characters, e.g. export {env_var}=$(python -c "
                    "'import secrets; print(secrets.token_hex(32))'), and keep it to rebuild the same pseudonyms"
                )
            logger.warning(
                "%s is not set: using the PUBLIC demo key; pseudonyms are not secret (demo/test use only)", env_var
            )
            return cls(INSECURE_DEMO_KEY)
        if len(secret) < MIN_KEY_LENGTH:
            logger.warning("%s is shorter than %d characters: pseudonyms are easier to attack", env_var, MIN_KEY_LENGTH)
        return cls(secret.encode("utf-8"))
