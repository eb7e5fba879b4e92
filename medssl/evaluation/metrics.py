"""Classification metrics for imbalanced medical datasets, computed from integer labels with numpy.

Every function takes ``y_true`` and ``y_pred`` as integer class indices in ``[0, num_classes)`` (shape (N,))
and, for AUROC, ``probs`` of shape (N, num_classes). Definitions follow scikit-learn so that published numbers
are comparable (the tests check equality with sklearn):

- balanced accuracy = macro recall over the classes present in ``y_true`` (Brodersen et al. 2010): the single
  definition :func:`medssl.engines.scores.balanced_accuracy`, used everywhere in medssl;
- macro F1 = unweighted mean of 2PR/(P+R) over the classes present in ``y_true`` (sklearn's
  ``f1_score(average="macro", labels=<present classes>, zero_division=0)``); a present class with P+R = 0
  contributes 0, a class without test images is left out (it is not scored 0);
- accuracy = fraction of correct predictions;
- recall/precision per class (0 where undefined, as sklearn's ``zero_division=0``);
- one-vs-rest AUROC per class = Mann-Whitney U / (n_pos * n_neg) with ties counted 1/2; macro AUROC = mean
  over classes having both positives and negatives (NaN per class otherwise);
- confusion matrix C[i, j] = number of images of true class i predicted as class j.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from medssl.engines.scores import (
    BALANCED_ACCURACY_DEFINITION,
    balanced_accuracy,
    balanced_accuracy_from_confusion,
)

__all__ = ["balanced_accuracy", "confusion_matrix", "metrics_from_confusion", "macro_f1", "auroc_one_vs_rest",
           "classification_metrics", "METRIC_DEFINITIONS"]

#: human-readable definitions written next to every number in results.json
METRIC_DEFINITIONS: dict[str, str] = {
    "balanced_accuracy": BALANCED_ACCURACY_DEFINITION,
    "macro_f1": "unweighted mean over the classes present in the test labels of F1 = "
                "2*precision*recall/(precision+recall) (0 if undefined)",
    "accuracy": "fraction of test images whose predicted class equals the true class",
    "recall": "per class: true positives / images of that class (null for a class without test images)",
    "precision": "per class: true positives / images predicted as that class (0 if none predicted)",
    "auroc": "per class one-vs-rest area under the ROC curve from the class probabilities (ties count 1/2)",
    "macro_auroc": "mean of the per-class one-vs-rest AUROCs over classes with positives and negatives",
    "confusion_matrix": "rows = true class, columns = predicted class, counts of test images",
}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes) int64: rows true class, columns predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Balanced accuracy, macro F1, accuracy, recall and precision from confusion matrices.

    Args:
        cm: (..., K, K) counts; leading dimensions (e.g. bootstrap resamples) are kept.

    Returns:
        dict with ``balanced_accuracy``, ``macro_f1``, ``accuracy`` of shape (...) and ``recall``,
        ``precision``, ``f1`` of shape (..., K).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    present = support > 0
    total = cm.sum(axis=(-2, -1))
    accuracy = tp.sum(axis=-1) / np.maximum(total, 1)
    return {
        "balanced_accuracy": balanced_accuracy_from_confusion(cm),
        "macro_f1": (f1 * present).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1),
        "accuracy": accuracy,
        "recall": recall,
        "precision": precision,
        "f1": f1,
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores over the classes present in ``y_true``."""
    return float(metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes))["macro_f1"])


def auroc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class one-vs-rest AUROC, shape (K,); NaN for a class without positives or negatives.

    Computed as the normalised Mann-Whitney U statistic from average ranks of the class scores.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        pos = y_true == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(probs[:, c])
        u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
        out[c] = u / (n_pos * n_neg)
    return out


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None, num_classes: int
) -> dict[str, Any]:
    """Every metric of this module as JSON-able Python values (see the module docstring for definitions)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    m = metrics_from_confusion(cm)
    out: dict[str, Any] = {
        "balanced_accuracy": float(m["balanced_accuracy"]),
        "macro_f1": float(m["macro_f1"]),
        "accuracy": float(m["accuracy"]),
        "recall": [float(v) if n > 0 else None for v, n in zip(m["recall"], cm.sum(axis=1))],
        "precision": [float(v) for v in m["precision"]],
        "confusion_matrix": cm.tolist(),
        "n": int(len(y_true)),
    }
    if probs is not None:
        auc = auroc_one_vs_rest(y_true, probs)
        out["auroc"] = [None if np.isnan(v) else float(v) for v in auc]
        out["macro_auroc"] = None if np.all(np.isnan(auc)) else float(np.nanmean(auc))
    return out
