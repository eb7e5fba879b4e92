"""Optimizers for pretraining: SGD, Adam, AdamW and LARS over the methods' parameter groups.

Which parameters get weight decay and the LARS trust ratio follows each method's paper or code
(:meth:`medssl.methods.base.SSLMethod.param_groups`): SimCLR and BYOL exclude biases and normalisation
parameters from both (their papers); SimSiam's code decays every parameter (plain SGD); SwAV's code
(``main_swav.py``: ``SGD(model.parameters(), weight_decay=wd)`` wrapped in ``LARC``) applies both to every
parameter.

Param groups carry two medssl flags besides the usual torch keys:

- ``exclude_from_lars`` (bool): LARS uses a trust ratio of 1 for the group (plain SGD with momentum);
  bias and normalisation parameters get this together with ``weight_decay=0`` (BYOL, SimCLR).
- ``fixed_lr`` (bool): the learning-rate schedule leaves the group at the base rate (SimSiam predictor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by SimCLR, SwAV and BYOL.

    For each parameter ``w`` with gradient ``g`` of a group that is not ``exclude_from_lars``::

        d = g + weight_decay * w
        trust = eta * ||w|| / ||d||      (1 when ||w|| == 0 or ||d|| == 0)
        d = trust * d

    (excluded groups: ``d = g + weight_decay * w``, normally with weight_decay 0). Then SGD momentum::

        buf = momentum * buf + d         (buf = d at the first step)
        w = w - lr * buf

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (the schedule overwrites it every step).
        momentum: default 0.9.
        weight_decay: default 0.
        eta: trust coefficient, default 1e-3 (SimCLR/BYOL value; SwAV's ``trust_coefficient`` too).

    SwAV's code uses NVIDIA apex's ``LARC`` (``clip=False``), whose trust ratio is
    ``eta * ||w|| / (||g|| + weight_decay * ||w|| + 1e-8)``. By the triangle inequality ``||g|| - wd * ||w|| <=
    ||d|| <= ||g|| + wd * ||w||``, so this ratio is at least LARC's and exceeds it by a relative amount of at
    most about ``2 * wd * ||w|| / ||g||`` (SwAV's weight decay is 1e-6).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 1e-3) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "exclude_from_lars": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum, eta = group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if not group["exclude_from_lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-group["lr"])
        return loss


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """True for biases and normalisation gains/shifts (1-D tensors), which get no weight decay / LARS."""
    return param.ndim <= 1 or name.endswith(".bias")


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (``weight_decay``) and biases/norm parameters (no decay, excluded from LARS).

    Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_bias_or_norm(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "exclude_from_lars": False},
              {"params": no_decay, "weight_decay": 0.0, "exclude_from_lars": True}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eta: float = 1e-3,
) -> Optimizer:
    """Build ``sgd`` | ``adam`` | ``adamw`` | ``lars`` over ``param_groups``.

    Groups keep their own ``weight_decay`` (the method excludes bias/norm parameters) and their
    ``exclude_from_lars`` / ``fixed_lr`` flags; ``lr`` is the initial rate (the schedule then sets it).
    """
    key = name.lower()
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
        g.setdefault("exclude_from_lars", False)
        g.setdefault("fixed_lr", False)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
