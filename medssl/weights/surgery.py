"""Weight surgery before a second stage of pretraining (Ciga et al.; DESIGN.md §1).

- :func:`scale_frobenius`: shrink conv layers whose weight has a Frobenius norm above a threshold and
  compensate in the BatchNorm that follows, so the network computes the same function.
- :func:`find_dead_filters` / :func:`repair_dead_filters`: filters (output channels) whose weight norm is
  below 0.1 are "dead"; they are replaced by copies of randomly chosen live filters of the same layer
  (default) or re-initialised randomly, with the following norm layer's channel entries handled to match.

Conv -> norm pairing (:func:`find_conv_norm_pairs`) walks the module graph obtained by ``torch.fx`` symbolic
tracing (convolutions and norm layers kept as leaves): a conv is paired with a BatchNorm/GroupNorm when every
call of the conv feeds exactly that norm layer and nothing else, and that norm layer only ever reads this conv.
This finds ``conv1/bn1``, ``layerX.Y.convK/bnK`` and ``downsample.0/downsample.1`` in torchvision-named
ResNets and ``convK -> norm(K+1)`` in pre-activation ResNetV2 without relying on names. If a model cannot be
traced, a naming fallback pairs consecutive modules (definition order) with the same parent named
``convK``/``bnK`` (or ``normK``), ``0``/``1`` inside a Sequential, or ``conv``/``bn``|``norm``, when the widths agree.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import MedsslError
from medssl.models.resnetv2 import StdConv2d

logger = logging.getLogger("medssl.weights.surgery")

_NORM_TYPES = (_BatchNorm, nn.GroupNorm)


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every conv and norm layer (including subclasses such as StdConv2d) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, *_NORM_TYPES)) or super().is_leaf_module(m, module_qualified_name)


def filter_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The conv layers whose output channels are "filters", in definition order: every ``nn.Conv2d`` (including
    ``StdConv2d``) except a classifier head (modules under ``head.``, e.g. BiT's 1x1-conv ``head.fc``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and name and not name.startswith("head.")]


def _width(norm: nn.Module) -> int:
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


def _pairs_by_tracing(model: nn.Module) -> dict[str, str]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    conv_to_norm: dict[str, set[str | None]] = {}
    norm_to_conv: dict[str, set[str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        if isinstance(mod, nn.Conv2d):
            users = list(node.users)
            ok = (len(users) == 1 and users[0].op == "call_module"
                  and isinstance(modules.get(users[0].target), _NORM_TYPES) and users[0].args[:1] == (node,))
            conv_to_norm.setdefault(node.target, set()).add(users[0].target if ok else None)
        elif isinstance(mod, _NORM_TYPES):
            src = node.args[0] if node.args else None
            ok = (isinstance(src, fx.Node) and src.op == "call_module"
                  and isinstance(modules.get(src.target), nn.Conv2d))
            norm_to_conv.setdefault(node.target, set()).add(src.target if ok else None)
    pairs = {}
    for conv, norms in conv_to_norm.items():
        if len(norms) == 1 and None not in norms:
            norm = next(iter(norms))
            if norm_to_conv.get(norm) == {conv}:
                pairs[conv] = norm
    return pairs


def _names_match(conv_leaf: str, norm_leaf: str) -> bool:
    if conv_leaf == "0" and norm_leaf == "1":
        return True
    if conv_leaf == "conv" and norm_leaf in ("bn", "norm"):
        return True
    m = re.fullmatch(r"conv(\d+)", conv_leaf)
    return bool(m) and norm_leaf in (f"bn{m.group(1)}", f"norm{m.group(1)}")


def _pairs_by_name(model: nn.Module) -> dict[str, str]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, *_NORM_TYPES))]
    pairs = {}
    for (cname, conv), (nname, norm) in zip(named, named[1:]):
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, _NORM_TYPES):
            continue
        cparent, _, cleaf = cname.rpartition(".")
        nparent, _, nleaf = nname.rpartition(".")
        if cparent == nparent and _names_match(cleaf, nleaf) and _width(norm) == conv.out_channels:
            pairs[cname] = nname
    return pairs


def find_conv_norm_pairs(model: nn.Module) -> dict[str, str]:
    """Map each conv name to the name of the BatchNorm/GroupNorm that directly normalises its output.

    Uses ``torch.fx`` tracing of ``model.forward`` (see the module docstring), falling back to the naming
    conventions when the model cannot be traced. Pairs whose widths disagree are dropped.
    """
    try:
        pairs = _pairs_by_tracing(model)
    except Exception as exc:  # tracing fails on data-dependent control flow; names are the documented fallback
        logger.info("fx tracing failed (%s); pairing conv and norm layers by name", exc)
        pairs = _pairs_by_name(model)
    return {c: n for c, n in pairs.items()
            if _width(model.get_submodule(n)) == model.get_submodule(c).out_channels}


def filter_norms(conv: nn.Conv2d) -> torch.Tensor:
    """Frobenius norm of each output filter of ``conv`` (over in, kh, kw), shape (out_channels,), float64."""
    return conv.weight.detach().double().flatten(1).norm(dim=1)


def scale_frobenius(
    model: nn.Module, *, threshold: float = 1.0, rule: str = "unit_norm", compensate_eps: bool = True
) -> dict[str, Any]:
    """Scale down every conv directly followed by a BatchNorm whose weight Frobenius norm ``s`` exceeds ``threshold``.

    With ``x`` the conv output and ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` the BatchNorm in eval
    mode, dividing the conv weight (and bias) by ``c`` divides ``x`` by ``c``; the BatchNorm then gets
    ``mean' = mean / c`` and ``var' = var / c**2``:

    - ``rule="unit_norm"`` (default): ``c = s / threshold``, so the layer's norm becomes exactly ``threshold``
      (1 by default) and ``var' = var / c**2`` (with threshold 1 exactly DESIGN.md's ``running_var / s**2``);
      beta is unchanged and gamma too (up to the eps compensation below). The output is unchanged in eval mode
      (running statistics) and in train mode (batch statistics scale the same way), apart from BatchNorm's eps,
      and the running statistics remain those of the scaled activations.
    - ``rule="paper"``: DESIGN.md's literal rule, ``c = sqrt(s)``, ``mean' = mean / sqrt(s)``, ``var' = var / s**2``
      and ``gamma' = gamma / sqrt(s)``. This also preserves the eval-mode output (the factor ``s / sqrt(s)`` from
      the variance cancels the gamma factor) but leaves the norm at ``sqrt(s) > 1``, its running variance no
      longer matches the activations (true variance ``var / s``), and in train mode the output shrinks by
      ``sqrt(s)``.

    The eps term: ``sqrt(var' + eps)`` is not exactly ``sqrt(var + eps) / c``. With ``compensate_eps=True``
    (default) both rules set ``gamma' = gamma * c * sqrt(var' + eps) / sqrt(var + eps)``, which makes the
    eval-mode output exact (float rounding only); for large ``var`` this tends to ``gamma`` (unit_norm) and
    ``gamma / sqrt(s)`` (paper), differing by a relative ``~ (c**2 or s**2) * eps / (2 var)``. With
    ``compensate_eps=False`` gamma follows the rule literally.

    Convs whose output is not directly normalised by a BatchNorm (e.g. ResNetV2's conv3, the stem before
    max-pool) are not scaled and are listed under ``unpaired`` when their norm exceeds the threshold. A
    weight-standardised ``StdConv2d`` is scale-invariant, so it is skipped (fold standardisation first). A
    BatchNorm without running statistics only needs the conv scaled.

    Returns:
        ``{"operation": "frobenius_scaling", "rule", "threshold", "compensate_eps", "count", "layers": [{"conv",
        "norm", "frobenius_norm", "divisor"}], "skipped": [{"conv", "reason"}], "unpaired": [{"conv",
        "frobenius_norm"}]}``.
    """
    if rule not in ("unit_norm", "paper"):
        raise MedsslError(f"Frobenius scaling rule must be 'unit_norm' or 'paper', not {rule!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise MedsslError(f"Frobenius threshold must be a positive number, not {threshold!r}")
    pairs = {c: n for c, n in find_conv_norm_pairs(model).items() if isinstance(model.get_submodule(n), _BatchNorm)}
    layers, skipped, unpaired = [], [], []
    for name, conv in filter_layers(model):
        s = float(conv.weight.detach().double().norm())
        if s <= threshold:
            continue
        if name not in pairs:
            unpaired.append({"conv": name, "frobenius_norm": s})
            continue
        if isinstance(conv, StdConv2d) and conv.standardize:
            skipped.append({"conv": name, "reason": "weight-standardised (scale-invariant); fold it first"})
            continue
        bn = model.get_submodule(pairs[name])
        assert isinstance(bn, _BatchNorm)
        c = s / threshold if rule == "unit_norm" else math.sqrt(s)
        _scale_pair(conv, bn, s, c, rule, compensate_eps)
        layers.append({"conv": name, "norm": pairs[name], "frobenius_norm": s, "divisor": c})
    logger.info("Frobenius scaling (%s) of %d conv+BN pairs", rule, len(layers))
    return {"operation": "frobenius_scaling", "rule": rule, "threshold": float(threshold),
            "compensate_eps": bool(compensate_eps), "count": len(layers), "layers": layers,
            "skipped": skipped, "unpaired": unpaired}


@torch.no_grad()
def _scale_pair(conv: nn.Conv2d, bn: _BatchNorm, s: float, c: float, rule: str, compensate_eps: bool) -> None:
    """Apply the formulas of :func:`scale_frobenius` to one conv+BN pair (computed in float64)."""
    conv.weight.copy_(conv.weight.double() / c)
    if conv.bias is not None:
        conv.bias.copy_(conv.bias.double() / c)
    if bn.running_mean is None or bn.running_var is None:
        return  # batch statistics in every mode: the normalisation absorbs the scale
    var = bn.running_var.double()
    new_var = var / (c * c) if rule == "unit_norm" else var / (s * s)
    bn.running_mean.copy_(bn.running_mean.double() / c)
    bn.running_var.copy_(new_var)
    if bn.weight is None:
        return
    if compensate_eps:
        factor = c * torch.sqrt(new_var + bn.eps) / torch.sqrt(var + bn.eps)
    else:
        factor = torch.full_like(var, 1.0 if rule == "unit_norm" else 1.0 / math.sqrt(s))
    bn.weight.copy_(bn.weight.double() * factor)


def find_dead_filters(model: nn.Module, threshold: float = 0.1) -> dict[str, list[int]]:
    """Indices of "dead" filters (per-filter Frobenius norm of the stored weight < ``threshold``) per conv layer.

    Only layers with at least one dead filter appear. Layers are those of :func:`filter_layers`; for a
    ``StdConv2d`` the raw (unstandardised) weight is measured.
    """
    dead = {}
    for name, conv in filter_layers(model):
        idx = torch.nonzero(filter_norms(conv) < threshold).flatten().tolist()
        if idx:
            dead[name] = [int(i) for i in idx]
    return dead


def repair_dead_filters(
    model: nn.Module, *, mode: str = "copy", threshold: float = 0.1, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Replace dead filters (norm < ``threshold``) in place, as in Ciga et al. (Table 1: Copy > Random).

    - ``mode="copy"`` (default): each dead filter becomes an exact copy of a live filter of the same layer,
      drawn uniformly (with replacement) from the filters that were live before the repair; the conv bias
      entry is copied too, and in the norm layer that directly follows the conv (see
      :func:`find_conv_norm_pairs`) the dead channel receives the source channel's gamma/beta and, for
      BatchNorm, its running mean/var, so the new channel reproduces the source channel exactly. A layer with no
      live filter falls back to ``"random"`` (reported as ``fallback``).
    - ``mode="random"``: the filter is re-drawn from Kaiming-normal (fan-in, ReLU gain: std
      ``sqrt(2 / fan_in)``, expected norm ``sqrt(2)``); a draw still below the threshold is rescaled to norm
      ``sqrt(2)``. The conv bias entry is zeroed and the norm layer's channel reset to its default init (gamma 1,
      beta 0, running mean 0, running var 1): the new filter's statistics are unknown, so recalibrate BatchNorm
      (``medssl.weights.norm.recalibrate_bn``) before evaluating in eval mode.

    Args:
        model: module to repair.
        mode: ``"copy"`` or ``"random"``.
        threshold: dead-filter norm threshold (default 0.1).
        generator: CPU ``torch.Generator`` for reproducible choices; default the global RNG.

    Returns:
        ``{"operation": "dead_filter_repair", "mode", "threshold", "count", "layers": [{"conv", "norm",
        "filters": [dead indices], "sources": [source index or None], "fallback": None|"random"}]}``.
    """
    if mode not in ("copy", "random"):
        raise MedsslError(f"dead-filter repair mode must be 'copy' or 'random', not {mode!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise MedsslError(f"dead-filter threshold must be a positive number, not {threshold!r}")
    dead = find_dead_filters(model, threshold)
    pairs = find_conv_norm_pairs(model) if dead else {}
    layers, count = [], 0
    for name, idx in dead.items():
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        norm = model.get_submodule(pairs[name]) if name in pairs else None
        dead_set = set(idx)
        live = [i for i in range(conv.out_channels) if i not in dead_set]
        layer_mode = mode if live else "random"
        sources: list[int | None] = []
        for d in idx:
            if layer_mode == "copy":
                src = live[int(torch.randint(len(live), (1,), generator=generator))]
                _copy_channel(conv, norm, src, d)
                sources.append(src)
            else:
                _reinit_channel(conv, norm, d, threshold, generator)
                sources.append(None)
        count += len(idx)
        layers.append({"conv": name, "norm": pairs.get(name), "filters": idx, "sources": sources,
                       "fallback": "random" if layer_mode != mode else None})
    logger.info("repaired %d dead filters in %d layers (mode=%s)", count, len(layers), mode)
    return {"operation": "dead_filter_repair", "mode": mode, "threshold": float(threshold), "count": count,
            "layers": layers}


@torch.no_grad()
def _copy_channel(conv: nn.Conv2d, norm: nn.Module | None, src: int, dst: int) -> None:
    conv.weight[dst] = conv.weight[src]
    if conv.bias is not None:
        conv.bias[dst] = conv.bias[src]
    if norm is None:
        return
    for tensor in (norm.weight, norm.bias, getattr(norm, "running_mean", None), getattr(norm, "running_var", None)):
        if tensor is not None:
            tensor[dst] = tensor[src]


@torch.no_grad()
def _reinit_channel(
    conv: nn.Conv2d, norm: nn.Module | None, dst: int, threshold: float, generator: torch.Generator | None
) -> None:
    shape = conv.weight.shape[1:]
    fan_in = math.prod(shape)
    w = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
    if float(w.norm()) < threshold:
        w = w / w.norm().clamp_min(1e-30) * math.sqrt(2.0)
    conv.weight[dst] = w.to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias[dst] = 0.0
    if norm is None:
        return
    for tensor, value in ((norm.weight, 1.0), (norm.bias, 0.0), (getattr(norm, "running_mean", None), 0.0),
                          (getattr(norm, "running_var", None), 1.0)):
        if tensor is not None:
            tensor[dst] = value
