"""A prepared store built from a PACS-like export whose folder and file names carry a patient's name, birth date
and MRN holds none of them in any file (issue 13, acceptance 3), including a decode error's reason; pretraining
(with the kNN monitor) and evaluation read the prepared manifest like any other."""

from __future__ import annotations

import json
import re

import pytest

from medssl.cli import main
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.private_map import read_private_map
from medssl.data.readers.load import LoadRecordd
from tests.test_data_private_map import BIRTH, KEY, MRN, NAME, _export

#: searched in every byte (case-insensitive); long enough that image bytes never hold them by chance
BYTE_NEEDLES = tuple(n.lower().encode() for n in (NAME, "DOE_JOHN", "DOE JOHN", BIRTH, "1945-03-14", MRN, "123456"))
#: the name parts alone, searched where the bytes are text (not next to other letters)
NAME_PARTS = re.compile(r"(?<![a-z])(doe|john)(?![a-z])", re.IGNORECASE)


def _assert_clean(where: str, data: bytes) -> None:
    for needle in BYTE_NEEDLES:
        assert needle not in data.lower(), f"{needle!r} leaked into {where}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # binary (shards): the long needles above
    hit = NAME_PARTS.search(text)
    assert hit is None, f"{hit.group(0)!r} leaked into {where}"


@pytest.fixture()
def prepared(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MEDSSL_DEID_KEY", KEY)
    export = tmp_path / "export"
    labels = _export(export)
    manifest = tmp_path / "work" / "cxr.jsonl"
    assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress"]) == 0
    records = read_manifest(manifest)
    for record in records:  # labels as a labelling step would add them
        record["label"] = labels[record["image"]]
    write_manifest(manifest, records)
    split = manifest.parent / "cxr_split.jsonl"
    assert main(["manifest", "split", str(manifest), "-o", str(split), "--ratios", "0.5,0.17,0.33",
                 "--group", "patient_id"]) == 0
    manifest = split
    paths = read_private_map(manifest).records
    broken = next(v["image"] for v in paths.values() if NAME in v["image"])
    with open(broken, "r+b") as fh:  # a header that ingest accepted, pixel data cut short: fails at prepare
        fh.truncate(fh.seek(0, 2) - 600)
    capfd.readouterr()
    store = tmp_path / "store"
    assert main(["prepare", str(manifest), "-o", str(store), "--workers", "1", "--no-progress"]) == 0
    return labels, manifest, store, broken, capfd.readouterr()


def test_prepared_store_holds_no_identifier(prepared):
    labels, manifest, store, broken, captured = prepared
    files = [p for p in store.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.json", "manifest.jsonl", "errors.jsonl", "shard-00000.bin"}
    for path in files:
        _assert_clean(f"{path} (name)", str(path.relative_to(store)).encode())
        _assert_clean(str(path), path.read_bytes())
    _assert_clean("stdout/stderr", (captured.out + captured.err).encode())
    # the failed record is in the errors file (its reason path-free), the others load from the store
    errors = (store / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and "cannot decode" in errors[0]
    source = {r["id"]: r for r in read_manifest(manifest)}
    records = read_manifest(store / "manifest.jsonl")
    assert len(records) == len(source) - 1
    for record in records:
        original = source[record["id"]]
        assert original["image"] != broken
        assert record["label"] == labels[original["image"]] and record["patient_id"] == original["patient_id"]
        assert record["deidentified"] is True and record["source"] == "store"
        image = LoadRecordd()(record)["image"]
        assert image.shape == (1, 32, 32)
    assert not (store / "manifest.jsonl.private.jsonl").exists()


def test_pretrain_knn_monitor_and_evaluate_read_the_store(prepared, tmp_path, capfd):
    _, _, store, _, _ = prepared
    data = str(store / "manifest.jsonl")
    run, evals = tmp_path / "run", tmp_path / "eval"
    tiny = ["--arch", "resnet18", "--small-stem", "--widen-factor", "0.25", "--image-size", "32"]
    assert main(["pretrain", "--data", data, "--method", "simclr", "--init", "random", *tiny, "--iterations", "2",
                 "--batch-size", "8", "--modality", "xray", "--workers", "0", "--knn-every", "1", "--no-progress",
                 "--out", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(any(k.startswith("knn") for k in m) for m in metrics)  # the monitor ran on store records
    assert main(["evaluate", "--backbone", str(run / "backbone.safetensors"), "--data", data, "--name", "P1X",
                 "--protocol", "linear", "--fractions", "1.0", "--trials", "1", "--epochs", "2",
                 "--batch-size", "8", "--bootstrap", "1000", "--out", str(evals)]) == 0
    captured = capfd.readouterr()
    for folder in (run, evals):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            _assert_clean(str(path), path.read_bytes())
    _assert_clean("stdout/stderr", (captured.out + captured.err).encode())
