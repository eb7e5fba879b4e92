"""Print the tables of docs/results.md from finished studies: ``python studies/tables.py OUT [OUT ...]``.

For each study output folder (``medssl study ... --out OUT``), one Markdown table per study: a row per
initialisation (sanity rows included), a column per protocol and label fraction with the test balanced accuracy
``mean [95 % CI]`` from ``report[/<protocol>]/comparison.csv`` (``degenerate (k/T)`` where every trial's
predictions are degenerate, ``(!k/T)`` where some are: the report's ``degenerate_probe`` flags), then, for every learned row, its paired
difference against the random init of the same architecture (``paired.csv``: difference [95 % CI], Holm p;
``(degenerate side)`` where either side has degenerate trials).
Nothing is recomputed: the numbers are the study's own report.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _reports(out: Path) -> list[Path]:
    base = out / "report"
    return [base] if (base / "comparison.csv").is_file() else sorted(p for p in base.iterdir() if p.is_dir())


def study_table(out: Path) -> str:
    """The Markdown table of one study folder (see the module docstring)."""
    cells: dict[str, dict[str, str]] = {}
    degenerate: set[tuple[str, str]] = set()
    columns: list[str] = []
    paired_lines = []
    for report in _reports(out):
        for row in _read(report / "comparison.csv"):
            col = f"{row['protocol']} {float(row['fraction']):.0%}"
            if col not in columns:
                columns.append(col)
            bad, trials = int(row.get("degenerate_trials") or 0), int(row["trials"])
            if bad:
                degenerate.add((row["name"], col))
            cells.setdefault(row["name"], {})[col] = f"degenerate ({bad}/{trials})" if bad == trials else (
                f"{float(row['balanced_accuracy_mean']):.3f} [{float(row['balanced_accuracy_ci_low']):.3f}, "
                f"{float(row['balanced_accuracy_ci_high']):.3f}]" + (f" (!{bad}/{trials})" if bad else ""))
        protocol_of = {row["name"]: row["protocol"] for row in _read(report / "comparison.csv")}
        for row in _read(report / "paired.csv"):
            if protocol_of.get(row["a"]) != protocol_of.get(row["b"]):
                continue  # the raw-pixel sanity row (a linear probe) in the kNN report: not a like-for-like pair
            names = {row["a"], row["b"]}
            random = next((n for n in names if n.lower().startswith("random")), None)
            if random is None or len(names) != 2:
                continue
            learned = (names - {random}).pop()
            sign = 1.0 if row["a"] == learned else -1.0
            low, high = sorted((sign * float(row["ci_low"]), sign * float(row["ci_high"])))
            protocol = protocol_of[row["a"]]
            col = f"{protocol} {float(row['fraction']):.0%}"
            note = " (degenerate side)" if {(learned, col), (random, col)} & degenerate else ""
            paired_lines.append(f"| {learned} - {random} | {col} | "
                                f"{sign * float(row['difference']):+.3f} [{low:+.3f}, {high:+.3f}]{note} | "
                                f"{row['p_holm_display']} |")
    lines = [f"| initialisation | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | {' | '.join(c.get(col, '') for col in columns)} |" for name, c in cells.items()]
    lines += ["", "| paired difference | protocol, labels | balanced accuracy [95% CI] | p (Holm) |",
              "|---|---|---|---|", *paired_lines]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    for out in argv:
        print(f"### {Path(out).name}\n\n{study_table(Path(out))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
