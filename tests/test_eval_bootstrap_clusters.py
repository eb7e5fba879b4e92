"""Cluster (patient / lesion) bootstrap, the two-stage trial bootstrap, Holm adjustment and p-value display
(issue 10, build item 6, acceptance 5), against naive loops, closed forms and simulations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from medssl.cli import main
from medssl.errors import MedsslError
from medssl.evaluation.bootstrap import (
    bootstrap_ci,
    cluster_confusions,
    cluster_weights,
    format_p_value,
    holm_adjust,
    interval_description,
    make_clusters,
    paired_bootstrap,
    trial_expansion,
)
from medssl.evaluation.predictions import (
    PredictionTable,
    cluster_ids,
    read_predictions,
    summarize_predictions,
    write_predictions,
)


def _noisy(y: np.ndarray, acc: np.ndarray | float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Predictions correct with probability ``acc`` (per image), else a uniformly drawn wrong class."""
    correct = rng.random(len(y)) < acc
    return np.where(correct, y, (y + rng.integers(1, k, len(y))) % k)


def test_cluster_weights_draw_whole_clusters_within_class_strata():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 20, 14])
    pid = rng.integers(0, 25, len(y))  # patients with images of several classes
    clusters = make_clusters(y, pid, "patient_id")
    # naive: cluster of each image, majority label per cluster (ties: lowest class)
    firsts = list(dict.fromkeys(pid.tolist()))
    assert clusters.n_clusters == len(firsts)
    np.testing.assert_array_equal(clusters.index, [firsts.index(p) for p in pid])
    for g, p in enumerate(firsts):
        counts = np.bincount(y[pid == p], minlength=3)
        assert clusters.stratum[g] == int(np.flatnonzero(counts == counts.max())[0])
    w = cluster_weights(clusters, 50, np.random.default_rng(1))
    assert w.shape == (50, clusters.n_clusters)
    for s in range(3):  # every resample keeps the number of clusters of every stratum
        np.testing.assert_array_equal(w[:, clusters.stratum == s].sum(axis=1), np.sum(clusters.stratum == s))
    # weighted per-cluster confusions equal the confusion matrix of the expanded resample (naive loop)
    y_pred = _noisy(y, 0.6, 3, rng)
    conf = cluster_confusions(y, y_pred, clusters, 3)
    for b in range(5):
        rows = [i for g in range(clusters.n_clusters) for _ in range(w[b, g]) for i in np.flatnonzero(clusters.index == g)]
        expected = confusion_matrix(y[rows], y_pred[rows], labels=[0, 1, 2])
        np.testing.assert_array_equal((w[b] @ conf).reshape(3, 3), expected)


def test_images_duplicated_under_one_patient_give_a_twice_as_wide_ci():
    """Acceptance 5: 4 copies per patient; the patient-level CI is ~2x the one that counts copies as patients,
    and equals (same seed) the CI of the unduplicated test set."""
    ratios = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        y = np.repeat([0, 1, 2], [70, 50, 40])
        y_pred = _noisy(y, 0.7, 3, rng)
        y4, p4, pid = np.repeat(y, 4), np.repeat(y_pred, 4), np.repeat(np.arange(len(y)), 4)
        patients = bootstrap_ci(y4, p4, 3, clusters=make_clusters(y4, pid, "patient_id"), seed=seed)
        copies = bootstrap_ci(y4, p4, 3, seed=seed)  # every copy its own cluster, as the old code did
        single = bootstrap_ci(y, y_pred, 3, seed=seed)
        for m in ("balanced_accuracy", "macro_f1", "accuracy"):
            assert patients[m] == pytest.approx(single[m], abs=1e-12)
        width = {k: v["balanced_accuracy"]["high"] - v["balanced_accuracy"]["low"] for k, v in
                 (("p", patients), ("c", copies))}
        ratios.append(width["p"] / width["c"])
    assert all(1.6 <= r <= 2.5 for r in ratios), ratios
    assert np.mean(ratios) == pytest.approx(2.0, abs=0.2)


def test_trial_mean_ci_covers_the_true_mean_when_subsets_vary():
    """Acceptance 5: 3 trials whose per-class accuracies differ by subset (sd 0.15) on 250 test images: the
    two-stage CI covers the true mean ~95 % of the time; the interval with fixed trials (old code) does not."""
    rng = np.random.default_rng(1)
    mu = np.array([0.7, 0.6])
    y = np.repeat([0, 1], [150, 100])
    reps, trials = 200, 3
    shift = 0.15 * rng.standard_normal((reps, trials))
    correct = rng.random((reps, trials, len(y))) < np.clip(mu[y][None, None, :] + shift[..., None], 0, 1)
    preds = np.where(correct, y, 1 - y)
    truth = mu.mean()
    covered = {"two_stage": 0, "fixed_trials": 0}
    for r in range(reps):
        for key, stage in (("two_stage", True), ("fixed_trials", False)):
            ci = bootstrap_ci(y, list(preds[r]), 2, seed=r, trial_stage=stage)["balanced_accuracy"]
            covered[key] += ci["low"] <= truth <= ci["high"]
    rate = {k: v / reps for k, v in covered.items()}
    assert 0.90 <= rate["two_stage"] <= 0.99, rate
    assert rate["fixed_trials"] <= 0.6, rate


def test_trial_expansion_closed_form():
    from scipy import stats

    assert trial_expansion(1) == 1.0
    for t in (2, 3, 5, 10):
        assert trial_expansion(t) == pytest.approx(stats.t.ppf(0.975, t - 1) / stats.norm.ppf(0.975)
                                                   * np.sqrt(t / (t - 1)))
    assert trial_expansion(3) == pytest.approx(2.69, abs=0.01)


def _naive_holm(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: (p[i], i))
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_holm_equals_a_naive_implementation(seed):
    rng = np.random.default_rng(seed)
    p = rng.choice([1 / 1001, 0.004, 0.01, 0.03, 0.2, 0.5, 0.9], size=12) * rng.uniform(0.5, 1, 12)
    p[:2] = p[2]  # ties
    np.testing.assert_allclose(holm_adjust(p), _naive_holm(list(p)), rtol=0, atol=1e-15)
    assert holm_adjust([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])


def test_p_values_at_their_resolution_and_adaptive_resamples():
    assert format_p_value(1 / 1001, 1000) == "< 0.001"
    assert format_p_value(2 / 1001, 1000) == "0.002"
    assert format_p_value(0.0234, 1000) == "0.023"
    assert format_p_value(1 / 10001, 10000) == "< 0.0001"
    assert format_p_value(3 / 10001, 10000) == "0.0003"
    assert format_p_value(1.0, 1000) == "1.000"
    assert format_p_value(0.012, 1000, upper_bound=True) == "< 0.012"
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], [80, 60, 40])
    strong = paired_bootstrap(y, _noisy(y, 0.95, 3, rng), _noisy(y, 0.4, 3, rng), 3, seed=0)
    assert strong["n_resamples"] == 10_000 and strong["exceedances"] == 0
    assert strong["p_value"] == pytest.approx(1 / 10001)
    assert format_p_value(strong["p_value"], strong["n_resamples"]) == "< 0.0001"
    # a null comparison keeps 1,000 resamples and a p-value inside (0, 1]
    null = paired_bootstrap(y, _noisy(y, 0.7, 3, rng), _noisy(y, 0.7, 3, rng), 3, seed=0)
    assert null["n_resamples"] == 1000 and null["exceedances"] >= 10 and null["p_value"] > 0.01
    for value in (strong, null):
        assert format_p_value(value["p_value"], value["n_resamples"]) not in ("0.000", "0.0000")


def test_paired_bootstrap_on_patients_equals_the_unduplicated_test():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], [90, 60])
    a = [_noisy(y, 0.8, 2, rng) for _ in range(3)]
    b = [_noisy(y, 0.7, 2, rng) for _ in range(3)]
    plain = paired_bootstrap(y, a, b, 2, seed=2, paired_trials=True)
    y4, pid = np.repeat(y, 4), np.repeat(np.arange(len(y)), 4)
    dup = paired_bootstrap(y4, [np.repeat(p, 4) for p in a], [np.repeat(p, 4) for p in b], 2,
                           clusters=make_clusters(y4, pid, "patient_id"), seed=2, paired_trials=True)
    for key in ("difference", "ci_low", "ci_high", "p_value"):
        assert dup[key] == pytest.approx(plain[key], abs=1e-12)
    assert dup["n_clusters"] == len(y) and dup["n"] == 4 * len(y) and dup["unit"] == "patient_id"
    expected = np.mean([balanced_accuracy_score(y, p) for p in a]) - np.mean([balanced_accuracy_score(y, p) for p in b])
    assert plain["difference"] == pytest.approx(expected)


def _table(y, preds, classes, *, patients=None, lesions=None, fraction=1.0):
    rows = []
    for t, p in enumerate(preds):
        probs = np.eye(len(classes))[p] * 0.8 + 0.2 / len(classes)
        rows.append(PredictionTable(list(classes), np.array([f"img-{i:04d}" for i in range(len(y))], dtype=object),
                                    np.array(["test"] * len(y), dtype=object), np.full(len(y), t),
                                    np.full(len(y), fraction), np.asarray(y), np.asarray(p), probs,
                                    patients, lesions))
    from medssl.evaluation.predictions import concat_tables

    return concat_tables(rows)


def test_predictions_csv_carries_cluster_ids_and_auto_picks_the_unit(tmp_path):
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], [12, 8])
    patients = [f"pat-{i // 2:03d}" for i in range(20)]
    lesions = [f"les-{i // 4:03d}" if i < 16 else None for i in range(20)]
    table = _table(y, [_noisy(y, 0.7, 2, rng)], ["a", "b"], patients=patients, lesions=lesions)
    write_predictions(tmp_path / "predictions.csv", table)
    back = read_predictions(tmp_path / "predictions.csv")
    assert back.patient_ids.tolist() == patients
    assert back.lesion_ids.tolist() == [v or "" for v in lesions]
    unit, ids = cluster_ids(back)  # auto: lesion_id, images without one are their own cluster
    assert unit == "lesion_id" and len(set(ids)) == 4 + 4
    assert cluster_ids(back, "patient_id")[0] == "patient_id" and len(set(cluster_ids(back, "patient_id")[1])) == 10
    assert cluster_ids(back, "none") == ("image", None)
    no_ids = _table(y, [y], ["a", "b"])
    assert cluster_ids(no_ids)[0] == "image"
    with pytest.raises(MedsslError, match="no test image has a lesion_id"):
        cluster_ids(no_ids, "lesion_id")
    block = summarize_predictions(back, cluster_by="patient_id")[0]
    assert block["interval"]["unit"] == "patient_id" and block["interval"]["n_clusters"] == 10
    assert "one trial" in block["interval"]["covers"]
    # a predictions.csv written before the cluster columns existed is still read (every image a cluster)
    old = tmp_path / "old.csv"
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    old.write_text("\n".join(",".join(c for j, c in enumerate(line.split(",")) if j not in (6, 7))
                             for line in lines) + "\n")
    legacy = read_predictions(old)
    assert cluster_ids(legacy)[0] == "image" and legacy.probs.shape == (20, 2)


def _write_eval(path: Path, name: str, table: PredictionTable, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    write_predictions(path / "predictions.csv", table)
    results = {"name": name, "protocol": "linear", "config": {"seed": seed, "bootstrap": 1000},
               "data": {"dataset": "toy", "manifest_sha256": "ab" * 32}, "results": []}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_report_states_the_unit_and_holm_adjusts_the_family(tmp_path):
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], [60, 40])
    patients = [f"pat-{i // 4:03d}" for i in range(100)]
    dirs = []
    for name, acc in (("Random", 0.55), ("P2X", 0.75), ("P1X", 0.7)):
        preds = [_noisy(y, acc, 2, rng) for _ in range(3)]
        dirs.append(_write_eval(tmp_path / name, name, _table(y, preds, ["benign", "malignant"],
                                                              patients=patients)))
    out = tmp_path / "cmp"
    assert main(["report", *map(str, dirs), "-o", str(out)]) == 0
    header = (out / "comparison.md").read_text().splitlines()[0]
    assert "toy 100% (CI unit: patient_id, 25 clusters)" in header
    import csv

    with open(out / "paired.csv", newline="") as fh:
        paired = list(csv.DictReader(fh))
    assert len(paired) == 3 and all(r["unit"] == "patient_id" and r["n_clusters"] == "25" for r in paired)
    p = [float(r["p_value"]) for r in paired]
    np.testing.assert_allclose([float(r["p_holm"]) for r in paired], _naive_holm(p), atol=1e-12)
    report = (out / "report.md").read_text()
    for r in paired:
        shown = [d if d.startswith("<") else f"= {d}" for d in (r["p_display"], r["p_holm_display"])]
        assert f"p {shown[0]} (Holm-adjusted {shown[1]}, {r['n_resamples']} resamples)" in report
        assert float(r["p_display"].lstrip("< ")) > 0 and float(r["p_holm_display"].lstrip("< ")) > 0
    assert "in 25 patients" in report and "(paired by label subset)" in report
    # the report of one evaluation names the unit in its table header and what the interval covers
    from medssl.evaluation.report import load_evaluation, paired_comparisons, write_eval_report

    text = write_eval_report(dirs[0]).read_text()
    assert "95% CI of the trial mean; CI unit: patient_id)" in text and "| test clusters (patient_id) |" in text
    assert "covers test-set sampling (25 patients, stratified by class) and label-subset variation (3 trials" in text
    # cluster_by none (``medssl report --cluster-by none``) resamples images
    evals = [load_evaluation(d, "none") for d in dirs[:2]]
    assert evals[0].summary[0]["interval"]["n_clusters"] == 100
    row = paired_comparisons(evals)[0]
    assert row["unit"] == "image" and row["n_clusters"] == 100 and row["p_holm"] == row["p_value"]


def test_evaluate_writes_patient_ids_and_the_interval_unit(tmp_path):
    """run_evaluation (kNN on a tiny backbone): predictions.csv carries the patient pseudonyms of the test
    images; results.json and report.md state the unit, the clusters and what the CI covers; the CI equals the
    patient-level bootstrap recomputed from predictions.csv."""
    import zlib

    import torch

    from medssl.evaluation.run import run_evaluation
    from medssl.models import build_backbone

    classes = ("a", "b")
    recs = [{"id": f"{s}-{i:03d}", "image": "unused", "label": classes[(i // 3) % 2], "split": s,
             "patient_id": f"pat-{s}-{i // 3:02d}", "source": "image"}
            for s, n in (("train", 24), ("val", 12), ("test", 18)) for i in range(n)]

    def transform(record):
        g = torch.Generator().manual_seed(zlib.crc32(record["id"].encode()))
        img = torch.rand(3, 32, 32, generator=g) * 0.8
        img[classes.index(record["label"])] += 0.2
        return {"image": img.clamp(0, 1), "label": record["label"], "id": record["id"]}

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    out = run_evaluation("synthetic", tmp_path / "ev", backbone=backbone, records=recs, transform=transform,
                         transform_desc="cluster-test-v1", protocol="knn", k=3, fractions=[0.5, 1.0], trials=2,
                         seed=0, image_size=32, modality="generic")
    table = read_predictions(out / "predictions.csv")
    expected = {r["id"]: r["patient_id"] for r in recs if r["split"] == "test"}
    assert {i: p for i, p in zip(table.ids, table.patient_ids)} == expected
    res = json.loads((out / "results.json").read_text())
    block = res["results"][0]
    assert block["interval"]["unit"] == "patient_id" and block["interval"]["n_clusters"] == 6
    assert block["interval"]["n_trials"] == 2 and "label-subset variation" in block["interval"]["covers"]
    assert "interval" in res["definitions"] and "patients" in res["definitions"]["bootstrap"]
    ref = table.select(0.5, 0)
    ci = bootstrap_ci(ref.y_true, [table.select(0.5, t).y_pred for t in (0, 1)], 2,
                      clusters=make_clusters(ref.y_true, ref.patient_ids, "patient_id"), seed=0)
    assert block["summary"]["balanced_accuracy"]["ci_low"] == pytest.approx(ci["balanced_accuracy"]["low"])
    assert block["summary"]["balanced_accuracy"]["ci_high"] == pytest.approx(ci["balanced_accuracy"]["high"])
    report = (out / "report.md").read_text()
    assert "CI unit: patient_id" in report and "| test clusters (patient_id) |" in report


def test_interval_over_too_few_clusters_of_a_class_is_flagged():
    """A class whose test images come from one patient has no sampling variation in the stratified bootstrap:
    the interval description carries a warning (and none when every class has enough patients)."""
    y = np.array([0] * 20 + [1] * 6)
    one_patient = make_clusters(y, [f"p{i}" for i in range(20)] + ["q"] * 6, unit="patient_id")
    flagged = interval_description(one_patient, n_trials=3, n_resamples=1000)
    assert flagged["warning"] is not None and "class 1: 1" in flagged["warning"]
    many = make_clusters(y, [f"p{i}" for i in range(26)], unit="patient_id")
    assert interval_description(many, n_trials=3, n_resamples=1000)["warning"] is None


def test_evaluate_cli_flags_an_interval_over_one_patient_of_a_class(tmp_path):
    """``medssl evaluate`` on a manifest whose test images of class b all come from one patient: results.json
    carries the interval warning for that class (1 patient < MIN_CLUSTERS_PER_CLASS) and report.md prints it;
    class a (6 patients) is not named."""
    from skimage.io import imsave

    from medssl.data.manifest import write_manifest
    from medssl.evaluation.bootstrap import MIN_CLUSTERS_PER_CLASS

    rng = np.random.default_rng(0)
    records = []
    layout = {"train": {"a": [f"ta{i}" for i in range(8)], "b": [f"tb{i}" for i in range(8)]},
              "val": {"a": ["va0", "va1", "va2"], "b": ["vb0", "vb1", "vb2"]},
              "test": {"a": [f"xa{i}" for i in range(6)], "b": ["xb"] * 4}}  # class b: one patient
    for split, by_class in layout.items():
        for label, patients in by_class.items():
            for i, patient in enumerate(patients):
                path = tmp_path / "img" / f"{split}_{label}_{i}.png"
                path.parent.mkdir(exist_ok=True)
                image = rng.integers(0, 160, (32, 32, 3)) + (60 if label == "b" else 0)
                imsave(path, image.astype(np.uint8), check_contrast=False)
                records.append({"id": f"{split}-{label}-{i}", "image": str(path), "label": label, "split": split,
                                "patient_id": patient, "source": "image"})
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, records)
    out = tmp_path / "ev"
    assert main(["evaluate", "--backbone", "random", "--arch", "resnet18", "--small-stem", "--widen-factor",
                 "0.125", "--data", str(manifest), "--protocol", "knn", "--k", "3", "--fractions", "1.0",
                 "--trials", "1", "--bootstrap", "1000", "--modality", "generic", "--image-size", "32",
                 "--out", str(out)]) == 0
    interval = json.loads((out / "results.json").read_text())["results"][0]["interval"]
    assert interval["unit"] == "patient_id" and interval["n_clusters"] == 7
    assert interval["warning"] is not None and "class 1: 1)" in interval["warning"]
    assert "class 0" not in interval["warning"] and f"fewer than {MIN_CLUSTERS_PER_CLASS} patients" in interval[
        "warning"]
    assert f"**Warning: {interval['warning']}.**" in (out / "report.md").read_text()
