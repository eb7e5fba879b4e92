"""Frobenius scaling and dead-filter repair (medssl.weights.surgery), issue 2 acceptance 4."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import build_backbone
from medssl.weights.surgery import (
    _pairs_by_name,
    _pairs_by_tracing,
    find_conv_norm_pairs,
    find_dead_filters,
    repair_dead_filters,
    scale_frobenius,
)


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def _inflated_resnet(arch: str = "resnet18", calibrate_on: torch.Tensor | None = None) -> nn.Module:
    """A narrow ResNet whose conv layers have Frobenius norms well above 1 (weights scaled up 2-12x), random BN
    affine parameters and running statistics measured on data (as a pretrained network has them)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_backbone(arch, widen_factor=0.125, small_stem=True)
    _randomise_bn(model, gen)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.Conv2d)):
            m.weight.mul_(2.0 + (i % 6) * 2.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        data = calibrate_on if calibrate_on is not None else torch.rand(8, 3, 32, 32, generator=gen)
        model.train()(data)
    return model.eval()


def _conv_norm(conv: nn.Conv2d) -> float:
    return float(conv.weight.detach().double().square().sum().sqrt())


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_unit_norm_rule_keeps_eval_output_and_bounds_norms() -> None:
    model = _inflated_resnet("resnet50")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    before_norms = {n: _conv_norm(c) for n, c in convs.items()}
    assert sum(v > 1 for v in before_norms.values()) == len(convs)  # every layer needs scaling
    before = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
        report = scale_frobenius(model, rule="unit_norm")
        out = model(x)
    assert _max_rel_err(out, ref) <= 1e-4
    assert report["count"] == len(convs) and not report["unpaired"]
    for row in report["layers"]:
        conv = model.get_submodule(row["conv"])
        assert _conv_norm(conv) <= 1.0 + 1e-6
        assert row["frobenius_norm"] == pytest.approx(before_norms[row["conv"]], rel=1e-9)
    # closed form for one pair: weight / s, running_mean / s, running_var / s^2, gamma eps-compensated
    s = before_norms["layer1.0.conv1"]
    old_bn, new_bn = before.get_submodule("layer1.0.bn1"), model.get_submodule("layer1.0.bn1")
    torch.testing.assert_close(model.get_submodule("layer1.0.conv1").weight,
                               before.get_submodule("layer1.0.conv1").weight / s)
    torch.testing.assert_close(new_bn.running_mean, old_bn.running_mean / s)
    torch.testing.assert_close(new_bn.running_var, old_bn.running_var / s**2)
    eps, var = old_bn.eps, old_bn.running_var.double()
    gamma = old_bn.weight.double() * torch.sqrt(var + s**2 * eps) / torch.sqrt(var + eps)
    torch.testing.assert_close(new_bn.weight, gamma.float())


def test_unit_norm_rule_keeps_train_mode_output_but_paper_rule_does_not() -> None:
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _inflated_resnet("resnet18", calibrate_on=x)  # running stats ~ the batch statistics of x
    paper = copy.deepcopy(model)
    with torch.no_grad():
        ref_eval = model(x)
        ref_train = copy.deepcopy(model).train()(x)
        scale_frobenius(model, rule="unit_norm")
        report = scale_frobenius(paper)  # default rule: the paper's
        assert _max_rel_err(paper(x), ref_eval) <= 1e-4  # the literal rule also preserves eval mode
        assert _max_rel_err(copy.deepcopy(model).train()(x), ref_train) <= 1e-3
        assert _max_rel_err(copy.deepcopy(paper).train()(x), ref_train) > 1e-2
    for row in report["layers"]:  # ... but leaves the layer at norm sqrt(s) > 1
        assert _conv_norm(paper.get_submodule(row["conv"])) == pytest.approx(math.sqrt(row["frobenius_norm"]), rel=1e-5)


def test_paper_rule_equals_closed_form_and_keeps_eval_output() -> None:
    """Ciga et al.: W / sqrt(s), running_mean / sqrt(s), running_var / s^2, gamma / sqrt(s) (times the eps
    factor sqrt((var + s^2 eps) / (var + eps)) that keeps the eval output exact), for every conv+BN pair."""
    model = _inflated_resnet("resnet18")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    before = copy.deepcopy(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        ref = model(x)
        report = scale_frobenius(model)
        out = model(x)
    assert report["rule"] == "paper" and report["count"] == len(convs) == 20
    assert _max_rel_err(out, ref) <= 1e-4
    for row in report["layers"]:
        old_conv, new_conv = before.get_submodule(row["conv"]), model.get_submodule(row["conv"])
        old_bn, new_bn = before.get_submodule(row["norm"]), model.get_submodule(row["norm"])
        s = math.sqrt(math.fsum(v * v for v in old_conv.weight.detach().double().flatten().tolist()))
        assert s > 1 and row["frobenius_norm"] == pytest.approx(s, rel=1e-12)
        var = old_bn.running_var.double()
        eps_factor = torch.sqrt((var + s**2 * old_bn.eps) / (var + old_bn.eps))
        torch.testing.assert_close(new_conv.weight.double(), old_conv.weight.double() / math.sqrt(s))
        torch.testing.assert_close(new_bn.running_mean.double(), old_bn.running_mean.double() / math.sqrt(s))
        torch.testing.assert_close(new_bn.running_var.double(), var / s**2)
        torch.testing.assert_close(new_bn.weight.double(), old_bn.weight.double() / math.sqrt(s) * eps_factor)
        assert torch.equal(new_bn.bias, old_bn.bias)


def test_paper_rule_literal_gamma_multiplies_bn_eps_by_s_squared() -> None:
    """compensate_eps=False: gamma is exactly gamma / sqrt(s), and the network computes the original one with
    each scaled BatchNorm's eps multiplied by s^2 (the documented eps effect)."""
    model = _inflated_resnet("resnet18")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        report = scale_frobenius(model, compensate_eps=False)
        for row in report["layers"]:
            old_bn, new_bn = reference.get_submodule(row["norm"]), model.get_submodule(row["norm"])
            s = row["frobenius_norm"]
            torch.testing.assert_close(new_bn.weight.double(), old_bn.weight.double() / math.sqrt(s))
            old_bn.eps = old_bn.eps * s**2
        assert _max_rel_err(model(x), reference(x)) <= 1e-4


def test_scaling_a_groupnorm_network_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8))
    with torch.no_grad():
        model[0].weight.mul_(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MedsslError, match="--norm bn") as info:
        scale_frobenius(model)
    assert "\n" not in str(info.value) and "GroupNorm" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MedsslError, match="none"):
        scale_frobenius(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_pairing_by_tracing_and_by_name_agree_on_torchvision_names() -> None:
    model = build_backbone("resnet50", widen_factor=0.125)
    traced, named = _pairs_by_tracing(model), _pairs_by_name(model)
    assert traced == named
    assert traced["conv1"] == "bn1" and traced["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(traced) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_resnetv2_preactivation_pairs_and_standardised_convs_are_refused() -> None:
    model = build_backbone("resnetv2_50x1", widen_factor=0.125, norm="bn", small_stem=True).eval()
    pairs = find_conv_norm_pairs(model)
    assert pairs["stages.0.blocks.0.conv1"] == "stages.0.blocks.0.norm2"
    assert pairs["stages.0.blocks.0.conv2"] == "stages.0.blocks.0.norm3"
    assert "stages.0.blocks.0.conv3" not in pairs and "stem.conv" not in pairs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # scaling a standardised conv would not shrink its output while the BN statistics shrink: refused
    with pytest.raises(MedsslError, match="--fold-ws") as info:
        scale_frobenius(model)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _resnet_with_dead_filters() -> tuple[nn.Module, dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(3)
    model = build_backbone("resnet18", widen_factor=0.125, small_stem=True)
    _randomise_bn(model, gen)
    planted = {"conv1": [1, 5], "layer1.0.conv2": [0], "layer3.1.conv1": [2, 3, 30], "layer4.0.downsample.0": [7]}
    with torch.no_grad():
        for name, idx in planted.items():
            w = model.get_submodule(name).weight
            for i in idx:
                w[i] = w[i] / w[i].norm() * (0.05 if i % 2 else 0.0)
    return model.eval(), planted


def _naive_dead(model: nn.Module, threshold: float) -> dict[str, list[int]]:
    dead = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            idx = [o for o in range(m.out_channels)
                   if math.sqrt(math.fsum(v * v for v in m.weight[o].detach().flatten().tolist())) < threshold]
            if idx:
                dead[name] = idx
    return dead


def test_find_dead_filters_matches_naive_loop() -> None:
    model, planted = _resnet_with_dead_filters()
    assert find_dead_filters(model) == _naive_dead(model, 0.1) == planted


def test_copy_repair_copies_live_filters_and_their_bn_channels() -> None:
    model, planted = _resnet_with_dead_filters()
    before = copy.deepcopy(model)
    report = repair_dead_filters(model, generator=torch.Generator().manual_seed(0))
    assert report["count"] == sum(map(len, planted.values()))
    assert _naive_dead(model, 0.1) == {}
    pairs = find_conv_norm_pairs(before)
    for row in report["layers"]:
        old_w = before.get_submodule(row["conv"]).weight
        new_w = model.get_submodule(row["conv"]).weight
        live = [o for o in range(old_w.shape[0]) if o not in planted[row["conv"]]]
        for d, src in zip(row["filters"], row["sources"]):
            assert src in live and torch.equal(new_w[d], old_w[src])
            assert any(torch.equal(new_w[d], old_w[o]) for o in live)
            old_bn, new_bn = before.get_submodule(pairs[row["conv"]]), model.get_submodule(row["norm"])
            for key in ("weight", "bias", "running_mean", "running_var"):
                assert getattr(new_bn, key)[d] == getattr(old_bn, key)[src]
        untouched = [o for o in range(old_w.shape[0]) if o not in row["filters"]]
        assert torch.equal(new_w[untouched], old_w[untouched])
    # the copied channel reproduces its source channel after the BatchNorm
    row = next(r for r in report["layers"] if r["conv"] == "conv1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        act = model.bn1(model.conv1(x))
    for d, src in zip(row["filters"], row["sources"]):
        assert torch.equal(act[:, d], act[:, src])


def test_random_repair_is_seeded_and_resets_bn_channels() -> None:
    model, planted = _resnet_with_dead_filters()
    twin = copy.deepcopy(model)
    report = repair_dead_filters(model, mode="random", generator=torch.Generator().manual_seed(5))
    repair_dead_filters(twin, mode="random", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert _naive_dead(model, 0.1) == {}
    for row in report["layers"]:
        bn = model.get_submodule(row["norm"])
        for d in row["filters"]:
            assert (bn.weight[d], bn.bias[d], bn.running_mean[d], bn.running_var[d]) == (1, 0, 0, 1)
        assert row["sources"] == [None] * len(row["filters"])


def test_all_dead_layer_falls_back_to_random_and_bad_options_raise() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[0].weight.zero_()
    report = repair_dead_filters(model, generator=torch.Generator().manual_seed(0))
    assert report["layers"][0]["fallback"] == "random" and report["layers"][0]["norm"] == "1"
    assert find_dead_filters(model) == {}
    with pytest.raises(MedsslError):
        repair_dead_filters(model, mode="zeros")
    with pytest.raises(MedsslError):
        scale_frobenius(model, rule="literal")
    with pytest.raises(MedsslError):
        scale_frobenius(model, threshold=0)


def test_copy_repair_copies_groupnorm_affine_of_the_source_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].bias.copy_(torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    report = repair_dead_filters(model, generator=torch.Generator().manual_seed(0))
    (src,) = report["layers"][0]["sources"]
    assert report["layers"][0]["norm"] == "1" and src != 2
    assert torch.equal(model[0].weight[2], model[0].weight[src]) and model[0].bias[2] == model[0].bias[src]
    assert model[1].weight[2] == src + 1 and model[1].bias[2] == -(src + 1)
