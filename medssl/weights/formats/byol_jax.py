"""The original BYOL JAX checkpoint (``pretrain_res50x1.pkl``): a dill pickle ``{experiment_state, step, rng}``.

``experiment_state`` is the experiment's own NamedTuple (online_params, target_params, online_state,
target_state, opt_state), read through :mod:`medssl.weights.safe_unpickle` with inert stubs. Haiku names:
``<enc>/~/initial_conv`` (``w`` HWIO), ``<enc>/~/initial_batchnorm`` (``scale``/``offset`` (1,1,1,C)),
``<enc>/~/block_group_G/~/block_B/~/{conv_i, batchnorm_i, shortcut_conv, shortcut_batchnorm}``; BN statistics
in the state tree under ``<bn>/~/mean_ema`` and ``<bn>/~/var_ema`` (``average``). The online network is
imported (BYOL evaluates it). Projector/predictor ``linear``, ``batch_norm``, ``linear_1`` -> MLPHead keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from medssl.errors import MedsslError
from medssl.weights.formats.common import (
    NORM_BYOL_JAX,
    ReaderOutput,
    dense_to_linear,
    flat_vector,
    hwio_to_oihw,
)
from medssl.weights.safe_unpickle import StubObject, stub_children

_BLOCK = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)$")
_SHORTCUT = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$")
_HEAD_LAYER = re.compile(r"^(linear|batch_norm)(?:_(\d+))?$")
_INITIAL_CONV = re.compile(r"/~/initial_conv(?:_\d+)?$")


def as_mapping(obj: Any) -> Mapping | None:
    """A dict, or the dict a stubbed mapping class (e.g. haiku FlatMapping) was built from."""
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, StubObject):
        for cand in (*obj.args, obj.state):
            if isinstance(cand, Mapping):
                return cand
        if obj.items:
            return obj.items
    return None


def as_array(obj: Any) -> np.ndarray | None:
    """A numpy array, or the array a stubbed wrapper (e.g. a jax array) was rebuilt from."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, StubObject):
        return next((a for a in obj.args if isinstance(a, np.ndarray)), None)
    return None


def _walk(obj: Any, depth: int = 0) -> Iterator[Mapping]:
    mapping = as_mapping(obj)
    if mapping is not None:
        yield mapping
    if depth > 12:
        return
    for child in stub_children(obj):
        yield from _walk(child, depth + 1)


def _is_params(tree: Mapping) -> bool:
    return any(_INITIAL_CONV.search(str(k)) for k in tree)


def _is_state(tree: Mapping) -> bool:
    return any(re.search(r"/~/initial_batchnorm(?:_\d+)?/~/mean_ema$", str(k)) for k in tree)


def find_online_trees(root: Any) -> tuple[Mapping, Mapping]:
    """(online_params, online_state): by field name when available, else the first of each in pickle order."""
    params = state = None
    for tree in _walk(root):
        if "online_params" in tree and "online_state" in tree:
            return as_mapping(tree["online_params"]) or {}, as_mapping(tree["online_state"]) or {}
        if params is None and _is_params(tree):
            params = tree
        elif state is None and _is_state(tree):
            state = tree
    if params is None:
        raise ValueError("no haiku parameter tree with '<encoder>/~/initial_conv' found")
    return params, state or {}


def _leaf(tree: Mapping, module: str, name: str) -> np.ndarray | None:
    entry = as_mapping(tree.get(module))
    return None if entry is None else as_array(entry.get(name))


def _bn(params: Mapping, state: Mapping, module: str, target: str, out: dict) -> None:
    for src, dst in (("scale", "weight"), ("offset", "bias")):
        arr = _leaf(params, module, src)
        if arr is not None:
            out[f"{target}.{dst}"] = flat_vector(arr)
    for src, dst in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
        arr = _leaf(state, f"{module}/~/{src}", "average")
        if arr is None:  # e.g. params under 'initial_batchnorm_1', statistics under 'initial_batchnorm'
            arr = _leaf(state, f"{re.sub(r'_[0-9]+$', '', module)}/~/{src}", "average")
        if arr is not None:
            out[f"{target}.{dst}"] = flat_vector(arr)


def _encoder_name(module: str, enc: str) -> str | None:
    rest = re.sub(r"^(initial_(?:conv|batchnorm))_\d+$", r"\1", module[len(enc) + 3:])
    if rest == "initial_conv":
        return "conv1"
    if rest == "initial_batchnorm":
        return "bn1"
    m = _BLOCK.match(rest)
    if m:
        g, b, kind, i = m.groups()
        return f"layer{int(g) + 1}.{b}.{'conv' if kind == 'conv' else 'bn'}{int(i) + 1}"
    m = _SHORTCUT.match(rest)
    if m:
        g, b, kind = m.groups()
        return f"layer{int(g) + 1}.{b}.downsample.{0 if kind == 'conv' else 1}"
    return None


def _head(params: Mapping, state: Mapping, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module in params:
        if not str(module).startswith(f"{name}/~/"):
            continue
        m = _HEAD_LAYER.match(str(module)[len(name) + 3:])
        if not m:
            continue
        pos = 3 * int(m.group(2) or 0)
        if m.group(1) == "linear":
            out[f"{pos}.weight"] = dense_to_linear(_leaf(params, module, "w"))
            bias = _leaf(params, module, "b")
            if bias is not None:
                out[f"{pos}.bias"] = flat_vector(bias)
        else:
            _bn(params, state, module, str(pos + 1), out)
    return out


def read_byol_jax(obj: Any, path: str | os.PathLike[str]) -> ReaderOutput:
    """Online encoder (torchvision names), projector and predictor of a BYOL JAX checkpoint."""
    try:
        params, state = find_online_trees(obj["experiment_state"])
    except ValueError as exc:
        raise MedsslError(f"BYOL JAX checkpoint: {exc}", path) from exc
    enc = next(str(k)[: _INITIAL_CONV.search(str(k)).start()] for k in params if _INITIAL_CONV.search(str(k)))
    backbone: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for module in params:
        module = str(module)
        if not module.startswith(f"{enc}/~/"):
            if not module.startswith(("projector/~/", "predictor/~/")):
                skipped.append(module)
            continue
        target = _encoder_name(module, enc)
        if target is None:
            skipped.append(module)
        elif target.split(".")[-1].startswith("bn") or target.endswith("downsample.1"):
            _bn(params, state, module, target, backbone)
        else:
            backbone[f"{target}.weight"] = hwio_to_oihw(_leaf(params, module, "w"))
    out = ReaderOutput(backbone, dict(NORM_BYOL_JAX), skipped=sorted(skipped))
    for head in ("projector", "predictor"):
        part = _head(params, state, head)
        if part:
            out.heads[head] = part
    out.notes.append(f"BYOL JAX: online network '{enc}' imported (target network and optimizer state skipped); "
                     "HWIO kernels transposed to OIHW; haiku uses TF 'SAME' padding, which differs from PyTorch's "
                     "symmetric padding on stride-2 layers (same weights, slightly shifted sampling)")
    return out
