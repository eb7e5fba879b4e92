"""``medssl study`` options used by the committed studies (``studies/``): ``--data`` / ``--first-stage-data``
(the data's location is not part of any stage hash) and ``network.norm`` (a ResNetV2 with GroupNorm or
BatchNorm, Lu et al.'s contrast), run end to end on real PneumoniaMNIST images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch import nn

from medssl.study import build_plan, load_study_config, run_study


def _npz_subset(shared: Path, dest: Path, per_class: int = 12) -> Path:
    """The first ``per_class`` images of each class in each split of the balanced PneumoniaMNIST file."""
    src = np.load(shared / "pneumoniamnist" / "pneumoniamnist_balanced.npz")
    out = {}
    for split in ("train", "val", "test"):
        labels = src[f"{split}_labels"].reshape(-1)
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in (0, 1)])
        out[f"{split}_images"], out[f"{split}_labels"] = src[f"{split}_images"][keep], src[f"{split}_labels"][keep]
    np.savez(dest, **out)
    return dest


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _raw(data: str, norm: str | None = None) -> dict:
    network = {"arch": "resnetv2_50x1", "widen_factor": 0.125, "small_stem": True}
    if norm:
        network["norm"] = norm
    return {"data": data, "out": "out", "modality": "xray", "device": "cpu", "network": network,
            "methods": {"simsiam": {"method_options": {"projector_hidden_dim": 32, "projector_out_dim": 16,
                                                      "predictor_hidden_dim": 8}}},
            "pretrain": {"iterations": 2, "batch_size": 8, "image_size": 16, "knn_every": 0, "workers": 0},
            "first_stage": {"data": data, "iterations": 1},
            "initialisations": ["random", "p1x"],
            "evaluation": {"protocols": ["knn"], "trials": 1, "baselines": False}}


def test_data_given_on_the_command_line_replaces_the_file_and_keeps_the_hashes(shared_data: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    from medssl.cli import main

    here = _npz_subset(shared_data, tmp_path / "pn.npz")
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    shutil.copy(here, elsewhere / "pn.npz")
    study = _write(tmp_path / "study.yaml", _raw("pn.npz"))
    plain = build_plan(load_study_config(study))
    moved = load_study_config(study, data=elsewhere / "pn.npz", first_stage_data=elsewhere / "pn.npz")
    assert moved.data == (elsewhere / "pn.npz").resolve() and moved.first_stage["data"] == str(moved.data)
    assert [s.hash for s in build_plan(moved)] == [s.hash for s in plain]  # content, not location
    assert all(s.call.get("data") in (None, str(moved.data)) for s in build_plan(moved))
    assert main(["study", str(study), "--data", str(tmp_path / "absent.npz"), "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study.yaml: data:" in err and "absent.npz not found" in err
    no_first = _write(tmp_path / "no_first.yaml", {k: v for k, v in _raw("pn.npz").items() if k != "first_stage"})
    assert main(["study", str(no_first), "--first-stage-data", str(here), "--plan"]) == 2
    assert "first_stage:" in capsys.readouterr().err


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_network_norm_builds_resnetv2_with_that_norm_in_every_row(shared_data: Path, tmp_path: Path,
                                                                  norm: str) -> None:
    """``network.norm`` reaches the P1X run (its backbone's layers) and the random row (its arch_kwargs)."""
    from medssl.weights import build_from_checkpoint

    _npz_subset(shared_data, tmp_path / "pn.npz")
    cfg = load_study_config(_write(tmp_path / "study.yaml", _raw("pn.npz", norm)))
    run_study(cfg, progress=False)
    kind = nn.BatchNorm2d if norm == "bn" else nn.GroupNorm
    net, _ = build_from_checkpoint(cfg.out / "runs" / "p1x" / "backbone.safetensors")
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(isinstance(m, kind) for m in norms)
    random_row = json.loads((cfg.out / "eval" / "random" / "results.json").read_text())["backbone"]
    assert random_row["arch"] == "resnetv2_50x1"
    assert random_row["arch_kwargs"].get("norm", "gn") == norm
    cached = sorted((cfg.out / "eval" / "random" / "cache").glob("*.npy"))
    assert cached and all(np.isfinite(np.load(f)).all() for f in cached)  # random BN: statistics re-estimated
    assert (cfg.out / "report.md").is_file()


def test_network_norm_is_for_resnetv2_only(tmp_path: Path) -> None:
    from medssl.errors import MedsslError

    (tmp_path / "pn.npz").touch()
    raw = _raw("pn.npz", "bn")
    raw["network"]["arch"] = "resnet18"
    with pytest.raises(MedsslError, match="network.norm"):
        load_study_config(_write(tmp_path / "study.yaml", raw))


def test_committed_studies_validate_with_their_data_given_on_the_command_line(tmp_path: Path) -> None:
    """``studies/*.yaml`` (docs/results.md) load with ``--data`` / ``--first-stage-data`` and name their paper
    settings: each method's own optimiser (no study-wide lr or optimizer), 3 trials, kNN and the linear probe."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "pn.npz").touch()
    (tmp_path / "store").mkdir()
    files = sorted((repo / "studies").glob("*.yaml"))
    assert {f.stem for f in files} == {"pneumoniamnist", "busi", "busi_64px", "busi_p2x", "simsiam_resnetv2_gn",
                                       "simsiam_resnetv2_bn"}
    for path in files:
        first = tmp_path / "pn.npz" if path.stem == "busi_p2x" else None
        cfg = load_study_config(path, data=tmp_path / "store", first_stage_data=first)
        assert cfg.data == (tmp_path / "store").resolve() and cfg.out == repo / "study_runs" / path.stem
        assert not {"lr", "optimizer"} & set(cfg.pretrain), path
        assert cfg.protocols == ["knn", "linear"] and cfg.evaluation["trials"] == 3, path
    gn, bn = (load_study_config(repo / "studies" / f"simsiam_resnetv2_{n}.yaml", data=tmp_path / "pn.npz")
              for n in ("gn", "bn"))
    assert (gn.network["norm"], bn.network["norm"]) == ("gn", "bn")
    assert {**gn.network, "norm": "bn"} == bn.network and gn.pretrain == bn.pretrain
