"""MoCo v2 (``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``) and MoCo v3 ResNet
(``module.base_encoder.*``, ``module.momentum_encoder.*``, ``module.predictor.*``)."""

from __future__ import annotations

import os
from typing import Any

from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import NORM_IMAGENET, ReaderOutput, split_prefix, torchvision_backbone
from medssl.weights.formats.simsiam import read_encoder_and_heads
from medssl.weights.formats.torchvision import strip_module


def read_moco_v2(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Query encoder; the key encoder and queue are listed as skipped."""
    state = strip_module(tensors_only(obj["state_dict"], path))
    backbone, rest = torchvision_backbone(split_prefix(state, "encoder_q."), keep_fc=False)
    out = ReaderOutput(backbone, dict(NORM_IMAGENET))
    out.skipped = sorted([f"encoder_q.{k}" for k in rest] + [k for k in state if not k.startswith("encoder_q.")])
    out.skipped += sorted(k for k in obj if k != "state_dict")
    out.notes.append("MoCo v2: encoder_q imported; encoder_k (momentum copy) and the queue are skipped")
    if any(k.startswith("fc.") for k in rest):
        out.notes.append("MoCo v2 projector (Linear-ReLU-Linear, no BatchNorm) has no MLPHead layout: skipped")
    return out


def read_moco_v3(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Base encoder with its ``fc`` projector, and the predictor; the momentum encoder is skipped."""
    out = read_encoder_and_heads(obj, path, "base_encoder.")
    out.notes.append("MoCo v3: base_encoder imported; momentum_encoder skipped")
    return out
