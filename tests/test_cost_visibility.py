"""Cost made visible (issue "medssl study", build 3): images/s and ETA log lines without a progress bar,
wall-clock timestamps in metrics.jsonl, SSL head widths that fit the backbone unless the paper's are asked for
(the bundles ask), loader workers from the cores available."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl.engines.config import PretrainConfig, default_workers
from medssl.engines.handlers import Throughput, format_duration
from medssl.engines.run import run_pretraining
from medssl.evaluation.run import EvalConfig
from medssl.methods import build_method
from medssl.methods.base import head_width
from medssl.models import build_backbone
from tests.conftest import write_image_folder

BUNDLES = Path(__file__).resolve().parents[1] / "medssl" / "bundles"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_lines_every_n_steps_or_30_seconds_with_rate_and_eta():
    clock = FakeClock()
    meter = Throughput("pretraining", 100, every_steps=10, every_seconds=30.0, clock=clock)
    lines = {}
    for step in range(1, 101):
        clock.now += 2.0 if step <= 20 else 40.0 if step == 25 else 0.5  # slow start, one 40-s stall
        line = meter.update(step, 16)
        if line is not None:
            lines[step] = line
    # every 10 steps, plus step 25 (30 s passed since the line at step 20), and the last step
    assert sorted(lines) == [10, 20, 25, 35, 45, 55, 65, 75, 85, 95, 100]
    # step 10: 160 images in 20 s; ETA = 90 remaining steps x 2 s
    assert lines[10] == f"pretraining step 10/100: 8.0 images/s, ETA {format_duration(180)}"
    # step 25: 5 steps (80 images) in 2 + 40 s since step 20; mean 82.0 s / 25 steps so far
    assert "1.9 images/s" in lines[25] and f"ETA {format_duration(75 * 82.0 / 25)}" in lines[25]
    assert lines[100].endswith("ETA 0:00:00")
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"


def test_pretraining_logs_images_per_second_eta_and_timestamps_without_progress_bar(tmp_path, caplog):
    data = write_image_folder(tmp_path / "images", height=36, width=36, seed=0)
    config = PretrainConfig(data=str(data), out=str(tmp_path / "run"), method="simclr", arch="resnet18",
                            small_stem=True, widen_factor=0.125, image_size=32, batch_size=8, iterations=4,
                            knn_every=0, workers=0, checkpoint_every=0, checkpoint_every_epochs=0,
                            method_options={"projector_hidden_dim": 16, "projector_out_dim": 8})
    before = dt.datetime.now(dt.timezone.utc)
    with caplog.at_level(logging.INFO, logger="medssl.engines.handlers"):
        run_pretraining(config, progress=False)
    after = dt.datetime.now(dt.timezone.utc)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert lines and lines[-1].startswith("pretraining step 4/4: ") and "ETA 0:00:00" in lines[-1]
    assert ", loss " in lines[-1]
    stamps = [dt.datetime.fromisoformat(json.loads(x)["time"])
              for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(stamps) == 4 and all(s.utcoffset() == dt.timedelta(0) for s in stamps)
    assert before - dt.timedelta(seconds=1) <= stamps[0] <= stamps[-1] <= after + dt.timedelta(seconds=1)
    assert stamps == sorted(stamps)


class Features(nn.Module):
    """A stand-in backbone of a given feature width (the heads only read ``num_features``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = width
        self.lin = nn.Linear(3, width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean((2, 3)))


def _widths(head: nn.Module) -> list[int]:
    return [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]


def test_head_widths_scale_with_the_backbone_unless_the_paper_heads_are_asked_for():
    tiny = build_backbone("resnet18", small_stem=True, widen_factor=0.25)  # 128 features
    assert tiny.num_features == 128
    simsiam = build_method("simsiam", tiny)
    assert _widths(simsiam.projector) == [128, 128, 128] and _widths(simsiam.predictor) == [64, 128]
    byol = build_method("byol", tiny)
    assert _widths(byol.projector) == [256, 256] and _widths(byol.predictor) == [256, 256]
    assert _widths(build_method("simclr", tiny).projector) == [128, 128]
    assert _widths(build_method("swav", tiny, num_prototypes=10).projector) == [128, 128]
    paper = build_method("simsiam", tiny, paper_heads=True)
    assert _widths(paper.projector) == [2048, 2048, 2048] and _widths(paper.predictor) == [512, 2048]
    assert _widths(build_method("byol", tiny, paper_heads=True).projector) == [4096, 256]
    # a width asked for is kept; a ResNet-50-wide backbone (2048 features) gets the paper's heads anyway
    assert _widths(build_method("simclr", tiny, projector_hidden_dim=300).projector) == [300, 128]
    assert _widths(build_method("byol", Features(2048)).projector) == [4096, 256]
    assert _widths(build_method("simsiam", Features(512)).predictor) == [128, 512]  # ResNet-18: a quarter
    for width in (1, 64, 128, 512, 1024, 2048, 4096):  # the documented rule, computed naively
        assert head_width(2048, 2048, width) == min(2048, max(64, round(2048 * width / 2048)))


@pytest.mark.parametrize("modality", ["dermatoscopy", "histology", "xray", "mri", "ultrasound"])
def test_bundles_reproducing_the_papers_ask_for_the_paper_heads(modality):
    from monai.bundle import ConfigParser

    for method in ("simclr", "swav", "byol", "simsiam"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / modality / "configs" / "train.yaml"))
        parser.update({"bundle_root": str(BUNDLES / modality), "method": method})
        parser.parse()
        assert parser.get_parsed_content("method_options")["paper_heads"] is True, (modality, method)


def test_loader_workers_default_to_the_cores_available(monkeypatch):
    for cores, expected in ((1, 0), (2, 1), (4, 3), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == expected
        assert PretrainConfig().workers == expected
        assert EvalConfig().resolved()["num_workers"] == expected
    assert PretrainConfig(workers=0).workers == 0 and EvalConfig(num_workers=2).resolved()["num_workers"] == 2
