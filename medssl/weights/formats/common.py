"""Helpers shared by the checkpoint readers: normalisation specs, prefix handling, array conversion.

Every reader returns a :class:`ReaderOutput`: backbone tensors already in medssl names (torchvision names for
ResNet v1.5, timm names for ResNetV2), heads in :class:`medssl.models.MLPHead` / ``Prototypes`` key layout,
the keys it set aside (``skipped``) with the reason in ``notes``, and the input normalisation the weights
expect (docs/checkpoints.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: input normalisation specs for inputs in [0, 1] (``InputNormalization.from_spec``)
NORM_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "description": "[0,1] then ImageNet mean/std"}
NORM_SWAV = {"mean": IMAGENET_MEAN, "std": [0.228, 0.224, 0.225],
             "description": "[0,1] then ImageNet mean, SwAV std (0.228, 0.224, 0.225)"}
NORM_BIT = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "description": "[-1,1] (BiT): (x - 0.5) / 0.5"}
NORM_SIMCLR = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "description": "[0,1], no mean/std (SimCLR)"}
NORM_BYOL_JAX = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                 "description": "[0,1] then ImageNet mean/std (applied inside the original BYOL JAX model)"}

#: torchvision ResNet top-level module names (the backbone part of a torchvision-named state_dict)
_TV_BACKBONE = re.compile(r"^(conv1|bn1|layer[1-4])\.")


@dataclass
class ReaderOutput:
    """What a format reader extracted from a checkpoint (before architecture inference).

    Attributes:
        backbone: tensors in medssl names (float32 unless the file stored another float dtype).
        heads: ``{"projector"|"predictor"|"prototypes": state_dict in MLPHead/Prototypes layout}``.
        skipped: source keys deliberately not imported (momentum encoders, queues, optimizer, ...).
        notes: human-readable remarks (why something was skipped, caveats of the format).
        input_normalization: spec dict ``{"mean", "std", "description"}``.
        ws_eps: weight-standardisation epsilon the weights were trained with (ResNetV2 only).
    """

    backbone: dict[str, torch.Tensor]
    input_normalization: dict[str, Any]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ws_eps: float | None = None


def to_tensor(value: Any) -> torch.Tensor:
    """A CPU tensor from a tensor or numpy array (numpy arrays are copied, so the file can be closed)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.array(value, copy=True))


def hwio_to_oihw(kernel: Any) -> torch.Tensor:
    """TF/JAX conv kernel (kh, kw, in, out) -> PyTorch (out, in, kh, kw): ``transpose(3, 2, 0, 1)``."""
    arr = np.asarray(kernel)
    if arr.ndim != 4:
        raise ValueError(f"conv kernel must have 4 dims (HWIO), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 2, 0, 1)))


def dense_to_linear(kernel: Any) -> torch.Tensor:
    """TF/JAX dense kernel (in, out) -> PyTorch Linear weight (out, in)."""
    arr = np.asarray(kernel)
    if arr.ndim != 2:
        raise ValueError(f"dense kernel must have 2 dims (in, out), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.T))


def flat_vector(value: Any) -> torch.Tensor:
    """A per-channel parameter stored as (C,), (1, C) or (1, 1, 1, C) -> (C,)."""
    return torch.from_numpy(np.array(value, copy=True).reshape(-1))


def tensor_items(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor-valued entries of a mapping (other values, e.g. counters stored as ints, are dropped)."""
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def split_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries whose key starts with ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def torchvision_backbone(state: Mapping[str, torch.Tensor], *, keep_fc: bool) -> tuple[dict, dict]:
    """Split a torchvision-named dict into (backbone incl. ``fc`` if ``keep_fc``, remainder)."""
    backbone, rest = {}, {}
    for key, value in state.items():
        if _TV_BACKBONE.match(key) or (keep_fc and key.startswith("fc.")):
            backbone[key] = value
        else:
            rest[key] = value
    return backbone, rest


def looks_torchvision(keys: Any) -> bool:
    """True when the keys contain a torchvision ResNet stem and first stage."""
    keys = set(keys)
    return "conv1.weight" in keys and any(k.startswith("layer1.0.conv1.") for k in keys)
