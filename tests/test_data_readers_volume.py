"""NIfTI/NRRD slices: reorientation to RAS checked against an independently built RAS copy of PSR.nii.gz."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medssl.data.readers.load import LoadRecordd
from medssl.data.readers.volume import read_volume_slice, volume_range
from medssl.data.sources import records_from_path
from medssl.errors import MedsslError


@pytest.fixture(scope="module")
def psr(shared_data):
    path = shared_data / "mri" / "PSR.nii.gz"
    if not path.is_file():
        pytest.skip("mri/PSR.nii.gz missing from shared data")
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    data = np.asarray(img.dataobj, dtype=np.float32)
    # explicit reorientation: stored axes (P, S, R) -> (R, A, S): R = stored axis 2, A = reversed stored axis 0,
    # S = stored axis 1
    ras = np.flip(np.transpose(data, (2, 0, 1)), axis=1)
    return path, data, ras


def test_psr_slices_show_the_same_planes_as_the_ras_copy(psr):
    path, data, ras = psr
    assert ras.shape == (64, 79, 67)
    for axis in (0, 1, 2):
        n = ras.shape[axis]
        for s in (n // 4, n // 2, (3 * n) // 4):
            img, _ = read_volume_slice(path, s, axis)
            assert img.shape == (1, *np.delete(ras.shape, axis))
            np.testing.assert_array_equal(img[0], np.take(ras, s, axis=axis))
    # the anterior-posterior flip matters: the unflipped transpose is a different array
    assert not np.array_equal(np.transpose(data, (2, 0, 1)), ras)


def test_psr_physical_direction_of_axes(psr):
    # voxel (i, j, k) of the RAS copy: world x grows with i, y with j, z with k
    path, _, ras = psr
    img = nib.load(str(path))
    canonical = nib.as_closest_canonical(img)
    assert np.all(np.diag(canonical.affine)[:3] > 0)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj, dtype=np.float32), ras)


def test_two_and_a_half_d_slab_and_per_volume_range(psr):
    path, _, ras = psr
    s = 30
    slab, rng = read_volume_slice(path, s, 2, mode="2.5d")
    np.testing.assert_array_equal(slab, np.stack([ras[:, :, s - 1], ras[:, :, s], ras[:, :, s + 1]]))
    edge, _ = read_volume_slice(path, 0, 2, mode="2.5d")
    np.testing.assert_array_equal(edge[0], edge[1])
    nonzero = ras[ras != 0]
    assert rng == pytest.approx(tuple(np.percentile(nonzero, [0.5, 99.5])), rel=1e-5)
    assert rng == volume_range(ras)
    # all slices share the volume's range
    assert read_volume_slice(path, 5, 0)[1] == rng


def test_nrrd_copy_reads_the_same_ras_slices(psr, tmp_path):
    import SimpleITK as sitk

    path, _, ras = psr
    nrrd = tmp_path / "psr.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(nrrd))
    rec = LoadRecordd()({"id": "v", "image": str(nrrd), "source": "nrrd", "slice": 40, "axis": 1})
    np.testing.assert_allclose(rec["image"][0], ras[:, 40, :], atol=1e-4)


def test_out_of_range_slice_is_a_medssl_error(psr):
    path, _, _ = psr
    with pytest.raises(MedsslError, match="slice 500 out of range"):
        read_volume_slice(path, 500, 2)


def test_volume_records_cover_the_non_empty_axial_slices(psr):
    path, _, ras = psr
    records = records_from_path(path)
    expected = [k for k in range(ras.shape[2]) if np.any(ras[:, :, k] != 0)]
    assert [r["slice"] for r in records] == expected
    assert all(r["axis"] == 2 and r["source"] == "nifti" for r in records)
    loaded = LoadRecordd()(records[len(records) // 2])
    np.testing.assert_array_equal(loaded["image"][0], ras[:, :, expected[len(expected) // 2]])
