"""prepare_backbone (medssl.weights.prepare): order of the steps, their combined effect, option checking."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import build_backbone
from medssl.weights.norm import recalibrate_bn
from medssl.weights.prepare import prepare_backbone


def _bit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnetv2_50x1", widen_factor=0.125, small_stem=True).eval()


def test_prepare_runs_steps_in_order() -> None:
    records = prepare_backbone(_bit(), norm="bn", fold_ws=True, scale_frobenius=True, dead_filters="copy")
    json.dumps(records)
    assert [r["operation"] for r in records] == ["gn_to_bn", "fold_weight_standardization", "dead_filter_repair",
                                                 "frobenius_scaling"]
    assert records[0]["count"] == 16 * 3 + 1 and records[1]["count"] == 53
    assert records[2]["count"] == 0 and records[3]["count"] > 0


def test_prepared_bit_scaling_keeps_the_function() -> None:
    # BiT converted to BN and folded, with BN statistics measured on data (the state before a second stage)
    gen = torch.Generator().manual_seed(1)
    reference = _bit()
    prepare_backbone(reference, norm="bn", fold_ws=True)
    recalibrate_bn(reference, [torch.rand(8, 3, 32, 32, generator=gen) for _ in range(2)], num_batches=2)
    model = copy.deepcopy(reference)
    records = prepare_backbone(model, scale_frobenius=True, dead_filters="copy")
    assert [r["operation"] for r in records] == ["dead_filter_repair", "frobenius_scaling"]
    assert records[1]["count"] == 32  # conv1 -> norm2 and conv2 -> norm3 of the 16 units
    x = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref, out = reference(x), model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    for row in records[1]["layers"]:  # the paper's rule leaves each scaled layer at norm sqrt(s)
        weight = model.get_submodule(row["conv"]).weight.detach().double()
        assert row["frobenius_norm"] > 1 and records[1]["rule"] == "paper"
        assert float(weight.square().sum().sqrt()) == pytest.approx(row["frobenius_norm"] ** 0.5, rel=1e-6)


def test_prepare_repairs_before_scaling_and_is_seeded() -> None:
    model = _bit()
    with torch.no_grad():
        model.get_submodule("stages.1.blocks.1.conv1").weight[[0, 5]] = 0.0
    twin = copy.deepcopy(model)
    records = prepare_backbone(model, norm="bn", fold_ws=True, scale_frobenius=True, dead_filters="copy", seed=7)
    prepare_backbone(twin, norm="bn", fold_ws=True, scale_frobenius=True, dead_filters="copy", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    repair = records[2]
    assert repair["seed"] == 7 and repair["layers"][0]["conv"] == "stages.1.blocks.1.conv1"
    weight = model.get_submodule("stages.1.blocks.1.conv1").weight
    for dead, src in zip(repair["layers"][0]["filters"], repair["layers"][0]["sources"]):
        assert torch.equal(weight[dead], weight[src]) and float(weight[dead].detach().norm()) > 0


@pytest.mark.parametrize("options", [
    {"norm": "gn"}, {"dead_filters": "zero"}, {"fold_ws": "yes"}, {"scale_frobenius": 1}, {"seed": 1.5},
])
def test_prepare_rejects_bad_options(options: dict) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MedsslError):
        prepare_backbone(model, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
