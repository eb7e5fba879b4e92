"""``medssl study``: validation, the stage plan and its hashes, and a study on real BUSI images killed twice
(once inside a pretraining stage, once at a random point) that must give the report of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 12  # a class-stratified BUSI subset: 36 images


def _busi_subset(shared: Path, dest: Path) -> Path:
    """The first PER_CLASS images of each BUSI class (natural order), linked into a class-folder tree."""
    for label in ("benign", "malignant", "normal"):
        files = sorted((shared / "busi" / label).glob("*.png"),
                       key=lambda p: int(p.stem.split("(")[1].rstrip(")")))[:PER_CLASS]
        (dest / label).mkdir(parents=True)
        for f in files:
            (dest / label / f.name).symlink_to(f)
    return dest


def _study(tmp: Path, shared: Path, **changes) -> dict:
    raw = {
        "data": str(_busi_subset(shared, tmp / "busi")) if not (tmp / "busi").exists() else str(tmp / "busi"),
        "out": "out", "modality": "ultrasound", "device": "cpu", "seed": 0,
        "network": {"arch": "resnet18", "widen_factor": 0.25, "small_stem": True},
        "methods": {"simclr": {"method_options": {"projector_hidden_dim": 32, "projector_out_dim": 16}},
                    "byol": {"method_options": {"projector_hidden_dim": 32, "projector_out_dim": 16,
                                                "predictor_hidden_dim": 32}}},
        "pretrain": {"iterations": 8, "batch_size": 8, "image_size": 32, "optimizer": "sgd", "lr": 0.5,
                     "knn_every": 0, "checkpoint_every": 1, "workers": 0},
        "first_stage": {"data": str(shared / "pneumoniamnist" / "pneumoniamnist_balanced.npz"),
                        "modality": "xray", "iterations": 4},
        "initialisations": ["random", "p1x", "p2x"],
        "evaluation": {"fractions": [0.5, 1.0], "trials": 2, "epochs": 3},
    }
    raw.update(changes)
    return raw


def _write(tmp: Path, raw: dict, name: str = "study.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _numbers(out: Path) -> dict[str, object]:
    """Everything the report and the evaluations compute (timing-free), and the pretrained weights."""
    from medssl.weights import load_checkpoint

    found: dict[str, object] = {}
    for name in ("comparison.md", "comparison.csv", "paired.csv"):
        found[name] = (out / "report" / name).read_bytes()
    for ev in sorted((out / "eval").iterdir()):
        found[f"{ev.name}/predictions.csv"] = (ev / "predictions.csv").read_bytes()
        found[f"{ev.name}/results"] = json.loads((ev / "results.json").read_text())["results"]
    for run in sorted((out / "runs").iterdir()):
        state = load_checkpoint(run / "backbone.safetensors").backbone
        found[f"{run.name}/backbone"] = {k: v.numpy().tobytes() for k, v in state.items()}
    return found


def _run_until(cmd: list[str], env: dict, should_kill=lambda line: False, watch=None) -> tuple[list[str], bool]:
    """Run ``cmd``; SIGKILL it when ``should_kill(stderr line)`` or ``watch()`` (polled every 2 ms by a thread,
    independent of when the log lines are read) returns True."""
    import threading

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    killed = threading.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            proc.send_signal(signal.SIGKILL)

    def poll() -> None:
        while proc.poll() is None and not killed.is_set():
            if watch():
                kill()
            time.sleep(0.002)

    if watch is not None:
        threading.Thread(target=poll, daemon=True).start()
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if not killed.is_set() and should_kill(line):
            kill()
    proc.stderr.close()
    proc.wait(timeout=300)
    assert killed.is_set() or proc.returncode == 0, "".join(lines[-20:])
    return lines, killed.is_set()


def test_study_killed_twice_gives_the_report_of_an_uninterrupted_run(shared_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from medssl.study import build_plan, load_study_config, run_study

    config = _write(tmp_path, _study(tmp_path, shared_data))
    run_study(load_study_config(config, out=tmp_path / "reference"), progress=False)
    reference = _numbers(tmp_path / "reference")
    assert len([k for k in reference if k.endswith("/results")]) == 5  # Random + {P1X, P2X} x {simclr, byol}

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medssl", "study", str(config), "--out", str(out), "--no-progress"]
    seed = int(os.environ.get("MEDSSL_TEST_KILL_SEED", time.time()))  # to replay the kill points of a failure
    rng = random.Random(seed)
    # kill 1: inside a random pretraining stage, once its first checkpoint is on disk
    target = rng.randrange(3, 7)  # stages 1-2 are the first stages; 3-6 P1X / P2X
    run = build_plan(load_study_config(config, out=out))[target - 1].folder
    _, killed = _run_until(cmd, env, watch=lambda: bool(list((run / "checkpoints").glob("checkpoint_*.pt"))))
    assert killed and not (run / "backbone.safetensors").exists()
    # kill 2: a random delay after a random later stage starts (pretraining, evaluation or report); the stage
    # killed first is continued (exactly) before it
    second = rng.randrange(target + 1, 13)
    delay = rng.uniform(0.0, 0.5)
    lines, killed = _run_until(cmd, env, lambda line: f"[study {second}/12]" in line and "->" in line
                               and (time.sleep(delay) or True))
    why = f"random seed {seed}: kills at stage {target} and {second} (+{delay:.2f} s)"
    assert killed, why
    assert any("continuing" in line and run.name in line for line in lines), why  # exact resume
    assert sum("skipped" in line for line in lines) == target - 1, why
    lines, killed = _run_until(cmd, env, lambda line: False)
    assert not killed and (out / "report.md").is_file()
    assert not list((out / "eval").glob(".*.partial"))
    # progress lines: every stage run shows its ETA, timed from the stages of its kind run before
    starts = [line for line in lines if "[study " in line and "stage ETA" in line]
    assert starts and all("study ETA" in line for line in starts)
    assert _numbers(out) == reference, why
    # the table: every initialisation (and the raw-pixel sanity row) x both fractions, each number the mean over
    # the 2 trials of scikit-learn's balanced accuracy on that evaluation's saved predictions
    table = list(csv.DictReader((out / "report" / "comparison.csv").open()))
    rows = {"Random": "random", "P1X (simclr)": "p1x_simclr", "P1X (byol)": "p1x_byol",
            "P2X (simclr)": "p2x_simclr", "P2X (byol)": "p2x_byol"}
    raw = [r["name"] for r in table if r["name"] not in rows]
    assert len(set(raw)) == 1 and raw[0].startswith("Raw pixels")
    assert sorted((r["name"], float(r["fraction"])) for r in table) == sorted(
        (n, f) for n in [*rows, raw[0]] for f in (0.5, 1.0))
    for r in table:
        folder = out / "eval" / rows[r["name"]] if r["name"] in rows else \
            out / "eval" / "random" / "baselines" / "raw_pixels"
        preds = [p for p in csv.DictReader((folder / "predictions.csv").open())
                 if float(p["fraction"]) == float(r["fraction"])]
        accs = [balanced_accuracy_score([p["true_label"] for p in preds if p["trial"] == t],
                                        [p["predicted_label"] for p in preds if p["trial"] == t])
                for t in sorted({p["trial"] for p in preds})]
        assert int(r["trials"]) == len(accs) == 2
        assert float(r["balanced_accuracy_mean"]) == pytest.approx(np.mean(accs), abs=1e-9)
    assert (out / "report.md").read_text() == (tmp_path / "reference" / "report.md").read_text()
    from medssl.cli import main

    capsys.readouterr()
    assert main(["study", str(config), "--out", str(out), "--plan"]) == 0
    plan = capsys.readouterr().out.strip().splitlines()
    assert len(plan) == 12 and all(line.endswith("\tcomplete") for line in plan)


def test_changed_setting_reruns_that_stage_and_everything_downstream(shared_data: Path, tmp_path: Path) -> None:
    from medssl.study import build_plan, study_config_from_dict

    path = tmp_path / "study.yaml"
    base = build_plan(study_config_from_dict(_study(tmp_path, shared_data), path))
    labels = [s.label for s in base]
    assert labels[:2] == ["first stage simclr on pneumoniamnist_balanced.npz",
                          "first stage byol on pneumoniamnist_balanced.npz"]
    assert [s.kind for s in base] == ["pretrain"] * 6 + ["evaluate"] * 5 + ["report"]

    def changed(**changes) -> set[str]:
        plan = build_plan(study_config_from_dict(_study(tmp_path, shared_data, **changes), path))
        assert [s.label for s in plan] == labels
        return {a.label for a, b in zip(base, plan) if a.hash != b.hash}

    assert changed() == set()
    # the first stage of BYOL: its P2X, that P2X's evaluation and the report (P1X and SimCLR untouched)
    first = _study(tmp_path, shared_data)["first_stage"]
    byol = _study(tmp_path, shared_data)["methods"]
    byol["byol"] = {**byol["byol"], "lr": 0.25}
    assert changed(methods=byol) == {labels[1], "P1X (byol): byol on busi", "P2X (byol): byol on busi",
                                     "evaluate P1X (byol) (linear)", "evaluate P2X (byol) (linear)",
                                     "report (linear)"}
    assert changed(first_stage={**first, "iterations": 3}) == set(labels[:2]) | {
        "P2X (simclr): simclr on busi", "P2X (byol): byol on busi", "evaluate P2X (simclr) (linear)",
        "evaluate P2X (byol) (linear)", "report (linear)"}
    # evaluation settings: every evaluation and the report, no pretraining
    assert changed(evaluation={"fractions": [0.5, 1.0], "trials": 2, "epochs": 4}) == set(labels[6:])
    # the target data itself (one image fewer): every stage that reads it
    next((tmp_path / "busi" / "normal").iterdir()).unlink()
    assert changed() == set(labels[2:])


@pytest.mark.parametrize(("edit", "key"), [
    ({"methods": ["simclr", "mocov9"]}, "methods.mocov9"),
    ({"pretrain": {"batch_size": "big"}}, "pretrain.batch_size"),
    ({"pretrain": {"data": "x"}}, "pretrain.data"),
    ({"evaluation": {"fractions": [0, 1.0]}}, "evaluation.fractions"),
    ({"evaluation": {"protocols": ["svm"]}}, "evaluation.protocols"),
    ({"initialisations": ["random", {"kind": "p2x", "from": "missing.pth"}]}, "initialisations[1].from"),
    ({"initialisations": ["random", {"kind": "checkpoint"}]}, "initialisations[1].path"),
    ({"initialisations": ["p1x", "p1x"]}, "initialisations[1].name"),
    ({"first_stage": None}, "first_stage"),
    ({"budget": 3}, "budget"),
])
def test_bad_study_file_is_a_one_line_error_naming_file_and_key(tmp_path: Path, edit: dict, key: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from medssl.cli import main

    (tmp_path / "busi" / "a").mkdir(parents=True)
    raw = {"data": "busi", "out": "out", "methods": ["simclr"], "initialisations": ["random", "p1x", "p2x"],
           "first_stage": {"data": "busi"}}
    raw.update(edit)
    path = _write(tmp_path, raw)
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"medssl: error: {path}: {key}:"), err
    assert not (tmp_path / "out").exists()


def test_bundle_study_files_are_valid(tmp_path: Path) -> None:
    """Every bundle ships configs/study.yaml; it validates once its data exists (weights are registry names)."""
    from medssl.study import study_config_from_dict

    bundles = sorted((REPO / "medssl" / "bundles").glob("*/configs/study.yaml"))
    assert {p.parents[1].name for p in bundles} == {"dermatoscopy", "histology", "mri", "ultrasound", "xray"}
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").touch()
    for path in bundles:
        cfg = study_config_from_dict(yaml.safe_load(path.read_text()), tmp_path / "configs" / "study.yaml")
        assert cfg.data == tmp_path / "data" / "manifest.jsonl" and cfg.out == tmp_path / "study"
        kinds = [i.kind for i in cfg.initialisations]
        assert kinds[0] == "random" and "p1x" in kinds and ("p2x" in kinds), path
        assert cfg.modality == path.parents[1].name


def test_demo_is_a_study_that_a_rerun_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """``medssl demo`` (relative --out) runs as a study; run again, every stage is found complete and skipped,
    the table is unchanged, and the notice of the synthetic data is not added twice."""
    import logging

    from medssl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo", "--quick", "--no-progress"]) == 0
    table = (tmp_path / "demo" / "report" / "comparison.csv").read_bytes()
    stages = json.loads((tmp_path / "demo" / "study.json").read_text())["stages"]
    assert [s["folder"] for s in stages] == ["runs/first_stage", "runs/p1x", "runs/p2x", "eval/random",
                                             "eval/first_stage", "eval/p1x", "eval/p2x", "report"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medssl.study"):
        assert main(["demo", "--out", "demo", "--quick", "--no-progress"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == len(stages) and not any("done in" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "demo" / "report" / "comparison.csv").read_bytes() == table
    assert (tmp_path / "demo" / "report" / "report.md").read_text().count("SYNTHETIC DATA") == 1
    assert (tmp_path / "demo" / "report.md").read_text().count("SYNTHETIC DATA") == 1
