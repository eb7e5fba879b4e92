"""Infer the architecture (and ``build_backbone`` options) from the shapes of a backbone state_dict.

ResNet v1.5 (torchvision names): depth from the number of blocks per stage and the block type (``conv3``
present -> bottleneck); ``widen_factor`` = stem channels / 64; ``small_stem`` when the stem kernel is 3x3.
ResNetV2 (timm names): depth from units per stage; width multiplier = stem channels / 64 when it is an integer
>= 1, else a ``widen_factor`` < 1 (narrow test networks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from medssl.models.resnet import RESNET_SPECS
from medssl.models.resnetv2 import RESNETV2_DEPTHS


def _blocks_per_stage(keys: list[str], pattern: str) -> list[int]:
    counts: dict[int, set[int]] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            counts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return [len(counts[s]) for s in sorted(counts)]


def infer_resnet(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(arch, arch_kwargs) for a torchvision-named ResNet state_dict.

    Raises:
        ValueError: when the block counts match no supported depth.
    """
    keys = list(state)
    blocks = _blocks_per_stage(keys, r"^layer([1-4])\.(\d+)\.conv1\.weight$")
    bottleneck = any(re.match(r"^layer1\.0\.conv3\.weight$", k) for k in keys)
    arch = None
    for name, (block, layers) in RESNET_SPECS.items():
        if layers == blocks and (block.expansion == 4) == bottleneck:
            arch = name
            break
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"ResNet with {kind} blocks per stage {blocks} matches no supported depth")
    stem = state["conv1.weight"]
    kwargs: dict[str, Any] = {
        "small_stem": int(stem.shape[-1]) == 3,
        "in_channels": int(stem.shape[1]),
        "num_classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0,
        "widen_factor": int(stem.shape[0]) / 64.0,
    }
    return arch, kwargs


def infer_resnetv2(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(arch, arch_kwargs) for a timm-named ResNetV2 state_dict (``ws_eps`` is left to the reader).

    Raises:
        ValueError: when the unit counts match no supported depth.
    """
    keys = list(state)
    units = _blocks_per_stage(keys, r"^stages\.(\d+)\.blocks\.(\d+)\.conv1\.weight$")
    depth = next((d for d, layers in RESNETV2_DEPTHS.items() if layers == units), None)
    if depth is None:
        raise ValueError(f"ResNetV2 with units per stage {units} matches no supported depth")
    stem = state["stem.conv.weight"]
    stem_ch = int(stem.shape[0])
    # stage widths are 256 * width * widen_factor; the stem is 64 * width * widen_factor
    scale = int(state["stages.0.blocks.0.conv3.weight"].shape[0]) / 256.0
    width, widen = (int(scale), 1.0) if scale >= 1 and float(scale).is_integer() else (1, scale)
    norm = "bn" if "norm.running_mean" in state else "gn"
    kwargs: dict[str, Any] = {
        "norm": norm,
        "small_stem": int(stem.shape[-1]) == 3,
        "in_channels": int(stem.shape[1]),
        "num_classes": int(state["head.fc.weight"].shape[0]) if "head.fc.weight" in state else 0,
        "widen_factor": widen,
        "stem_width": None if stem_ch == int(64 * width * widen) else stem_ch,
    }
    return f"resnetv2_{depth}x{width}", kwargs


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Dispatch on the stem key: ``stem.conv.weight`` -> ResNetV2, ``conv1.weight`` -> ResNet v1.5."""
    if "stem.conv.weight" in state:
        return infer_resnetv2(state)
    if "conv1.weight" in state:
        return infer_resnet(state)
    raise ValueError("no stem convolution (conv1.weight or stem.conv.weight) among the backbone weights")
