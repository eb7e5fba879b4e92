"""Header-only checks that a DICOM image's declared geometry matches its pixel data and can be decoded.

:func:`geometry_problem` runs on the facts the ingest's header read already has (the header values and the
position and length of the pixel-data element) and reads at most the 8-byte item headers of encapsulated
pixel data (never the compressed frames themselves). It returns the first problem as a one-line reason or
``None``. Checks, in order:

1. Transfer syntax: a valid UID that pydicom has a pixel-data decoder for, with a decoder plugin installed
   (JPEG, JPEG-LS, JPEG 2000 and HTJ2K through ``pylibjpeg``; MPEG/H.264/HEVC video has none).
2. Caps (:data:`MAX_SIDE_PIXELS`, :data:`MAX_FRAMES`), bits allocated in {1, 8, 16, 32, 64} (32 for Float
   Pixel Data, 64 for Double Float Pixel Data; PS3.5 8.1.1), 1 <= bits stored <= bits allocated, samples per
   pixel 1 or 3 (what the reader supports).
3. Native pixel data: its length must hold frames x rows x columns x samples x bits allocated / 8 bytes
   (rounded up to whole bytes for 1-bit data; YBR_FULL_422 stores 2 samples per pixel, PS3.3 C.7.6.3.1.2).
4. Encapsulated pixel data (PS3.5 A.4): the items must lie inside the file and end with a sequence
   delimiter; there must be at least one fragment and at least one per frame (a fragment never holds data
   of two frames); a non-empty Basic Offset Table must hold one offset per frame, the first 0, each the
   start of a fragment, increasing.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from medssl.data.dicom_values import valid_uid

# Caps. A 16384 x 16384 frame is already 1 GiB as float32 (the reader's working type), 3 GiB in colour, and
# twice the largest matrices of clinical projection detectors (mammography, CR and flat panels stay under
# about 5000 x 7000); a declared 65535 x 65535 frame (16 GiB) is refused before anything tries to allocate it.
MAX_SIDE_PIXELS = 16384
# Enhanced CT/MR series, ultrasound cines and tomosynthesis hold up to a few thousand frames; every frame
# becomes a manifest record, so a larger count is refused as a corrupt or hostile header.
MAX_FRAMES = 50_000
# Upper bound on encapsulated items walked (each costs one 8-byte read); far above MAX_FRAMES.
MAX_FRAGMENTS = 1_000_000
BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
FLOAT_PIXEL_TAG, DOUBLE_PIXEL_TAG = 0x7FE00008, 0x7FE00009
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")


def transfer_syntax_problem(transfer_syntax: str | None) -> str | None:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here, or ``None`` (``None`` syntax: native)."""
    if not transfer_syntax:
        return None  # no file meta: pydicom reads it as native (implicit or explicit VR little endian)
    if not valid_uid(transfer_syntax):
        return "invalid transfer syntax: the UID is not a valid UID"
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return "unknown transfer syntax: not a DICOM transfer syntax UID known to pydicom"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"undecodable transfer syntax: pydicom has no pixel-data decoder for {uid.name}"
    if not decoder.is_available:
        return f"undecodable transfer syntax: no decoder plugin installed for {uid.name} (install pylibjpeg)"
    return None


def _native_bytes(header: dict[str, Any], frames: int) -> int:
    rows, columns = int(header["rows"]), int(header["columns"])
    samples, bits = int(header.get("samples_per_pixel") or 1), int(header["bits_allocated"])
    if header.get("photometric") == "YBR_FULL_422" and samples == 3:
        samples = 2  # two luminance samples share one Cb/Cr pair
    total_bits = frames * rows * columns * samples * bits
    return (total_bits + 7) // 8


def _element_header_length(fh: Any, offset: int) -> int:
    fh.seek(offset + 4)
    return 12 if fh.read(2) in _LONG_VRS else 8


def _walk_items(fh: Any, start: int, file_size: int) -> tuple[list[tuple[int, int]], str | None]:
    """``[(offset, length)]`` of the items from ``start`` to the sequence delimiter, or the problem."""
    items: list[tuple[int, int]] = []
    position = start
    while True:
        fh.seek(position)
        raw = fh.read(8)
        if len(raw) < 8:
            return items, "truncated file (encapsulated pixel data ends before its sequence delimiter)"
        group, element, length = struct.unpack("<HHL", raw)
        if (group, element) == _SEQUENCE_END:
            return items, None
        if (group, element) != _ITEM:
            return items, "malformed encapsulated pixel data (an item tag is missing)"
        if length == UNDEFINED_LENGTH or position + 8 + length > file_size:
            return items, "truncated file (an encapsulated pixel-data fragment runs past the end of the file)"
        items.append((position, length))
        if len(items) > MAX_FRAGMENTS:
            return items, f"more than {MAX_FRAGMENTS} encapsulated pixel-data fragments"
        position += 8 + length


def _encapsulated_problem(path: str, offset: int, frames: int, file_size: int) -> str | None:
    with open(path, "rb") as fh:
        items, problem = _walk_items(fh, offset + _element_header_length(fh, offset), file_size)
        if problem:
            return problem
        if not items:
            return "malformed encapsulated pixel data (no Basic Offset Table item)"
        (bot_position, bot_length), fragments = items[0], items[1:]
        if not fragments:
            return "encapsulated pixel data holds no fragment"
        if len(fragments) < frames:
            return (f"fewer fragments than frames: {frames} frames declared but the encapsulated pixel data "
                    f"holds only {len(fragments)} fragment(s), at least one per frame is needed")
        if bot_length == 0:
            return None
        if bot_length % 4 or bot_length // 4 != frames:
            return f"inconsistent Basic Offset Table: {bot_length / 4:g} offsets for {frames} frame(s)"
        fh.seek(bot_position + 8)
        offsets = struct.unpack(f"<{frames}L", fh.read(bot_length))
    starts = {position - fragments[0][0] for position, _ in fragments}
    if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or not set(offsets) <= starts:
        return "inconsistent Basic Offset Table: offsets do not point at fragment starts in increasing order"
    return None


def geometry_problem(path: str, header: dict[str, Any], pixel: dict[str, Any], file_size: int) -> str | None:
    """The first reason ``header``'s geometry does not match the pixel data, or ``None``; see the module doc.

    Args:
        path: the file (read only for encapsulated data, item headers only).
        header: the ingest's validated header summary (rows, columns, bits_allocated, bits_stored,
            samples_per_pixel, number_of_frames, photometric, transfer_syntax).
        pixel: ``{"tag", "length", "offset"}`` of the pixel-data element (offset of its tag in the file).
        file_size: size of ``path`` in bytes.
    """
    transfer_syntax = header.get("transfer_syntax")
    problem = transfer_syntax_problem(transfer_syntax)
    if problem:
        return problem
    rows, columns, frames = int(header["rows"]), int(header["columns"]), int(header["number_of_frames"])
    if rows > MAX_SIDE_PIXELS or columns > MAX_SIDE_PIXELS:
        return (f"image too large: declared size {rows} x {columns} exceeds the cap of {MAX_SIDE_PIXELS} pixels "
                "per side, refused before decoding")
    if frames > MAX_FRAMES:
        return f"too many frames: NumberOfFrames {frames} exceeds the cap of {MAX_FRAMES}"
    bits, stored = header.get("bits_allocated"), header.get("bits_stored")
    tag = pixel.get("tag")
    expected_bits = {FLOAT_PIXEL_TAG: 32, DOUBLE_PIXEL_TAG: 64}.get(tag)  # type: ignore[arg-type]
    if bits is None or bits not in BITS_ALLOCATED or (expected_bits is not None and bits != expected_bits):
        return ("invalid BitsAllocated: missing, not one of 1, 8, 16, 32, 64, or not matching the float pixel "
                f"data (got {bits})")
    if stored is not None and not 1 <= stored <= bits:
        return f"invalid BitsStored: {stored} is outside 1..BitsAllocated ({bits})"
    samples = header.get("samples_per_pixel") or 1
    if samples not in (1, 3):
        return f"unsupported SamplesPerPixel: {samples} (1 or 3 supported)"
    length = int(pixel.get("length", 0))
    if length != UNDEFINED_LENGTH:
        needed = _native_bytes(header, frames)
        if length < needed:
            return (f"pixel data shorter than the declared geometry: {length} bytes, but frames x rows x columns "
                    f"x samples x bits allocated / 8 = {frames} x {rows} x {columns} x {samples} x {bits} / 8 "
                    f"= {needed}")
        return None
    if transfer_syntax and not UID(transfer_syntax).is_encapsulated:
        return "malformed pixel data: undefined length in a native (uncompressed) transfer syntax"
    return _encapsulated_problem(path, int(pixel["offset"]), frames, file_size)
