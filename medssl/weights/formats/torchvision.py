"""Readers for torchvision-named ResNets: torchvision V1/V2, SimCLR v1 (tonylins converter), DINO, BYOL
regex ports (flat), and the prefixed SSL wrappers that keep torchvision names under a prefix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from medssl.errors import MedsslError
from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import (
    NORM_IMAGENET,
    NORM_SIMCLR,
    ReaderOutput,
    split_prefix,
    torchvision_backbone,
)


def strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a DataParallel ``module.`` prefix when every key carries it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def read_torchvision(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """torchvision ``resnet*.pth`` (flat state_dict, ``fc`` kept as the 1000-class classifier); a
    DataParallel ``module.`` prefix or a ``{'state_dict': ...}`` wrapper is accepted."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = strip_module(tensors_only(obj, path))
    backbone, rest = torchvision_backbone(state, keep_fc=True)
    return ReaderOutput(backbone, dict(NORM_IMAGENET), skipped=sorted(rest))


def read_byol_torch(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """BYOL PyTorch ports converted with regexes to flat torchvision names."""
    out = read_torchvision(obj, path)
    out.notes.append("BYOL port with flat torchvision names; ImageNet mean/std input normalisation")
    return out


def read_simclr_v1(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """tonylins' SimCLR v1 converter: ``{'state_dict': torchvision names}``; its ``fc`` is not imported."""
    state = tensors_only(obj["state_dict"], path)
    backbone, rest = torchvision_backbone(state, keep_fc=False)
    out = ReaderOutput(backbone, dict(NORM_SIMCLR), skipped=sorted(rest))
    if any(k.startswith("fc.") for k in rest):
        out.notes.append("fc skipped: the tonylins converter writes a random fc.bias, so the classifier is unusable")
    return out


def read_dino(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """DINO ResNet-50: the released backbone (flat, no fc) or a full checkpoint (teacher backbone is used)."""
    if isinstance(obj, Mapping) and "teacher" in obj:
        teacher = strip_module(tensors_only(obj["teacher"], path))
        backbone = split_prefix(teacher, "backbone.")
        if not backbone:
            raise MedsslError("DINO checkpoint: no 'backbone.' weights in 'teacher'", path)
        skipped = [f"teacher.{k}" for k in teacher if not k.startswith("backbone.")]
        skipped += [f"student.{k}" for k in obj.get("student", {})]
        skipped += [k for k in obj if k not in ("teacher", "student")]
        backbone, rest = torchvision_backbone(backbone, keep_fc=False)
        skipped += [f"teacher.backbone.{k}" for k in rest]
        out = ReaderOutput(backbone, dict(NORM_IMAGENET), skipped=sorted(skipped))
        out.notes.append("DINO full checkpoint: teacher backbone imported (DINO evaluates the teacher); the student "
                         "and the DINO head (weight-normalised last layer, no MLPHead layout) are skipped")
        return out
    out = read_torchvision(obj, path)
    out.notes.append("DINO backbone (flat torchvision names, no fc)")
    return out
