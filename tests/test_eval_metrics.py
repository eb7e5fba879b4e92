"""Metrics, bootstrap CIs and losses of medssl.evaluation against sklearn and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from medssl.evaluation.bootstrap import (
    bootstrap_ci,
    cluster_confusions,
    cluster_weights,
    make_clusters,
    paired_bootstrap,
)
from medssl.evaluation.losses import SoftmaxFocalLoss, balanced_class_weights, build_loss
from medssl.evaluation.metrics import (
    auroc_one_vs_rest,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(20, 200))
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, k, n))
    probs = rng.dirichlet(np.ones(k), n)
    probs = np.round(probs, 2)  # create ties in the scores
    probs /= probs.sum(1, keepdims=True)
    labels = list(range(k))
    m = classification_metrics(y_true, y_pred, probs, k)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy(y_true, y_pred, k) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred, k) == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    )
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    np.testing.assert_allclose(m["recall"], recall_score(y_true, y_pred, average=None, labels=labels,
                                                         zero_division=0))
    np.testing.assert_allclose(m["precision"], precision_score(y_true, y_pred, average=None, labels=labels,
                                                               zero_division=0))
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, k),
                                  sk_confusion_matrix(y_true, y_pred, labels=labels))
    if len(np.unique(y_true)) == k:
        auc_sk = [roc_auc_score(y_true == c, probs[:, c]) for c in range(k)]
        np.testing.assert_allclose(auroc_one_vs_rest(y_true, probs), auc_sk)
        if k > 2:
            assert m["macro_auroc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"))


def test_auroc_nan_for_absent_class_and_balanced_accuracy_skips_it():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 0])
    probs = np.full((4, 3), 1 / 3)
    auc = auroc_one_vs_rest(y_true, probs)
    assert np.isnan(auc[2]) and auc[0] == pytest.approx(0.5)
    assert balanced_accuracy(y_true, y_pred, 3) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_image_bootstrap_weights_are_stratified_and_weighted_confusion_matches_loop():
    """Without patient ids every image is a cluster: resamples keep the class counts; the weighted confusion
    equals sklearn's on the expanded resample; the same seed gives the same resamples."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 50)
    y_pred = rng.integers(0, 3, 50)
    clusters = make_clusters(y_true)
    assert clusters.unit == "image" and clusters.n_clusters == 50
    w = cluster_weights(clusters, 20, np.random.default_rng(1))
    assert w.shape == (20, 50)
    conf = cluster_confusions(y_true, y_pred, clusters, 3)
    for b in range(20):
        rows = np.repeat(np.arange(50), w[b])
        np.testing.assert_array_equal(np.bincount(y_true[rows], minlength=3), np.bincount(y_true, minlength=3))
        np.testing.assert_array_equal((w[b] @ conf).reshape(3, 3),
                                      sk_confusion_matrix(y_true[rows], y_pred[rows], labels=[0, 1, 2]))
    np.testing.assert_array_equal(w, cluster_weights(clusters, 20, np.random.default_rng(1)))


def test_bootstrap_ci_coverage_simulation():
    """Bernoulli predictions with known per-class accuracy: the 95% CI covers the truth 90-99% of the time."""
    counts = np.array([120, 60, 40])
    acc = np.array([0.8, 0.6, 0.7])
    truth = acc.mean()  # expected balanced accuracy
    y_true = np.repeat(np.arange(3), counts)
    rng = np.random.default_rng(123)
    reps, covered = 200, 0
    for r in range(reps):
        correct = rng.random(len(y_true)) < acc[y_true]
        wrong = (y_true + rng.integers(1, 3, len(y_true))) % 3
        y_pred = np.where(correct, y_true, wrong)
        ci = bootstrap_ci(y_true, y_pred, 3, n_resamples=1000, seed=r)["balanced_accuracy"]
        covered += ci["low"] <= truth <= ci["high"]
    assert 0.90 <= covered / reps <= 0.99, covered / reps


def test_paired_bootstrap_detects_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(5)
    y_true = np.repeat(np.arange(3), [150, 100, 80])

    def predict(acc):
        correct = rng.random(len(y_true)) < acc
        return np.where(correct, y_true, (y_true + 1) % 3)

    better, worse = predict(0.9), predict(0.6)
    res = paired_bootstrap(y_true, better, worse, 3, n_resamples=1000, seed=0)
    assert res["difference"] == pytest.approx(
        balanced_accuracy_score(y_true, better) - balanced_accuracy_score(y_true, worse))
    assert res["ci_low"] > 0 and res["p_value"] < 0.01
    same = paired_bootstrap(y_true, better, better, 3, n_resamples=200, seed=0)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    # trials: the statistic is the mean over trials
    res_t = paired_bootstrap(y_true, [better, worse], [worse], 3, n_resamples=100, seed=0)
    expected = (balanced_accuracy_score(y_true, better) + balanced_accuracy_score(y_true, worse)) / 2 \
        - balanced_accuracy_score(y_true, worse)
    assert res_t["difference"] == pytest.approx(expected)


def test_focal_loss_gamma0_is_cross_entropy_and_gamma4_matches_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(16, 4, dtype=torch.float64)
    targets = torch.randint(0, 4, (16,))
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert SoftmaxFocalLoss(gamma=0.0)(logits, targets).item() == pytest.approx(ce.item(), rel=1e-6)
    # closed form, written out with a loop
    expected = 0.0
    for i in range(16):
        z = logits[i].tolist()
        m = max(z)
        denom = sum(np.exp(v - m) for v in z)
        p = np.exp(z[int(targets[i])] - m) / denom
        expected += -((1 - p) ** 4) * np.log(p)
    expected /= 16
    assert SoftmaxFocalLoss(gamma=4.0)(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_ce_uses_balanced_class_weights():
    labels = np.array([0, 0, 0, 1])
    w = balanced_class_weights(labels, 3)
    np.testing.assert_allclose(w, [4 / (2 * 3), 4 / (2 * 1), 0.0])
    logits = torch.randn(4, 3)
    targets = torch.tensor(labels)
    loss = build_loss("weighted_ce", 3, train_labels=labels)(logits, targets)
    per = torch.nn.functional.cross_entropy(logits, targets, reduction="none").numpy()
    wi = w[labels]
    assert loss.item() == pytest.approx(float((wi * per).sum() / wi.sum()), rel=1e-5)
