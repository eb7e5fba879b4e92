"""Loose ends of issues 10 and 12: unreadable records in ``medssl evaluate`` (issue 12 item 6), a full disk
while logging a pretraining run (item 9), strict JSON in results.json, SwAV's optimizer groups as its code sets
them, ViewPosition's DICOM vocabulary (item 5) and the dependency floors that NumPy 2 requires."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medssl.cli import main

TINY_RANDOM = ["--backbone", "random", "--arch", "resnet18", "--small-stem", "--widen-factor", "0.25",
               "--image-size", "32", "--modality", "ultrasound"]


def _strict_json(text: str):
    """``json.loads`` that refuses NaN and +-Infinity (not JSON, RFC 8259)."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from medssl.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    manifest = write_synthetic_dataset(root / "data", per_class=5, size=32, seed=3)
    return [json.loads(line) for line in manifest.read_text().splitlines()], manifest.parent


def _write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _two_frame_dicom(path: Path, **header) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 32, 32, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8).tobytes()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fault", ["missing_file", "frame_out_of_range"])
def test_evaluate_names_an_unreadable_record_and_its_file(synthetic, tmp_path, capsys, workers, fault):
    records, folder = synthetic
    records = [dict(r, image=str(folder / r["image"])) for r in records]
    bad = next(i for i, r in enumerate(records) if r["split"] == "test")
    if fault == "missing_file":
        path = str(tmp_path / "gone" / "IM_0007.png")
        records[bad] = dict(records[bad], id="rec-missing", image=path)
        detail = "IM_0007.png"
    else:
        path = str(_two_frame_dicom(tmp_path / "two_frames.dcm"))
        records[bad] = dict(records[bad], id="rec-frame", image=path, source="dicom", frame=5)
        detail = "frame 5 out of range"
    manifest = _write_manifest(tmp_path / "m.jsonl", records)
    out = tmp_path / "eval"
    code = main(["evaluate", *TINY_RANDOM, "--data", str(manifest), "--protocol", "knn", "--k", "3",
                 "--trials", "1", "--num-workers", str(workers), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert f"record {records[bad]['id']!r} cannot be loaded" in err and path in err
    assert detail in err and "applying transform" not in err and "Traceback" not in err
    assert not (out / "results.json").exists()


# --- a full disk while logging a pretraining run (issue 12 item 9) ------------------------------------------------

def _pretrain_args(data: Path, out: Path) -> list[str]:
    return ["pretrain", "--data", str(data), "--method", "simclr", "--init", "random", "--arch", "resnet18",
            "--small-stem", "--widen-factor", "0.125", "--image-size", "32", "--batch-size", "6", "--iterations", "3",
            "--checkpoint-every", "0", "--checkpoint-every-epochs", "0", "--knn-every", "0", "--workers", "0",
            "--modality", "ultrasound", "--method-options", '{"projector_hidden_dim": 16, "projector_out_dim": 8}',
            "--no-progress", "--out", str(out)]


def _cli_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("medssl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_full_disk_appending_to_metrics_jsonl_is_one_line(synthetic, tmp_path, monkeypatch, capsys):
    """The kernel's own ENOSPC: metrics.jsonl is opened on /dev/full."""
    _, folder = synthetic
    real_open = Path.open

    def full_metrics(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            return real_open(Path("/dev/full"), "w", *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_metrics)
    out = tmp_path / "run"
    assert main(_pretrain_args(folder / "manifest.jsonl", out)) == 2
    err = _cli_error(capsys)
    assert err == f"medssl: error: disk full writing {out / 'metrics.jsonl'} ({os.strerror(errno.ENOSPC)})"


def test_full_disk_writing_tensorboard_events_is_one_line(synthetic, tmp_path, monkeypatch, capsys):
    """Every TensorBoard append after the event file's header goes to /dev/full (ENOSPC from the kernel)."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    real_append = gfile.LocalFileSystem.append
    monkeypatch.setattr(gfile.LocalFileSystem, "append",
                        lambda self, filename, content, binary_mode=False: real_append(self, "/dev/full", content,
                                                                                       binary_mode))
    out = tmp_path / "run"
    assert main(_pretrain_args(synthetic[1] / "manifest.jsonl", out)) == 2
    err = _cli_error(capsys)
    event_files = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    assert err.startswith(f"medssl: error: disk full writing {event_files[0]} (")


def test_tensorboard_proxy_surfaces_a_full_disk_of_the_last_writes_at_close(tmp_path, monkeypatch):
    """The writer's own close() drops the background thread's error; the proxy's close() does not."""
    from ignite.engine import Engine
    from tensorboard.compat.tensorflow_stub.io import gfile

    from medssl.engines.handlers import attach_tensorboard
    from medssl.errors import MedsslError

    engine = Engine(lambda eng, batch: {"loss": 1.0, "lr": 0.1})
    tb = attach_tensorboard(engine, tmp_path / "tb")
    real_append = gfile.LocalFileSystem.append
    monkeypatch.setattr(gfile.LocalFileSystem, "append",
                        lambda self, filename, content, binary_mode=False: real_append(self, "/dev/full", content,
                                                                                       binary_mode))
    with pytest.raises(MedsslError, match=r"^disk full writing .*events\.out\.tfevents") as info:
        engine.run(range(3), max_epochs=1)
        tb.close()
    assert len(str(info.value).splitlines()) == 1


# --- results.json is strict JSON ----------------------------------------------------------------------------------

def _absent_class_records():
    recs = []
    for split, n, pool in (("train", 12, "abc"), ("val", 6, "abc"), ("test", 8, "ab")):
        recs += [{"id": f"{split}-{i:03d}", "image": "unused", "label": pool[i % len(pool)], "split": split,
                  "source": "image"} for i in range(n)]
    return recs


def _class_transform(record):
    import zlib

    import torch

    g = torch.Generator().manual_seed(zlib.crc32(record["id"].encode()))
    img = torch.rand(3, 32, 32, generator=g) * 0.3
    img["abc".index(record["label"])] += 0.6
    return {"image": img.clamp(0, 1), "label": record["label"], "id": record["id"]}


def test_results_json_of_a_class_absent_from_test_is_strict_json(tmp_path):
    import torch

    from medssl.evaluation.report import compare_evaluations
    from medssl.evaluation.run import run_evaluation
    from medssl.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    out = run_evaluation("synthetic", tmp_path / "eval", backbone=backbone, records=_absent_class_records(),
                         transform=_class_transform, transform_desc="absent-c-v1", protocol="knn", k=3, trials=2)
    report = compare_evaluations([out], tmp_path / "report")
    texts = {p: p.read_text() for folder in (out, Path(report).parent)
             for p in sorted(Path(folder).rglob("*.json"))}
    assert out / "results.json" in texts
    for text in texts.values():
        _strict_json(text)  # no NaN / Infinity anywhere
    block = _strict_json(texts[out / "results.json"])["results"][0]
    # class c has no test image: its recall and AUROC are undefined in every trial -> null, with the definition
    assert [t["recall"][2] for t in block["trials"]] == [None, None]
    assert block["per_class"]["recall"][2] is None and block["per_class"]["auroc"][2] is None
    assert block["per_class"]["recall"][0] == pytest.approx(np.mean([t["recall"][0] for t in block["trials"]]))
    assert "null for a class without test images" in _strict_json(texts[out / "results.json"])["definitions"]["recall"]


# --- SwAV's optimizer groups as its code sets them -----------------------------------------------------------------

def _apex_larc_sgd_step(params, grads, *, lr, wd, eta=1e-3, eps=1e-8):
    """The SwAV code's first step, written out: ``LARC(SGD(model.parameters(), lr, momentum=0.9,
    weight_decay=wd), trust_coefficient=eta, clip=False)`` (NVIDIA apex LARC; momentum buffer = d at step 1)."""
    out = []
    for w, g in zip(params, grads):
        w_norm, g_norm = float(w.norm()), float(g.norm())
        d = g + wd * w
        if w_norm != 0 and g_norm != 0:
            d = d * (eta * w_norm / (g_norm + w_norm * wd + eps))
        out.append(w - lr * d)
    return out


def test_swav_decays_and_lars_scales_every_parameter_as_its_code_does():
    import torch

    from medssl.engines.optim import build_optimizer
    from medssl.methods import build_method
    from medssl.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", widen_factor=0.125, small_stem=True)
    method = build_method("swav", backbone, projector_hidden_dim=16, projector_out_dim=8, num_prototypes=5,
                          num_local_crops=0)
    wd, lr = 1e-6, 0.6  # SwAV's weight decay and base lr
    groups = method.param_groups(wd, lr)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in trainable}
    assert any(p.ndim == 1 for p in trainable)  # biases and BatchNorm weights are there ...
    assert all(g["weight_decay"] == wd and not g["exclude_from_lars"] for g in groups)  # ... and treated alike
    for p in trainable:  # non-zero biases so that every tensor takes the trust-ratio branch
        if p.ndim == 1:
            p.data.add_(0.1)
    before = [p.detach().clone() for p in trainable]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in trainable]
    for p, g in zip(trainable, grads):
        p.grad = g.clone()
    build_optimizer("lars", groups, lr=lr, weight_decay=wd, momentum=0.9, eta=1e-3).step()
    expected = _apex_larc_sgd_step(before, grads, lr=lr, wd=wd)
    for p, b, e in zip(trainable, before, expected):
        step, ref = p.detach() - b, e - b
        # LARS's ||g + wd w|| and LARC's ||g|| + wd ||w|| differ by at most 2 wd ||w|| / ||g|| (relative)
        assert float((step - ref).norm() / ref.norm()) < 1e-4
    # the old groups (1-D tensors: no decay, trust ratio 1) would step the BatchNorm weights by lr * g instead
    bn = next(i for i, p in enumerate(trainable) if p.ndim == 1 and float(before[i].norm()) > 1)
    assert float((before[bn] - lr * grads[bn] - expected[bn]).norm()) > 10 * float((expected[bn] - before[bn]).norm())


# --- ViewPosition against its DICOM vocabulary (issue 12 item 5) ---------------------------------------------------

PS33_VIEW_POSITIONS = ("AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO")  # PS3.3 C.8.1.1, for humans


@pytest.mark.parametrize("value", [*PS33_VIEW_POSITIONS, "LATERAL", "pa", " AP "])
def test_defined_view_positions_are_kept(value):
    from medssl.data.dicom_values import validate_header_values

    out, reasons = validate_header_values({"ViewPosition": value})
    assert out["view_position"] == value.strip().upper() and reasons == []


@pytest.mark.parametrize("value", ["DOE JOHN", "MRN123456", "CC", "MLO", "CD10DI_CRPRO", "AP\\\\PA"])
def test_other_view_positions_become_null_with_a_reason(value):
    from medssl.data.dicom_values import cs_values, validate_header_values

    out, reasons = validate_header_values({"ViewPosition": value, "BodyPartExamined": "CHEST"})
    assert out["view_position"] is None and out["body_part"] == "CHEST"
    assert len(reasons) == 1 and reasons[0].startswith("ViewPosition is not a valid DICOM value (")
    assert value not in reasons[0]  # the reason never quotes the value
    if value == "DOE JOHN":
        assert cs_values(value) == (["DOE JOHN"], None)  # a valid Code String: only the vocabulary stops it
        assert "not a defined term" in reasons[0]


def test_ingest_nulls_a_name_typed_into_view_position(tmp_path, monkeypatch, capsys):
    from medssl.data.manifest import read_manifest
    from medssl.data.private_map import read_errors

    monkeypatch.setenv("MEDSSL_DEID_KEY", "5f1c0e4a9b7d2c3e8a6f4b1d0c9e7a2b")
    export = tmp_path / "export"
    _two_frame_dicom(export / "a.dcm", ViewPosition="DOE JOHN", Modality="CR")
    _two_frame_dicom(export / "b.dcm", ViewPosition="LL", Modality="CR")
    manifest = tmp_path / "out" / "m.jsonl"
    assert main(["ingest", str(export), "-o", str(manifest), "--workers", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    records = read_manifest(manifest)
    assert sorted(str(r["view_position"]) for r in records) == ["LL", "LL", "None", "None"]  # 2 files x 2 frames
    for text in (manifest.read_text(), captured.out, captured.err,
                 (tmp_path / "out" / "m.errors.jsonl").read_text()):
        assert "DOE" not in text and "JOHN" not in text
    errors = read_errors(tmp_path / "out" / "m.errors.jsonl", manifest)
    assert [(Path(e["path"]).name, e["reason"].split(" (")[0]) for e in errors if e["status"] == "warning"] \
        == [("a.dcm", "ViewPosition is not a valid DICOM value")]


# --- dependency floors compatible with numpy>=2 ---------------------------------------------------------------------

#: the oldest release of each binary (or NumPy-API-sensitive) dependency that works with NumPy 2, checked by
#: importing and running each under NumPy 2.4 (the previous release fails: ABI error or a removed NumPy name),
#: or, for torch, scipy, scikit-learn and imagecodecs, the first release their changelogs build against NumPy 2
NUMPY2_FLOORS = {"torch": "2.3", "scipy": "1.13", "scikit-learn": "1.4.2", "scikit-image": "0.23.1",
                 "h5py": "3.11", "matplotlib": "3.8.4", "imagecodecs": "2024.6.1", "nibabel": "5.2",
                 "pylibjpeg-libjpeg": "2.2", "tensorboard": "2.17.1"}


def test_dependency_floors_allow_no_release_built_for_numpy_1():
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    floors = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        floors[req.name.lower()] = min((Version(s.version) for s in req.specifier if s.operator == ">="),
                                       default=None)
    assert floors["numpy"] >= Version("2.0")
    for name, oldest in NUMPY2_FLOORS.items():
        assert floors[name] is not None and floors[name] >= Version(oldest), name
