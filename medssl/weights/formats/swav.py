"""SwAV (``swav_800ep_pretrain.pth.tar``): flat ``module.``-prefixed torchvision names, optional
``module.projection_head.{0,1,3}`` (-> projector) and ``module.prototypes.weight`` (-> prototypes); training
checkpoints wrap it as ``{epoch, state_dict, optimizer, amp}``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from medssl.weights.detect import tensors_only
from medssl.weights.formats.common import NORM_SWAV, ReaderOutput, split_prefix, torchvision_backbone
from medssl.weights.formats.torchvision import strip_module


def read_swav(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Backbone, projector and prototypes of a SwAV checkpoint."""
    wrapped = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    state = strip_module(tensors_only(obj["state_dict"] if wrapped else obj, path))
    backbone, rest = torchvision_backbone(state, keep_fc=False)
    out = ReaderOutput(backbone, dict(NORM_SWAV))
    projector = split_prefix(rest, "projection_head.")
    if projector:
        out.heads["projector"] = projector
    if "prototypes.weight" in rest:
        out.heads["prototypes"] = {"weight": rest["prototypes.weight"]}
    taken = {f"projection_head.{k}" for k in projector} | ({"prototypes.weight"} if "prototypes" in out.heads else set())
    out.skipped = sorted(k for k in rest if k not in taken)
    if wrapped:
        out.skipped += sorted(k for k in obj if k != "state_dict")
        out.notes.append("SwAV training checkpoint: optimizer/amp state skipped")
    return out
