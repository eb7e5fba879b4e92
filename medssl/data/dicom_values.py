"""Validation of the DICOM header values that the ingest copies into its outputs.

Only values that pass these checks reach the manifest, the state file, the errors file's reasons or the
printed summary; any other value becomes ``None`` and the ingest records why (without quoting the value,
which may be a name or an ID typed into the wrong field, e.g. Modality ``MRN123456 DOE^JOHN``).

Checks (DICOM PS3.5 section 6.2, value representations; vocabularies from PS3.3):

- CS (Code String: Modality, BodyPartExamined, ViewPosition, PhotometricInterpretation, ImageType): uppercase
  letters, digits, space and underscore, at most 16 characters per value. Values are upper-cased before the
  check (the ingest has always stored them upper case), so ``chest`` becomes ``CHEST``.
- ImageType is never written anywhere: only the flags derived from its valid values (value 1 ``DERIVED``,
  any value ``LOCALIZER``) are kept, so an invalid value (vendors write e.g. ``ABDOM/RAD`` as value 3) is
  dropped without a reason.
- Modality must also be a defined term of PS3.3 C.7.3.1.1.1 (current and retired ones) or one of the
  non-image modalities the ingest recognises.
- PhotometricInterpretation must be one of PS3.3 C.7.6.3.1.2 (including the retired ``HSV``, ``ARGB``,
  ``CMYK`` and the newer ``XYB``).
- ViewPosition (0018,5101) must be one of the defined terms for humans of PS3.3 C.8.1.1 (CR Series Module;
  the DX Positioning Module, C.8.11.5, refers to the same attribute): ``AP``, ``PA``, ``LL``, ``RL``, ``RLD``,
  ``LLD``, ``RLO``, ``LLO``; or ``LATERAL``, which is not a defined term but is what many chest X-ray exports
  (e.g. MIMIC-CXR's DICOM headers) write for a lateral view. The veterinary projection codes
  (Smallwood et al.) and the mammography views (CC, MLO, ...: coded in View Code Sequence, CID 4014, not in
  this attribute) are not accepted, so a CS-valid name such as ``DOE JOHN`` cannot pass as a view.
- BodyPartExamined is checked as a CS only: its defined terms (PS3.16 Annex L, several hundred, extended by
  each edition and by vendors) are too many to enumerate here.
- UI (Unique Identifier: the transfer syntax): digits and dots, at most 64 characters.
"""

from __future__ import annotations

import re
from typing import Any

CS_MAX_CHARS = 16  # PS3.5 table 6.2-1: CS is at most 16 bytes per value
UI_MAX_CHARS = 64  # PS3.5 table 6.2-1: UI is at most 64 bytes
_CS = re.compile(r"[A-Z0-9 _]*")
_UI = re.compile(r"[0-9]+(\.[0-9]+)*")

# PS3.3 C.7.3.1.1.1 Modality defined terms (2024 edition), current and retired.
MODALITY_TERMS: frozenset[str] = frozenset(
    {
        "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DMS", "DG", "DOC",
        "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS",
        "KER", "KO", "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF",
        "OPV", "OSS", "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
        "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR",
        "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
        # retired
        "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF",
    }
)
# PS3.3 C.7.6.3.1.2 Photometric Interpretation (HSV, ARGB, CMYK retired; XYB added for JPEG XL).
PHOTOMETRIC_TERMS: frozenset[str] = frozenset(
    {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
        "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK",
    }
)


# PS3.3 C.8.1.1 View Position defined terms (humans), plus the widespread vendor value LATERAL.
VIEW_POSITION_TERMS: frozenset[str] = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LATERAL"})


def cs_values(text: str | None) -> tuple[list[str] | None, str | None]:
    """Split a (possibly multi-valued) CS string and check each value.

    Returns ``(values, None)`` when every value is valid (upper-cased, stripped; ``[]`` for an absent value),
    or ``(None, problem)`` naming what is wrong without quoting the value.
    """
    if text is None:
        return [], None
    values = [v.strip().upper() for v in text.split("\\")]
    for value in values:
        if len(value) > CS_MAX_CHARS:
            return None, f"a value longer than {CS_MAX_CHARS} characters"
        if not _CS.fullmatch(value):
            return None, "characters outside A-Z, 0-9, space and underscore"
    return values, None


def valid_uid(text: str | None) -> bool:
    """True for a syntactically valid UI value (digits and dots, at most 64 characters)."""
    return bool(text) and len(text) <= UI_MAX_CHARS and _UI.fullmatch(text) is not None  # type: ignore[arg-type]


def _single(keyword: str, text: str | None, vocabulary: frozenset[str] | None,
            extra: frozenset[str] = frozenset()) -> tuple[str | None, str | None]:
    values, problem = cs_values(text)
    if problem is None and values and len(values) > 1:
        problem = "more than one value"
    if problem is None and values and values[0] and vocabulary is not None and values[0] not in vocabulary | extra:
        problem = "not a defined term"
    if problem is not None:
        return None, f"{keyword} is not a valid DICOM value ({problem}); set to null"
    return (values[0] or None) if values else None, None


def validate_header_values(raw: dict[str, str | None], extra_modalities: frozenset[str] = frozenset()
                           ) -> tuple[dict[str, Any], list[str]]:
    """Validated output values from the raw text of a header's CS attributes.

    Args:
        raw: keyword -> stripped text (``None`` when absent) for ``Modality``, ``BodyPartExamined``,
            ``ViewPosition``, ``PhotometricInterpretation`` and ``ImageType`` (backslash-separated).
        extra_modalities: further Modality values to accept (the non-image modalities the ingest knows).

    Returns:
        ``({"modality", "body_part", "view_position", "photometric", "image_type"}, reasons)``: invalid values
        are ``None`` and each has one reason, e.g. ``"Modality is not a valid DICOM value (characters outside
        A-Z, 0-9, space and underscore); set to null"``. ``image_type`` lists the valid ImageType values
        (positions kept, invalid ones ``""``) and is only for deriving flags, never for output.
    """
    reasons: list[str] = []
    out: dict[str, Any] = {}
    for field, keyword, vocabulary, extra in (
        ("modality", "Modality", MODALITY_TERMS, extra_modalities),
        ("body_part", "BodyPartExamined", None, frozenset()),
        ("view_position", "ViewPosition", VIEW_POSITION_TERMS, frozenset()),
        ("photometric", "PhotometricInterpretation", PHOTOMETRIC_TERMS, frozenset()),
    ):
        out[field], reason = _single(keyword, raw.get(keyword), vocabulary, extra)
        if reason:
            reasons.append(reason)
    text = raw.get("ImageType")
    out["image_type"] = [] if text is None else [
        v if cs_values(v)[1] is None else "" for v in (part.strip().upper() for part in text.split("\\"))
    ]
    return out, reasons
