"""BYOL PyTorch ports with a ``backbone.`` prefix: solo-learn (``state_dict`` with ``backbone.``,
``momentum_backbone.``, ``projector.``, ``predictor.``) and mmselfsup (``{'state_dict', 'author'}``)."""

from __future__ import annotations

import os
from typing import Any

from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import NORM_IMAGENET, ReaderOutput, split_prefix, torchvision_backbone


def _backbone_part(state: dict, path: str | os.PathLike[str]) -> tuple[dict, list[str]]:
    backbone, rest = torchvision_backbone(split_prefix(state, "backbone."), keep_fc=False)
    skipped = [f"backbone.{k}" for k in rest]
    return backbone, skipped


def read_byol_solo(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """solo-learn Lightning checkpoint: online backbone, projector and predictor; momentum copies skipped."""
    state = tensors_only(obj["state_dict"], path)
    backbone, skipped = _backbone_part(state, path)
    out = ReaderOutput(backbone, dict(NORM_IMAGENET))
    for head in ("projector", "predictor"):
        part = split_prefix(state, f"{head}.")
        if part:
            out.heads[head] = part
    taken = ("backbone.", "projector.", "predictor.")
    skipped += [k for k in state if not k.startswith(taken)]
    out.skipped = sorted(skipped) + sorted(k for k in obj if k != "state_dict")
    out.notes.append("solo-learn: online network imported; momentum_* (target) weights and the online "
                     "classifier are skipped")
    return out


def read_byol_mmselfsup(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """mmselfsup checkpoint: ``backbone.`` weights (mmcv ResNet uses torchvision names)."""
    state = tensors_only(obj["state_dict"], path)
    backbone, skipped = _backbone_part(state, path)
    skipped += [k for k in state if not k.startswith("backbone.")]
    out = ReaderOutput(backbone, dict(NORM_IMAGENET), skipped=sorted(skipped))
    out.notes.append("mmselfsup: backbone imported; neck/head weights (mmselfsup layout) skipped")
    return out
