"""Sanity flags on constructed cases (issue "medssl study", acceptance 2): a constant backbone (collapse flag), a
probe collapsed to one class, a flat loss, a backbone below its random init; and the collapse monitor's
threshold against the measurement it is set from."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from medssl.engines.handlers import COLLAPSE_THRESHOLD, CollapseMonitor, MetricsJsonl, collapse_statistic
from medssl.evaluation.report import compare_evaluations
from medssl.evaluation.run import run_evaluation
from medssl.evaluation.sanity import (
    FLAT_LOSS_RELATIVE,
    RawPixels,
    pretraining_flags,
    probe_flags,
    random_init_flags,
    run_baselines,
    trial_flags,
)
from medssl.methods import build_method
from medssl.models import build_backbone

CLASSES = ("a", "b", "c")
TINY = {"small_stem": True, "widen_factor": 0.125}


def _records(n_per_split=(24, 12, 12)):
    return [{"id": f"{split}-{i:03d}", "image": "unused", "label": CLASSES[i % 3], "split": split, "source": "image"}
            for split, n in zip(("train", "val", "test"), n_per_split) for i in range(n)]


def _transform(record):
    """Deterministic 3x32x32 image in [0,1] whose brightest channel is the class."""
    g = torch.Generator().manual_seed(zlib.crc32(record["id"].encode()))
    img = torch.rand(3, 32, 32, generator=g) * 0.3
    img[CLASSES.index(record["label"])] += 0.6
    return {"image": img.clamp(0, 1), "label": record["label"], "id": record["id"]}


class ConstantBackbone(nn.Module):
    """Features that ignore the image (a fully collapsed backbone), posing as a tiny ResNet-18."""

    arch = "resnet18"
    arch_kwargs = TINY
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.linspace(-1, 1, self.num_features))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1) + 0 * x.mean()


@pytest.mark.parametrize("dim", [64, 512, 2048])
def test_collapse_threshold_lies_between_collapsed_and_healthy_embeddings(dim):
    torch.manual_seed(dim)
    limit = COLLAPSE_THRESHOLD / math.sqrt(dim)
    v = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    a = 0.5 + torch.rand(256, 1)
    collapsed = {"constant": v.expand(256, dim).clone(),
                 "rank-1": a * v,
                 "rank-1 + 10% noise": a * v + 0.1 * torch.randn(256, dim) / math.sqrt(dim)}
    for name, z in collapsed.items():
        assert collapse_statistic(z) < limit, name
    assert collapse_statistic(torch.randn(256, dim)) > limit  # isotropic: about 1/sqrt(D)
    images = torch.rand(64, 3, 32, 32)
    for method in ("simclr", "simsiam"):  # heads at initialisation on a real (tiny) backbone
        m = build_method(method, build_backbone("resnet18", **TINY), projector_out_dim=dim)
        with torch.no_grad():
            z = m.projector(m.encode(images))
        assert collapse_statistic(z) > 2 * limit, method
    # the old rule (0.2) would miss rank-1 embeddings with 20 % noise; the measured one flags them
    noisy = a * v + 0.2 * torch.randn(256, dim) / math.sqrt(dim)
    assert 0.2 / math.sqrt(dim) < collapse_statistic(noisy) < limit


def test_constant_backbone_raises_the_collapse_flag(tmp_path):
    """Embeddings of SimCLR on a constant backbone -> the monitor's warning lines -> ``collapse_warning``; a
    real backbone's -> none."""
    for name, backbone in (("constant", ConstantBackbone()), ("real", build_backbone("resnet18", **TINY))):
        run = tmp_path / name
        run.mkdir()
        metrics = MetricsJsonl(run / "metrics.jsonl")
        monitor = CollapseMonitor(sink=metrics.write)
        method = build_method("simclr", backbone)
        torch.manual_seed(0)
        for it in range(1, 4):
            out = method([torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)])
            std = monitor.update(out["embeddings"], iteration=it, epoch=1)
            metrics.write({"iteration": it, "epoch": 1, "loss": float(out["loss"].detach()), "collapse_std": std})
        kinds = [f["flag"] for f in pretraining_flags(run)]
        if name == "constant":
            assert kinds.count("collapse_warning") == 1 and len(monitor.flags) == 3
        else:
            assert "collapse_warning" not in kinds and not monitor.flags
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(x["time"].endswith("+00:00") for x in lines)  # wall-clock stamp on every line


def _write_run(path, losses, spreads=None):
    path.mkdir()
    metrics = MetricsJsonl(path / "metrics.jsonl")
    for i, loss in enumerate(losses, start=1):
        line = {"iteration": i, "epoch": 1, "loss": float(loss)}
        if spreads is not None:
            line["collapse_std"] = float(spreads[i - 1])
        metrics.write(line)
    metrics.write({"iteration": len(losses), "epoch": 1, "knn_balanced_accuracy": 0.5})  # not a loss line
    return path


def _relative_change(losses, window):
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return abs(first - last) / max(abs(first), abs(last), 1e-3)


def test_flat_loss_and_falling_spread_are_flagged(tmp_path):
    rng = np.random.default_rng(0)
    flat = 5.0 + 0.01 * rng.standard_normal(200)  # noise, no trend
    learning = np.linspace(5.0, 3.0, 200) + 0.01 * rng.standard_normal(200)
    falling = np.linspace(0.044, 0.028, 200) + 0.0005 * rng.standard_normal(200)  # the SimSiam run
    steady = 0.044 + 0.0005 * rng.standard_normal(200)
    flags_flat = pretraining_flags(_write_run(tmp_path / "flat", flat, falling))
    flags_ok = pretraining_flags(_write_run(tmp_path / "ok", learning, steady))
    assert sorted(f["flag"] for f in flags_flat) == ["flat_loss", "spread_falling"]
    assert flags_ok == []
    flat_flag = next(f for f in flags_flat if f["flag"] == "flat_loss")
    assert flat_flag["relative_change"] == pytest.approx(_relative_change(list(flat), 20))
    assert _relative_change(list(flat), 20) < FLAT_LOSS_RELATIVE < _relative_change(list(learning), 20)
    # a partial last line (a killed run) is skipped, not an error
    with (tmp_path / "ok" / "metrics.jsonl").open("a") as fh:
        fh.write('{"iteration": 201, "lo')
    assert pretraining_flags(tmp_path / "ok") == []


def test_probe_collapsed_to_one_class_is_flagged_in_results_and_report(tmp_path):
    out = run_evaluation("synthetic", tmp_path / "const", backbone=ConstantBackbone(), records=_records(),
                         transform=_transform, transform_desc="synthetic-v1", protocol="linear",
                         fractions=[1.0], trials=2, epochs=5, seed=0, bootstrap=1000, name="constant")
    res = json.loads((out / "results.json").read_text())
    predicted = np.array(res["results"][0]["trials"][0]["confusion_matrix"]).sum(axis=0)
    assert np.count_nonzero(predicted) == 1  # constant features: one class for every test image
    kinds = {f["flag"] for f in res["flags"]}
    assert "degenerate_probe" in kinds
    assert "flags" in res["definitions"]
    report = (out / "report.md").read_text()
    assert "## Sanity flags" in report and "(!) degenerate_probe" in report
    # in a comparison the degenerate cell is named, not printed as a number; the CSV keeps the number
    compare_evaluations([out], tmp_path / "cmp")
    row = next(line for line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
               if line.startswith("| constant |"))
    assert row == "| constant | degenerate (2/2 trials) (!) |"
    import csv

    with open(tmp_path / "cmp" / "comparison.csv", newline="") as fh:
        saved = next(csv.DictReader(fh))
    assert saved["degenerate_trials"] == "2" and 0 < float(saved["balanced_accuracy_mean"]) <= 0.5
    # the rule on a hand-made confusion matrix: 65 % of predictions on a class holding 5 % of the images
    cm = [[20, 0, 10], [0, 4, 1], [0, 0, 0]]  # rows true, columns predicted: no class dominates
    cm_rare = [[5, 0, 60], [0, 30, 0], [0, 0, 5]]  # 65 of 100 predicted c, 5 % are c
    blocks = [{"fraction": 1.0, "trials": [{"trial": 0, "confusion_matrix": cm_rare, "best_epoch": 1, "epochs": 10},
                                           {"trial": 1, "confusion_matrix": cm, "best_epoch": 4, "epochs": 10}]}]
    flags = probe_flags(blocks, CLASSES)
    assert [(f["flag"], f["trial"]) for f in flags] == [("degenerate_probe", 0), ("best_epoch_first", 0)]
    assert flags[0]["predicted_share"] == pytest.approx(0.65) and flags[0]["true_share"] == pytest.approx(0.05)


def test_trials_that_disagree_are_flagged():
    blocks = [{"fraction": 0.1, "trials": [{"balanced_accuracy": v} for v in (0.35, 0.80, 0.55)]},
              {"fraction": 1.0, "trials": [{"balanced_accuracy": v} for v in (0.80, 0.82, 0.81)]}]
    flags = trial_flags(blocks)
    assert [f["fraction"] for f in flags] == [0.1]
    assert flags[0]["std"] == pytest.approx(np.std([0.35, 0.80, 0.55], ddof=1))


def test_backbone_below_its_random_init_is_flagged_with_sanity_rows(tmp_path):
    """``run_baselines``: random init of the same (tiny ResNet-18) architecture and raw pixels on the same
    splits; the constant backbone does not beat its random init -> flagged in results.json, report.md and
    ``medssl report``, where both sanity rows appear."""
    options = dict(records=_records(), transform=_transform, transform_desc="synthetic-v1")
    out = run_evaluation("synthetic", tmp_path / "const", backbone=ConstantBackbone(), protocol="linear",
                         fractions=[1.0], trials=2, epochs=5, seed=0, bootstrap=1000, name="Learned", **options)
    written = run_baselines(out, "synthetic", **options)
    assert [p.name for p in written] == ["random_init", "raw_pixels"]
    rand = json.loads((out / "baselines" / "random_init" / "results.json").read_text())
    raw = json.loads((out / "baselines" / "raw_pixels" / "results.json").read_text())
    assert {k: rand["backbone"]["arch_kwargs"][k] for k in TINY} == TINY and rand["backbone"]["source"] == "random"
    assert rand["config"]["trials"] == raw["config"]["trials"] == 2 and raw["protocol"] == "linear"
    assert raw["results"][0]["summary"]["balanced_accuracy"]["mean"] > 0.9  # the class is the brightest channel
    res = json.loads((out / "results.json").read_text())
    flag = next(f for f in res["flags"] if f["flag"] == "not_above_random_init")
    assert flag["baseline"] == "Random init (resnet18)" and flag["ci_low"] <= 0
    assert "not_above_random_init" in (out / "report.md").read_text()
    report = compare_evaluations([out], tmp_path / "report").read_text()
    assert "| Random init (resnet18) |" in report and "| Raw pixels 16x16 (logistic regression) |" in report
    assert "(!) not_above_random_init" in report
    # raw pixels, 16 x 16 x 3 features: the pooled image
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(RawPixels(16).forward_features(x), x.view(2, 3, 16, 2, 16, 2).mean((3, 5)).flatten(1))


def test_random_init_rule_on_paired_rows():
    rows = [{"a": "P1X", "b": "Random", "dataset": "d", "fraction": 1.0, "difference": 0.05, "ci_low": 0.01,
             "ci_high": 0.09},
            {"a": "Random", "b": "P2X", "dataset": "d", "fraction": 1.0, "difference": -0.02, "ci_low": -0.06,
             "ci_high": 0.01},
            {"a": "P1X", "b": "P2X", "dataset": "d", "fraction": 1.0, "difference": 0.0, "ci_low": -1, "ci_high": 1}]
    flags = random_init_flags(rows, ["Random"])
    assert [(f["name"], f["difference"]) for f in flags] == [("P2X", 0.02)]
    assert (flags[0]["ci_low"], flags[0]["ci_high"]) == (-0.01, 0.06)


def test_a_pretraining_flag_is_reported_once_in_a_comparison(tmp_path):
    """A collapsing run evaluated (its flag copied into results.json) and also named as a pretraining run of the
    comparison gives one ``collapse_warning``, not one per source."""
    from types import SimpleNamespace

    from medssl.evaluation.sanity import comparison_flags

    run = tmp_path / "p1x"
    run.mkdir()
    metrics = MetricsJsonl(run / "metrics.jsonl")
    monitor = CollapseMonitor(sink=metrics.write)
    method = build_method("simclr", ConstantBackbone())
    for it in range(1, 3):
        out = method([torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)])
        monitor.update(out["embeddings"], iteration=it, epoch=1)
    own = pretraining_flags(run)
    assert [f["flag"] for f in own] == ["collapse_warning"]
    ev = SimpleNamespace(name="P1X", dataset="d", path=tmp_path / "eval", summary=[],
                         results={"flags": own, "backbone": {"arch": "resnet18", "source": "checkpoint"}})
    flags = comparison_flags([ev], [], pretrain_runs=[run])
    assert [f["flag"] for f in flags] == ["collapse_warning"] and flags[0]["message"] == own[0]["message"]
    twice = comparison_flags([ev, SimpleNamespace(**{**vars(ev), "name": "P1X again"})], [])
    assert [f["message"] for f in twice] == [f"P1X: {own[0]['message']}"]
    # a copy stored by an older evaluation of a run listed in the comparison is replaced by the run's own flags
    stale = SimpleNamespace(**{**vars(ev), "results": {**ev.results, "flags": [
        {"flag": "collapse_warning", "message": "p1x: old wording", "run": str(run)}]}})
    assert [f["message"] for f in comparison_flags([stale], [], pretrain_runs=[run / "metrics.jsonl"])] == \
        [own[0]["message"]]
    # an evaluation's own flags are not merged with another's, even in the same words (two degenerate probes)
    one_class = {"fraction": 1.0, "trials": [{"trial": 0, "balanced_accuracy": 1 / 3,
                                              "confusion_matrix": [[5, 0, 0], [5, 0, 0], [5, 0, 0]]}]}
    probes = [SimpleNamespace(name=n, dataset="d", path=tmp_path / n, summary=[one_class],
                              results={"backbone": {}, "data": {"classes": list(CLASSES)}})
              for n in ("Random", "P1X")]
    found = [(f["flag"], f["evaluation"]) for f in comparison_flags(probes, [])]
    assert found == [("degenerate_probe", "Random"), ("degenerate_probe", "P1X")]


def test_an_early_dip_of_the_spread_that_recovers_is_not_a_collapse(tmp_path):
    """The shape measured on SimCLR from random init (PneumoniaMNIST, docs/results.md): the spread falls from
    0.073 to 0.019 in the first steps, then rises to 0.073 as the run learns; the monitor warns during the dip.
    The run is flagged only when the spread is still below the threshold at its end."""
    healthy = 1 / math.sqrt(64)
    limit = COLLAPSE_THRESHOLD * healthy
    dip = np.concatenate([np.linspace(0.073, 0.019, 16), np.linspace(0.019, 0.073, 184)])
    stays = np.concatenate([np.linspace(0.073, 0.019, 16), np.full(184, 0.015)])
    found = {}
    for name, spread in (("recovers", dip), ("stays", stays)):
        run = tmp_path / name
        run.mkdir()
        metrics = MetricsJsonl(run / "metrics.jsonl")
        for i, std in enumerate(spread, start=1):
            metrics.write({"iteration": i, "epoch": 1, "loss": 5.0 - i / 100, "collapse_std": float(std)})
            if std < limit:
                metrics.write({"iteration": i, "epoch": 1, "warning": "collapse", "collapse_std": float(std),
                               "healthy_std": healthy})
        found[name] = [f["flag"] for f in pretraining_flags(run)]
    assert "collapse_warning" not in found["recovers"]
    assert "collapse_warning" in found["stays"]


def test_swav_loss_at_ln_k_is_flagged_as_uniform_prototypes(tmp_path):
    """ln K is the loss of uniform predictions whatever the codes (closed form); a SwAV run ending there is
    flagged, one below it is not, and another method's loss at the same value is not judged by this rule."""
    found = {}
    for name, method, k, level in (("stuck", "swav", 30, math.log(30) - 0.005), ("learns", "swav", 30, 3.0),
                                   ("default_k", "swav", None, math.log(3000)), ("simclr", "simclr", None, 8.0)):
        run = _write_run(tmp_path / name, np.linspace(level + 0.4, level, 100))
        options = {"num_prototypes": k} if k else {}
        (run / "config.json").write_text(json.dumps({"method": method, "method_options": options}))
        found[name] = [f["flag"] for f in pretraining_flags(run)]
    assert "uniform_prototypes" in found["stuck"] and "uniform_prototypes" in found["default_k"]
    assert "uniform_prototypes" not in found["learns"] and "uniform_prototypes" not in found["simclr"]
    # the closed form the rule rests on: cross-entropy of any code distribution against uniform predictions
    q = torch.softmax(torch.randn(5, 30), dim=1)
    ce = -(q * torch.log_softmax(torch.zeros(5, 30), dim=1)).sum(1)
    assert torch.allclose(ce, torch.full((5,), math.log(30)))
