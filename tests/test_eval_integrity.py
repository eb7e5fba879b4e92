"""Evaluation integrity (issue 10 items 3-5, 7; issue 12 item 9): settings inherited from the backbone, GN -> BN
with recalibrated statistics, one balanced accuracy everywhere, honoured options, per-trial seeds, degenerate
splits and non-finite features refused or flagged before anything is written."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from medssl.errors import MedsslError
from medssl.evaluation.run import run_evaluation
from medssl.models import build_backbone
from tests.test_weights_norm import _bit as narrow_bit

CLASSES = ("a", "b", "c")
REPO = Path(__file__).resolve().parents[1]


def _records(n_per_split=(24, 12, 12), labels=None):
    recs = []
    for split, n in zip(("train", "val", "test"), n_per_split):
        pool = (labels or {}).get(split, CLASSES)
        for i in range(n):
            recs.append({"id": f"{split}-{i:03d}", "image": "unused", "label": pool[i % len(pool)], "split": split,
                         "source": "image"})
    return recs


def _transform(record):
    """Deterministic 3x32x32 image in [0,1] whose brightest channel is the class."""
    g = torch.Generator().manual_seed(zlib.crc32(record["id"].encode()))
    img = torch.rand(3, 32, 32, generator=g) * 0.3
    img[CLASSES.index(record["label"])] += 0.6
    return {"image": img.clamp(0, 1), "label": record["label"], "id": record["id"]}


def _tiny():
    torch.manual_seed(0)
    return build_backbone("resnet18", small_stem=True, widen_factor=0.125)


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# --- settings inherited from the checkpoint's provenance ---------------------------------------------------------

def test_evaluate_inherits_image_size_and_preset_from_the_pretraining_run(tmp_path, capsys):
    from medssl.cli import main
    from medssl.data.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "data", per_class=10, size=56, seed=1)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(manifest), "--method", "simclr", "--init", "random",
                 "--arch", "resnet18", "--small-stem", "--widen-factor", "0.125", "--image-size", "48",
                 "--modality", "ultrasound", "--iterations", "2", "--batch-size", "8", "--optimizer", "sgd",
                 "--workers", "0", "--knn-every", "0", "--seed", "0", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "ev"
    assert main(["evaluate", "--backbone", str(run / "backbone.safetensors"), "--data", str(manifest),
                 "--protocol", "knn", "--k", "3", "--trials", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["image_size"] == 48 and res["config"]["modality"] == "ultrasound"
    assert res["data"]["transform"] == "build_eval_transform('ultrasound', 48)"
    settings = res["input_settings"]
    assert settings["image_size"] == {"value": 48, "source": "checkpoint provenance (pretraining run)"}
    assert settings["modality"] == {"value": "ultrasound", "source": "checkpoint provenance (pretraining run)"}
    assert settings["input_normalization"]["source"] == "checkpoint metadata (medssl file)"
    # the features really were computed from 48-px images: one cached test array per 48-px forward pass
    from medssl.transforms.presets import build_eval_transform

    rec = json.loads(manifest.read_text().splitlines()[0])
    image = build_eval_transform("ultrasound", 48)({**rec, "image": str(manifest.parent / rec["image"])})["image"]
    assert tuple(image.shape[-2:]) == (48, 48)
    # a backbone without a pretraining record needs the flags, named in a one-line error
    capsys.readouterr()
    assert main(["evaluate", "--backbone", "random", "--arch", "resnet18", "--data", str(manifest),
                 "--out", str(tmp_path / "ev_random")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--image-size" in err and "--modality" in err
    assert _nothing_written(tmp_path / "ev_random")


# --- GroupNorm -> BatchNorm and BatchNorm statistics --------------------------------------------------------------

def _bit_file(path: Path, *, norm: str = "gn", provenance: dict | None = None) -> Path:
    from medssl.weights import save_medssl_file

    model = narrow_bit(norm=norm)
    save_medssl_file(path, {k: v.detach().clone() for k, v in model.state_dict().items()}, arch=model.arch,
                     arch_kwargs=model.arch_kwargs, input_normalization={"mean": [0.5] * 3, "std": [0.5] * 3},
                     provenance=provenance or {})
    return path


def _test_features(out: Path) -> np.ndarray:
    for meta_path in (out / "cache").glob("*.json"):
        if json.loads(meta_path.read_text())["ids"][0].startswith("test-"):
            return np.load(meta_path.with_suffix(".npy"))
    raise AssertionError("no cached test features")


def test_bit_gn_to_bn_with_norm_bn_gives_finite_features_on_the_gn_scale(tmp_path, monkeypatch):
    import medssl.evaluation.run as run_mod
    from medssl.evaluation.setup import load_backbone
    from medssl.weights.norm import convert_gn_to_bn

    ckpt = _bit_file(tmp_path / "bit.safetensors")
    kw = dict(records=_records(), transform=_transform, transform_desc="synthetic-v1", protocol="knn", k=5,
              trials=1, batch_size=8, seed=0)
    gn = _test_features(run_evaluation("synthetic", tmp_path / "gn", backbone=ckpt, **kw))
    captured = {}
    original = run_mod.recalibrate_backbone

    def spy(loaded, records, transform, **options):
        captured.update(model=loaded.model, records=records, transform=transform, options=options)
        return original(loaded, records, transform, **options)

    monkeypatch.setattr(run_mod, "recalibrate_backbone", spy)
    out = run_evaluation("synthetic", tmp_path / "bn", backbone=ckpt, norm="bn", **kw)
    bn = _test_features(out)
    assert np.isfinite(bn).all()
    scale_gn, scale_bn = np.sqrt((gn ** 2).mean()), np.sqrt((bn ** 2).mean())
    assert 0.1 < scale_bn / scale_gn < 10, (scale_gn, scale_bn)
    # without recalibration (BatchNorm mean 0 / var 1) the same network is far off that scale
    raw = load_backbone(ckpt).model
    convert_gn_to_bn(raw)
    with torch.no_grad():
        images = torch.stack([_transform(r)["image"] for r in _records() if r["split"] == "test"])
        uncal = raw.eval().forward_features((images - 0.5) / 0.5).double().numpy()
    assert not np.isfinite(uncal).all() or np.sqrt((uncal ** 2).mean()) > 10 * scale_gn
    res = json.loads((out / "results.json").read_text())
    norm = res["backbone"]["norm"]
    assert norm["gn_to_bn"] > 0 and norm["bn_statistics"] == "recalibrated"
    assert norm["recalibration"]["num_batches"] == 3 and norm["recalibration"]["num_samples"] == 24
    # the first BatchNorm's statistics are the pooled statistics of its inputs over all 24 train images
    model = captured["model"]
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    inputs = []
    handle = first.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().double()))
    with torch.no_grad():
        train = torch.stack([captured["transform"](r)["image"] for r in captured["records"]])
        model.eval().forward_features((train - 0.5) / 0.5)
    handle.remove()
    x = inputs[0].transpose(0, 1).reshape(first.num_features, -1)
    np.testing.assert_allclose(first.running_mean.double().numpy(), x.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.running_var.double().numpy(), x.var(1, unbiased=True).numpy(),
                               rtol=1e-3, atol=1e-5)


def test_uncalibrated_bn_file_is_refused_in_eval_mode_unless_recalibrated(tmp_path):
    ckpt = _bit_file(tmp_path / "converted.safetensors", norm="bn",
                     provenance={"operations": [{"operation": "gn_to_bn"}], "bn_statistics": "uncalibrated"})
    kw = dict(records=_records(), transform=_transform, transform_desc="synthetic-v1", protocol="linear",
              epochs=2, trials=1, seed=0)
    with pytest.raises(MedsslError) as err:
        run_evaluation("synthetic", tmp_path / "refused", backbone=ckpt, **kw)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "uncalibrated" in msg and "--recalibrate-bn" in msg
    assert "converted.safetensors" in msg and _nothing_written(tmp_path / "refused")
    out = run_evaluation("synthetic", tmp_path / "ok", backbone=ckpt, recalibrate_bn=True, **kw)
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"]["norm"]["bn_statistics"] == "recalibrated"
    assert np.isfinite(_test_features(out)).all()


def test_uncalibrated_refusal_names_the_operation_that_reset_the_statistics(tmp_path, capsys):
    """A file left uncalibrated by random dead-filter repair (no GroupNorm anywhere) is refused naming that repair."""
    from medssl.cli import main

    net = _tiny()
    with torch.no_grad():
        net.layer1[0].conv1.weight[0].zero_()  # one dead filter (norm 0 < 0.1)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    converted = tmp_path / "repaired.safetensors"
    assert main(["weights", "convert", str(tmp_path / "tv.pth"), "--dead-filters", "random",
                 "-o", str(converted)]) == 0
    printed = capsys.readouterr().out
    assert "1 dead filters repaired; BatchNorm statistics: uncalibrated" in printed
    assert "rule" not in printed  # no Frobenius scaling was asked for, so no rule is named
    with pytest.raises(MedsslError) as err:
        run_evaluation("synthetic", tmp_path / "refused", backbone=str(converted), records=_records(),
                       transform=_transform, transform_desc="synthetic-v1", protocol="linear", epochs=1, trials=1)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "repaired.safetensors" in msg and "--recalibrate-bn" in msg
    assert "random dead-filter repair" in msg and "GroupNorm" not in msg
    assert _nothing_written(tmp_path / "refused")


# --- one balanced accuracy ---------------------------------------------------------------------------------------

def test_balanced_accuracy_has_one_definition_equal_to_sklearn():
    from medssl.engines.scores import balanced_accuracy
    from medssl.evaluation.protocols.finetune import BalancedAccuracy

    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 2, 3], 60)  # classes 1 and 4 absent from the true labels
    y_pred = rng.integers(0, 5, 60)
    expected = balanced_accuracy_score(y_true, y_pred)
    assert balanced_accuracy(y_true, y_pred, 5) == pytest.approx(expected)
    metric = BalancedAccuracy(5)
    logits = torch.nn.functional.one_hot(torch.as_tensor(y_pred), 5).float()
    for s in range(0, 60, 16):
        metric.update((logits[s:s + 16], torch.as_tensor(y_true[s:s + 16])))
    assert metric.compute() == pytest.approx(expected)
    # no second definition anywhere in the package
    sources = {p: p.read_text() for p in (REPO / "medssl").rglob("*.py")}
    defs = [p for p, text in sources.items() if re.search(r"^def balanced_accuracy\(", text, re.M)]
    assert [p.name for p in defs] == ["scores.py"]
    others = re.compile(r"import[^\n]*balanced_accuracy_score|balanced_accuracy_score\(|Recall\(")
    assert not [p for p, text in sources.items() if others.search(text)]


def test_finetune_selects_by_sklearn_balanced_accuracy_with_a_class_absent_from_val(tmp_path, finetune_runs):
    trained = finetune_runs
    recs = _records((12, 8, 6), labels={"val": ("a", "b")})  # class c absent from val
    out = run_evaluation("synthetic", tmp_path / "ft", backbone=_tiny(), records=recs, transform=_transform,
                         transform_desc="synthetic-v1", protocol="finetune", fractions=[1.0], trials=1, epochs=2,
                         batch_size=6, loss="ce", seed=0)
    (model, record), = trained
    from medssl.evaluation.run import IndexedLabels

    tf = IndexedLabels(_transform, CLASSES)
    val = [r for r in recs if r["split"] == "val"]
    with torch.no_grad():
        pred = model.eval()(torch.stack([tf(r)["image"] for r in val])).argmax(1).numpy()
    y_val = [CLASSES.index(r["label"]) for r in val]
    assert record["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_val, pred))
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["absent_classes"] == {"val": ["c"]}
    assert any("no val images" in n for n in res["data"]["notes"])


# --- every option honoured; trials determined by their seed ------------------------------------------------------

def test_linear_probe_uses_the_given_batch_size(tmp_path, monkeypatch):
    import medssl.evaluation.protocols.linear as linear

    sizes = []
    original = linear.build_loss

    def counting(*args, **kwargs):
        criterion = original(*args, **kwargs)

        def wrapped(logits, target):
            sizes.append(len(target))
            return criterion(logits, target)
        return wrapped

    monkeypatch.setattr(linear, "build_loss", counting)
    run_evaluation("synthetic", tmp_path / "lin", backbone=_tiny(), records=_records(), transform=_transform,
                   transform_desc="synthetic-v1", protocol="linear", fractions=[1.0], trials=1, epochs=2,
                   batch_size=5, seed=0)
    assert sizes == [5, 5, 5, 5, 4] * 2  # 24 training features, ceil(24 / 5) steps per epoch


def test_finetune_trial_is_a_function_of_its_seed(tmp_path, monkeypatch):
    import medssl.evaluation.protocols.finetune as ft

    heads = []
    original = ft.finetune_once

    def spy(model, *args, **kwargs):
        heads.append(model.head.weight.detach().clone())
        return original(model, *args, **kwargs)

    monkeypatch.setattr(ft, "finetune_once", spy)
    kw = dict(records=_records((9, 6, 6)), transform=_transform, transform_desc="synthetic-v1",
              protocol="finetune", fractions=[1.0], epochs=1, batch_size=4, loss="ce")
    two = run_evaluation("s", tmp_path / "two", backbone=_tiny(), trials=2, seed=0, **kw)
    one = run_evaluation("s", tmp_path / "one", backbone=_tiny(), trials=1, seed=1000, **kw)
    # trial 1 of seed 0 uses seed 0 + 1000 * 1: the same head and predictions as trial 0 of seed 1000
    assert torch.equal(heads[1], heads[2]) and not torch.equal(heads[0], heads[1])
    rows_two = [r.split(",")[5:] for r in (two / "predictions.csv").read_text().splitlines()[1:]
                if r.split(",")[2] == "1"]
    rows_one = [r.split(",")[5:] for r in (one / "predictions.csv").read_text().splitlines()[1:]]
    assert rows_two == rows_one


# --- degenerate splits and non-finite features ------------------------------------------------------------------

def test_one_class_test_split_is_refused_before_writing(tmp_path):
    recs = _records((12, 6, 6), labels={"test": ("a",)})
    out = tmp_path / "one"
    with pytest.raises(MedsslError) as err:
        run_evaluation("synthetic", out, backbone=_tiny(), records=recs, transform=_transform,
                       transform_desc="synthetic-v1", protocol="knn", trials=1)
    assert "test split holds images of one class only" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert _nothing_written(out)


def test_class_absent_from_test_is_scored_over_present_classes_and_noted(tmp_path):
    recs = _records((12, 6, 8), labels={"test": ("a", "b")})
    out = run_evaluation("synthetic", tmp_path / "absent", backbone=_tiny(), records=recs, transform=_transform,
                         transform_desc="synthetic-v1", protocol="knn", k=3, trials=1, seed=0)
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["absent_classes"] == {"test": ["c"]}
    assert res["data"]["class_counts"]["test"] == {"a": 4, "b": 4, "c": 0}
    rows = [r.split(",") for r in (out / "predictions.csv").read_text().splitlines()[1:]]
    y, p = [r[4] for r in rows], [r[5] for r in rows]
    trial = res["results"][0]["trials"][0]
    assert trial["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert trial["recall"][2] is None  # the absent class has no recall, not 0
    report = (out / "report.md").read_text()
    assert "class c has no test images" in report


def test_nan_features_stop_with_an_error_naming_the_backbone_and_write_nothing(tmp_path):
    class NaNNet(nn.Module):
        arch = "nan_net"
        arch_kwargs: dict = {}
        num_features = 4

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward_features(self, x):
            feats = x.mean(dim=(2, 3)).repeat(1, 2)[:, :4] * self.scale
            feats[0, 0] = float("nan")
            return feats

    out = tmp_path / "nan"
    for protocol in ("linear", "finetune"):
        with pytest.raises(MedsslError) as err:
            run_evaluation("synthetic", out, backbone=NaNNet(), records=_records((9, 6, 6)), transform=_transform,
                           transform_desc="synthetic-v1", protocol=protocol, trials=1, epochs=1, batch_size=4)
        msg = str(err.value)
        assert "nan_net" in msg and "non-finite" in msg and len(msg.splitlines()) == 1
        assert _nothing_written(out)


def test_validation_carve_out_groups_by_lesion_then_patient():
    from medssl.evaluation.setup import load_eval_data

    recs = []
    for lesion in range(15):
        for copy in range(4):
            recs.append({"id": f"l{lesion}-{copy}", "image": "x", "label": CLASSES[lesion % 3], "split": "train",
                         "lesion_id": f"L{lesion}", "patient_id": None})
    recs += [{"id": f"t{i}", "image": "x", "label": CLASSES[i % 3], "split": "test"} for i in range(6)]
    data = load_eval_data("synthetic", records=recs, seed=0)
    lesions = {split: {r["lesion_id"] for r in getattr(data, split)} for split in ("train", "val")}
    assert lesions["val"] and not lesions["train"] & lesions["val"]  # no lesion on both sides
    assert all(len([r for r in data.val if r["lesion_id"] == lesion]) == 4 for lesion in lesions["val"])
    assert any("grouped by lesion_id" in n for n in data.notes)
    # patient_id is the unit when there is no lesion_id; with neither, images are split one by one
    for r in recs:
        r["patient_id"], r["lesion_id"] = r.pop("lesion_id", None), None
    data = load_eval_data("synthetic", records=recs, seed=0)
    patients = {split: {r["patient_id"] for r in getattr(data, split)} for split in ("train", "val")}
    assert not patients["train"] & patients["val"] and any("grouped by patient_id" in n for n in data.notes)
