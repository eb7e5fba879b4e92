"""Weight surgery before a second stage of pretraining (Ciga et al., *Resource and data efficient self supervised
learning*).

- :func:`scale_frobenius`: shrink conv layers whose weight has a Frobenius norm ``s`` above 1 and compensate in
  the BatchNorm that follows, so the network computes the same function in eval mode (the paper's rule divides
  by ``sqrt(s)``; ``unit_norm`` divides by ``s``). Networks without conv+BatchNorm pairs or with
  weight-standardised convs are refused (:func:`scalable_pairs`).
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


RULES = ("paper", "unit_norm")


def scalable_pairs(model: nn.Module, *, norm_to_bn: bool = False, folds_ws: bool = False) -> dict[str, str]:
    """The conv -> BatchNorm pairs :func:`scale_frobenius` may scale, or a one-line :class:`MedsslError`.

    Scaling only preserves the network's function when the conv's output goes straight into a BatchNorm with
    running statistics that absorb the scale, and when the conv really convolves ``W`` (a weight-standardised
    ``StdConv2d`` convolves ``(W - mean) / std``, which is invariant to ``W -> W / c``: its output would not
    shrink while the BatchNorm statistics are divided, so the outputs would change). Hence:

    - no conv+BatchNorm pair (e.g. a GroupNorm BiT) -> error naming ``--norm bn``;
    - a weight-standardised conv in a pair -> error naming ``--fold-ws`` (fold first: exact).

    ``norm_to_bn`` / ``folds_ws`` check a model *before* GN -> BN conversion / WS folding that the caller will
    apply (:func:`medssl.weights.prepare.prepare_backbone` checks up front so that nothing is changed on error).
    """
    pairs = find_conv_norm_pairs(model)
    bn_pairs = {c: n for c, n in pairs.items() if isinstance(model.get_submodule(n), _BatchNorm)
                or (norm_to_bn and isinstance(model.get_submodule(n), nn.GroupNorm))}
    standardised = [c for c in bn_pairs if isinstance(model.get_submodule(c), StdConv2d)
                    and model.get_submodule(c).standardize]
    if not bn_pairs:
        gn = sum(isinstance(model.get_submodule(n), nn.GroupNorm) for n in pairs.values())
        if gn:
            ws = any(isinstance(m, StdConv2d) and m.standardize for m in model.modules())
            raise MedsslError(f"Frobenius scaling needs conv+BatchNorm pairs, but this network's {gn} conv+norm "
                              f"pairs use GroupNorm: add --norm bn{' --fold-ws' if ws else ''} (or drop "
                              "--scale-frobenius)")
        raise MedsslError("Frobenius scaling needs conv+BatchNorm pairs and this network has none "
                          "(drop --scale-frobenius)")
    if standardised and not folds_ws:
        raise MedsslError(f"Frobenius scaling of {len(standardised)} weight-standardised convs (e.g. "
                          f"{standardised[0]}) would change the outputs (standardisation undoes the scaling of "
                          "the weights, not of the BatchNorm statistics): add --fold-ws")
    return bn_pairs


def scale_frobenius(
    model: nn.Module, *, threshold: float = 1.0, rule: str = "paper", compensate_eps: bool = True
) -> dict[str, Any]:
    """Scale down every conv directly followed by a BatchNorm whose weight Frobenius norm ``s`` exceeds ``threshold``.

    With ``x`` the conv output and ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` the BatchNorm in eval
    mode, dividing the conv weight (and bias) by ``c`` divides ``x`` by ``c``. ``s = ||W||_F`` over the whole
    weight tensor (out, in, kh, kw), measured in float64; all arithmetic is done in float64.

    - ``rule="paper"`` (default; Ciga, Xu & Martel, "Resource and data efficient self supervised learning",
      weight preparation before the second stage): ``W' = W / sqrt(s)``, ``mean' = mean / sqrt(s)``, ``gamma' = gamma / sqrt(s)``,
      ``var' = var / s**2`` (``beta`` unchanged). Then ``gamma' (x' - mean') / sqrt(var') = gamma (x - mean) /
      sqrt(var)``: the eval-mode output is unchanged apart from BatchNorm's eps (below). The layer keeps the norm
      ``sqrt(s) > 1``; in train mode (batch statistics) the BatchNorm output shrinks by ``sqrt(s)`` (the paper's
      intent: smaller activations at the start of the second stage), and the running variance is that of
      ``x / s`` rather than of the new activations ``x / sqrt(s)`` until training updates it.
    - ``rule="unit_norm"`` (documented alternative): ``c = s / threshold``, so the layer's norm becomes exactly
      ``threshold`` (1 by default): ``W' = W / c``, ``mean' = mean / c``, ``var' = var / c**2``, gamma and beta
      unchanged. The output is unchanged in eval mode and in train mode (batch statistics scale the same way),
      apart from eps, and the running statistics remain those of the scaled activations.

    The eps term, exactly: ``sqrt(var' + eps)`` is not ``sqrt(var + eps) / c``. With the literal formulas the
    scaled layer computes ``gamma (x - mean) / sqrt(var + k * eps) + beta`` with ``k = s**2`` (paper) or
    ``k = c**2`` (unit_norm): BatchNorm's eps is effectively multiplied by ``k``, and the normalised term
    changes by the factor ``sqrt((var + eps) / (var + k * eps))``, i.e. by a relative ``~ -(k - 1) * eps /
    (2 var)`` when ``var >> k * eps`` (eps is 1e-5 in torch BatchNorm: s = 10, var = 1 gives -5e-4; s = 20,
    var = 0.01, common in pretrained ResNets, gives -15 %; over the ~50 pairs of a ResNet-50 the changes
    compound: 6.5 % at the output of a test network whose per-layer changes are below 1 %). Therefore
    ``compensate_eps=True`` (default) sets ``gamma' = gamma * c * sqrt(var' + eps) / sqrt(var + eps)``: the
    rule's gamma times ``sqrt((var + k * eps) / (var + eps))``, which makes the eval-mode output exact (float
    rounding only), the property the paper states. ``compensate_eps=False`` applies the published gamma
    literally (``gamma / sqrt(s)`` for ``paper``, ``gamma`` for ``unit_norm``) and accepts the eps change.

    Convs whose output is not directly normalised by a BatchNorm (e.g. ResNetV2's conv3, the stem before
    max-pool) are not scaled and are listed under ``unpaired`` when their norm exceeds the threshold. A network
    without conv+BatchNorm pairs, or with weight-standardised convs in such pairs, is refused (see
    :func:`scalable_pairs`). A BatchNorm without running statistics only needs the conv scaled.

    Returns:
        ``{"operation": "frobenius_scaling", "rule", "threshold", "compensate_eps", "count", "layers": [{"conv",
        "norm", "frobenius_norm", "divisor"}], "unpaired": [{"conv", "frobenius_norm"}]}``.
    """
    if rule not in RULES:
        raise MedsslError(f"Frobenius scaling rule must be one of {', '.join(RULES)}, not {rule!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise MedsslError(f"Frobenius threshold must be a positive number, not {threshold!r}")
    compensate = bool(compensate_eps)
    pairs = scalable_pairs(model)
    layers, unpaired = [], []
    for name, conv in filter_layers(model):
        s = float(conv.weight.detach().double().norm())
        if s <= threshold:
            continue
        if name not in pairs:
            unpaired.append({"conv": name, "frobenius_norm": s})
            continue
        bn = model.get_submodule(pairs[name])
        assert isinstance(bn, _BatchNorm)
        c = s / threshold if rule == "unit_norm" else math.sqrt(s)
        _scale_pair(conv, bn, s, c, rule, compensate)
        layers.append({"conv": name, "norm": pairs[name], "frobenius_norm": s, "divisor": c})
    logger.info("Frobenius scaling (%s rule): %d of %d conv+BN pairs scaled", rule, len(layers), len(pairs))
    return {"operation": "frobenius_scaling", "rule": rule, "threshold": float(threshold),
            "compensate_eps": compensate, "count": len(layers), "layers": layers, "unpaired": unpaired}


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
