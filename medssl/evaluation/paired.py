"""Paired comparisons of evaluations: the two-stage paired bootstrap (balanced accuracy, A - B) of every pair
that shares a dataset, classes and label fraction, over the test images both contain, with Holm-adjusted
p-values over the comparisons of one report. :mod:`medssl.evaluation.report` formats and writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medssl.errors import MedsslError
from medssl.evaluation.bootstrap import format_p_value, holm_adjust, paired_bootstrap
from medssl.evaluation.predictions import PredictionTable, table_clusters

if TYPE_CHECKING:
    from medssl.evaluation.report import Evaluation


def _aligned_trials(ev: Evaluation, fraction: float, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """True labels and per-trial predictions of ``ev`` for the test ``ids`` (in that order)."""
    preds = []
    y_true = None
    for trial in ev.table.trials(fraction):
        t = ev.table.select(fraction, trial)
        pos = {i: k for k, i in enumerate(t.ids)}
        order = np.array([pos[i] for i in ids], dtype=np.int64)
        preds.append(t.y_pred[order])
        y_true = t.y_true[order]
    return y_true, preds


def _aligned_table(a: Evaluation, b: Evaluation, fraction: float, ids: np.ndarray) -> PredictionTable:
    """First-trial rows of ``a`` for ``ids`` with the cluster pseudonyms of both (one may lack them)."""
    tables = []
    for ev in (a, b):
        t = ev.table.select(fraction, ev.table.trials(fraction)[0])
        pos = {i: k for k, i in enumerate(t.ids)}
        tables.append(t.take(np.array([pos[i] for i in ids], dtype=np.int64)))
    ta, tb = tables
    for column in ("patient_ids", "lesion_ids"):
        va, vb = getattr(ta, column), getattr(tb, column)
        both = (va != "") & (vb != "")
        if np.any(va[both] != vb[both]):
            raise MedsslError(f"{a.name} and {b.name} disagree on the {column[:-1]} of the same test images")
        setattr(ta, column, np.where(va != "", va, vb))
    return ta


def _same_label_subsets(a: Evaluation, b: Evaluation, fraction: float) -> bool:
    """Trial t of ``a`` and of ``b`` trained on the same label subset: same manifest, seed, trials, n_train."""
    def key(ev: Evaluation) -> tuple:
        blocks = [blk for blk in ev.results.get("results", []) if np.isclose(blk.get("fraction", -1), fraction)]
        n_train = [t.get("n_train") for blk in blocks for t in blk.get("trials", [])]
        return (ev.results.get("data", {}).get("manifest_sha256"), ev.results.get("config", {}).get("seed"),
                tuple(ev.table.trials(fraction)), tuple(n_train))
    ka, kb = key(a), key(b)
    return bool(ka[0]) and ka[1] is not None and ka == kb


def paired_comparisons(evals: Sequence[Evaluation], *, n_resamples: int = 1000, seed: int = 0,
                       cluster_by: str | None = None) -> list[dict]:
    """Paired two-stage bootstrap (balanced accuracy, A - B) for every pair of evaluations on the same dataset,
    classes and label fraction, over the test images both contain (matched by id), resampling the clusters of
    ``cluster_by`` (default: the evaluations' own setting, ``auto`` if they differ). Every row carries the raw
    ``p_value`` and ``p_holm``, Holm-adjusted over all rows (the family of comparisons of one report), and both
    as shown at their resolution (``p_display``, ``p_holm_display``)."""
    rows = []
    for i, a in enumerate(evals):
        for b in evals[i + 1:]:
            if a.dataset != b.dataset or a.table.classes != b.table.classes:
                continue
            unit_choice = cluster_by or (a.cluster_by if a.cluster_by == b.cluster_by else "auto")
            for fraction in sorted(set(a.table.fractions()) & set(b.table.fractions())):
                ids_a = set(a.table.select(fraction, a.table.trials(fraction)[0]).ids)
                ids_b = set(b.table.select(fraction, b.table.trials(fraction)[0]).ids)
                common = np.array(sorted(ids_a & ids_b), dtype=object)
                if len(common) == 0:
                    continue
                y_a, preds_a = _aligned_trials(a, fraction, common)
                y_b, preds_b = _aligned_trials(b, fraction, common)
                if not np.array_equal(y_a, y_b):
                    raise MedsslError(f"{a.name} and {b.name} disagree on the true labels of the same test images")
                clusters = table_clusters(_aligned_table(a, b, fraction, common), unit_choice)
                res = paired_bootstrap(y_a, preds_a, preds_b, len(a.table.classes), clusters=clusters,
                                       n_resamples=n_resamples, seed=seed,
                                       paired_trials=_same_label_subsets(a, b, fraction))
                rows.append({"a": a.name, "b": b.name, "dataset": a.dataset, "fraction": fraction,
                             "trials_a": len(preds_a), "trials_b": len(preds_b), **res})
    _add_holm(rows)
    return rows


def _add_holm(rows: list[dict]) -> None:
    """``p_holm`` (Holm over ``rows``) and the displayed raw / adjusted p-values.

    A raw p with no exceedance is only known to be < 1/B; a Holm value whose step-down maximum comes from such
    a p is then a bound too, computed from 1/B, and shown as ``< value``.
    """
    if not rows:
        return
    p = np.array([r["p_value"] for r in rows])
    floored = np.array([r["exceedances"] == 0 for r in rows])
    bound_p = np.where(floored, [1 / r["n_resamples"] for r in rows], p)
    adjusted = holm_adjust(p)
    m, order = len(rows), np.argsort(p, kind="stable")
    running, arg = -1.0, 0
    for rank, j in enumerate(order):
        if (m - rank) * bound_p[j] > running:
            running, arg = (m - rank) * bound_p[j], j
        row = rows[j]
        row["p_holm"] = float(adjusted[j])
        row["p_display"] = format_p_value(row["p_value"], row["n_resamples"])
        row["p_holm_display"] = format_p_value(min(1.0, running) if floored[arg] else float(adjusted[j]),
                                               row["n_resamples"], upper_bound=bool(floored[arg]),
                                               adjusted=True)
