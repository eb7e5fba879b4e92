"""SimSiam (Chen & He 2021): symmetrised negative cosine with a stop-gradient, no negatives, no EMA.

Defaults (SimSiam paper, Chen & He 2021, Sec. 3 and 4.2): projector of 3 layers of width 2048 (Linear-BN-ReLU
x2, Linear, BatchNorm without affine parameters; hidden Linears without bias), predictor 2048-512-2048
(bottleneck), predictor trained with a fixed learning rate (its parameter groups carry ``"fixed_lr": True``),
weight decay on every parameter, biases and BatchNorm weights included (the SimSiam code, ``main_simsiam.py``,
passes ``weight_decay`` to SGD for all parameters).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medssl.methods.base import SSLMethod, head_width, resolve_mlp_head
from medssl.models import MLPHead


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-mean_i cos(p_i, z_i)`` with a stop-gradient on ``z``.

    Args:
        p: predictions (B, D).
        z: projections of the other view (B, D); detached here.

    Returns:
        Scalar loss in [-1, 1] (float32).
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


class SimSiam(SSLMethod):
    """SimSiam: ``loss = (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2``.

    Args:
        backbone: a medssl backbone.
        projector_hidden_dim: hidden width of the projector. Default 2048.
        projector_out_dim: projection dimension. Default 2048.
        projector_layers: Linear layers in the projector. Default 3.
        predictor_hidden_dim: bottleneck width of the predictor. Default 512.
        predictor_fixed_lr: flag the predictor's groups ``"fixed_lr": True`` in :meth:`param_groups`. Default True.
        paper_heads: use the paper's widths (2048, 2048, 512) whatever the backbone; default False: the projector
            widths and the predictor bottleneck left at their defaults are scaled to the backbone
            (:func:`medssl.methods.base.head_width`; e.g. 512-512-128 on a ResNet-18).
        heads: heads from an imported checkpoint; ``projector`` and ``predictor`` are used when present.
        heads_source: the checkpoint path, for error messages.
    """

    name = "simsiam"
    views_required = 2
    decay_all_parameters = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector_hidden_dim: int = 2048,
        projector_out_dim: int = 2048,
        projector_layers: int = 3,
        predictor_hidden_dim: int = 512,
        predictor_fixed_lr: bool = True,
        paper_heads: bool = False,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__(backbone)
        projector_hidden_dim = head_width(projector_hidden_dim, 2048, self.num_features, paper_heads=paper_heads)
        projector_out_dim = head_width(projector_out_dim, 2048, self.num_features, paper_heads=paper_heads)
        predictor_hidden_dim = head_width(predictor_hidden_dim, 512, self.num_features, paper_heads=paper_heads)
        default_projector = MLPHead(self.num_features, projector_hidden_dim, projector_out_dim,
                                    num_layers=projector_layers, hidden_bias=False, last_bias=False,
                                    last_bn=True, last_bn_affine=False)
        self.projector, self.head_sources["projector"] = resolve_mlp_head(
            "projector", heads, default_projector, in_dim=self.num_features, source=heads_source)
        proj_dim = self.projector.out_dim
        default_predictor = MLPHead(proj_dim, predictor_hidden_dim, proj_dim, hidden_bias=False)
        self.predictor, self.head_sources["predictor"] = resolve_mlp_head(
            "predictor", heads, default_predictor, in_dim=proj_dim, out_dim=proj_dim, source=heads_source)
        self.predictor_fixed_lr = bool(predictor_fixed_lr)

    def _fixed_lr_modules(self) -> dict[str, nn.Module]:
        return {"predictor": self.predictor} if self.predictor_fixed_lr else {}

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Two views -> ``{"loss" in [-1, 1], "embeddings": projections z1 (B, D), detached}``."""
        self.check_views(views)
        z1 = self.projector(self.encode(views[0]))
        z2 = self.projector(self.encode(views[1]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1))
        return {"loss": loss, "embeddings": z1.detach()}
