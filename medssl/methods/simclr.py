"""SimCLR (Chen et al. 2020): NT-Xent over cosine similarities with an MLP projector.

Defaults (SimCLR paper, Chen et al. 2020, Sec. 2.3 and Table 5): projector 2048-2048-128 with BatchNorm +
ReLU, temperature 0.1 (0.5 is often better for small batches). With several processes the negatives come from
every rank (see :func:`nt_xent_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medssl.methods.base import SSLMethod, head_width, resolve_mlp_head
from medssl.methods.distributed import all_gather_with_grad, gather_sizes, is_distributed, rank
from medssl.models import MLPHead


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *, gather: bool = True) -> torch.Tensor:
    """Normalised-temperature cross-entropy (SimCLR's NT-Xent), mean over the 2B local anchors.

    Each of the 2B embeddings is an anchor; its positive is the other view of the same image and its
    negatives are the other 2N - 2 embeddings (N = B, or the sum of all ranks' B when gathering), so the
    softmax runs over the 2N - 1 embeddings other than the anchor. Similarity is the cosine.

    Args:
        z1: projections of the first view, (B, D) (need not be normalised).
        z2: projections of the second view, (B, D); row i is the same image as ``z1[i]``.
        temperature: softmax temperature. Default 0.1.
        gather: when ``torch.distributed`` is initialised with several processes, take candidates from all
            ranks with :func:`medssl.methods.distributed.all_gather_with_grad` (anchors stay local). Default True.

    Returns:
        Scalar loss (float32). Averaging it over ranks gives the loss of one process holding all ranks' batches.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2], dim=1).float().view(batch, 2, -1), dim=2).view(batch, -1)
    if gather and is_distributed():
        sizes = gather_sizes(batch, device=z1.device)
        both = all_gather_with_grad(local, sizes)
        offset, total = sum(sizes[: rank()]), sum(sizes)
    else:
        both, offset, total = local, 0, batch
    dim = z1.shape[1]
    anchors = torch.cat([local[:, :dim], local[:, dim:]], dim=0)  # (2B, D)
    candidates = torch.cat([both[:, :dim], both[:, dim:]], dim=0)  # (2N, D)
    logits = anchors @ candidates.T / temperature  # (2B, 2N)
    idx = torch.arange(batch, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + total])
    positive_idx = torch.cat([idx + total, idx])
    rows = torch.arange(2 * batch, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_idx)


class SimCLR(SSLMethod):
    """SimCLR: backbone -> MLP projector -> NT-Xent between two views.

    Args:
        backbone: a medssl backbone.
        projector_hidden_dim: hidden width of the projector. Default 2048.
        projector_out_dim: projection dimension. Default 128.
        projector_layers: number of Linear layers in the projector (2 in SimCLR v1, 3 in v2). Default 2.
        temperature: NT-Xent temperature. Default 0.1.
        gather: gather negatives from all ranks when distributed. Default True.
        paper_heads: use the paper's hidden width (2048) whatever the backbone; default False: the hidden width
            left at its default is scaled to the backbone (:func:`medssl.methods.base.head_width`).
        heads: heads from an imported checkpoint; ``heads["projector"]`` is used when present.
        heads_source: the checkpoint path, for error messages.
    """

    name = "simclr"
    views_required = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector_hidden_dim: int = 2048,
        projector_out_dim: int = 128,
        projector_layers: int = 2,
        temperature: float = 0.1,
        gather: bool = True,
        paper_heads: bool = False,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__(backbone)
        projector_hidden_dim = head_width(projector_hidden_dim, 2048, self.num_features, paper_heads=paper_heads)
        default = MLPHead(self.num_features, projector_hidden_dim, projector_out_dim, num_layers=projector_layers)
        self.projector, self.head_sources["projector"] = resolve_mlp_head(
            "projector", heads, default, in_dim=self.num_features, source=heads_source)
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Two views (B, C, H, W) -> ``{"loss", "embeddings": projections of view 1 (B, D), detached}``."""
        self.check_views(views)
        z1 = self.projector(self.encode(views[0]))
        z2 = self.projector(self.encode(views[1]))
        loss = nt_xent_loss(z1, z2, self.temperature, gather=self.gather)
        return {"loss": loss, "embeddings": z1.detach()}
