"""The one balanced accuracy of medssl (kNN monitor, linear probe, fine-tune selection, results, reports).

Definition (scikit-learn's ``balanced_accuracy_score``, Brodersen et al. 2010): the mean over the classes
*present in the true labels* of the per-class recall ``TP_c / n_c``. A class without true images is left out
(it neither scores 0 nor counts in the denominator); a class that is only predicted lowers the recall of the
classes it was confused with. Everything that reports or selects by balanced accuracy calls these functions;
this module sits below :mod:`medssl.evaluation` so the pretraining engine can use it too.
"""

from __future__ import annotations

import numpy as np
import torch

BALANCED_ACCURACY_DEFINITION = (
    "mean over the classes present in the true labels of per-class recall TP_c / n_c "
    "(scikit-learn balanced_accuracy_score; absent classes are left out, not scored 0)"
)


def balanced_accuracy_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Balanced accuracy of confusion matrices (..., K, K) (rows true, columns predicted); shape (...).

    NaN where no class has a true image (an empty matrix).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    present = support > 0
    recall = np.where(present, tp / np.maximum(support, 1), 0.0)
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_present > 0, recall.sum(axis=-1) / np.maximum(n_present, 1), np.nan)


def balanced_accuracy(y_true: np.ndarray | torch.Tensor, y_pred: np.ndarray | torch.Tensor,
                      num_classes: int | None = None) -> float:
    """Balanced accuracy of integer labels and predictions (N,); see the module docstring.

    ``num_classes`` only sizes the confusion matrix (default: 1 + the largest label seen); it does not change the
    value. NaN for empty input.
    """
    y_true = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred.cpu() if isinstance(y_pred, torch.Tensor) else y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
    if y_true.size == 0:
        return float("nan")
    k = int(num_classes) if num_classes is not None else int(max(y_true.max(), y_pred.max())) + 1
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    return float(balanced_accuracy_from_confusion(cm))
