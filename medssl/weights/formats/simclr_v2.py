"""SimCLR v2 converted by Separius' converter: ``{'resnet': sd, 'head': sd}`` (``r50_1x_sk0.pth``).

Backbone names -> torchvision: stem ``net.0.0`` -> ``conv1``, ``net.0.1.0`` -> ``bn1``; blocks
``net.{k}.blocks.{j}.net.{0,2,4}`` -> ``layer{k}.{j}.conv{1,2,3}`` (stride on the 3x3 conv, as v1.5),
``net.{k}.blocks.{j}.net.{1,3,5}.0`` -> ``bn{1,2,3}``, ``projection.shortcut`` -> ``downsample.0``,
``projection.bn.0`` -> ``downsample.1``; ``fc`` kept. Head ``layers.{0,1,3,4,6,7}`` -> projector keys
``{0,1,3,4,6,7}`` (MLPHead with bias-free Linears and a final BatchNorm1d).
"""

from __future__ import annotations

import os
import re
from typing import Any

from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import NORM_SIMCLR, ReaderOutput

_RULES = [
    (re.compile(r"^net\.0\.0\.(weight)$"), "conv1.{0}"),
    (re.compile(r"^net\.0\.1\.0\.(\w+)$"), "bn1.{0}"),
    (re.compile(r"^net\.([1-4])\.blocks\.(\d+)\.net\.([024])\.weight$"), "conv"),
    (re.compile(r"^net\.([1-4])\.blocks\.(\d+)\.net\.([135])\.0\.(\w+)$"), "bn"),
    (re.compile(r"^net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.weight$"), "layer{0}.{1}.downsample.0.weight"),
    (re.compile(r"^net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.(\w+)$"), "layer{0}.{1}.downsample.1.{2}"),
    (re.compile(r"^fc\.(weight|bias)$"), "fc.{0}"),
]


def map_simclr_v2_name(key: str) -> str | None:
    """The torchvision name of a Separius SimCLR v2 backbone key, or None when it has none."""
    for pattern, template in _RULES:
        m = pattern.match(key)
        if not m:
            continue
        g = m.groups()
        if template == "conv":
            return f"layer{g[0]}.{g[1]}.conv{int(g[2]) // 2 + 1}.weight"
        if template == "bn":
            return f"layer{g[0]}.{g[1]}.bn{(int(g[2]) + 1) // 2}.{g[3]}"
        return template.format(*g)
    return None


def read_simclr_v2(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Backbone in torchvision names and the contrastive head as ``projector``."""
    resnet = tensors_only(obj["resnet"], path)
    backbone, skipped = {}, []
    for key, value in resnet.items():
        name = map_simclr_v2_name(key)
        if name is None:
            skipped.append(f"resnet.{key}")
        else:
            backbone[name] = value
    out = ReaderOutput(backbone, dict(NORM_SIMCLR), skipped=sorted(skipped))
    head = tensors_only(obj["head"], path) if obj.get("head") else {}
    projector = {k[len("layers."):]: v for k, v in head.items() if k.startswith("layers.")}
    out.skipped += sorted(f"head.{k}" for k in head if not k.startswith("layers."))
    if projector:
        out.heads["projector"] = projector
    if skipped:
        out.notes.append("unmapped backbone keys: selective-kernel (sk1) SimCLR v2 models are not supported")
    return out
