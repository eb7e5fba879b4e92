"""ResNetV2 as in BiT (Kolesnikov et al.): pre-activation bottlenecks, weight-standardised convs, GroupNorm.

Parameter names follow timm's ``resnetv2_50x1_bit``: ``stem.conv``, ``stages.{s}.blocks.{j}.{norm1, conv1,
norm2, conv2, norm3, conv3}``, ``stages.{s}.blocks.0.downsample.conv``, final ``norm`` and ``head.fc`` (a 1x1
conv). Unit (BiT, Kolesnikov et al., *Big Transfer*): ``out = relu(norm1(x))``; shortcut = ``downsample(out)`` on the first unit of a
stage, else ``x``; conv1 (1x1) -> relu(norm2) -> conv2 (3x3, carries the stride) -> relu(norm3) -> conv3 (1x1);
add the shortcut, no ReLU after. Root: StdConv 7x7/2 pad 3, ConstantPad(1) + MaxPool(3, stride 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: units per stage for each depth
RESNETV2_DEPTHS: dict[int, list[int]] = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: each output filter is standardised over (in, kh, kw).

    ``w_hat = (w - mean) / sqrt(var + eps)`` with the biased variance. BiT uses ``eps = 1e-10``, timm 1e-8.
    ``standardize = False`` turns it into a plain convolution (used after folding).
    """

    def __init__(self, *args: Any, eps: float = 1e-10, standardize: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.standardize = standardize

    def standardized_weight(self) -> torch.Tensor:
        """The weight actually convolved: standardised when ``standardize`` is True."""
        w = self.weight
        if not self.standardize:
            return w
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def std_conv(*args: Any, eps: float, standardize: bool, **kwargs: Any) -> StdConv2d:
    """A :class:`StdConv2d`, standardising or (after WS folding) plain."""
    return StdConv2d(*args, eps=eps, standardize=standardize, **kwargs)


def gn_groups(channels: int, groups: int = 32) -> int:
    """GroupNorm group count: 32 (BiT), or gcd(channels, 32) for narrow test networks."""
    return math.gcd(channels, groups)


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"gn"``: GroupNorm(32 groups, eps 1e-5) as in BiT; ``"bn"``: BatchNorm2d with default init."""
    if kind == "gn":
        return nn.GroupNorm(gn_groups(channels), channels, eps=1e-5)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'gn' or 'bn', not {kind!r}")


class Downsample(nn.Module):
    """Projection shortcut of the first unit of a stage: a strided 1x1 StdConv (no norm: pre-activation)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, eps: float, ws: bool = True) -> None:
        super().__init__()
        self.conv = std_conv(in_ch, out_ch, 1, stride=stride, bias=False, eps=eps, standardize=ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PreActBottleneck(nn.Module):
    """BiT unit: pre-activation bottleneck with mid width ``out_ch // 4`` and stride on the 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, eps: float, ws: bool = True) -> None:
        super().__init__()
        mid = out_ch // 4
        self.downsample = Downsample(in_ch, out_ch, stride, eps, ws) if (stride != 1 or in_ch != out_ch) else None
        self.norm1 = make_norm(norm, in_ch)
        self.conv1 = std_conv(in_ch, mid, 1, bias=False, eps=eps, standardize=ws)
        self.norm2 = make_norm(norm, mid)
        self.conv2 = std_conv(mid, mid, 3, stride=stride, padding=1, bias=False, eps=eps, standardize=ws)
        self.norm3 = make_norm(norm, mid)
        self.conv3 = std_conv(mid, out_ch, 1, bias=False, eps=eps, standardize=ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x))
        shortcut = self.downsample(pre) if self.downsample is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return out + shortcut


class Stage(nn.Module):
    """A stage: ``blocks`` is an nn.Sequential of units (timm's ``stages.{s}.blocks.{j}`` naming)."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, norm: str, eps: float,
                 ws: bool = True) -> None:
        super().__init__()
        units = [PreActBottleneck(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1, norm, eps, ws)
                 for j in range(depth)]
        self.blocks = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """Root block: StdConv 7x7/2 (pad 3), ConstantPad(1), MaxPool 3/2; or a 3x3/1 conv only (small stem)."""

    def __init__(self, in_ch: int, width: int, small: bool, eps: float, ws: bool = True) -> None:
        super().__init__()
        if small:
            self.conv = std_conv(in_ch, width, 3, stride=1, padding=1, bias=False, eps=eps, standardize=ws)
            self.pad: nn.Module = nn.Identity()
            self.pool: nn.Module = nn.Identity()
        else:
            self.conv = std_conv(in_ch, width, 7, stride=2, padding=3, bias=False, eps=eps, standardize=ws)
            self.pad = nn.ConstantPad2d(1, 0.0)
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(self.conv(x)))


class Head(nn.Module):
    """Classifier head of BiT: a 1x1 conv with bias on the pooled features (``head.fc``)."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(in_ch, num_classes, 1, bias=True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.fc(feats[:, :, None, None]), 1)


class ResNetV2(nn.Module):
    """BiT ResNetV2 (R50x1 by default) with medssl's backbone interface.

    Args:
        depth: 50, 101 or 152.
        width: width multiplier (1 for R50x1/R101x1, 3 for R50x3); combined with ``widen_factor``.
        norm: ``"gn"`` (GroupNorm 32, BiT) or ``"bn"`` (BatchNorm, Lu et al.'s fix for SimSiam).
        small_stem: 3x3 stride-1 stem without padding/max-pool, for small images.
        in_channels: input channels. Default 3.
        num_classes: size of the 1x1-conv head; 0 (default) builds none.
        widen_factor: extra multiplier (< 1 for narrow test networks).
        stem_width: stem channels; default 64 x width x widen_factor.
        ws_eps: weight-standardisation epsilon (1e-10 BiT, 1e-8 timm).
        standardize: False builds plain convolutions (a BiT whose weight standardisation was folded).
    """

    def __init__(
        self,
        depth: int = 50,
        width: int = 1,
        *,
        norm: str = "gn",
        small_stem: bool = False,
        in_channels: int = 3,
        num_classes: int = 0,
        widen_factor: float = 1.0,
        stem_width: int | None = None,
        ws_eps: float = 1e-10,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNETV2_DEPTHS:
            raise ValueError(f"ResNetV2 depth must be one of {sorted(RESNETV2_DEPTHS)}, not {depth}")
        scale = width * widen_factor
        stem_ch = stem_width if stem_width is not None else int(64 * scale)
        outs = [int(c * scale) for c in (256, 512, 1024, 2048)]
        self.stem = Stem(in_channels, stem_ch, small_stem, ws_eps, standardize)
        in_ch = stem_ch
        stages = []
        for i, (out_ch, units) in enumerate(zip(outs, RESNETV2_DEPTHS[depth])):
            stages.append(Stage(in_ch, out_ch, units, 1 if i == 0 else 2, norm, ws_eps, standardize))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.norm = make_norm(norm, in_ch)
        self.head = Head(in_ch, num_classes) if num_classes > 0 else None
        self.num_features = in_ch
        self.arch = f"resnetv2_{depth}x{width}"
        self.arch_kwargs: dict[str, Any] = {
            "norm": norm,
            "small_stem": small_stem,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "widen_factor": widen_factor,
            "stem_width": stem_width,
            "ws_eps": ws_eps,
            "standardize": standardize,
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.head is not None:
            nn.init.zeros_(self.head.fc.weight)
            nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, num_features): stem, stages, final norm + ReLU, global average pool."""
        x = self.stages(self.stem(x))
        x = F.relu(self.norm(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) when a head exists, else the features."""
        feats = self.forward_features(x)
        return self.head(feats) if self.head is not None else feats
