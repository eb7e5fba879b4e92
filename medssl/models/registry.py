"""``build_backbone``: one entry point for every backbone medssl supports."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from medssl.models.resnet import RESNET_SPECS, ResNet
from medssl.models.resnetv2 import ResNetV2

_V2 = re.compile(r"^resnetv2_(\d+)x(\d+)$")

#: architectures documented for users (ResNetV2 accepts any ``resnetv2_<depth>x<width>``)
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnetv2_50x1", "resnetv2_101x1", "resnetv2_50x3")


def build_backbone(arch: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name.

    Args:
        arch: ``resnet18|34|50|101|152`` (ResNet v1.5, torchvision names) or ``resnetv2_<depth>x<width>``
            (BiT, timm names), e.g. ``resnetv2_50x1``.
        **kwargs: ``small_stem``, ``in_channels``, ``num_classes``, ``widen_factor``; for ResNetV2 also
            ``norm`` ("gn"|"bn"), ``stem_width``, ``ws_eps``, ``standardize``. Unknown options raise ``TypeError``.

    Returns:
        A module with ``num_features``, ``forward_features(x) -> (N, num_features)``, ``arch`` and
        ``arch_kwargs`` (``build_backbone(m.arch, **m.arch_kwargs)`` rebuilds it).
    """
    if arch in RESNET_SPECS:
        for key in ("norm", "stem_width", "ws_eps", "standardize"):
            if kwargs.get(key) not in (None, "bn", True):
                raise ValueError(f"option {key}={kwargs[key]!r} applies to ResNetV2 only, not {arch}")
            kwargs.pop(key, None)
        return ResNet(arch, **kwargs)
    match = _V2.match(arch)
    if match:
        return ResNetV2(int(match.group(1)), int(match.group(2)), **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
