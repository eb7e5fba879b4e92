"""``predictions.csv``: one row per (test image, trial, label fraction), and the summaries computed from it.

Columns: ``id`` (pseudonymous record id), ``split``, ``trial``, ``fraction``, ``true_label``,
``predicted_label``, ``patient_id`` and ``lesion_id`` (the manifest's pseudonyms, empty where unknown; they
define the bootstrap clusters, see :func:`cluster_ids`), then ``prob_<class>`` for every class in class-index
order. No paths, no raw identifiers. Every number of report.md is derived from this file by
:func:`summarize_predictions` (plus the bootstrap settings of results.json), so a reader can recompute it.
Files written before the cluster columns existed are read with empty ones (every image its own cluster).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medssl.errors import MedsslError
from medssl.evaluation.bootstrap import (
    CLUSTER_BY_CHOICES,
    Clusters,
    bootstrap_ci,
    interval_description,
    make_clusters,
)
from medssl.evaluation.metrics import classification_metrics, confusion_matrix
from medssl.io import atomic_open

BASE_COLUMNS = ("id", "split", "trial", "fraction", "true_label", "predicted_label")
CLUSTER_COLUMNS = ("patient_id", "lesion_id")

SUMMARY_DEFINITIONS = {
    "mean": "arithmetic mean of the per-trial test metric over trials",
    "std": "sample standard deviation (ddof=1) of the per-trial test metric over trials; 0 for one trial",
    "ci95": "two-stage bootstrap 95% CI of the trial-mean metric over test clusters (stratified by class) and "
            "trials; 'interval' of each fraction states the unit, the number of clusters and what it covers",
    "confusion_matrix_sum": "confusion matrices of all trials of the fraction, summed",
    "interval": "what the 95% CIs of the fraction resample and cover: unit (lesion_id, patient_id or image), "
                "n_clusters (test clusters resampled, stratified by class), n_trials, n_resamples, covers",
}


@dataclass
class PredictionTable:
    """Columns of predictions.csv as arrays; ``probs`` is (N, K) in ``classes`` order; ``patient_ids`` and
    ``lesion_ids`` (N,) hold pseudonyms or ``""`` (default: all empty)."""

    classes: list[str]
    ids: np.ndarray
    split: np.ndarray
    trial: np.ndarray
    fraction: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    patient_ids: np.ndarray | None = None
    lesion_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("patient_ids", "lesion_ids"):
            value = getattr(self, name)
            if value is None:
                value = np.full(len(self.ids), "", dtype=object)
            elif not (isinstance(value, np.ndarray) and value.dtype == object):
                value = np.asarray(["" if v is None else str(v) for v in value], dtype=object)
            setattr(self, name, value)

    def select(self, fraction: float, trial: int) -> PredictionTable:
        """Rows of one (fraction, trial), ordered by id (so trials align image by image)."""
        mask = (self.trial == trial) & np.isclose(self.fraction, fraction)
        return self.take(np.flatnonzero(mask)[np.argsort(self.ids[mask], kind="stable")])

    def take(self, order: np.ndarray) -> PredictionTable:
        """The rows at positions ``order`` (an int index array), in that order."""
        return PredictionTable(self.classes, self.ids[order], self.split[order], self.trial[order],
                               self.fraction[order], self.y_true[order], self.y_pred[order], self.probs[order],
                               self.patient_ids[order], self.lesion_ids[order])

    def fractions(self) -> list[float]:
        return sorted({float(f) for f in self.fraction})

    def trials(self, fraction: float) -> list[int]:
        return sorted({int(t) for t in self.trial[np.isclose(self.fraction, fraction)]})


def prediction_rows(test_records: Sequence[Mapping[str, Any]], classes: Sequence[str], y_true: np.ndarray,
               probs: np.ndarray, trial: int, fraction: float) -> PredictionTable:
    """Rows of one (trial, fraction) on the test split; the prediction is the argmax of ``probs`` (N, K)."""
    n = len(test_records)
    return PredictionTable(
        classes=list(classes), ids=np.array([str(r["id"]) for r in test_records], dtype=object),
        split=np.array(["test"] * n, dtype=object), trial=np.full(n, trial, dtype=np.int64),
        fraction=np.full(n, float(fraction)), y_true=np.asarray(y_true, dtype=np.int64),
        y_pred=np.asarray(probs).argmax(axis=1).astype(np.int64), probs=np.asarray(probs, dtype=np.float64),
        patient_ids=[r.get("patient_id") for r in test_records], lesion_ids=[r.get("lesion_id") for r in test_records])


def write_predictions(path: str | os.PathLike[str], table: PredictionTable) -> None:
    """Write ``table`` as predictions.csv (atomic); probabilities with 6 decimals."""
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*BASE_COLUMNS, *CLUSTER_COLUMNS, *(f"prob_{c}" for c in table.classes)])
        for i in range(len(table.ids)):
            writer.writerow([
                table.ids[i], table.split[i], int(table.trial[i]), f"{float(table.fraction[i]):g}",
                table.classes[table.y_true[i]], table.classes[table.y_pred[i]],
                table.patient_ids[i], table.lesion_ids[i],
                *(f"{p:.6f}" for p in table.probs[i]),
            ])


def read_predictions(path: str | os.PathLike[str]) -> PredictionTable:
    """Read a predictions.csv written by :func:`write_predictions`."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise MedsslError(f"cannot read predictions ({exc.strerror})", path) from exc
    if not rows or tuple(rows[0][: len(BASE_COLUMNS)]) != BASE_COLUMNS:
        raise MedsslError(f"not a medssl predictions.csv (expected columns {', '.join(BASE_COLUMNS)})", path)
    header = rows[0]
    n_extra = len(CLUSTER_COLUMNS) if tuple(header[len(BASE_COLUMNS):][:2]) == CLUSTER_COLUMNS else 0
    first_prob = len(BASE_COLUMNS) + n_extra
    if any(not c.startswith("prob_") for c in header[first_prob:]):
        raise MedsslError(f"unexpected columns {header[first_prob:]} (expected prob_<class> columns)", path)
    classes = [c[len("prob_"):] for c in header[first_prob:]]
    index = {c: i for i, c in enumerate(classes)}
    body = rows[1:]
    try:
        return PredictionTable(
            classes=classes,
            ids=np.array([r[0] for r in body], dtype=object),
            split=np.array([r[1] for r in body], dtype=object),
            trial=np.array([int(r[2]) for r in body], dtype=np.int64),
            fraction=np.array([float(r[3]) for r in body]),
            y_true=np.array([index[r[4]] for r in body], dtype=np.int64),
            y_pred=np.array([index[r[5]] for r in body], dtype=np.int64),
            probs=np.array([[float(v) for v in r[first_prob:]] for r in body]).reshape(len(body), -1),
            patient_ids=[r[len(BASE_COLUMNS)] if n_extra else "" for r in body],
            lesion_ids=[r[len(BASE_COLUMNS) + 1] if n_extra else "" for r in body],
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise MedsslError(f"malformed predictions row ({exc})", path) from exc


def concat_tables(tables: Sequence[PredictionTable]) -> PredictionTable:
    """Stack tables with the same classes."""
    first = tables[0]
    return PredictionTable(
        first.classes,
        *(np.concatenate([getattr(t, f) for t in tables]) for f in
          ("ids", "split", "trial", "fraction", "y_true", "y_pred", "probs", "patient_ids", "lesion_ids")),
    )


def cluster_ids(table: PredictionTable, cluster_by: str = "auto",
                source: str | os.PathLike[str] | None = None) -> tuple[str, np.ndarray | None]:
    """The bootstrap unit of ``table``'s images and their cluster ids: ``(unit, (N,) ids or None)``.

    ``cluster_by``: ``"auto"`` (default) = ``lesion_id`` if any image has one, else ``patient_id`` if any image
    has one, else ``"image"`` (ids None: every image its own cluster); ``"lesion_id"`` / ``"patient_id"``
    force that column (an error if no image has it); ``"none"`` = image. Images without an id in the chosen
    column are their own cluster.
    """
    if cluster_by not in CLUSTER_BY_CHOICES:
        raise MedsslError(f"unknown --cluster-by {cluster_by!r}; choose one of {', '.join(CLUSTER_BY_CHOICES)}")
    if cluster_by == "auto":
        cluster_by = next((c for c, v in (("lesion_id", table.lesion_ids), ("patient_id", table.patient_ids))
                           if any(v)), "none")
    if cluster_by == "none":
        return "image", None
    values = table.lesion_ids if cluster_by == "lesion_id" else table.patient_ids
    if not any(values):
        raise MedsslError(f"--cluster-by {cluster_by}: no test image has a {cluster_by} "
                          "(use --cluster-by none to resample images)", source)
    ids = np.array([f"{cluster_by}:{v}" if v else f"image:{i}" for v, i in zip(values, table.ids)], dtype=object)
    return cluster_by, ids


def table_clusters(table: PredictionTable, cluster_by: str = "auto",
                   source: str | os.PathLike[str] | None = None) -> Clusters:
    """:class:`~medssl.evaluation.bootstrap.Clusters` of ``table``'s images (see :func:`cluster_ids`)."""
    unit, ids = cluster_ids(table, cluster_by, source)
    return make_clusters(table.y_true, ids, unit)


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample std (ddof=1; 0 for one value) of the defined values; both ``None`` (JSON ``null``, as
    for the per-trial metrics) when no value is defined, e.g. the recall of a class without test images."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def summarize_predictions(table: PredictionTable, *, n_resamples: int = 1000, seed: int = 0,
                          cluster_by: str = "auto", source: str | os.PathLike[str] | None = None) -> list[dict]:
    """Per label fraction: every trial's metrics, mean/std over trials, bootstrap CIs of the trial means.

    The CIs are two-stage cluster bootstraps (:func:`medssl.evaluation.bootstrap.bootstrap_ci`) with the
    clusters of ``cluster_by`` (:func:`cluster_ids`). Returns a list (one dict per fraction, ascending) with
    keys ``fraction``, ``trials`` (list of ``{"trial", **classification_metrics}``), ``summary``
    (``{metric: {"mean", "std", "ci_low", "ci_high"}}`` for balanced accuracy, macro F1 and accuracy; mean/std
    only for macro AUROC), ``interval`` (unit, number of clusters and trials, what the CI covers:
    :func:`~medssl.evaluation.bootstrap.interval_description`), ``per_class`` (mean over trials of recall,
    precision, AUROC per class) and ``confusion_matrix_sum``.
    """
    k = len(table.classes)
    out = []
    for fraction in table.fractions():
        trial_tables = [table.select(fraction, t) for t in table.trials(fraction)]
        ref = trial_tables[0]
        for t in trial_tables[1:]:
            if not np.array_equal(t.ids, ref.ids) or not np.array_equal(t.y_true, ref.y_true):
                raise MedsslError(f"trials of fraction {fraction:g} do not cover the same test images")
        per_trial = [{"trial": int(t.trial[0]), **classification_metrics(t.y_true, t.y_pred, t.probs, k)}
                     for t in trial_tables]
        clusters = table_clusters(ref, cluster_by, source)
        ci = bootstrap_ci(ref.y_true, [t.y_pred for t in trial_tables], k, clusters=clusters,
                          n_resamples=n_resamples, seed=seed)
        summary: dict[str, dict[str, float]] = {}
        for metric in ("balanced_accuracy", "macro_f1", "accuracy"):
            summary[metric] = {**_mean_std([m[metric] for m in per_trial]),
                               "ci_low": ci[metric]["low"], "ci_high": ci[metric]["high"]}
        summary["macro_auroc"] = _mean_std([m.get("macro_auroc") for m in per_trial])
        per_class = {
            name: [_mean_std([m[name][c] if m.get(name) else None for m in per_trial])["mean"] for c in range(k)]
            for name in ("recall", "precision", "auroc")
        }
        cm = sum(confusion_matrix(t.y_true, t.y_pred, k) for t in trial_tables)
        out.append({"fraction": fraction, "n_test": int(len(ref.ids)), "trials": per_trial, "summary": summary,
                    "interval": interval_description(clusters, len(trial_tables), n_resamples),
                    "per_class": per_class, "confusion_matrix_sum": np.asarray(cm).tolist()})
    return out
