"""Manifest read/write/validate/check, the JSON Schema file, the MONAI datalist export and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.cli import data_cmd
from medssl.data.datalist import load_datalist, write_datalist
from medssl.data.manifest import (
    MANIFEST_FIELDS,
    MANIFEST_SCHEMA,
    check_records,
    manifest_sha256,
    read_manifest,
    record_problems,
    validate_records,
    write_manifest,
)
from medssl.errors import MedsslError

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    """Run one of this area's sub-commands (without importing every other area's CLI module)."""
    import argparse

    parser = argparse.ArgumentParser(prog="medssl")
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _record(i: int, image: str, **extra):
    record = {"id": f"r{i}", "image": image, "source": "image", "label": "a", "patient_id": f"pat-{i}"}
    record.update(extra)
    return record


def test_schema_file_matches_code_and_fields():
    on_disk = json.loads((REPO / "data_manifests" / "manifest.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(MANIFEST_SCHEMA))
    assert set(MANIFEST_SCHEMA["properties"]) == set(MANIFEST_FIELDS)
    jsonschema.Draft202012Validator.check_schema(on_disk)


def test_example_manifest_is_valid():
    lines = (REPO / "data_manifests" / "example_manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and validate_records(records) == []


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.text(max_size=3), st.sampled_from(["train", "dicom", "x"])
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*MANIFEST_FIELDS, "extra"]), _values, max_size=10))
def test_record_problems_agree_with_jsonschema(record):
    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    assert (record_problems(record) == []) == validator.is_valid(record)


def test_round_trip_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    inside = tmp_path / "imgs" / "a.png"
    inside.write_bytes(b"x")
    outside = tmp_path.parent / "elsewhere.png"
    records = [_record(0, str(inside), frame=2), _record(1, str(outside), burned_in=True, custom={"k": 1})]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, records)
    stored = [json.loads(line) for line in manifest.read_text().splitlines()]
    # no path in the manifest: they are in the private map beside it (mode 0600), relative when inside its folder
    assert all("image" not in r for r in stored) and "a.png" not in manifest.read_text()
    assert list(stored[0])[: len(MANIFEST_FIELDS) - 1] == [f for f in MANIFEST_FIELDS if f != "image"]
    private = Path(str(manifest) + ".private.jsonl")
    assert private.stat().st_mode & 0o777 == 0o600
    mapped = [json.loads(line) for line in private.read_text().splitlines()]
    assert mapped == [{"id": "r0", "image": "imgs/a.png"}, {"id": "r1", "image": str(outside)}]
    back = read_manifest(manifest)
    assert [r["image"] for r in back] == [str(inside), str(outside)]
    assert back[0]["frame"] == 2 and back[0]["slice"] is None and back[1]["custom"] == {"k": 1}
    # reading from another working directory resolves against the manifest folder, not the cwd
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        assert read_manifest(manifest)[0]["image"] == str(inside)
    finally:
        os.chdir(cwd)
    assert len(manifest_sha256(manifest)) == 64


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "a", "image": "x.png", "source": "image", "rows": 0}', "rows"),
        ('{"id": "a", "image": "x.png", "source": "camera"}', "source"),
        ('{"id": "a", "source": "image"}', "image"),
        ('{"id": "a", "image": "x.png", "source": "image", "split": "holdout"}', "split"),
        ('{"id": "r0", "image": "x.png", "source": "image"}', "duplicate id"),
    ],
)
def test_read_manifest_names_file_and_line(tmp_path, line, needle):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"id": "r0", "image": "ok.png", "source": "image"}\n\n' + line + "\n")
    with pytest.raises(MedsslError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert str(manifest) in message and "line 3" in message and needle in message


def test_write_manifest_refuses_invalid_records(tmp_path):
    with pytest.raises(MedsslError, match="duplicate id"):
        write_manifest(tmp_path / "m.jsonl", [_record(0, "a"), _record(0, "b")])
    assert not (tmp_path / "m.jsonl").exists()


def test_check_records_finds_each_problem(tmp_path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(b"x")
    records = [
        _record(0, str(files[0]), split="train", patient_id="pat-A"),
        _record(1, str(files[1]), split="test", patient_id="pat-A"),  # leakage
        _record(2, str(files[2]), split="train", label="b", patient_id="pat-B"),
        _record(3, str(files[2]), split="val", label="a", patient_id="pat-C"),  # duplicate image
        _record(4, str(tmp_path / "gone.png"), split="val", label="zebra", patient_id="pat-D"),
    ]
    problems = check_records(records, labels=["a", "b", "c"])
    text = "\n".join(problems)
    assert "missing image file" in text and "gone.png" in text
    assert "unknown label 'zebra'" in text
    assert "empty class 'c'" in text
    assert "empty class 'b' in split test" in text
    assert "duplicate image" in text
    assert "patient_id pat-A appears in several splits: test, train" in text
    clean = [_record(i, str(files[i]), split="train", patient_id=f"p{i}") for i in range(4)]
    assert check_records(clean, labels=["a"]) == []


def test_cli_validate_split_subsample_export(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(60):
        path = images / f"{i}.png"
        path.write_bytes(b"x")
        records.append(_record(i, str(path), label="ab"[i % 2], patient_id=f"p{i // 3}"))
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, records)
    assert main(["manifest", "validate", str(manifest), "--labels", "a,b"]) == 0
    assert main(["manifest", "validate", str(manifest), "--labels", "a"]) == 1
    assert "unknown label 'b'" in capsys.readouterr().out

    split = tmp_path / "split.jsonl"
    assert main(["manifest", "split", str(manifest), "-o", str(split), "--seed", "3"]) == 0
    split_records = read_manifest(split)
    assert {r["split"] for r in split_records} == {"train", "val", "test"}
    assert main(["manifest", "validate", str(split)]) == 0

    out = tmp_path / "subsets"
    assert main(["manifest", "subsample", str(split), "-o", str(out), "--fractions", "0.1,0.5",
                 "--seeds", "0,1"]) == 0
    small = read_manifest(out / "split.frac0.1.seed0.jsonl")
    large = read_manifest(out / "split.frac0.5.seed0.jsonl")
    train_small = {r["id"] for r in small if r["split"] == "train"}
    train_large = {r["id"] for r in large if r["split"] == "train"}
    assert train_small < train_large
    assert [r for r in small if r["split"] != "train"] == [r for r in split_records if r["split"] != "train"]

    # every output carries its own private map with exactly its records' paths
    for written in (split, out / "split.frac0.1.seed0.jsonl"):
        private = [json.loads(line) for line in Path(str(written) + ".private.jsonl").read_text().splitlines()]
        assert {e["id"] for e in private} == {json.loads(line)["id"] for line in written.read_text().splitlines()}
        assert "images/" not in written.read_text()

    datalist = tmp_path / "datalist.json"
    assert main(["manifest", "export", str(split), "-o", str(datalist)]) == 0
    data = json.loads(datalist.read_text())
    assert all("image" not in d for d in data["training"])
    training = load_datalist(datalist, "training")  # paths merged back from datalist.json.private.jsonl
    assert sorted(d["image"] for d in training) == sorted(r["image"] for r in split_records if r["split"] == "train")
    assert len(data["validation"]) + len(data["test"]) + len(training) == len(split_records)
    assert {d["label_index"] for d in training} == {0, 1}
    # --with-paths: a private (0600) datalist that MONAI's load_decathlon_datalist reads directly
    from monai.data import load_decathlon_datalist

    with_paths = tmp_path / "datalist_paths.json"
    assert main(["manifest", "export", str(split), "-o", str(with_paths), "--with-paths"]) == 0
    assert with_paths.stat().st_mode & 0o777 == 0o600
    monai_training = load_decathlon_datalist(str(with_paths), data_list_key="training")
    assert sorted(os.path.normpath(d["image"]) for d in monai_training) == sorted(d["image"] for d in training)


def test_datalist_maps_splits(tmp_path):
    records = [_record(0, str(tmp_path / "a.png"), split="val"), _record(1, "/abs/b.png", split=None, label=None),
               _record(2, str(tmp_path / "c.png"), split="pretrain")]
    counts = write_datalist(tmp_path / "d.json", records, with_paths=True)
    data = json.loads((tmp_path / "d.json").read_text())
    assert counts == {"training": 1, "validation": 1, "test": 0, "pretrain": 1}
    assert data["validation"][0]["image"] == "a.png" and data["training"][0]["image"] == "/abs/b.png"
    assert data["training"][0]["label_index"] is None and data["labels"] == ["a"]


def test_container_records_are_distinct_images_but_true_duplicates_are_found():
    """npz/h5/tile records share one file path: their index fields make them different images."""
    from medssl.data.manifest import check_records

    recs = [{"id": f"r{i}", "image": "/data/x.npz", "index": i, "npz_split": "train", "label": "0",
             "split": "train"} for i in range(3)]
    recs += [{"id": f"t{i}", "image": "/data/s.svs", "x": 224 * i, "y": 0, "level": 0, "tile_size": 224,
              "label": "0", "split": "train"} for i in range(2)]
    assert [p for p in check_records(recs, check_files=False) if "duplicate" in p] == []
    recs.append(dict(recs[1], id="again"))
    dups = [p for p in check_records(recs, check_files=False) if "duplicate" in p]
    assert dups == ["duplicate image: records r1 and again both read /data/x.npz index 1 npz_split train"]


def test_empty_manifest_is_an_error_for_every_command(tmp_path, capsys):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("\n\n")
    assert main(["manifest", "validate", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "empty manifest" in out and "ok: no problems" not in out
    for argv in (["split", str(manifest), "-o", str(tmp_path / "s.jsonl")],
                 ["subsample", str(manifest), "-o", str(tmp_path / "sub")],
                 ["export", str(manifest), "-o", str(tmp_path / "d.json")]):
        with pytest.raises(MedsslError, match="empty manifest"):
            main(["manifest", *argv])
    from medssl.data.sources import records_from_path

    with pytest.raises(MedsslError, match="empty manifest"):
        records_from_path(manifest)  # what pretrain and evaluate read
    assert check_records([]) == ["empty manifest: no records"]


def test_labels_are_nfc_normalised_and_collisions_named(tmp_path):
    import unicodedata

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "image": f"{i}.png", "source": "image", "label": lab})
                                + "\n" for i, lab in enumerate([decomposed, decomposed, "tea"])))
    records = read_manifest(manifest)
    assert [r["label"] for r in records] == [composed, composed, "tea"]
    assert check_records(records, labels=[decomposed, "tea"], check_files=False) == []
    # both spellings in one manifest: a one-line error naming both, not two classes
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "image": f"{i}.png", "source": "image", "label": lab})
                                + "\n" for i, lab in enumerate([composed, decomposed])))
    with pytest.raises(MedsslError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message and ascii(composed) in message and ascii(decomposed) in message
    # the same for class folders (macOS returns decomposed names)
    from medssl.data.sources import records_from_path

    folder = tmp_path / "folder"
    for name in (composed, decomposed):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "x.png").write_bytes(b"x")
    if len(list(folder.iterdir())) == 2:  # a normalising file system keeps one folder
        with pytest.raises(MedsslError, match="NFC"):
            records_from_path(folder)
