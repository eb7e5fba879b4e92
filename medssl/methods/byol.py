"""BYOL (Grill et al. 2020): online network + predictor regress an EMA target network's projections.

Defaults (BYOL paper, Grill et al. 2020, Sec. 3.3): projector 4096-256, predictor 4096-256 (both
Linear-BN-ReLU-Linear), symmetrised loss ``2 - 2 cos(q, z')``, target = exponential moving average of the
online backbone + projector with ``tau`` rising from 0.996 to 1 on a cosine schedule over the run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medssl.methods.base import SSLMethod, head_width, resolve_mlp_head
from medssl.models import MLPHead

EMA_BUFFER_POLICIES = ("own", "copy", "ema")


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i (2 - 2 cos(p_i, z_i))`` with no gradient through ``z`` (the target).

    Args:
        p: online predictions (B, D).
        z: target projections (B, D); detached here.

    Returns:
        Scalar loss in [0, 4] (float32).
    """
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def cosine_tau(iteration: int, max_iterations: int, base_tau: float = 0.996, final_tau: float = 1.0) -> float:
    """BYOL's momentum schedule ``final - (final - base) * (cos(pi * k / K) + 1) / 2``.

    Args:
        iteration: k, steps completed so far (0 gives ``base_tau``); clamped to [0, K].
        max_iterations: K, total optimizer steps of the run (> 0).
        base_tau: tau at k = 0. Default 0.996.
        final_tau: tau at k = K. Default 1.0.
    """
    if max_iterations <= 0:
        raise ValueError(f"max_iterations must be > 0, got {max_iterations}")
    k = min(max(iteration, 0), max_iterations)
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * k / max_iterations) + 1) / 2


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float, *, buffers: str = "own") -> None:
    """In place: ``target_param = tau * target_param + (1 - tau) * online_param`` for every parameter.

    Buffer policy (``buffers``):
        ``"own"`` (default, as BYOL and solo-learn): the target keeps its own buffers; its BatchNorm running
        statistics come from its own forward passes in train mode.
        ``"copy"``: every buffer is copied from the online network.
        ``"ema"``: floating-point buffers get the same moving average; integer buffers (``num_batches_tracked``)
        are copied.

    Raises:
        ValueError: when the two modules do not have the same parameter / buffer names and shapes.
    """
    if buffers not in EMA_BUFFER_POLICIES:
        raise ValueError(f"buffers must be one of {EMA_BUFFER_POLICIES}, got {buffers!r}")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        raise ValueError("target and online networks have different parameters")
    for name, t in t_params.items():
        o = o_params[name]
        if t.shape != o.shape:
            raise ValueError(f"parameter {name}: target {tuple(t.shape)} vs online {tuple(o.shape)}")
        t.mul_(tau).add_(o.detach().to(t.dtype), alpha=1.0 - tau)
    if buffers == "own":
        return
    t_bufs, o_bufs = dict(target.named_buffers()), dict(online.named_buffers())
    if t_bufs.keys() != o_bufs.keys():
        raise ValueError("target and online networks have different buffers")
    for name, t in t_bufs.items():
        o = o_bufs[name]
        if buffers == "ema" and t.is_floating_point():
            t.mul_(tau).add_(o.to(t.dtype), alpha=1.0 - tau)
        else:
            t.copy_(o)


class BYOL(SSLMethod):
    """BYOL with an EMA target (``target_backbone``, ``target_projector``: deep copies, requires_grad False).

    Args:
        backbone: a medssl backbone.
        projector_hidden_dim: hidden width of the projector. Default 4096.
        projector_out_dim: projection dimension. Default 256.
        predictor_hidden_dim: hidden width of the predictor (output = projection dimension). Default 4096.
        base_tau: EMA momentum at the start. Default 0.996.
        final_tau: EMA momentum at the end. Default 1.0.
        ema_buffers: buffer policy of :func:`ema_update_`. Default ``"own"``.
        paper_heads: use the paper's hidden widths (4096) whatever the backbone; default False: hidden widths
            left at their defaults are scaled to the backbone (:func:`medssl.methods.base.head_width`).
        heads: heads from an imported checkpoint; ``projector`` and ``predictor`` are used when present
            (the target starts as a copy of the online projector).
        heads_source: the checkpoint path, for error messages.
    """

    name = "byol"
    views_required = 2
    view_recipe = "byol"  # view 1: blur p 1.0, no solarize; view 2: blur p 0.1, solarize p 0.2 (BYOL, Table 6)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector_hidden_dim: int = 4096,
        projector_out_dim: int = 256,
        predictor_hidden_dim: int = 4096,
        base_tau: float = 0.996,
        final_tau: float = 1.0,
        ema_buffers: str = "own",
        paper_heads: bool = False,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__(backbone)
        projector_hidden_dim = head_width(projector_hidden_dim, 4096, self.num_features, paper_heads=paper_heads)
        predictor_hidden_dim = head_width(predictor_hidden_dim, 4096, self.num_features, paper_heads=paper_heads)
        if ema_buffers not in EMA_BUFFER_POLICIES:
            raise ValueError(f"ema_buffers must be one of {EMA_BUFFER_POLICIES}, got {ema_buffers!r}")
        self.projector, self.head_sources["projector"] = resolve_mlp_head(
            "projector", heads, MLPHead(self.num_features, projector_hidden_dim, projector_out_dim),
            in_dim=self.num_features, source=heads_source)
        proj_dim = self.projector.out_dim
        self.predictor, self.head_sources["predictor"] = resolve_mlp_head(
            "predictor", heads, MLPHead(proj_dim, predictor_hidden_dim, proj_dim),
            in_dim=proj_dim, out_dim=proj_dim, source=heads_source)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_tau, self.final_tau = float(base_tau), float(final_tau)
        self.ema_buffers = ema_buffers

    def target_modules(self) -> list[nn.Module]:
        """The EMA target: ``[target_backbone, target_projector]``."""
        return [self.target_backbone, self.target_projector]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Two views -> symmetrised loss ``byol_loss(q1, z2') + byol_loss(q2, z1')`` (range [0, 8])."""
        self.check_views(views)
        z1 = self.projector(self.encode(views[0]))
        z2 = self.projector(self.encode(views[1]))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone.forward_features(views[0]))
            t2 = self.target_projector(self.target_backbone.forward_features(views[1]))
        loss = byol_loss(q1, t2) + byol_loss(q2, t1)
        return {"loss": loss, "embeddings": z1.detach()}

    def on_after_optimizer_step(self, iteration: int, max_iterations: int) -> dict[str, float]:
        """EMA update of the target after step ``iteration`` (1-based) with ``tau = cosine_tau(iteration - 1)``."""
        tau = cosine_tau(iteration - 1, max_iterations, self.base_tau, self.final_tau)
        ema_update_(self.target_backbone, self.backbone, tau, buffers=self.ema_buffers)
        ema_update_(self.target_projector, self.projector, tau, buffers=self.ema_buffers)
        return {"tau": tau}
