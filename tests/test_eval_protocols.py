"""Frozen-backbone protocols on synthetic records: the linear probe changes no backbone parameter or BN
buffer (acceptance 2), the feature cache, kNN against a naive loop, label-fraction subsets."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medssl.evaluation.features import (
    cached_features,
    clear_memory_cache,
    module_sha256,
)
from medssl.evaluation.fractions import label_fraction_subsets
from medssl.evaluation.protocols.knn import knn_predict_proba
from medssl.evaluation.run import run_evaluation
from medssl.models import FeatureExtractor, InputNormalization, build_backbone

CLASSES = ("a", "b", "c")


def _records(n_per_split=(24, 12, 12)):
    recs = []
    for split, n in zip(("train", "val", "test"), n_per_split):
        for i in range(n):
            recs.append({"id": f"{split}-{i:03d}", "image": "unused", "label": CLASSES[i % 3], "split": split,
                         "source": "image"})
    return recs


def _transform(record):
    """Deterministic 3x32x32 image in [0,1] whose brightest channel is the class."""
    seed = zlib.crc32(record["id"].encode())
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, 32, 32, generator=g) * 0.3
    c = CLASSES.index(record["label"])
    img[c] += 0.6
    return {"image": img.clamp(0, 1), "label": record["label"], "id": record["id"]}


def test_linear_probe_changes_no_backbone_parameter_or_bn_buffer(tmp_path):
    clear_memory_cache()  # an earlier test in this process may hold these very features in memory (no file then)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    backbone.train()  # the protocol must put it in eval mode itself (BN buffers would move otherwise)
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    out = run_evaluation("synthetic", tmp_path / "ev", backbone=backbone, records=_records(),
                         transform=_transform, transform_desc="synthetic-v1", protocol="linear",
                         fractions=[0.5, 1.0], trials=2, epochs=100, seed=3, bootstrap=1000, name="probe")
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any("running_mean" in k for k in before)  # BN buffers were part of the check
    res = json.loads((out / "results.json").read_text())
    assert res["results"][-1]["summary"]["balanced_accuracy"]["mean"] > 0.6  # class signal is learnt
    # the cache files hold exactly the frozen features of each split
    extractor = FeatureExtractor(backbone, InputNormalization.from_spec(res["backbone"]["input_normalization"]))
    test_recs = [r for r in _records() if r["split"] == "test"]
    with torch.no_grad():
        direct = extractor.eval()(torch.stack([_transform(r)["image"] for r in test_recs])).numpy()
    cache_meta = [json.loads(p.read_text()) for p in (out / "cache").glob("*.json")]
    meta = next(m for m in cache_meta if m["ids"] == [r["id"] for r in test_recs])
    key = next(p for p in (out / "cache").glob("*.json") if json.loads(p.read_text()) == meta).stem
    np.testing.assert_allclose(np.load(out / "cache" / f"{key}.npy"), direct, rtol=1e-4, atol=1e-5)


def test_feature_cache_reuses_disk_and_keys_on_the_network(tmp_path):
    torch.manual_seed(0)
    net = FeatureExtractor(build_backbone("resnet18", small_stem=True, widen_factor=0.125),
                             InputNormalization([0.5] * 3, [0.5] * 3))
    recs = _records((6, 0, 0))
    kw = dict(cache_dir=tmp_path, manifest_hash="m", transform_desc="t", batch_size=4)
    first = cached_features(net, recs, _transform, model_hash=module_sha256(net), **kw)
    clear_memory_cache()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    again = cached_features(net, recs, _transform, model_hash=module_sha256(net), **kw)
    assert not calls and np.array_equal(first, again)  # read from the .npy, no forward pass
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    changed = cached_features(net, recs, _transform, model_hash=module_sha256(net), **kw)
    assert calls and not np.allclose(first, changed)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_knn_probabilities_match_naive_loop():
    rng = np.random.default_rng(0)
    train, labels, query = rng.normal(size=(30, 8)), rng.integers(0, 3, 30), rng.normal(size=(5, 8))
    probs = knn_predict_proba(train, labels, query, 3, k=7, temperature=0.1)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    for i, q in enumerate(query):
        sims = tn @ (q / np.linalg.norm(q))
        top = np.argsort(-sims)[:7]
        votes = np.zeros(3)
        for j in top:
            votes[labels[j]] += np.exp(sims[j] / 0.1)
        np.testing.assert_allclose(probs[i], votes / votes.sum(), rtol=1e-4)


def test_knn_protocol_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    out = run_evaluation("synthetic", tmp_path / "knn", backbone=backbone, records=_records(),
                         transform=_transform, transform_desc="synthetic-v1", protocol="knn", k=5,
                         fractions=[1.0], trials=1, seed=0)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 12
    res = json.loads((out / "results.json").read_text())
    trial = res["results"][0]["trials"][0]
    y = [CLASSES.index(r.split(",")[4]) for r in rows[1:]]
    p = [CLASSES.index(r.split(",")[5]) for r in rows[1:]]
    assert trial["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))


def test_label_fraction_subsets_are_nested_stratified_and_differ_between_trials():
    recs = [{"id": str(i), "label": "x" if i < 60 else "y"} for i in range(100)]
    subsets = label_fraction_subsets(recs, [0.1, 0.5, 1.0], trials=3, seed=0)
    labels = np.array([r["label"] for r in recs])
    for t in range(3):
        s10, s50, s100 = (set(subsets[(t, f)].tolist()) for f in (0.1, 0.5, 1.0))
        assert s10 <= s50 <= s100 and len(s100) == 100
        assert (labels[list(s10)] == "x").sum() == 6 and (labels[list(s10)] == "y").sum() == 4
    assert set(subsets[(0, 0.1)].tolist()) != set(subsets[(1, 0.1)].tolist())


def test_finetune_trains_a_copy_of_the_whole_network_and_tests_the_best_epoch(tmp_path, finetune_runs, caplog):
    caplog.set_level("INFO", logger="medssl")
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    trained = finetune_runs
    recs = _records((12, 6, 6))
    out = run_evaluation("synthetic", tmp_path / "ft", backbone=backbone, records=recs, transform=_transform,
                         transform_desc="synthetic-v1", protocol="finetune", fractions=[1.0], trials=1,
                         epochs=3, batch_size=6, loss="ce", seed=0)
    for k in before:  # the caller's backbone is copied, never modified
        assert torch.equal(before[k], backbone.state_dict()[k]), k
    (model, record), = trained
    conv = "extractor.backbone.conv1.weight"
    assert not torch.equal(model.state_dict()[conv], before["conv1.weight"])  # the whole network was trained
    assert 1 <= record["best_epoch"] <= 3
    # images/s and ETA log lines without a progress bar: 12 images / batch 6 x 3 epochs = 6 steps, last at 6/6
    rates = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning step ")]
    assert rates and rates[-1].startswith("fine-tuning step 6/6: ") and "images/s, ETA 0:00:00" in rates[-1]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["lr"] == 3e-4 and res["config"]["weight_decay"] == 1e-4
    # the restored best-epoch model reproduces its validation score and the saved test predictions
    val = [r for r in recs if r["split"] == "val"]
    from medssl.evaluation.run import IndexedLabels

    tf = IndexedLabels(_transform, CLASSES)
    with torch.no_grad():
        model.eval()
        val_pred = model(torch.stack([tf(r)["image"] for r in val])).argmax(1).numpy()
        test_probs = torch.softmax(model(torch.stack([tf(r)["image"] for r in recs if r["split"] == "test"])), 1)
    y_val = [CLASSES.index(r["label"]) for r in val]
    assert balanced_accuracy_score(y_val, val_pred) == pytest.approx(record["val_balanced_accuracy"])
    import csv

    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    saved = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(saved, test_probs.numpy(), atol=2e-6)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from medssl.cli import main

    missing = tmp_path / "nope.jsonl"
    assert main(["evaluate", "--backbone", "random", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medssl: error:") and str(missing) in err and len(err.splitlines()) == 1
    assert main(["evaluate", "--backbone", "random", "--data", str(tmp_path), "--fractions", "0,2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "fractions" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "results.json" in capsys.readouterr().err
