"""Filter statistics, table and histogram (medssl.weights.stats), issue 2 build item 5 (paper Fig. 1)."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import build_backbone
from medssl.weights.stats import filter_statistics, format_stats_table, plot_filter_histogram


def _planted_resnet() -> nn.Module:
    """A narrow ResNet-50 where some filters are set to known norms (0, 0.05, 3) in each layer type."""
    torch.manual_seed(0)
    model = build_backbone("resnet50", widen_factor=0.125)
    with torch.no_grad():
        for name, idx, norm in (("conv1", [0, 1], 0.0), ("conv1", [2], 3.0), ("layer1.0.conv2", [4], 0.05),
                                ("layer2.0.downsample.0", [0, 9], 3.0), ("layer3.1.conv3", [1, 2, 3], 0.05)):
            w = model.get_submodule(name).weight
            for i in idx:
                w[i] = 0.0 if norm == 0 else w[i] / w[i].norm() * norm
    return model


def _naive_counts(model: nn.Module) -> dict[str, list[int]]:
    """[filters, norm > 1, norm < 0.1] per layer type, by a loop over every filter."""
    counts: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        kind = ("stem conv" if name == "conv1" else "downsample conv" if "downsample" in name
                else f"{m.kernel_size[0]}x{m.kernel_size[1]} conv")
        row = counts.setdefault(kind, [0, 0, 0])
        for o in range(m.out_channels):
            norm = math.sqrt(math.fsum(v * v for v in m.weight[o].detach().flatten().tolist()))
            row[0] += 1
            row[1] += norm > 1
            row[2] += norm < 0.1
    return counts


def test_filter_statistics_match_naive_counts_and_are_json() -> None:
    model = _planted_resnet()
    stats = json.loads(json.dumps(filter_statistics(model)))
    ref = _naive_counts(model)
    assert set(stats["by_type"]) == set(ref) == {"stem conv", "1x1 conv", "3x3 conv", "downsample conv"}
    for kind, (n, above, below) in ref.items():
        got = stats["by_type"][kind]
        assert (got["filters"], got["above"], got["below"]) == (n, above, below)
        assert got["share_above"] == pytest.approx(above / n) and got["share_below"] == pytest.approx(below / n)
    total = [sum(v[i] for v in ref.values()) for i in range(3)]
    assert [stats["overall"][k] for k in ("filters", "above", "below")] == total
    assert stats["by_type"]["stem conv"]["below"] == 2 and stats["overall"]["below"] == 6
    row = next(r for r in stats["layers"] if r["name"] == "layer2.0.downsample.0")
    assert row["type"] == "downsample conv" and row["max_norm"] == pytest.approx(3.0, rel=1e-6)
    w = model.get_submodule("layer2.0.downsample.0").weight.detach().double()
    assert row["frobenius_norm"] == pytest.approx(float(w.square().sum().sqrt()), rel=1e-9)


def test_bit_stem_is_stem_and_head_is_excluded() -> None:
    model = build_backbone("resnetv2_50x1", widen_factor=0.125, num_classes=5)
    stats = filter_statistics(model)
    names = [r["name"] for r in stats["layers"]]
    assert names[0] == "stem.conv" and stats["layers"][0]["type"] == "stem conv"
    assert "head.fc" not in names and len(names) == 53
    assert all(r["weight_standardized"] for r in stats["layers"])


def test_format_stats_table_is_aligned_and_shows_counts() -> None:
    stats = filter_statistics(_planted_resnet())
    text = format_stats_table(stats, layers=True)
    summary, layers = text.rstrip("\n").split("\n\n")
    lines = summary.splitlines()
    assert len(lines) == 2 + len(stats["by_type"]) + 1
    assert len({len(line) for line in lines}) == 1  # every row right-aligned to the same width
    overall = lines[-1].split()
    assert overall[:2] == ["overall", str(stats["overall"]["filters"])] and overall[4] == "6"
    assert len(layers.splitlines()) == 2 + len(stats["layers"])


def test_plot_filter_histogram_writes_png(tmp_path) -> None:
    out = tmp_path / "plots" / "filters.png"
    plot_filter_histogram(_planted_resnet(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in out.parent.iterdir()] == ["filters.png"]  # no temporary file left
    with pytest.raises(MedsslError):
        plot_filter_histogram(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.png")
