"""Generic adapters (folder per class, CSV + folder), the grouped ratio split, the CLI, and the real shared data."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medssl.cli import main
from medssl.data.adapters import ADAPTERS, assign_splits, build_manifest, parse_ratios
from medssl.data.deid import Pseudonymizer
from medssl.data.manifest import read_manifest
from medssl.errors import MedsslError

DEID = Pseudonymizer(b"test-key-for-adapters-0123456789")


def _img(path: Path, size: tuple[int, int] = (9, 7)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size).save(path)
    return path


def test_folder_per_class_with_and_without_split_folders(tmp_path):
    _img(tmp_path / "a" / "cats" / "x1.png")
    _img(tmp_path / "a" / "cats" / "nested" / "x2.png")
    _img(tmp_path / "a" / "dogs" / "y1.png")
    (tmp_path / "a" / "dogs" / "notes.txt").write_text("not an image")
    recs = build_manifest("folder", tmp_path / "a", deid=DEID, modality="XC", preset="dermatoscopy")
    assert sorted((Path(r["image"]).name, r["label"]) for r in recs) == [("x1.png", "cats"), ("x2.png", "cats"),
                                                                        ("y1.png", "dogs")]
    assert {r["split"] for r in recs} == {None} and {r["modality"] for r in recs} == {"XC"}
    for split_dir, cls, n in (("train", "c0", 2), ("train", "c1", 1), ("valid", "c0", 1), ("test", "c1", 2)):
        for i in range(n):
            _img(tmp_path / "b" / split_dir / cls / f"{i}.png")
    recs = build_manifest("folder", tmp_path / "b", deid=DEID)
    assert Counter((r["split"], r["label"]) for r in recs) == {("train", "c0"): 2, ("train", "c1"): 1,
                                                               ("val", "c0"): 1, ("test", "c1"): 2}
    assert len({r["id"] for r in recs}) == 6
    with pytest.raises(MedsslError, match="class sub-folders"):
        build_manifest("folder", tmp_path / "a" / "dogs", deid=DEID)


def _write_table(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_csv_with_group_and_split_columns(tmp_path):
    for name in ("s1.png", "s2.png", "s3.png", "s4.png"):
        _img(tmp_path / "imgs" / name)
    rows = [["file", "diagnosis", "mrn", "fold"], ["s1", "pos", "MRN0001", "train"], ["s2", "neg", "MRN0001", "train"],
            ["s3", "neg", "MRN0002", "testing"], ["s4", "", "MRN0003", ""]]
    _write_table(tmp_path / "labels.csv", rows)
    recs = build_manifest("csv", tmp_path / "labels.csv", deid=DEID, image_column="file", label_column="diagnosis",
                          group_column="mrn", split_column="fold", image_root="imgs", suffix=".png")
    got = {Path(r["image"]).name: (r["label"], r["split"], r["patient_id"]) for r in recs}
    assert [got[f"s{i}.png"][:2] for i in range(1, 5)] == [("pos", "train"), ("neg", "train"), ("neg", "test"),
                                                           (None, None)]
    pats = [got[f"s{i}.png"][2] for i in range(1, 5)]
    assert pats[0] == pats[1] and len({pats[0], pats[2], pats[3]}) == 3
    assert pats[0] == DEID.pseudonym("patient", "MRN0001")  # joins with `medssl ingest` pseudonyms
    assert not any("MRN" in str(v) for r in recs for v in r.values())
    lesion = build_manifest("csv", tmp_path, deid=DEID, csv_path="labels.csv", image_column="file",
                            group_column="mrn", group_kind="lesion", image_root="imgs", suffix=".png")
    assert all(r["patient_id"] is None and r["lesion_id"].startswith("les-") for r in lesion)
    with pytest.raises(MedsslError, match=r"labels\.csv.*'dx'"):
        build_manifest("csv", tmp_path / "labels.csv", deid=DEID, image_column="file", label_column="dx")
    with pytest.raises(MedsslError, match="s1"):  # no image_root: files not beside the CSV
        build_manifest("csv", tmp_path / "labels.csv", deid=DEID, image_column="file", suffix=".png")
    with pytest.raises(MedsslError, match="bad options"):
        build_manifest("csv", tmp_path / "labels.csv", deid=DEID, image_col="file")


def test_unknown_adapter_and_missing_root(tmp_path):
    with pytest.raises(MedsslError, match="available: ham10000"):
        build_manifest("isic", tmp_path, deid=DEID)
    with pytest.raises(MedsslError, match="nope"):
        build_manifest("busi", tmp_path / "nope", deid=DEID)
    assert set(ADAPTERS) == {"ham10000", "busi", "chestxray8", "covid-radiography", "brain-tumor-mri", "pcam",
                             "nct-crc-he", "medmnist", "folder", "csv"}


def test_parse_ratios():
    assert parse_ratios("0.7,0.1,0.2") == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2})
    assert parse_ratios("pretrain=3,train=1,test=1") == pytest.approx({"pretrain": 0.6, "train": 0.2, "test": 0.2})
    for bad in ("train=0.5,holdout=0.5", "train=-1", "a,b", ""):
        with pytest.raises(MedsslError):
            parse_ratios(bad)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abc"), min_size=1, max_size=60),
    groups=st.lists(st.integers(0, 15), min_size=60, max_size=60),
    official=st.lists(st.sampled_from([None, None, "train", "test"]), min_size=60, max_size=60),
    seed=st.integers(0, 3),
)
def test_assign_splits_grouped_stratified_reproducible(labels, groups, official, seed):
    def make(grouped: bool) -> list[dict]:
        recs = []
        for i, lab in enumerate(labels):
            # official test is per group, as in a real dataset: decided by the group's first record
            split = "test" if grouped and official[groups[i]] == "test" else None
            recs.append({"id": f"r{i}", "label": lab, "lesion_id": f"les-{groups[i]}" if grouped else None,
                         "patient_id": None, "split": split})
        return recs

    ratios = {"train": 0.6, "val": 0.2, "test": 0.2}
    grouped = assign_splits(make(True), ratios, seed=seed)
    assert [r["split"] for r in grouped] == [r["split"] for r in assign_splits(make(True), ratios, seed=seed)]
    split_of: dict[str, set] = {}
    for rec in grouped:
        split_of.setdefault(rec["lesion_id"], set()).add(rec["split"])
    assert all(len(s) == 1 for s in split_of.values())
    singles = assign_splits(make(False), ratios, seed=seed)
    for lab, n in Counter(labels).items():
        for split, ratio in ratios.items():
            count = sum(1 for r in singles if r["label"] == lab and r["split"] == split)
            assert abs(count - ratio * n) < 1 + 1e-9, (lab, split, count, n)


def test_assign_splits_keeps_official_test(tmp_path):
    recs = [{"id": f"r{i}", "label": "x", "patient_id": f"p{i}", "split": s}
            for i, s in enumerate(["train", "test", None, "val", "train"])]
    assign_splits(recs, {"pretrain": 0.5, "train": 0.5})
    assert [r["split"] for r in recs][1] == "test" and recs[3]["split"] == "val"
    assert {recs[i]["split"] for i in (0, 2, 4)} <= {"pretrain", "train"}
    recs.append({"id": "r9", "label": "x", "patient_id": "p1", "split": None})  # patient p1 is in test already
    with pytest.raises(MedsslError, match="official split"):
        assign_splits(recs, {"train": 1.0})


def test_cli_adapt_writes_manifest(tmp_path, monkeypatch, capsys):
    for cls, n in (("benign", 2), ("malignant", 1), ("normal", 1)):
        for i in range(1, n + 1):
            _img(tmp_path / "Dataset_BUSI_with_GT" / cls / f"{cls} ({i}).png")
            _img(tmp_path / "Dataset_BUSI_with_GT" / cls / f"{cls} ({i})_mask.png")
    out = tmp_path / "m" / "busi.jsonl"
    monkeypatch.delenv("MEDSSL_DEID_KEY", raising=False)
    assert main(["adapt", "busi", str(tmp_path), "-o", str(out)]) == 2
    assert "MEDSSL_DEID_KEY" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("MEDSSL_DEID_KEY", "cli-test-key-0123456789")
    assert main(["adapt", "busi", str(tmp_path), "-o", str(out), "--split-ratios", "train=0.5,test=0.5"]) == 0
    recs = read_manifest(out)
    assert Counter(r["label"] for r in recs) == {"benign": 2, "malignant": 1, "normal": 1}
    assert {r["split"] for r in recs} <= {"train", "test"} and all(Path(r["image"]).is_file() for r in recs)
    assert "4 records" in capsys.readouterr().out
    assert main(["adapt", "csv", str(tmp_path), "-o", str(out)]) == 2
    assert "--image-column" in capsys.readouterr().err


def test_csv_ids_keyed_and_marked_and_adapt_writes_no_paths(tmp_path, monkeypatch, capsys):
    import json

    from medssl.data.deid import INSECURE_DEMO_KEY

    folder = tmp_path / "DOE^JOHN_19450314"
    for i in range(3):
        _img(folder / f"MRN12345{i}.png")
    table = folder / "labels.csv"
    table.write_text("file,dx\n" + "".join(f"MRN12345{i}.png,{'ab'[i % 2]}\n" for i in range(3)))
    keyed = build_manifest("csv", table, deid=DEID, image_column="file", label_column="dx")
    other = build_manifest("csv", table, deid=Pseudonymizer(b"another-adapter-key-987654321"), image_column="file",
                           label_column="dx")
    demo = build_manifest("csv", table, deid=Pseudonymizer(INSECURE_DEMO_KEY), image_column="file",
                          label_column="dx")
    assert all(r["deidentified"] is True for r in keyed) and all(r["deidentified"] is False for r in demo)
    assert not {r["id"] for r in keyed} & {r["id"] for r in other}
    monkeypatch.setenv("MEDSSL_DEID_KEY", "5f1c0e4a9b7d2c3e8a6f4b1d0c9e7a2b")
    out = tmp_path / "m" / "study.jsonl"
    assert main(["adapt", "csv", str(table), "-o", str(out), "--image-column", "file", "--label-column", "dx"]) == 0
    capsys.readouterr()
    assert "MRN" not in out.read_text() and "DOE" not in out.read_text()
    private = Path(str(out) + ".private.jsonl")
    assert private.stat().st_mode & 0o777 == 0o600 and "MRN123450.png" in private.read_text()
    assert sorted(Path(r["image"]).name for r in read_manifest(out)) == [f"MRN12345{i}.png" for i in range(3)]
    assert {json.loads(line)["deidentified"] for line in out.read_text().splitlines()} == {True}


def test_shared_busi_counts(shared_data):
    recs = build_manifest("busi", shared_data / "busi", deid=DEID)
    assert Counter(r["label"] for r in recs) == {"benign": 437, "malignant": 210, "normal": 133}
    assert len({r["id"] for r in recs}) == 780 and all(r["rows"] == 256 for r in recs)


def test_shared_pneumoniamnist_counts_and_labels(shared_data):
    path = shared_data / "pneumoniamnist" / "pneumoniamnist_balanced.npz"
    recs = build_manifest("medmnist", path.parent, deid=DEID)
    assert Counter(r["split"] for r in recs) == {"train": 2428, "val": 270, "test": 468}
    with np.load(path) as ref:
        for split in ("train", "val", "test"):
            got = [(r["index"], r["label"]) for r in recs if r["split"] == split]
            assert got == [(i, str(v)) for i, v in enumerate(ref[f"{split}_labels"][:, 0])]
    assert all(r["preset"] == "xray" and (r["rows"], r["columns"]) == (28, 28) for r in recs)
