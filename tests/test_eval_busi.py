"""End to end on real BUSI ultrasound: two linear-probe evaluations through the CLI, report.md recomputed
from predictions.csv, and ``medssl report`` comparing them (issue 5, acceptance 3 and 5)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion

from medssl.cli import main
from medssl.evaluation.bootstrap import bootstrap_ci

# a class-stratified subset keeps the test within its time budget on 2 shared cores
PER_CLASS = {"benign": 50, "malignant": 40, "normal": 30}
ARGS = ["--arch", "resnet18", "--small-stem", "--widen-factor", "0.125", "--protocol", "linear",
        "--fractions", "0.1,1.0", "--trials", "3", "--epochs", "30", "--batch-size", "32", "--seed", "7",
        "--bootstrap", "1000"]
# random init has no pretraining record: it is told the preset and size; the pretrained file inherits them
RANDOM_ONLY = ["--modality", "ultrasound", "--image-size", "32"]


@pytest.fixture(scope="module")
def busi_evals(shared_data, tmp_path_factory):
    from medssl.data.manifest import write_manifest
    from medssl.data.sources import records_from_path

    root = tmp_path_factory.mktemp("busi_eval")
    records = sorted(records_from_path(shared_data / "busi"), key=lambda r: r["id"])
    chosen = [r for c, n in PER_CLASS.items() for r in [r for r in records if r["label"] == c][:n]]
    manifest = root / "busi_subset.jsonl"
    write_manifest(manifest, chosen)
    # the second backbone is briefly pretrained (SimCLR, 6 steps from random init) on the subset, labels unused
    run = root / "pretrain"
    assert main(["pretrain", "--data", str(manifest), "--method", "simclr", "--init", "random",
                 "--arch", "resnet18", "--small-stem", "--widen-factor", "0.125", "--image-size", "32",
                 "--iterations", "6", "--batch-size", "16", "--lr", "0.5", "--optimizer", "sgd",
                 "--modality", "ultrasound", "--workers", "0", "--knn-every", "0", "--seed", "3",
                 "--no-progress", "--out", str(run)]) == 0
    ckpt = run / "backbone.safetensors"
    out_random, out_p2x = root / "ev_random", root / "ev_p2x"
    assert main(["evaluate", "--backbone", "random", "--data", str(manifest), "--name", "Random",
                 "--out", str(out_random), *ARGS, *RANDOM_ONLY]) == 0
    assert main(["evaluate", "--backbone", str(ckpt), "--data", str(manifest), "--name", "P2X",
                 "--out", str(out_p2x), *ARGS]) == 0
    return root, out_random, out_p2x


def _read_predictions(path: Path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    return rows, classes


def _groups(rows, classes):
    """{fraction: {trial: (y_true, y_pred, probs)}} with rows ordered by id."""
    out: dict[float, dict[int, tuple]] = {}
    for f in sorted({float(r["fraction"]) for r in rows}):
        out[f] = {}
        for t in sorted({int(r["trial"]) for r in rows if float(r["fraction"]) == f}):
            sel = sorted((r for r in rows if float(r["fraction"]) == f and int(r["trial"]) == t),
                         key=lambda r: r["id"])
            y = np.array([classes.index(r["true_label"]) for r in sel])
            p = np.array([classes.index(r["predicted_label"]) for r in sel])
            pr = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in sel])
            out[f][t] = (y, p, pr)
    return out


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the Markdown table whose header line starts with ``header_start`` (first match)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _nums(cell: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d+|-?\d+", cell)]


def test_both_evaluations_write_all_outputs(busi_evals):
    _, *dirs = busi_evals
    for d in dirs:
        for name in ("results.json", "predictions.csv", "report.md", "plots/tsne_test.png",
                     "plots/confusion_matrix_fraction_0.1.png", "plots/confusion_matrix_fraction_1.png"):
            assert (d / name).is_file() and (d / name).stat().st_size > 0, name
        res = json.loads((d / "results.json").read_text())
        assert res["config"]["fractions"] == [0.1, 1.0] and res["config"]["trials"] == 3
        assert res["config"]["image_size"] == 32 and res["config"]["modality"] == "ultrasound"
        source = res["input_settings"]["image_size"]["source"]
        assert source == ("given" if d.name == "ev_random" else "checkpoint provenance (pretraining run)")
        assert len(res["data"]["manifest_sha256"]) == 64 and "scikit-learn" in res["versions"]
        assert res["data"]["split_sizes"] == {"train": 72, "val": 24, "test": 24}
        assert "balanced_accuracy" in res["definitions"]
        for block in res["results"]:
            assert len(block["trials"]) == 3
            # 24 test images, at least 5 of each class (one cluster per image): no too-few-clusters warning
            assert block["interval"]["warning"] is None
            for t in block["trials"]:
                assert 1 <= t["best_epoch"] <= 30 and 0 <= t["val_balanced_accuracy"] <= 1
        n_train = {b["fraction"]: b["trials"][0]["n_train"] for b in res["results"]}
        assert n_train == {0.1: 7, 1.0: 72}
        text = (d / "predictions.csv").read_text()
        assert "/" not in text and "busi" not in text  # no paths in the per-image file
        rows, classes = _read_predictions(d / "predictions.csv")
        assert classes == ["benign", "malignant", "normal"] and len(rows) == 24 * 2 * 3
        assert "Warning:" not in (d / "report.md").read_text()


def test_every_number_in_report_md_is_recomputed_from_predictions(busi_evals):
    _, *dirs = busi_evals
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        report = (d / "report.md").read_text()
        rows, classes = _read_predictions(d / "predictions.csv")
        groups = _groups(rows, classes)
        assert f"seed: {res['config']['seed']}" in report and f"bootstrap resamples: {res['config']['bootstrap']}" in report
        headline = _table_rows(report, "| label fraction | trials |")
        assert len(headline) == len(groups)
        for cells, (f, trials) in zip(headline, groups.items()):
            assert cells[0] == f"{100 * f:g}%" and int(cells[1]) == len(trials) and int(cells[2]) == 24
            y = trials[0][0]
            fns = [lambda y, p: balanced_accuracy_score(y, p),
                   lambda y, p: f1_score(y, p, average="macro", labels=[0, 1, 2], zero_division=0),
                   accuracy_score]
            ci = bootstrap_ci(y, [t[1] for t in trials.values()], 3, n_resamples=res["config"]["bootstrap"],
                              seed=res["config"]["seed"])
            for j, (fn, key) in enumerate(zip(fns, ("balanced_accuracy", "macro_f1", "accuracy"))):
                vals = [fn(t[0], t[1]) for t in trials.values()]
                mean, std = _nums(cells[3 + 2 * j])
                lo, hi = _nums(cells[4 + 2 * j])
                assert mean == pytest.approx(np.mean(vals), abs=6e-5)
                assert std == pytest.approx(np.std(vals, ddof=1), abs=6e-5)
                assert (lo, hi) == pytest.approx((ci[key]["low"], ci[key]["high"]), abs=6e-5)
                assert lo <= mean <= hi
            aucs = [roc_auc_score(t[0], t[2], multi_class="ovr") for t in trials.values()]
            assert _nums(cells[9]) == pytest.approx([np.mean(aucs), np.std(aucs, ddof=1)], abs=6e-5)
        per_trial = _table_rows(report, "| label fraction | trial |")
        expected = [(f, t, v) for f, trials in groups.items() for t, v in trials.items()]
        assert len(per_trial) == len(expected)
        for cells, (f, t, (y, p, pr)) in zip(per_trial, expected):
            assert cells[0] == f"{100 * f:g}%" and int(cells[1]) == t
            assert _nums(" ".join(cells[2:])) == pytest.approx([
                balanced_accuracy_score(y, p), f1_score(y, p, average="macro", labels=[0, 1, 2], zero_division=0),
                accuracy_score(y, p), roc_auc_score(y, pr, multi_class="ovr")], abs=6e-5)
        for f, trials in groups.items():
            label = f"{100 * f:g}%"
            per_class = _table_rows(report.split(f"## Per class, {label} labels")[1], "| class |")
            for c, cells in enumerate(per_class):
                assert cells[0] == classes[c]
                rec = np.mean([recall_score(v[0], v[1], average=None, labels=[0, 1, 2], zero_division=0)[c]
                               for v in trials.values()])
                prec = np.mean([precision_score(v[0], v[1], average=None, labels=[0, 1, 2], zero_division=0)[c]
                                for v in trials.values()])
                auc = np.mean([roc_auc_score(v[0] == c, v[2][:, c]) for v in trials.values()])
                assert _nums(" ".join(cells[1:])) == pytest.approx([rec, prec, auc], abs=6e-5)
            section = report.split(f"Confusion matrix, {label} labels")[1]
            cm_rows = _table_rows(section, "| true \\ predicted |")
            cm = sum(sk_confusion(v[0], v[1], labels=[0, 1, 2]) for v in trials.values())
            assert [[int(x) for x in r[1:]] for r in cm_rows] == cm.tolist()


def test_medssl_report_compares_the_two_evaluations(busi_evals, tmp_path):
    root, ev_random, ev_p2x = busi_evals
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"iteration": i, "epoch": i // 5, "loss": 5.0 - 0.1 * i, "lr": 0.01} for i in range(20)]
    lines += [{"iteration": 5 * e, "epoch": e, "knn_balanced_accuracy": 0.4 + 0.05 * e} for e in range(4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "cmp"
    assert main(["report", str(ev_random), str(ev_p2x), "-o", str(out), "--pretrain-runs", str(run)]) == 0
    table = (out / "comparison.md").read_text()
    rows = _table_rows(table, "| initialisation |")
    assert [r[0] for r in rows] == ["Random", "P2X"]
    header = table.splitlines()[0]
    assert "busi_subset 10%" in header and "busi_subset 100%" in header
    with open(out / "comparison.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 4
    for row, d in ((rows[0], ev_random), (rows[1], ev_p2x)):
        groups = _groups(*_read_predictions(d / "predictions.csv"))
        for cell, trials in zip(row[1:], groups.values()):
            mean, std, lo, hi = _nums(cell)
            assert mean == pytest.approx(np.mean([balanced_accuracy_score(t[0], t[1]) for t in trials.values()]),
                                         abs=6e-5)
            assert lo <= mean <= hi
    report = (out / "report.md").read_text()
    paired = [line for line in report.splitlines() if line.startswith("- **Random vs P2X**")]
    assert len(paired) == 2
    g_r = _groups(*_read_predictions(ev_random / "predictions.csv"))
    g_p = _groups(*_read_predictions(ev_p2x / "predictions.csv"))
    for line, f in zip(paired, sorted(g_r)):
        diff = np.mean([balanced_accuracy_score(t[0], t[1]) for t in g_r[f].values()]) - np.mean(
            [balanced_accuracy_score(t[0], t[1]) for t in g_p[f].values()])
        m = re.search(r"balanced accuracy ([+-]\d\.\d+) \(95% CI (-?\d\.\d+) to (-?\d\.\d+)\), p = (\d\.\d+)", line)
        assert m, line
        d, lo, hi, p = map(float, m.groups())
        assert d == pytest.approx(diff, abs=6e-5) and lo <= d <= hi and 0 < p <= 1
    for name in ("pretrain_loss.png", "pretrain_knn_balanced_accuracy.png", "Random_busi_subset_tsne_test.png",
                 "P2X_busi_subset_confusion_0.1.png"):
        assert (out / "plots" / name).is_file(), name
