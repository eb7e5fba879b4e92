"""DICOM pixel pipeline against pydicom's test files and the pydicom-data package (real files)."""

from __future__ import annotations

import functools

import numpy as np
import pydicom
import pytest

from medssl.data.readers.dicom import count_frames, read_dicom_frame, window_to_range
from medssl.errors import MedsslError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (install the pydicom-data package)")
    return path


@functools.lru_cache(maxsize=8)
def _read(name: str, frame: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Decoded file, cached across tests (the JPEG 2000 chest films take seconds to decode)."""
    return read_dicom_frame(_file(name), frame)


def _band_mean(img: np.ndarray, x0: float, x1: float) -> float:
    """Mean of the mid-height band (40-60 % of rows) between column fractions x0 and x1."""
    h, w = img.shape
    return float(img[int(0.4 * h) : int(0.6 * h), int(x0 * w) : int(x1 * w)].mean())


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_chest_cr_monochrome1_lungs_darker_than_mediastinum(name):
    path = _file(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    img, _ = _read(name)
    assert img.shape == (1, 1955, 1841) and img.dtype == np.float32
    g = img[0]
    left, right, centre = _band_mean(g, 0.1, 0.3), _band_mean(g, 0.7, 0.9), _band_mean(g, 0.45, 0.55)
    assert left < centre - 0.1 and right < centre - 0.1
    # the stored MONOCHROME1 values have the opposite order: the inversion is what fixes it
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert _band_mean(raw, 0.1, 0.3) > _band_mean(raw, 0.45, 0.55)


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG3_J2KR.dcm"])
def test_extremity_cr_monochrome1_bone_brighter_than_air(name):
    # RG3 is a tibia radiograph (BodyPartExamined EXTREMITY), not a chest: check bone vs the air beside the leg
    img, _ = _read(name)
    g = img[0]
    bone, air = _band_mean(g, 0.45, 0.52), _band_mean(g, 0.28, 0.38)
    assert bone > air + 0.3


def test_monochrome1_matches_closed_form_window_and_inversion():
    path = _file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.empty_like(raw)
    flat, out = raw.ravel(), expected.ravel()
    for i in range(0, flat.size, 997):  # naive DICOM C.11.2.1.2 linear window on a sample of pixels
        x = flat[i]
        if x <= c - 0.5 - (w - 1) / 2:
            y = 0.0
        elif x > c - 0.5 + (w - 1) / 2:
            y = 1.0
        else:
            y = (x - (c - 0.5)) / (w - 1) + 0.5
        out[i] = 1.0 - y
    img, rng = _read("RG1_UNCR.dcm")
    assert rng == (0.0, 1.0)
    np.testing.assert_allclose(img[0].ravel()[::997], out[::997], atol=1e-6)


@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
    ],
)
def test_lossless_syntaxes_decode_equal_to_uncompressed(compressed, reference):
    a, ra = _read(compressed)
    b, rb = _read(reference)
    assert pydicom.dcmread(_file(compressed), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    assert ra == rb
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm"])
def test_jpeg_baseline_ybr_becomes_rgb_close_to_original(name):
    # lossy JPEG (YBR_FULL / 4:2:2) of SC_rgb: after YBR->RGB conversion it is close to the RGB original
    a, _ = read_dicom_frame(_file(name))
    b, _ = read_dicom_frame(_file("SC_rgb.dcm"))
    assert a.shape == b.shape == (3, 100, 100)
    assert np.abs(a - b).mean() < 4.0  # 8-bit levels; a missed YBR->RGB conversion gives tens of levels


def test_uncompressed_ybr_full_converted_to_rgb():
    path = _file("SC_ybr_full_uncompressed.dcm")
    a, rng = read_dicom_frame(path)
    assert rng == (0.0, 255.0)
    # naive JPEG/JFIF full-range YCbCr -> RGB (DICOM PS3.3 C.7.6.3.1.2, YBR_FULL) of the stored samples
    ybr = pydicom.pixels.pixel_array(pydicom.dcmread(path), raw=True).astype(np.float64)
    y, cb, cr = ybr[..., 0], ybr[..., 1] - 128.0, ybr[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb])
    np.testing.assert_allclose(a, np.clip(rgb, 0, 255), atol=1.01)
    b, _ = read_dicom_frame(_file("SC_rgb.dcm"))  # the same picture stored as RGB
    assert np.abs(a - b).mean() < 1.5 and np.abs(a - b).max() <= 8.0


def test_palette_colour_to_rgb_matches_naive_lookup():
    path = _file("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    img, rng = read_dicom_frame(path)
    assert img.shape == (3, ds.Rows, ds.Columns)
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    n_entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536
    for c, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(getattr(ds, f"{colour}PaletteColorLookupTableData"), dtype="<u2")
        assert lut.size == n_entries
        for y, x in [(0, 0), (300, 400), (100, 650), (599, 799), (250, 123)]:
            idx = min(max(int(raw[y, x]) - first, 0), n_entries - 1)
            assert img[c, y, x] == float(lut[idx])
    assert rng == (0.0, 65535.0)


def test_thirty_frame_ultrasound_cine_yields_every_frame():
    path = _file("examples_ybr_color.dcm")
    assert count_frames(path) == 30
    reference = pydicom.dcmread(path).pixel_array  # (30, 240, 320, 3), RGB after pydicom's conversion
    frames = [read_dicom_frame(path, f)[0] for f in range(30)]
    assert all(f.shape == (3, 240, 320) for f in frames)
    for i in (0, 14, 29):
        np.testing.assert_array_equal(frames[i], np.moveaxis(reference[i], -1, 0).astype(np.float32))
    assert len({f.tobytes() for f in frames}) > 1  # a cine: frames differ
    with pytest.raises(MedsslError, match="frame 30 out of range"):
        read_dicom_frame(path, 30)


def test_rescale_slope_intercept_applied_minmax_window():
    path = _file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img, rng = read_dicom_frame(path, window="minmax")
    np.testing.assert_allclose(img[0], expected, atol=1e-3)
    assert rng == (float(expected.min()), float(expected.max()))
    _, (plo, phi) = read_dicom_frame(path, window="percentile", percentiles=(1.0, 99.0))
    assert (plo, phi) == pytest.approx(tuple(np.percentile(expected, [1.0, 99.0])), abs=1e-2)


def test_window_functions_closed_forms():
    x = np.array([0.0, 40.0, 50.0, 60.0, 100.0])
    lin, _ = window_to_range(x, 50.0, 21.0, "LINEAR")
    np.testing.assert_allclose(lin, [0.0, (40 - 49.5) / 20 + 0.5, (50 - 49.5) / 20 + 0.5, 1.0, 1.0], atol=1e-6)
    exact, _ = window_to_range(x, 50.0, 20.0, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    sig, _ = window_to_range(x, 50.0, 20.0, "SIGMOID")
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (x - 50) / 20)), atol=1e-6)


def test_bad_files_raise_medssl_error_naming_the_file(tmp_path):
    bad = tmp_path / "not_dicom.dcm"
    bad.write_bytes(b"hello, not a DICOM file")
    with pytest.raises(MedsslError) as info:
        read_dicom_frame(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(MedsslError, match="no pixel data"):
        read_dicom_frame(_file("rtplan.dcm"))


def test_voi_lut_sequence_matches_naive_lookup():
    path = _file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    n_entries, first, _ = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    assert lut.size == (n_entries or 65536)
    raw = ds.pixel_array.astype(np.int64)  # no rescale in this file: modality LUT is the identity
    assert "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    expected = lut[np.clip(raw - first, 0, lut.size - 1)]
    img, rng = read_dicom_frame(path)
    np.testing.assert_array_equal(img[0], expected.astype(np.float32))
    assert rng == (float(lut.min()), float(lut.max()))


@pytest.mark.parametrize(
    "name",
    [
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless, process 14
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
        "MR_small_jp2klossless.dcm",  # JPEG 2000
        "MR_small_RLE.dcm",  # RLE (pylibjpeg-rle)
    ],
)
def test_compressed_syntaxes_decode_through_pylibjpeg_plugins(name):
    path = _file(name)
    ds = pydicom.dcmread(path)
    ref = pydicom.pixels.pixel_array(ds, decoding_plugin="pylibjpeg")  # fails if the plugin is missing
    img, _ = read_dicom_frame(path, window="minmax")
    if ref.ndim == 3:
        np.testing.assert_array_equal(img, np.moveaxis(ref, -1, 0).astype(np.float32))
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        np.testing.assert_allclose(img[0], ref * slope + intercept, atol=1e-4)


def test_file_without_preamble_or_file_meta_decodes_as_the_ingest_accepts_it():
    path = _file("OT-PAL-8-face.dcm")  # no 128-byte preamble, no DICM prefix, no file meta (ACR-NEMA style)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)
    ds = pydicom.dcmread(path, force=True)
    implicit, little = ds.original_encoding
    assert (implicit, little) == (True, True) and "TransferSyntaxUID" not in ds.file_meta
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    reference = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)  # palette colour -> RGB, naive reference
    img, rng = read_dicom_frame(path)
    np.testing.assert_array_equal(img, np.moveaxis(reference, -1, 0).astype(np.float32))
    assert rng == (0.0, 65535.0)
