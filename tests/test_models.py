"""Backbones and heads: parameter layouts, interface, and equivalence with independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet50 as monai_resnet50

from medssl.models import InputNormalization, MLPHead, Prototypes, build_backbone
from medssl.models.resnetv2 import StdConv2d


def test_resnet50_matches_torchvision_layout_and_monai_reference():
    model = build_backbone("resnet50", num_classes=1000).eval()
    sd = model.state_dict()
    assert len(sd) == 320
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias",
                "layer3.5.conv2.weight", "fc.weight", "fc.bias"):
        assert key in sd
    ref = monai_resnet50(spatial_dims=2, n_input_channels=3, shortcut_type="B", bias_downsample=False,
                         conv1_t_stride=2, num_classes=1000).eval()
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features) == (2, 2048)


@pytest.mark.parametrize("arch,feat", [("resnet18", 64), ("resnet34", 64), ("resnet50", 256)])
def test_small_stem_and_rebuild(arch, feat):
    model = build_backbone(arch, widen_factor=0.125, small_stem=True).eval()
    assert model.num_features == feat
    assert model.conv1.weight.shape[-1] == 3 and model.conv1.stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    clone = build_backbone(model.arch, **model.arch_kwargs).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, feat)
        assert torch.equal(out, clone(x))


def _naive_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o].double()
        mu = f.mean()
        var = ((f - mu) ** 2).mean()
        out[o] = ((f - mu) / torch.sqrt(var + eps)).float()
    return out


def test_stdconv_standardises_each_filter():
    conv = StdConv2d(4, 6, 3, padding=1, bias=False, eps=1e-10)
    x = torch.randn(1, 4, 8, 8)
    expected = F.conv2d(x, _naive_ws(conv.weight.detach(), 1e-10), padding=1)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_resnetv2_unit_matches_functional_reference():
    torch.manual_seed(0)
    model = build_backbone("resnetv2_50x1", widen_factor=0.125).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)

    def conv(t, key, stride=1, pad=0):
        return F.conv2d(t, _naive_ws(sd[key], 1e-10), stride=stride, padding=pad)

    def gn(t, key):
        c = t.shape[1]
        return F.group_norm(t, 32 if c % 32 == 0 else c if c < 32 else 32, sd[f"{key}.weight"], sd[f"{key}.bias"], 1e-5)

    h = conv(x, "stem.conv.weight", 2, 3)
    h = F.max_pool2d(F.pad(h, (1, 1, 1, 1)), 3, 2)
    for s, units in enumerate([3, 4, 6, 3]):
        for j in range(units):
            p = f"stages.{s}.blocks.{j}"
            stride = 2 if (j == 0 and s > 0) else 1
            pre = F.relu(gn(h, f"{p}.norm1"))
            short = conv(pre, f"{p}.downsample.conv.weight", stride) if j == 0 else h
            o = conv(pre, f"{p}.conv1.weight")
            o = conv(F.relu(gn(o, f"{p}.norm2")), f"{p}.conv2.weight", stride, 1)
            o = conv(F.relu(gn(o, f"{p}.norm3")), f"{p}.conv3.weight")
            h = o + short
    ref = F.relu(gn(h, "norm")).mean(dim=(2, 3))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref, atol=1e-5, rtol=1e-4)


def test_resnetv2_names_and_widths():
    model = build_backbone("resnetv2_50x1")
    sd = model.state_dict()
    assert sd["stem.conv.weight"].shape == (64, 3, 7, 7)
    assert sd["stages.0.blocks.0.downsample.conv.weight"].shape == (256, 64, 1, 1)
    assert sd["stages.3.blocks.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert "stages.1.blocks.1.downsample.conv.weight" not in sd
    assert model.num_features == 2048
    wide = build_backbone("resnetv2_50x3", widen_factor=0.125)
    assert wide.num_features == 2048 * 3 // 8
    assert len(build_backbone("resnetv2_101x1", widen_factor=0.125).stages[2].blocks) == 23
    bn = build_backbone("resnetv2_50x1", norm="bn", widen_factor=0.125)
    assert isinstance(bn.norm, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("vit_b16")


def test_mlp_head_layout_roundtrip_and_prototypes():
    head = MLPHead(32, 16, 8, num_layers=3, hidden_bias=False, last_bn=True, last_bn_affine=False)
    keys = list(head.state_dict())
    assert keys[0] == "0.weight" and "3.weight" in keys and "6.bias" in keys and "7.running_mean" in keys
    assert "7.weight" not in keys and "0.bias" not in keys
    clone = MLPHead.from_state_dict(head.state_dict())
    assert clone.config == head.config
    protos = Prototypes(8, 5)
    protos.normalize_()
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(5))
    z = torch.randn(3, 8)
    torch.testing.assert_close(protos(z), z @ protos.weight.T)


def test_input_normalization():
    norm = InputNormalization.from_spec({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), x * 2 - 1)


def test_resnetv2_plain_conv_option_matches_prestandardised_weights():
    """``standardize=False`` (a WS-folded BiT) with pre-standardised weights equals the StdConv network."""
    torch.manual_seed(1)
    ws = build_backbone("resnetv2_50x1", widen_factor=0.125, small_stem=True).eval()
    plain = build_backbone("resnetv2_50x1", widen_factor=0.125, small_stem=True, standardize=False).eval()
    assert plain.arch_kwargs["standardize"] is False
    state = ws.state_dict()
    for name, module in ws.named_modules():
        if isinstance(module, StdConv2d):
            state[f"{name}.weight"] = _naive_ws(module.weight.detach(), module.eps)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ws(x)
        torch.testing.assert_close(plain(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
