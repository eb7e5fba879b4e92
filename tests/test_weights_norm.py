"""Norm conversion (medssl.weights.norm): GN -> BN, WS folding, BN recalibration, SyncBN (issue 2, acceptance 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import StdConv2d, build_backbone
from medssl.weights.norm import (
    convert_gn_to_bn,
    convert_to_sync_bn,
    fold_weight_standardization,
    recalibrate_bn,
)


def _bit(**kwargs) -> nn.Module:
    """A narrow BiT R50x1 (StdConv + GroupNorm) with non-trivial GroupNorm affine parameters."""
    torch.manual_seed(0)
    model = build_backbone("resnetv2_50x1", widen_factor=0.125, small_stem=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_channels, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_channels, generator=gen))
    return model.eval()


def test_gn_to_bn_keeps_conv_weights_bit_identical_and_default_inits_bn() -> None:
    model = _bit()
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    convs_before = {f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in conv_names}
    gn_names = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    report = convert_gn_to_bn(model)
    assert report["count"] == len(gn_names) > 0 and report["layers"] == gn_names
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    state = model.state_dict()
    assert len(convs_before) == 53 and all(torch.equal(state[k], v) for k, v in convs_before.items())
    for name in gn_names:
        bn = model.get_submodule(name)
        assert type(bn) is nn.BatchNorm2d and bn.eps == 1e-5
        for tensor, value in ((bn.weight, 1), (bn.bias, 0), (bn.running_mean, 0), (bn.running_var, 1)):
            assert torch.equal(tensor, torch.full_like(tensor, value))
    # the recorded build options now rebuild the converted layout, with a strict load
    assert model.arch_kwargs["norm"] == "bn"
    build_backbone(model.arch, **model.arch_kwargs).load_state_dict(state, strict=True)


def test_gn_to_bn_copy_affine_copies_gamma_beta() -> None:
    model = _bit()
    gns = {n: (m.weight.clone(), m.bias.clone()) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    convert_gn_to_bn(model, copy_affine=True)
    for name, (gamma, beta) in gns.items():
        bn = model.get_submodule(name)
        assert torch.equal(bn.weight, gamma) and torch.equal(bn.bias, beta)


def _naive_standardize(w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(w, dtype=np.float64)
    for o in range(w.shape[0]):
        vals = w[o].ravel().tolist()
        mean = math.fsum(vals) / len(vals)
        var = math.fsum((v - mean) ** 2 for v in vals) / len(vals)
        out[o] = (w[o].astype(np.float64) - mean) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("ws_eps", [1e-10, 1e-8])
def test_fold_weight_standardization_is_exact(ws_eps: float) -> None:
    model = _bit(ws_eps=ws_eps)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    raw = {n: m.weight.detach().numpy().copy() for n, m in model.named_modules() if isinstance(m, StdConv2d)}
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        report = fold_weight_standardization(model)
        out = model(x)
    assert report["count"] == len(raw)
    assert not any(isinstance(m, StdConv2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for name in ("stem.conv", "stages.1.blocks.0.downsample.conv", "stages.3.blocks.2.conv2"):
        conv = model.get_submodule(name)
        assert type(conv) is nn.Conv2d
        np.testing.assert_allclose(conv.weight.detach().numpy(), _naive_standardize(raw[name], ws_eps),
                                   rtol=1e-6, atol=1e-6)


class _Small(nn.Module):
    """conv -> BN -> ReLU -> Dropout -> conv -> BN, to check recalibration against closed-form statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5, momentum=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.drop(torch.relu(self.bn1(self.conv1(x))))))


def _naive_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, unbiased and biased variance over (N, H, W), written out."""
    vals = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    n = vals.shape[1]
    mean = vals.sum(1) / n
    ss = ((vals - mean[:, None]) ** 2).sum(1)
    return mean, ss / (n - 1), ss / n


def test_recalibrate_bn_gives_pooled_naive_statistics_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = _Small()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    model.train()
    model.bn2.eval()
    gen = torch.Generator().manual_seed(3)
    # batches of different sizes and scales: pooled statistics differ from averaged per-batch ones
    batches = [torch.rand(3 + i, 3, 8, 8, generator=gen) * (1 + i) for i in range(5)]
    report = recalibrate_bn(model, iter(batches), num_batches=3)
    assert report["num_batches"] == 3 and report["num_samples"] == 12 and report["count"] == 2
    # reference: the same network written out, each BN normalising with its batch statistics, dropout off;
    # the inputs of each BN collected over all calibration images, then mean / unbiased variance
    inputs1, inputs2 = [], []
    with torch.no_grad():
        for x in batches[:3]:
            a = model.conv1(x)
            mean, _, biased = _naive_stats(a)
            g, b = model.bn1.weight.double(), model.bn1.bias.double()
            h = torch.relu((a.double() - mean[:, None, None]) / torch.sqrt(biased[:, None, None] + 1e-5)
                           * g[:, None, None] + b[:, None, None])
            inputs1.append(a)
            inputs2.append(model.conv2(h.float()))
    averaged_var = []
    for bn, inputs in ((model.bn1, inputs1), (model.bn2, inputs2)):
        values = np.concatenate([t.double().numpy().transpose(1, 0, 2, 3).reshape(t.shape[1], -1)
                                 for t in inputs], axis=1)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), values.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), values.var(axis=1, ddof=1),
                                   rtol=1e-5, atol=1e-6)
        averaged_var.append(sum(_naive_stats(t)[1] for t in inputs) / 3)
        assert int(bn.num_batches_tracked) == 3
    # torch's cumulative average of per-batch variances (update_bn) underestimates the pooled variance here
    assert float((model.bn1.running_var.double() - averaged_var[0]).min()) > 1e-3
    assert model.training and model.conv1.training and model.drop.training and model.bn1.training
    assert not model.bn2.training
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.3


def test_recalibrate_bn_rejects_bad_input() -> None:
    with pytest.raises(MedsslError):
        recalibrate_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), [torch.rand(2, 3, 4, 4)], 1)
    with pytest.raises(MedsslError):
        recalibrate_bn(_Small(), [torch.rand(2, 3, 4, 4)], 0)
    with pytest.raises(MedsslError):
        recalibrate_bn(_Small(), [], 2)
    with pytest.raises(MedsslError):
        recalibrate_bn(_Small(), ["not a tensor"], 2)


def test_convert_to_sync_bn_keeps_statistics() -> None:
    model = build_backbone("resnet18", widen_factor=0.125)
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_sync_bn(model)
    assert converted.num_features == model.num_features and converted.arch == "resnet18"
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())
