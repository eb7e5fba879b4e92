"""``medssl demo --quick``: the whole pipeline end to end, its report and its numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

REPO = Path(__file__).resolve().parents[1]
NAMES = {"Random": "random", "First stage": "first_stage", "P1X": "p1x", "P2X": "p2x"}


def _trial_balanced_accuracies(predictions: Path, fraction: float) -> list[float]:
    rows = [r for r in csv.DictReader(predictions.open()) if float(r["fraction"]) == fraction]
    trials = sorted({int(r["trial"]) for r in rows})
    return [balanced_accuracy_score([r["true_label"] for r in rows if int(r["trial"]) == t],
                                    [r["predicted_label"] for r in rows if int(r["trial"]) == t]) for t in trials]


def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medssl.cli import main
    from medssl.demo import QUICK
    from medssl.weights import load_checkpoint, sha256_of

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    report = (out / "report.md").read_text()
    assert "SYNTHETIC DATA" in report
    assert "SYNTHETIC" in (out / "report" / "report.md").read_text()
    for name in NAMES:
        assert f"| {name} |" in report
    assert (out / "report" / "plots" / "pretrain_loss.png").is_file()
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link  # image links are valid from the demo folder
    # every table number is the mean over 3 trials of sklearn's balanced accuracy on the saved predictions
    table = list(csv.DictReader((out / "report" / "comparison.csv").open()))
    assert sorted({(r["name"], float(r["fraction"])) for r in table}) == \
        sorted((n, f) for n in NAMES for f in QUICK.fractions)
    for row in table:
        accs = _trial_balanced_accuracies(out / "eval" / NAMES[row["name"]] / "predictions.csv", float(row["fraction"]))
        assert len(accs) == 3 == int(row["trials"])
        assert float(row["balanced_accuracy_mean"]) == pytest.approx(np.mean(accs), abs=1e-9)
    # the 10% subsets are smaller than the full training split
    results = json.loads((out / "eval" / "p2x" / "results.json").read_text())
    n_train = {b["fraction"]: b["trials"][0]["n_train"] for b in results["results"]}
    assert n_train[0.1] < n_train[1.0] == results["data"]["split_sizes"]["train"]
    # P2X started from the first stage's weights after Frobenius scaling and dead-filter copy; P1X from random
    p2x = load_checkpoint(out / "runs" / "p2x" / "backbone.safetensors").provenance
    assert p2x["sha256"] == sha256_of(out / "runs" / "first_stage" / "backbone.safetensors")
    ops = {op["operation"]: op for op in p2x["operations"]}
    assert ops["dead_filter_repair"]["mode"] == "copy" and ops["frobenius_scaling"]["count"] > 0
    assert load_checkpoint(out / "runs" / "p1x" / "backbone.safetensors").provenance["format"] == "random_init"
    summary = json.loads((out / "demo.json").read_text())
    assert summary["synthetic_data"] is True and summary["seconds"]["total"] > 0


def test_demo_with_missing_data_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medssl.cli import main

    missing = tmp_path / "nowhere" / "manifest.jsonl"
    assert main(["demo", "--out", str(tmp_path / "out"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "not found" in err
    assert not (tmp_path / "out").exists()  # nothing written before the input is checked


def test_bundle_demo_command_reaches_the_demo(tmp_path: Path) -> None:
    """bundles/ultrasound/configs/demo.yaml passes its options to medssl.demo.run_demo (checked via --demo_data)."""
    from monai.bundle import run

    from medssl.errors import MedsslError

    missing = tmp_path / "user" / "manifest.jsonl"
    with pytest.raises(RuntimeError) as info:
        run(config_file=str(REPO / "bundles" / "ultrasound" / "configs" / "demo.yaml"), bundle_root=str(tmp_path),
            demo_out=str(tmp_path / "demo"), demo_data=str(missing), quick=True)
    cause = info.value.__cause__
    assert isinstance(cause, MedsslError) and str(missing) in str(cause)
