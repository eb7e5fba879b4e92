"""Acceptance 4 and 5 on real images (BUSI ultrasound PNGs through the ``shared_data`` fixture):
each method lowers its loss from random init, logs kNN balanced accuracy and writes a backbone that
``medssl weights inspect`` reads; a model with constant embeddings is flagged by the collapse monitor; a NaN loss
stops the run with a clear message and leaves the last good checkpoint loadable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import medssl.methods
from medssl.cli import main as medssl_main
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import NonFiniteLossError
from medssl.engines.run import run_pretraining

# per method: options for tiny heads, and an optimizer/lr that moves a width-1/8 ResNet-18 within 12 steps
SETTINGS = {
    "simclr": ({"projector_hidden_dim": 32, "projector_out_dim": 16, "temperature": 0.5}, "lars", 5.0),
    "swav": ({"projector_hidden_dim": 32, "projector_out_dim": 16, "num_prototypes": 10, "num_local_crops": 0,
              "freeze_prototypes_epochs": 2}, "adam", 3e-3),
    "byol": ({"projector_hidden_dim": 32, "projector_out_dim": 16}, "adam", 3e-3),
    "simsiam": ({"projector_hidden_dim": 64, "projector_out_dim": 64, "predictor_hidden_dim": 16}, "sgd", 0.5),
}


def _busi_subset(shared: Path, dest: Path, per_class: dict[str, int]) -> Path:
    busi = shared / "busi"
    if not busi.is_dir():
        pytest.skip("BUSI images not in the shared data folder")
    for label, n in per_class.items():
        (dest / label).mkdir(parents=True)
        for src in sorted((busi / label).glob("*.png"))[:n]:
            os.symlink(src, dest / label / src.name.replace(" ", "_"))
    return dest


@pytest.fixture(scope="module")
def busi_folders(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("busi")
    train = _busi_subset(shared_data, root / "train", {"benign": 3, "malignant": 3, "normal": 2})
    knn = _busi_subset(shared_data, root / "knn", {"benign": 8, "malignant": 8, "normal": 8})
    return train, knn


def _config(data: Path, knn: Path, out: Path, method: str, **extra) -> PretrainConfig:
    options, optimizer, lr = SETTINGS[method]
    values = dict(data=str(data), knn_data=str(knn), out=str(out), method=method, arch="resnet18", small_stem=True,
                  widen_factor=0.125, image_size=32, batch_size=8, iterations=12, workers=0, knn_every=100,
                  modality="ultrasound", method_options=options, optimizer=optimizer, lr=lr, warmup_epochs=0,
                  checkpoint_every_epochs=0, seed=0)
    values.update(extra)
    return PretrainConfig(**values)


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["simclr", "swav", "byol", "simsiam"])
def test_short_run_lowers_loss_logs_knn_and_writes_backbone(busi_folders, tmp_path, capsys, method):
    train, knn = busi_folders
    run_dir = run_pretraining(_config(train, knn, tmp_path / "run", method), progress=False)
    events = _read_metrics(run_dir)
    losses = [e["loss"] for e in events if "loss" in e]
    assert len(losses) == 12
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.1, (first, last, losses)  # margins seen: simclr 0.27, swav 0.8, byol 1.0, simsiam 0.25
    knn_events = [e for e in events if "knn_balanced_accuracy" in e]
    assert len(knn_events) == 1 and knn_events[0]["iteration"] == 12
    assert 0.0 <= knn_events[0]["knn_balanced_accuracy"] <= 1.0
    assert not [e for e in events if e.get("warning") == "collapse"]  # healthy runs are not flagged
    if method == "byol":
        taus = [e["tau"] for e in events if "loss" in e]
        assert taus[0] == pytest.approx(0.996) and all(a < b for a, b in zip(taus, taus[1:]))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["iterations"] == 12 and config["optimizer"] == SETTINGS[method][1]
    assert any((run_dir / "tb").iterdir())
    capsys.readouterr()
    assert medssl_main(["weights", "inspect", "--json", str(run_dir / "backbone.safetensors")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "medssl" and record["arch"] == "resnet18" and not record["missing"]
    assert "projector" in record["heads"]
    # the saved backbone equals the trained one of the final checkpoint
    final = load_checkpoint_file(list_checkpoints(run_dir)[-1][1])["method"]
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "backbone.safetensors"))
    assert torch.equal(saved["backbone.conv1.weight"], final["backbone.conv1.weight"])


def test_constant_embeddings_are_flagged(busi_folders, tmp_path, monkeypatch):
    train, knn = busi_folders
    real_build = medssl.methods.build_method

    def constant_encoder(name, backbone, **cfg):
        method = real_build(name, backbone, **cfg)
        # every image gets the same features: the projector outputs one point for the whole batch
        method.encode = lambda x: backbone.forward_features(torch.zeros_like(x[:1])).expand(x.shape[0], -1)
        return method

    monkeypatch.setattr(medssl.methods, "build_method", constant_encoder)
    run_dir = run_pretraining(_config(train, knn, tmp_path / "run", "simsiam", iterations=2, knn_every=0),
                              progress=False)
    flags = [e for e in _read_metrics(run_dir) if e.get("warning") == "collapse"]
    assert [f["iteration"] for f in flags] == [1, 2]
    assert all(f["collapse_std"] < 1e-3 < f["healthy_std"] for f in flags)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(busi_folders, tmp_path, monkeypatch):
    train, knn = busi_folders
    real_build = medssl.methods.build_method
    calls = {"n": 0}

    def nan_at_fourth_step(name, backbone, **cfg):
        method = real_build(name, backbone, **cfg)
        forward = method.forward

        def poisoned(views):
            calls["n"] += 1
            out = forward(views)
            if calls["n"] == 4:
                out["loss"] = out["loss"] * float("nan")
            return out

        method.forward = poisoned
        return method

    monkeypatch.setattr(medssl.methods, "build_method", nan_at_fourth_step)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        run_pretraining(_config(train, knn, run_dir, "simclr", iterations=6, knn_every=0, checkpoint_every=2),
                        progress=False)
    message = str(info.value)
    assert "iteration 4" in message and "nan" in message and "checkpoint_00000002.pt" in message
    ckpts = list_checkpoints(run_dir)
    assert [it for it, _ in ckpts] == [2]
    state = load_checkpoint_file(ckpts[0][1])
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert not (run_dir / "backbone.safetensors").exists()
    # the CLI reports it on one line and exits 2; without the fault the kept checkpoint resumes to the end
    calls["n"] = 1  # the resumed run's 3rd forward (step 5) is poisoned
    assert medssl_main(["pretrain", "--resume", "--out", str(run_dir), "--no-progress"]) == 2
    assert [it for it, _ in list_checkpoints(run_dir)] == [2, 4]
    monkeypatch.setattr(medssl.methods, "build_method", real_build)
    assert medssl_main(["pretrain", "--resume", "--out", str(run_dir), "--no-progress"]) == 0
    assert [it for it, _ in list_checkpoints(run_dir)][-1] == 6
    assert (run_dir / "backbone.safetensors").exists()
    # steps logged after the last checkpoint before each failure were dropped on resume: no duplicates
    logged = [e["iteration"] for e in _read_metrics(run_dir) if "loss" in e]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_swav_prototypes_freeze_for_one_epoch_and_queue_starts_at_its_epoch(shared_data, tmp_path, monkeypatch,
                                                                            caplog):
    """Acceptance 1: SwAV on 16 BUSI images, 4 epochs of 4 steps (batch 4), a checkpoint per epoch. The
    prototypes are bit-identical to the initial ones through epoch 1 (no gradient, so also no re-normalisation)
    and move after it; with ``epoch_queue_starts=2`` the queue is empty after epoch 2 and full after epoch 3."""
    import logging

    data = _busi_subset(shared_data, tmp_path / "busi16", {"benign": 6, "malignant": 6, "normal": 4})
    real_build = medssl.methods.build_method
    initial = {}

    def spy(name, backbone, **cfg):
        method = real_build(name, backbone, **cfg)
        initial["prototypes"] = method.prototypes.weight.detach().clone()
        return method

    monkeypatch.setattr(medssl.methods, "build_method", spy)
    options = {"projector_hidden_dim": 32, "projector_out_dim": 16, "num_prototypes": 10, "num_local_crops": 0,
               "epoch_queue_starts": 2}  # freeze_prototypes_epochs: default 1; queue_length: default
    config = _config(data, data, tmp_path / "run", "swav", batch_size=4, iterations=16, knn_every=0,
                     checkpoint_every_epochs=1, keep_checkpoints=4, method_options=options)
    with caplog.at_level(logging.INFO, logger="medssl.methods.swav"):
        run_dir = run_pretraining(config, progress=False)
    recorded = json.loads((run_dir / "config.json").read_text())["method_schedule"]
    # global batch 4 < 256: queue on by default, min(3840, one epoch = 16 images) = 16 embeddings
    assert (recorded["steps_per_epoch"], recorded["freeze_prototypes_steps"]) == (4, 4)
    assert (recorded["queue_length"], recorded["queue_start_step"]) == (16, 8)
    assert "SwAV queue: 16 embeddings" in caplog.text and "from step 9" in caplog.text
    ckpts = {it: load_checkpoint_file(path) for it, path in list_checkpoints(run_dir)}
    assert sorted(ckpts) == [4, 8, 12, 16]
    protos = {it: c["method"]["prototypes.weight"] for it, c in ckpts.items()}
    assert torch.equal(protos[4], initial["prototypes"])  # frozen through the first epoch
    for it in (8, 12, 16):
        assert (protos[it] - initial["prototypes"]).abs().max() > 1e-3, it  # trained after it
        torch.testing.assert_close(protos[it].norm(dim=1), torch.ones(10))  # and kept on the unit sphere
    extra = {it: c["method_extra"] for it, c in ckpts.items()}
    assert [extra[it]["steps_done"] for it in (4, 8, 12, 16)] == [4, 8, 12, 16]
    assert extra[4]["queue"] is None and extra[8]["queue"] is None  # not before epoch 3 (after 2 epochs)
    assert extra[12]["queue"] is not None and extra[12]["queue_filled"] == 16  # steps 9-12 filled it
    assert extra[12]["queue"].shape == (2, 16, 16) and extra[12]["queue"].abs().sum(dim=2).gt(0).all()
    filled = [e["queue_filled"] for e in _read_metrics(run_dir) if "loss" in e]
    assert filled == [0] * 8 + [4, 8, 12, 16] + [16] * 4  # the logged queue: batches of 4 from step 9
