"""SimSiam (``checkpoint_0099.pth.tar``): ``{epoch, arch, state_dict, optimizer}``; ``module.encoder.`` +
torchvision names, projector ``module.encoder.fc.{0..7}``, predictor ``module.predictor.{0,1,3}``."""

from __future__ import annotations

import os
from typing import Any

from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import NORM_IMAGENET, ReaderOutput, split_prefix, torchvision_backbone
from medssl.weights.formats.torchvision import strip_module


def read_encoder_and_heads(obj: Any, path: str | os.PathLike[str], encoder: str) -> ReaderOutput:
    """``state_dict`` with a torchvision encoder under ``encoder`` (its ``fc`` MLP = projector) and a
    ``predictor.`` MLP, as written by SimSiam (``encoder.``) and MoCo v3 (``base_encoder.``)."""
    state = strip_module(tensors_only(obj["state_dict"], path))
    backbone, rest = torchvision_backbone(split_prefix(state, encoder), keep_fc=False)
    out = ReaderOutput(backbone, dict(NORM_IMAGENET))
    projector = split_prefix(rest, "fc.")
    if projector:
        out.heads["projector"] = projector
    predictor = split_prefix(state, "predictor.")
    if predictor:
        out.heads["predictor"] = predictor
    out.skipped = sorted(f"{encoder}{k}" for k in rest if not k.startswith("fc."))
    out.skipped += sorted(k for k in state if not k.startswith((encoder, "predictor.")))
    out.skipped += sorted(k for k in obj if k != "state_dict")
    return out


def read_simsiam(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Encoder backbone, its ``fc`` projector and the predictor."""
    return read_encoder_and_heads(obj, path, "encoder.")
