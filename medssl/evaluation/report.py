"""report.md of one evaluation folder, and the comparison of several (``medssl report``).

Every number in a report is recomputed from ``predictions.csv`` (with the bootstrap settings stored in
results.json), so the tables can be checked independently from the per-image predictions. Intervals and paired
tests resample test clusters (lesions, patients or images: ``--cluster-by``) and trials
(:mod:`medssl.evaluation.bootstrap`); each table header states the unit and the number of clusters, and the
paired comparisons of one report (computed by :mod:`medssl.evaluation.paired`) carry Holm-adjusted p-values
next to the raw ones.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import MedsslError
from medssl.evaluation.bootstrap import BOOTSTRAP_DEFINITION, PAIRED_DEFINITION
from medssl.evaluation.paired import paired_comparisons
from medssl.evaluation.plots import plot_confusion_matrix, plot_pretraining_curves
from medssl.evaluation.predictions import PredictionTable, read_predictions, summarize_predictions
from medssl.evaluation.sanity import (
    FLAG_DEFINITIONS,
    comparison_flags,
    flag_lines,
    report_flags,
    with_baselines,
)
from medssl.io import atomic_open, atomic_write_bytes, atomic_write_text

HEADLINE = ("balanced_accuracy", "macro_f1", "accuracy")


def fmt(value: float | None) -> str:
    """Numbers in reports: 4 decimals; ``n/a`` for undefined."""
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"


def fraction_label(fraction: float) -> str:
    """0.1 -> ``10%``."""
    return f"{100 * fraction:g}%"


@dataclass
class Evaluation:
    """An EVAL_DIR read back: results.json, predictions.csv and the summary recomputed from the latter."""

    path: Path
    results: dict[str, Any]
    table: PredictionTable
    summary: list[dict]
    cluster_by: str = "auto"

    @property
    def name(self) -> str:
        return str(self.results.get("name") or self.path.name)

    @property
    def dataset(self) -> str:
        return str(self.results.get("data", {}).get("dataset", "data"))


def load_evaluation(eval_dir: str | os.PathLike[str], cluster_by: str | None = None) -> Evaluation:
    """Read an EVAL_DIR and recompute its summary from predictions.csv; ``cluster_by`` (default: the
    evaluation's own ``config.cluster_by``, else ``auto``) chooses the bootstrap unit."""
    path = Path(eval_dir)
    results_path = path / "results.json"
    if not results_path.is_file():
        raise MedsslError("not an evaluation folder (no results.json)", path)
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedsslError(f"results.json is not valid JSON ({exc.msg})", results_path) from exc
    table = read_predictions(path / "predictions.csv")
    cfg = results.get("config", {})
    cluster_by = cluster_by or str(cfg.get("cluster_by") or "auto")
    summary = summarize_predictions(table, n_resamples=int(cfg.get("bootstrap", 1000)), seed=int(cfg.get("seed", 0)),
                                    cluster_by=cluster_by, source=path / "predictions.csv")
    return Evaluation(path, results, table, summary, cluster_by)


def interval_unit(summary: Sequence[dict]) -> str:
    """The CI unit(s) of summary blocks (``patient_id``, ``lesion_id``, ``image``), ``/``-joined if mixed."""
    return "/".join(dict.fromkeys(b["interval"]["unit"] for b in summary)) or "image"


def _cell(summary: dict, metric: str) -> str:
    s = summary[metric]
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}"


def _ci(summary: dict, metric: str) -> str:
    s = summary[metric]
    return f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"


def eval_report_markdown(ev: Evaluation) -> str:
    """The Markdown text of one evaluation's report.md."""
    res, cfg, classes = ev.results, ev.results.get("config", {}), ev.table.classes
    data, backbone = res.get("data", {}), res.get("backbone", {})
    source = backbone.get("file_name") or backbone.get("source", "?")
    lines = [
        f"# Evaluation: {ev.name}", "",
        f"- protocol: {res.get('protocol')}; loss: {cfg.get('loss')} (gamma {cfg.get('gamma')}); "
        f"epochs: {cfg.get('epochs')}; seed: {cfg.get('seed')}; bootstrap resamples: {cfg.get('bootstrap')}",
        f"- backbone: {source} ({backbone.get('format', backbone.get('source'))}, {backbone.get('arch')})",
        f"- data: {ev.dataset} (manifest sha256 {str(data.get('manifest_sha256', ''))[:12]}), "
        f"classes: {', '.join(classes)}",
    ]
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    flags = report_flags(ev)
    lines += ["", "## Sanity flags", ""] + (flag_lines(flags) or ["None raised (definitions below)."])
    baselines = res.get("baselines") or {}
    if baselines:
        lines += ["", "Sanity rows (same splits, fractions, trials): "
                  + ", ".join(f"[{k}]({v}/report.md)" for k, v in baselines.items()) + "."]
    unit = interval_unit(ev.summary)
    lines += ["", f"## Test results (mean ± std over trials, 95% CI of the trial mean; CI unit: {unit})", "",
              "| label fraction | trials | test images | balanced accuracy | 95% CI | macro F1 | 95% CI | "
              f"accuracy | 95% CI | macro AUROC | test clusters ({unit}) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in ev.summary:
        s = b["summary"]
        lines.append(f"| {fraction_label(b['fraction'])} | {len(b['trials'])} | {b['n_test']} | "
                     + " | ".join(f"{_cell(s, m)} | {_ci(s, m)}" for m in HEADLINE)
                     + f" | {_cell(s, 'macro_auroc')} | {b['interval']['n_clusters']} |")
    lines += [""] + [f"95% CI, {fraction_label(b['fraction'])} labels: covers {b['interval']['covers']}."
                     + (f" **Warning: {b['interval']['warning']}.**" if b["interval"].get("warning") else "")
                     for b in ev.summary]
    lines += ["", "## Every trial", "",
              "| label fraction | trial | balanced accuracy | macro F1 | accuracy | macro AUROC |",
              "|---|---|---|---|---|---|"]
    for b in ev.summary:
        for t in b["trials"]:
            lines.append(f"| {fraction_label(b['fraction'])} | {t['trial']} | {fmt(t['balanced_accuracy'])} | "
                         f"{fmt(t['macro_f1'])} | {fmt(t['accuracy'])} | {fmt(t.get('macro_auroc'))} |")
    for b in ev.summary:
        pc = b["per_class"]
        lines += ["", f"## Per class, {fraction_label(b['fraction'])} labels (mean over trials)", "",
                  "| class | recall | precision | AUROC |", "|---|---|---|---|"]
        for c, name in enumerate(classes):
            lines.append(f"| {name} | {fmt(pc['recall'][c])} | {fmt(pc['precision'][c])} | {fmt(pc['auroc'][c])} |")
        lines += ["", f"Confusion matrix, {fraction_label(b['fraction'])} labels (rows true, columns predicted, "
                  "all trials summed):", "", "| true \\ predicted | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        for c, name in enumerate(classes):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in b["confusion_matrix_sum"][c]) + " |")
    plots = res.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{key}]({rel})" for key, rel in plots.items()]
    lines += ["", "## Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in res.get("definitions", {}).items()]
    return "\n".join(lines) + "\n"


def write_eval_report(eval_dir: str | os.PathLike[str]) -> Path:
    """(Re)write EVAL_DIR/report.md from results.json and predictions.csv."""
    ev = load_evaluation(eval_dir)
    atomic_write_text(ev.path / "report.md", eval_report_markdown(ev))
    return ev.path / "report.md"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "eval"


def _relation(display: str) -> str:
    """``= 0.023`` or ``< 0.001`` (a displayed p that is a bound keeps its ``<``)."""
    return display if display.startswith("<") else f"= {display}"


def paired_line(row: dict) -> str:
    """One sentence per paired comparison."""
    noun = {"lesion_id": "lesions", "patient_id": "patients"}.get(row.get("unit", "image"), "images")
    return (f"- **{row['a']} vs {row['b']}**, {row['dataset']}, {fraction_label(row['fraction'])} labels: "
            f"difference in balanced accuracy {row['difference']:+.4f} (95% CI {fmt(row['ci_low'])} to "
            f"{fmt(row['ci_high'])}), p {_relation(row['p_display'])} (Holm-adjusted "
            f"{_relation(row['p_holm_display'])}, "
            f"{row['n_resamples']} resamples); {row['n']} paired test images in {row['n_clusters']} {noun}, "
            f"{row['trials_a']} vs {row['trials_b']} trials"
            + (" (paired by label subset)" if row.get("trials_paired") else ""))


def compare_evaluations(
    eval_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    pretrain_runs: Sequence[str | os.PathLike[str]] = (),
    n_resamples: int = 1000,
    seed: int = 0,
    cluster_by: str | None = None,
) -> Path:
    """Write OUT_DIR/comparison.md (+ .csv), paired.csv, report.md and plots; returns report.md's path.

    Table (like Ciga et al. Tables 2/3): rows = initialisations (their --name), columns = dataset x label
    fraction (header: the CI unit and number of test clusters), cells = balanced accuracy mean ± std over
    trials with the 95% CI of the trial mean. ``cluster_by`` overrides every evaluation's bootstrap unit
    (``auto``, ``lesion_id``, ``patient_id``, ``none``); paired p-values are Holm-adjusted over the report.
    """
    if not eval_dirs:
        raise MedsslError("give at least one evaluation folder")
    out = Path(out_dir)
    evals = with_baselines([load_evaluation(d, cluster_by) for d in eval_dirs], cluster_by)
    columns = sorted({(ev.dataset, b["fraction"]) for ev in evals for b in ev.summary})
    names = list(dict.fromkeys(ev.name for ev in evals))
    cells: dict[tuple[str, str, float], dict] = {}
    paired = paired_comparisons(evals, n_resamples=n_resamples, seed=seed, cluster_by=cluster_by)
    flags = comparison_flags(evals, paired, pretrain_runs)
    degenerate: dict[tuple[str, str, float], set] = {}  # trials whose predictions are degenerate
    for f in flags:
        if f["flag"] == "degenerate_probe":
            degenerate.setdefault((f["evaluation"], f["dataset"], float(f["fraction"])), set()).add(f["trial"])
    csv_rows = []
    for ev in evals:
        for b in ev.summary:
            cells[(ev.name, ev.dataset, b["fraction"])] = b
            s = b["summary"]
            csv_rows.append({
                "name": ev.name, "protocol": ev.results.get("protocol"), "dataset": ev.dataset,
                "fraction": b["fraction"], "trials": len(b["trials"]), "test_images": b["n_test"],
                **{f"{m}_{k}": s[m][k] for m in HEADLINE for k in ("mean", "std", "ci_low", "ci_high")},
                "ci_unit": b["interval"]["unit"], "ci_clusters": b["interval"]["n_clusters"],
                "ci_covers": b["interval"]["covers"], "ci_warning": b["interval"].get("warning") or "",
                "degenerate_trials": len(degenerate.get((ev.name, ev.dataset, float(b["fraction"])), ()))})
    header = "| initialisation | " + " | ".join(f"{d} {fraction_label(f)} ({_column_unit(cells, d, f)})"
                                               for d, f in columns) + " |"
    table = [header, "|---|" + "---|" * len(columns)]
    for name in names:
        row = []
        for d, f in columns:
            b = cells.get((name, d, f))
            bad = len(degenerate.get((name, d, float(f)), ()))
            flag = " (!)" if b is not None and (b["interval"].get("warning") or bad) else ""
            if b is None:
                row.append("—")
            elif bad == len(b["trials"]):  # a degenerate result is flagged, not printed as a number
                row.append(f"degenerate ({bad}/{bad} trials) (!)")
            else:
                row.append(f"{_cell(b['summary'], 'balanced_accuracy')} {_ci(b['summary'], 'balanced_accuracy')}{flag}")
        table.append(f"| {name} | " + " | ".join(row) + " |")
    warnings = dict.fromkeys(f"(!) {name}, {d} {fraction_label(f)}: {b['interval']['warning']}."
                             for (name, d, f), b in cells.items() if b["interval"].get("warning"))
    warnings.update(dict.fromkeys(
        f"(!) {name}, {d} {fraction_label(f)}: one class predicted for most test images in {len(trials)} of "
        f"{len(cells[(name, d, f)]['trials'])} trials (degenerate_probe, Sanity flags); comparison.csv keeps "
        "the numbers." for (name, d, f), trials in degenerate.items() if (name, d, f) in cells))
    table += [""] + list(warnings) if warnings else []
    comparison_md = "\n".join(table) + "\n"
    atomic_write_text(out / "comparison.md", comparison_md)
    _write_csv(out / "comparison.csv", csv_rows)
    _write_csv(out / "paired.csv", paired)
    plots = _comparison_plots(evals, out, pretrain_runs)
    lines = ["# Comparison of initialisations", "",
             "Balanced accuracy on the test set: mean ± std over trials [95% CI of the trial mean, two-stage "
             "bootstrap over the trials and the test clusters named in each column header: it covers test-set "
             "sampling and label-subset variation].", "",
             comparison_md, "## Paired comparisons (same test images)", "",
             f"p: two-sided paired bootstrap p-value at its resolution; Holm-adjusted over the {len(paired)} "
             "comparisons of this report (family-wise error rate).", ""]
    lines += [paired_line(r) for r in paired] or ["(no two evaluations share a dataset and label fraction)"]
    lines += ["", "## Sanity flags", ""] + (flag_lines(flags) or ["None raised (definitions below)."])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    lines += ["", "## Definitions", "", f"- **CI**: {BOOTSTRAP_DEFINITION}", f"- **paired**: {PAIRED_DEFINITION}"]
    lines += [f"- **{k}**: {v}" for k, v in FLAG_DEFINITIONS.items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _column_unit(cells: dict[tuple[str, str, float], dict], dataset: str, fraction: float) -> str:
    """``CI unit: patient_id, 24 clusters`` of a table column (``/``-joined where evaluations differ)."""
    found = dict.fromkeys(f"{b['interval']['unit']}, {b['interval']['n_clusters']} clusters"
                          for (_, d, f), b in cells.items() if d == dataset and f == fraction)
    return "CI unit: " + " / ".join(found)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _comparison_plots(evals: Sequence[Evaluation], out: Path, pretrain_runs: Sequence) -> list[Path]:
    plots = []
    for ev in evals:
        prefix = _safe(f"{ev.name}_{ev.dataset}")
        for b in ev.summary:
            plots.append(plot_confusion_matrix(
                np.asarray(b["confusion_matrix_sum"]), ev.table.classes,
                out / "plots" / f"{prefix}_confusion_{b['fraction']:g}.png",
                title=f"{ev.name}, {ev.dataset}, {fraction_label(b['fraction'])} labels"))
        tsne = ev.path / "plots" / "tsne_test.png"
        if tsne.is_file():
            dest = out / "plots" / f"{prefix}_tsne_test.png"
            atomic_write_bytes(dest, tsne.read_bytes())
            plots.append(dest)
    if pretrain_runs:
        plots += plot_pretraining_curves(pretrain_runs, out / "plots")
    return plots
