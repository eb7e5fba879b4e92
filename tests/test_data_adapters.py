"""Public-dataset adapters on miniature copies of the published layouts (same file and column names)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from medssl.data.adapters import build_manifest
from medssl.data.deid import Pseudonymizer
from medssl.data.manifest import read_manifest, validate_records, write_manifest
from medssl.errors import MedsslError

DEID = Pseudonymizer(b"test-key-for-adapters-0123456789")


def _img(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=0 if mode in ("L", "I;16") else (10, 20, 30)).save(path, format=fmt)
    return path


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _check_groups(records: list[dict], raw_of: dict[str, str], field: str) -> None:
    """Pseudonyms in ``field`` are equal exactly when the raw ids (raw_of: image name -> raw id) are equal."""
    pairs = {(raw_of[Path(r["image"]).name], r[field]) for r in records}
    raws = {raw for raw, _ in pairs}
    pseudos = {p for _, p in pairs}
    assert len(pairs) == len(raws) == len(pseudos)  # a bijection raw <-> pseudonym
    assert all(p is not None and p not in raws for p in pseudos)


def _written_text(tmp_path: Path, records: list[dict]) -> str:
    out = tmp_path / "out" / "manifest.jsonl"
    write_manifest(out, records)
    assert len(read_manifest(out)) == len(records)
    return out.read_text()


# --------------------------------------------------------------------------------------------- HAM10000
HAM_ROWS = [  # lesion_id, image_id, dx, dx_type, age, sex, localization, dataset
    ["HAM_0000118", "ISIC_0027419", "bkl", "histo", 80.0, "male", "scalp", "vidir_modern"],
    ["HAM_0000118", "ISIC_0025030", "bkl", "histo", 80.0, "male", "scalp", "vidir_modern"],
    ["HAM_0002730", "ISIC_0026769", "bkl", "histo", 80.0, "male", "scalp", "vidir_modern"],
    ["HAM_0001466", "ISIC_0031633", "mel", "histo", 75.0, "male", "ear", "rosendahl"],
    ["HAM_0001466", "ISIC_0027850", "mel", "histo", 75.0, "male", "ear", "rosendahl"],
    ["HAM_0001466", "ISIC_0029176", "mel", "histo", 75.0, "male", "ear", "rosendahl"],
    ["HAM_0005678", "ISIC_0030000", "nv", "follow_up", 45.0, "female", "back", "vidir_molemax"],
]
HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


def _ham(root: Path) -> Path:
    _csv(root / "HAM10000_metadata.csv", HAM_HEADER, HAM_ROWS)
    for i, row in enumerate(HAM_ROWS):
        part = "HAM10000_images_part_1" if i < 4 else "HAM10000_images_part_2"
        _img(root / part / f"{row[1]}.jpg", fmt="JPEG")
    _img(root / "HAM10000_images_part_2" / "ISIC_9999999.jpg", fmt="JPEG")  # not in the table: ignored
    return root


def test_ham10000_labels_lesion_pseudonyms_and_no_raw_ids(tmp_path):
    root = _ham(tmp_path / "HAM10000")
    records = build_manifest("ham10000", root, deid=DEID)
    assert len(records) == len(HAM_ROWS)
    by_name = {Path(r["image"]).name: r for r in records}
    for _lesion, image_id, dx, *_ in HAM_ROWS:
        rec = by_name[f"{image_id}.jpg"]
        assert rec["label"] == dx and rec["patient_id"] is None and rec["split"] is None
        assert (rec["rows"], rec["columns"], rec["photometric"]) == (10, 12, "RGB")
    _check_groups(records, {f"{r[1]}.jpg": r[0] for r in HAM_ROWS}, "lesion_id")
    text = _written_text(tmp_path, records)
    assert "HAM_" not in text and "ISIC_9999999" not in text
    assert "male" not in text  # demographics are not copied


def test_ham10000_missing_image_and_column(tmp_path):
    root = _ham(tmp_path / "HAM10000")
    (root / "HAM10000_images_part_2" / "ISIC_0030000.jpg").unlink()
    with pytest.raises(MedsslError, match="ISIC_0030000"):
        build_manifest("ham10000", root, deid=DEID)
    assert len(build_manifest("ham10000", root, deid=DEID, on_missing="skip")) == len(HAM_ROWS) - 1
    _csv(root / "HAM10000_metadata.csv", ["image_id", "dx"], [["ISIC_0027419", "bkl"]])
    with pytest.raises(MedsslError, match=r"HAM10000_metadata\.csv.*'lesion_id'"):
        build_manifest("ham10000", root, deid=DEID)
    with pytest.raises(MedsslError, match="HAM10000_metadata.csv"):
        build_manifest("ham10000", tmp_path / "HAM10000" / "HAM10000_images_part_1", deid=DEID)


def test_ham10000_tab_separated_dataverse_table(tmp_path):
    root = _ham(tmp_path / "HAM10000")
    text = (root / "HAM10000_metadata.csv").read_text().replace(",", "\t")
    (root / "HAM10000_metadata.csv").unlink()
    (root / "HAM10000_metadata.tab").write_text(text)
    records = build_manifest("ham10000", root, deid=DEID)
    assert sorted(r["label"] for r in records) == sorted(r[2] for r in HAM_ROWS)


def test_ham10000_grouped_split_keeps_lesions_together(tmp_path):
    records = build_manifest("ham10000", _ham(tmp_path / "H"), deid=DEID, split_ratios="pretrain=0.6,train=0.2,test=0.2")
    splits_of = {}
    for rec in records:
        splits_of.setdefault(rec["lesion_id"], set()).add(rec["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r["split"] for r in records} <= {"pretrain", "train", "test"}


# ------------------------------------------------------------------------------------------------- BUSI
def test_busi_original_layout_excludes_masks(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    names = {"benign": ["benign (1)", "benign (2)", "benign (10)"], "malignant": ["malignant (1)"],
             "normal": ["normal (1)", "normal (2)"]}
    for cls, stems in names.items():
        for stem in stems:
            _img(base / cls / f"{stem}.png", mode="L")
            _img(base / cls / f"{stem}_mask.png", mode="L")
    _img(base / "benign" / "benign (2)_mask_1.png", mode="L")
    records = build_manifest("busi", tmp_path, deid=DEID)
    assert Counter(r["label"] for r in records) == {k: len(v) for k, v in names.items()}
    assert not any("_mask" in Path(r["image"]).name for r in records)
    two = next(r for r in records if Path(r["image"]).name == "benign (2).png")
    assert sorted(Path(m).name for m in two["masks"]) == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    assert all(r["modality"] == "US" and r["photometric"] == "MONOCHROME2" for r in records)
    assert len({r["id"] for r in records}) == len(records)


def test_busi_missing_class_folder(tmp_path):
    _img(tmp_path / "benign" / "benign (1).png")
    _img(tmp_path / "malignant" / "malignant (1).png")
    with pytest.raises(MedsslError, match="normal"):
        build_manifest("busi", tmp_path, deid=DEID)


# ------------------------------------------------------------------------------------------ ChestX-ray8
CXR_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
CXR_ROWS = [
    ["00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA", 2682, 2749, 0.143, 0.143],
    ["00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143],
    ["00000002_000.png", "No Finding", 0, 2, 80, "M", "PA", 2500, 2048, 0.171, 0.171],
    ["00000003_000.png", "Hernia", 0, 3, 74, "F", "PA", 2500, 2048, 0.168, 0.168],
    ["00000003_001.png", "Effusion|Hernia|Infiltration", 1, 3, 75, "F", "AP", 2048, 2500, 0.168, 0.168],
]


def test_chestxray8_multilabel_patients_and_official_split(tmp_path):
    _csv(tmp_path / "Data_Entry_2017_v2020.csv", CXR_HEADER, CXR_ROWS)
    for i, row in enumerate(CXR_ROWS):
        _img(tmp_path / ("images_001" if i < 3 else "images_002") / "images" / row[0], mode="L")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n"
                                                 "00000003_001.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    records = build_manifest("chestxray8", tmp_path, deid=DEID)
    by_name = {Path(r["image"]).name: r for r in records}
    assert len(records) == 5
    for name, findings, _follow_up, pid, _age, _sex, view, *_ in CXR_ROWS:
        rec = by_name[name]
        assert rec["label"] == findings and rec["labels"] == sorted(findings.split("|"))
        assert rec["view"] == view and rec["split"] == ("test" if pid == 2 else "train")
    _check_groups(records, {r[0]: str(r[3]) for r in CXR_ROWS}, "patient_id")
    _check_groups(records, {r[0]: f"{r[3]}:{r[2]}" for r in CXR_ROWS}, "study_id")
    fields = [{k: v for k, v in r.items() if k not in ("image", "id")} for r in records]
    assert not any(json.dumps(f).count('"M"') or "Patient" in json.dumps(f) for f in fields)
    (tmp_path / "Data_Entry_2017_v2020.csv").rename(tmp_path / "other.csv")
    with pytest.raises(MedsslError, match="Data_Entry_2017"):
        build_manifest("chestxray8", tmp_path, deid=DEID)


# ------------------------------------------------------------------------------- COVID-19 Radiography
def test_covid_radiography_skips_masks_and_metadata(tmp_path):
    base = tmp_path / "COVID-19_Radiography_Dataset"
    counts = {"COVID": 3, "Normal": 2, "Lung_Opacity": 1, "Viral Pneumonia": 2}
    for cls, n in counts.items():
        for i in range(1, n + 1):
            _img(base / cls / "images" / f"{cls}-{i}.png", mode="L")
            _img(base / cls / "masks" / f"{cls}-{i}.png", mode="L")
        (base / f"{cls}.metadata.xlsx").write_bytes(b"PK\x03\x04")
    records = build_manifest("covid-radiography", tmp_path, deid=DEID)
    assert Counter(r["label"] for r in records) == counts
    assert all(Path(r["image"]).parent.name == "images" for r in records)
    with pytest.raises(MedsslError, match="COVID"):
        build_manifest("covid-radiography", base / "COVID", deid=DEID)


# ------------------------------------------------------------------------------------- Brain Tumor MRI
def test_brain_tumor_mri_train_test_folders(tmp_path):
    layout = {("Training", "glioma"): 2, ("Training", "notumor"): 1, ("Training", "pituitary"): 1,
              ("Training", "meningioma"): 1, ("Testing", "glioma"): 1, ("Testing", "meningioma"): 2}
    for (split_dir, cls), n in layout.items():
        prefix = "Tr" if split_dir == "Training" else "Te"
        for i in range(n):
            _img(tmp_path / split_dir / cls / f"{prefix}-{cls[:2]}_{i:04d}.jpg", mode="L", fmt="JPEG")
    records = build_manifest("brain-tumor-mri", tmp_path, deid=DEID)
    got = Counter((r["split"], r["label"]) for r in records)
    assert got == {("train" if s == "Training" else "test", c): n for (s, c), n in layout.items()}
    assert all(Path(r["image"]).name.startswith("Tr-" if r["split"] == "train" else "Te-") for r in records)
    import shutil

    shutil.rmtree(tmp_path / "Testing")
    with pytest.raises(MedsslError, match="Testing"):
        build_manifest("brain-tumor-mri", tmp_path, deid=DEID)


# -------------------------------------------------------------------------------------- PatchCamelyon
def test_pcam_h5_records(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"train": 6, "valid": 3, "test": 4}
    ys = {}
    for name, n in sizes.items():
        ys[name] = rng.integers(0, 2, size=(n, 1, 1, 1)).astype(np.uint8)
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{name}_x.h5", "w") as fh:
            fh.create_dataset("x", data=rng.integers(0, 255, size=(n, 96, 96, 3), dtype=np.uint8))
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{name}_y.h5", "w") as fh:
            fh.create_dataset("y", data=ys[name])
    slides = ["camelyon16_train_normal_033", "camelyon16_train_tumor_011"] * 3
    _csv(tmp_path / "camelyonpatch_level_2_split_train_meta.csv",
         ["coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"],
         [[10 * i, 20 * i, False, False, s] for i, s in enumerate(slides)])
    records = build_manifest("pcam", tmp_path, deid=DEID)
    assert Counter(r["split"] for r in records) == {"train": 6, "val": 3, "test": 4}
    for name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        recs = sorted((r for r in records if r["split"] == split), key=lambda r: r["index"])
        assert [r["index"] for r in recs] == list(range(sizes[name]))
        assert [r["label"] for r in recs] == [str(int(v)) for v in ys[name].reshape(-1)]
        assert all(Path(r["image"]).name == f"camelyonpatch_level_2_split_{name}_x.h5" for r in recs)
        assert all(r["source"] == "h5" and r["h5_key"] == "x" and (r["rows"], r["columns"]) == (96, 96)
                   for r in recs)
    train = [r for r in records if r["split"] == "train"]
    _check_groups([{**r, "image": str(r["index"])} for r in train],
                  {str(i): s for i, s in enumerate(slides)}, "patient_id")
    assert "camelyon16" not in _written_text(tmp_path, records)
    (tmp_path / "camelyonpatch_level_2_split_test_y.h5").unlink()
    _csv(tmp_path / "camelyonpatch_level_2_split_valid_meta.csv", ["wsi"], [["a"]])  # 1 row for 3 patches
    with pytest.raises(MedsslError, match="valid_meta.csv.*1 rows"):
        build_manifest("pcam", tmp_path, deid=DEID)
    (tmp_path / "camelyonpatch_level_2_split_valid_meta.csv").unlink()
    with pytest.raises(MedsslError, match="test_y.h5"):
        build_manifest("pcam", tmp_path, deid=DEID)
    for name in ("test_x.h5", "valid_x.h5", "valid_y.h5", "train_x.h5", "train_y.h5"):
        (tmp_path / f"camelyonpatch_level_2_split_{name}").unlink()
    (tmp_path / "camelyonpatch_level_2_split_train_x.h5.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(MedsslError, match="gunzip"):
        build_manifest("pcam", tmp_path, deid=DEID)


# ------------------------------------------------------------------------------------------- NCT-CRC-HE
def test_nct_crc_sets_and_classes(tmp_path):
    layout = {("NCT-CRC-HE-100K", "ADI"): 2, ("NCT-CRC-HE-100K", "TUM"): 3, ("NCT-CRC-HE-100K", "NORM"): 1,
              ("CRC-VAL-HE-7K", "ADI"): 1, ("CRC-VAL-HE-7K", "TUM"): 1}
    for (set_name, cls), n in layout.items():
        for i in range(n):
            _img(tmp_path / set_name / cls / f"{cls}-AAA{i}.tif", fmt="TIFF")
    records = build_manifest("nct-crc-he", tmp_path, deid=DEID)
    want = {("train" if s.startswith("NCT") else "test", c): n for (s, c), n in layout.items()}
    assert Counter((r["split"], r["label"]) for r in records) == want
    assert all(r["modality"] == "SM" and r["preset"] == "histology" for r in records)
    only = build_manifest("nct-crc-he", tmp_path / "CRC-VAL-HE-7K", deid=DEID)
    assert len(only) == 2 and {r["split"] for r in only} == {None}
    with pytest.raises(MedsslError, match="ADI"):
        build_manifest("nct-crc-he", tmp_path / "CRC-VAL-HE-7K" / "ADI", deid=DEID)


# ---------------------------------------------------------------------------------------------- MedMNIST
def test_medmnist_single_and_multi_label(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 7), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 9, size=(n, 1), dtype=np.uint8)
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    records = build_manifest("medmnist", tmp_path / "pathmnist.npz", deid=DEID)
    for split in ("train", "val", "test"):
        recs = [r for r in records if r["split"] == split]
        assert [r["index"] for r in recs] == list(range(len(arrays[f"{split}_labels"])))
        assert [r["label"] for r in recs] == [str(v) for v in arrays[f"{split}_labels"][:, 0]]
        assert all(r["npz_split"] == split and r["photometric"] == "RGB" and r["preset"] == "histology"
                   for r in recs)
    multi = {"train_images": np.zeros((3, 28, 28), np.uint8),
             "train_labels": np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], np.uint8)}
    (tmp_path / "m").mkdir()
    np.savez(tmp_path / "m" / "chestmnist.npz", **multi)
    recs = build_manifest("medmnist", tmp_path / "m", deid=DEID)
    assert [r["labels"] for r in recs] == [["1", "3"], [], ["0"]]
    assert [r["label"] for r in recs] == ["1|3", "", "0"]
    np.savez(tmp_path / "m" / "bad.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(MedsslError, match="several"):
        build_manifest("medmnist", tmp_path / "m", deid=DEID)
    with pytest.raises(MedsslError, match=r"bad\.npz.*\{train,val,test\}_\{images,labels\}"):
        build_manifest("medmnist", tmp_path / "m" / "bad.npz", deid=DEID)
    np.savez(tmp_path / "m" / "bad.npz", train_images=np.zeros((2, 4, 4)))
    with pytest.raises(MedsslError, match="'train_labels' missing"):
        build_manifest("medmnist", tmp_path / "m" / "bad.npz", deid=DEID)


def test_records_are_schema_valid(tmp_path):
    records = build_manifest("ham10000", _ham(tmp_path / "H"), deid=DEID)
    assert validate_records(records) == []


def test_container_records_read_back_the_right_pixels(tmp_path):
    """The record fields (index, npz_split, h5_key) address the same pixels as direct array indexing."""
    load = pytest.importorskip("medssl.data.readers.load")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, size=(4, 96, 96, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_x.h5", "w") as fh:
        fh.create_dataset("x", data=x)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as fh:
        fh.create_dataset("y", data=np.zeros((4, 1, 1, 1), np.uint8))
    for rec in build_manifest("pcam", tmp_path, deid=DEID):
        pixels, _ = load.read_record(rec)
        np.testing.assert_array_equal(pixels, np.moveaxis(x[rec["index"]], -1, 0).astype(np.float32))
    arrays = {f"{s}_images": rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8) for s, n in (("train", 3), ("val", 2))}
    arrays.update({f"{s}_labels": np.zeros((len(arrays[f"{s}_images"]), 1), np.uint8) for s in ("train", "val")})
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    for rec in build_manifest("medmnist", tmp_path / "breastmnist.npz", deid=DEID):
        pixels, _ = load.read_record(rec)
        np.testing.assert_array_equal(pixels[0], arrays[f"{rec['npz_split']}_images"][rec["index"]])
