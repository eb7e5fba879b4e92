"""BiT-S/BiT-M ``.npz`` (Google's release, HWIO kernels, prefix ``resnet/``) and timm ``resnetv2_*_bit``
state_dicts / safetensors (already in medssl's ResNetV2 names)."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from medssl.errors import MedsslError
from medssl.weights.formats.common import NORM_BIT, ReaderOutput, flat_vector, hwio_to_oihw, to_tensor

_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/(?:(a)/proj|([abc]))/(standardized_conv2d/kernel|group_norm/gamma|"
                   r"group_norm/beta)$")
_PARAM = {"standardized_conv2d/kernel": "weight", "group_norm/gamma": "weight", "group_norm/beta": "bias"}


def map_bit_name(key: str) -> str | None:
    """medssl (timm) name of a BiT npz array, or None."""
    fixed = {
        "resnet/root_block/standardized_conv2d/kernel": "stem.conv.weight",
        "resnet/group_norm/gamma": "norm.weight",
        "resnet/group_norm/beta": "norm.bias",
        "resnet/head/conv2d/kernel": "head.fc.weight",
        "resnet/head/conv2d/bias": "head.fc.bias",
    }
    if key in fixed:
        return fixed[key]
    m = _UNIT.match(key)
    if not m:
        return None
    block, unit, proj, part, param = m.groups()
    prefix = f"stages.{int(block) - 1}.blocks.{int(unit) - 1}"
    if proj:
        return f"{prefix}.downsample.conv.weight" if param.endswith("kernel") else None
    idx = "abc".index(part) + 1
    kind = "conv" if param.endswith("kernel") else "norm"
    return f"{prefix}.{kind}{idx}.{_PARAM[param]}"


def read_bit_npz(obj: dict[str, np.ndarray], path: str | os.PathLike[str]) -> ReaderOutput:
    """All 153 arrays of a BiT R50x1 file (head included, N = 1000 for BiT-S, 21843 for BiT-M)."""
    backbone, skipped = {}, []
    for key, arr in obj.items():
        name = map_bit_name(key)
        if name is None:
            skipped.append(key)
            continue
        try:
            if name.endswith("conv.weight") or re.search(r"\.conv\d\.weight$", name) or name == "head.fc.weight":
                backbone[name] = hwio_to_oihw(arr)
            else:
                backbone[name] = flat_vector(arr)
        except ValueError as exc:
            raise MedsslError(f"BiT array {key!r}: {exc}", path) from exc
    out = ReaderOutput(backbone, dict(NORM_BIT), skipped=sorted(skipped), ws_eps=1e-10)
    out.notes.append("BiT npz: HWIO kernels transposed to OIHW; weight standardisation eps 1e-10")
    return out


def read_timm_resnetv2(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """timm ``resnetv2_50x1_bit``: names already match medssl's ResNetV2 (timm standardises with eps 1e-8)."""
    state = {str(k): to_tensor(v) for k, v in obj.items() if hasattr(v, "shape")}
    if not state:
        raise MedsslError("no tensors in timm ResNetV2 file", path)
    keep = re.compile(r"^(stem\.|stages\.|norm\.|head\.fc\.)")
    backbone = {k: v for k, v in state.items() if keep.match(k)}
    out = ReaderOutput(backbone, dict(NORM_BIT), skipped=sorted(k for k in state if k not in backbone), ws_eps=1e-8)
    out.notes.append("timm ResNetV2: weight standardisation eps 1e-8 (timm), input [-1,1]")
    return out
