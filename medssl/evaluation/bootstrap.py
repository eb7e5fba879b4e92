"""Stratified bootstrap confidence intervals and the paired bootstrap comparison of two initialisations.

Resampling is stratified by the true class: each resample draws, with replacement, exactly ``n_c`` test images
from the ``n_c`` images of each class c, so every resample has the test set's class counts (the
balanced-accuracy denominators stay fixed). All resamples are drawn at once with numpy (an index matrix of
shape (B, N)) and scored through batched confusion matrices, so 1,000 resamples of a few thousand images take
milliseconds.

Several prediction vectors (e.g. the trials of one label fraction) can be scored on the same resamples; the
statistic is then the mean of the metric over them, which gives a CI for the trial-averaged number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl.evaluation.metrics import metrics_from_confusion

#: the metrics whose bootstrap CI is reported
CI_METRICS = ("balanced_accuracy", "macro_f1", "accuracy")

BOOTSTRAP_DEFINITION = (
    "95% percentile interval of the metric over stratified bootstrap resamples of the test images "
    "(resampled with replacement within each true class, seeded); for several trials the metric is the "
    "mean over trials computed on the same resamples"
)
PAIRED_DEFINITION = (
    "paired stratified bootstrap over the test images common to both evaluations (matched by image id): "
    "difference = mean-over-trials balanced accuracy of A minus that of B; CI = 95% percentile interval of the "
    "resampled differences; two-sided p = fraction of resampled differences, centred at 0, whose absolute "
    "value is >= the observed absolute difference, as (count + 1) / (B + 1) (null hypothesis: no difference)"
)


def stratified_bootstrap_indices(y_true: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Indices (n_resamples, N) into the test set; each row keeps the per-class counts of ``y_true``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    rng = np.random.default_rng(seed)
    blocks = []
    for c in np.unique(y_true):
        positions = np.flatnonzero(y_true == c)
        draws = rng.integers(0, len(positions), size=(n_resamples, len(positions)))
        blocks.append(positions[draws])
    return np.concatenate(blocks, axis=1)


def batched_confusion(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices (B, K, K) of ``y_true[idx[b]]`` vs ``y_pred[idx[b]]`` for every resample b."""
    n_resamples = idx.shape[0]
    codes = y_true[idx] * num_classes + y_pred[idx]
    codes = codes + (np.arange(n_resamples)[:, None] * num_classes * num_classes)
    flat = np.bincount(codes.ravel(), minlength=n_resamples * num_classes * num_classes)
    return flat.reshape(n_resamples, num_classes, num_classes)


def _as_trials(y_pred: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    arr = y_pred if isinstance(y_pred, (list, tuple)) else [y_pred]
    return [np.asarray(p, dtype=np.int64) for p in arr]


def bootstrap_distribution(
    y_true: np.ndarray,
    y_pred: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    idx: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-resample values (B,) of :data:`CI_METRICS`, averaged over the prediction vectors given."""
    y_true = np.asarray(y_true, dtype=np.int64)
    trials = _as_trials(y_pred)
    acc = {m: np.zeros(idx.shape[0]) for m in CI_METRICS}
    for pred in trials:
        values = metrics_from_confusion(batched_confusion(y_true, pred, idx, num_classes))
        for m in CI_METRICS:
            acc[m] += values[m] / len(trials)
    return acc


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Stratified bootstrap percentile CIs of balanced accuracy, macro F1 and accuracy.

    Args:
        y_true: (N,) true class indices.
        y_pred: (N,) predicted indices, or a list of them (trials; the statistic is their mean).
        num_classes: K.
        n_resamples: B, default 1,000.
        seed: numpy seed of the resampling.
        level: coverage of the interval, default 0.95.

    Returns:
        ``{metric: {"low": float, "high": float}}``.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    idx = stratified_bootstrap_indices(y_true, n_resamples, seed)
    dist = bootstrap_distribution(y_true, y_pred, num_classes, idx)
    tail = 100 * (1 - level) / 2
    return {
        m: {"low": float(np.percentile(v, tail)), "high": float(np.percentile(v, 100 - tail))}
        for m, v in dist.items()
    }


def paired_bootstrap(
    y_true: np.ndarray,
    y_pred_a: np.ndarray | Sequence[np.ndarray],
    y_pred_b: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of the balanced-accuracy difference A - B on the same test images.

    Both prediction sets must be aligned with ``y_true`` (same images, same order). Returns
    ``{"difference", "ci_low", "ci_high", "p_value", "n", "n_resamples"}``; see :data:`PAIRED_DEFINITION`.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    idx = stratified_bootstrap_indices(y_true, n_resamples, seed)
    full = np.arange(len(y_true))[None, :]
    observed = (
        bootstrap_distribution(y_true, y_pred_a, num_classes, full)["balanced_accuracy"][0]
        - bootstrap_distribution(y_true, y_pred_b, num_classes, full)["balanced_accuracy"][0]
    )
    diffs = (
        bootstrap_distribution(y_true, y_pred_a, num_classes, idx)["balanced_accuracy"]
        - bootstrap_distribution(y_true, y_pred_b, num_classes, idx)["balanced_accuracy"]
    )
    tail = 100 * (1 - level) / 2
    centred = diffs - diffs.mean()
    exceed = int(np.sum(np.abs(centred) >= abs(observed) - 1e-12))
    p_value = (exceed + 1) / (n_resamples + 1)
    return {
        "difference": float(observed),
        "ci_low": float(np.percentile(diffs, tail)),
        "ci_high": float(np.percentile(diffs, 100 - tail)),
        "p_value": p_value,
        "n": int(len(y_true)),
        "n_resamples": int(n_resamples),
    }
