"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp cluster assignments, with multi-crop.

Defaults (DESIGN.md §5): projector 2048-2048-128, 3000 prototypes kept L2-normalised and frozen during the
first iterations, Sinkhorn eps 0.05 with 3 iterations, temperature 0.1, assignments computed on the two global
crops, optional queue of past embeddings for small batches, multi-crop 2 global + 6 local views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import MedsslError
from medssl.methods.base import SSLMethod, resolve_mlp_head, resolve_prototypes
from medssl.methods.distributed import all_reduce_max_, all_reduce_sum_, is_distributed, world_size
from medssl.models import MLPHead


def _logsumexp_over_samples(logq: torch.Tensor, reduce: bool) -> torch.Tensor:
    """log(sum over samples, and over ranks when ``reduce``, of exp(logq)) for logq (K, B_local) -> (K, 1)."""
    top = logq.amax(dim=1, keepdim=True)
    if reduce:
        all_reduce_max_(top)
    total = torch.exp(logq - top).sum(dim=1, keepdim=True)
    if reduce:
        all_reduce_sum_(total)
    return top + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3, *,
                   distributed: bool = True) -> torch.Tensor:
    """SwAV's equipartitioned soft assignments of samples to prototypes (no gradient).

    Starting from ``Q = exp(scores / eps)`` normalised to total mass 1, alternately rescale so every prototype
    receives mass 1/K and every sample 1/B (B = samples over all ranks when distributed), ``iterations``
    times, ending with the sample normalisation; the result is multiplied by B so each row is a probability
    vector. The same algorithm as SwAV's, carried out on log Q (log-sum-exp) so that large ``scores / eps``
    neither overflow nor underflow to an all-zero sample.

    Args:
        scores: prototype scores (B_local, K), e.g. ``normalize(z) @ prototypes.T``.
        eps: entropic regularisation (smaller = sharper assignments). Default 0.05.
        iterations: number of (prototype, sample) normalisation rounds. Default 3.
        distributed: normalise over the samples of all ranks with ``all_reduce`` when ``torch.distributed``
            is initialised with several processes. Default True.

    Returns:
        Q (B_local, K), float32: rows sum to 1; after enough iterations every column sums to B / K
        (summed over ranks when distributed).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    reduce = distributed and is_distributed()
    logq = scores.detach().float().T / eps  # (K, B_local)
    num_prototypes = logq.shape[0]
    num_samples = torch.tensor([float(logq.shape[1])], device=logq.device)
    if reduce:
        all_reduce_sum_(num_samples)
    log_k, log_b = math.log(num_prototypes), torch.log(num_samples)
    logq = logq - torch.logsumexp(_logsumexp_over_samples(logq, reduce), dim=0, keepdim=True)
    for _ in range(iterations):
        logq = logq - _logsumexp_over_samples(logq, reduce) - log_k
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - log_b
    return torch.exp(logq + log_b).T


def swav_loss(
    scores_per_view: Sequence[torch.Tensor],
    assignments: Sequence[torch.Tensor],
    temperature: float = 0.1,
    crops_for_assign: Sequence[int] = (0, 1),
) -> torch.Tensor:
    """Swapped prediction: every view predicts the assignments computed from each other assigned view.

    ``loss = mean_{a in crops_for_assign} mean_{v != a} mean_i [-sum_k q_a[i,k] log softmax(s_v[i] / T)_k]``.

    Args:
        scores_per_view: V tensors (B, K) of prototype scores, one per view (globals first).
        assignments: one Q (B, K) per entry of ``crops_for_assign`` (treated as constants).
        temperature: softmax temperature T. Default 0.1.
        crops_for_assign: indices of the views whose assignments are predicted. Default (0, 1).

    Returns:
        Scalar loss (float32).
    """
    num_views = len(scores_per_view)
    if len(assignments) != len(crops_for_assign):
        raise ValueError(f"{len(assignments)} assignments for {len(crops_for_assign)} crops_for_assign")
    if num_views < 2:
        raise ValueError("swav_loss needs at least 2 views")
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores_per_view]
    total = scores_per_view[0].new_zeros((), dtype=torch.float32)
    for q, assigned in zip(assignments, crops_for_assign):
        q = q.detach().float()
        terms = [-(q * log_probs[v]).sum(dim=1).mean() for v in range(num_views) if v != assigned]
        total = total + torch.stack(terms).sum() / (num_views - 1)
    return total / len(crops_for_assign)


class SwAV(SSLMethod):
    """SwAV with multi-crop, prototype freezing and an optional queue.

    Args:
        backbone: a medssl backbone.
        projector_hidden_dim: hidden width of the projector. Default 2048.
        projector_out_dim: embedding dimension (= prototype dimension). Default 128.
        num_prototypes: K. Default 3000.
        temperature: softmax temperature. Default 0.1.
        sinkhorn_eps: Sinkhorn regularisation. Default 0.05.
        sinkhorn_iterations: Sinkhorn rounds. Default 3.
        freeze_prototypes_iterations: prototype gradients are dropped for steps 1..N (SwAV freezes them for
            the first epoch; 313 is its value for batch 4096 on ImageNet: set one epoch's steps). Default 313.
        num_local_crops: local (small) views after the 2 global ones; ``views_required = 2 + num_local_crops``.
            Default 6.
        local_crop_size: side in pixels of the local crops, read by the training engine when it builds the
            multi-crop transform (the method itself accepts any size); None leaves the engine's default.
        crops_for_assign: views whose Sinkhorn assignments are predicted. Default (0, 1).
        queue_length: total queue length over all ranks (0 = no queue); each rank keeps
            ``queue_length // world_size`` past embeddings per assigned crop. Default 0.
        queue_start_iteration: the queue is filled and used once this many steps are done (for a start epoch
            e, pass e * steps_per_epoch). It enters the Sinkhorn scores only once full. Default 0.
        heads: heads from an imported checkpoint; ``projector`` and ``prototypes`` are used when present.
        heads_source: the checkpoint path, for error messages.
    """

    name = "swav"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector_hidden_dim: int = 2048,
        projector_out_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iterations: int = 3,
        freeze_prototypes_iterations: int = 313,
        num_local_crops: int = 6,
        local_crop_size: int | None = None,
        crops_for_assign: Sequence[int] = (0, 1),
        queue_length: int = 0,
        queue_start_iteration: int = 0,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__(backbone)
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        self.views_required = 2 + int(num_local_crops)
        self.local_crop_size = None if local_crop_size is None else int(local_crop_size)
        self.crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not self.crops_for_assign or any(not 0 <= c < self.views_required for c in self.crops_for_assign):
            raise ValueError(f"crops_for_assign {crops_for_assign} must index the {self.views_required} views")
        self.projector, self.head_sources["projector"] = resolve_mlp_head(
            "projector", heads, MLPHead(self.num_features, projector_hidden_dim, projector_out_dim),
            in_dim=self.num_features, source=heads_source)
        self.prototypes, self.head_sources["prototypes"] = resolve_prototypes(
            heads, self.projector.out_dim, num_prototypes, source=heads_source)
        self.prototypes.normalize_()
        self.temperature = float(temperature)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.freeze_prototypes_iterations = int(freeze_prototypes_iterations)
        self.queue_length = int(queue_length)
        self.queue_start_iteration = int(queue_start_iteration)
        self.steps_done = 0
        self.queue: torch.Tensor | None = None  # (len(crops_for_assign), L, D), kept out of state_dict
        self.queue_filled = 0

    # -- forward -------------------------------------------------------------------------------------
    def _embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised projections of all views, (V * B, D): one backbone pass per run of equal sizes."""
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.encode(torch.cat(views[start:end])))
            start = end
        return F.normalize(self.projector(torch.cat(feats)), dim=1)

    def _queue_active(self) -> bool:
        return self.training and self.queue_length > 0 and self.steps_done >= self.queue_start_iteration

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """V views (globals first) -> ``{"loss", "embeddings": normalised projections of view 1 (B, D)}``."""
        self.check_views(views)
        batch = views[0].shape[0]
        z = self._embed(list(views))
        scores = self.prototypes(z)
        scores_per_view = list(scores.split(batch))
        use_queue = self._queue_active()
        if use_queue and self.queue is None:
            per_rank = max(self.queue_length // world_size(), 1)
            self.queue = z.new_zeros((len(self.crops_for_assign), per_rank, z.shape[1]), dtype=torch.float32)
            self.queue_filled = 0
        assignments = []
        with torch.no_grad():
            for slot, crop in enumerate(self.crops_for_assign):
                out = scores_per_view[crop].detach()
                if use_queue and self.queue_filled >= self.queue.shape[1]:
                    out = torch.cat([self.queue[slot].to(out.dtype) @ self.prototypes.weight.T.to(out.dtype), out])
                assignments.append(sinkhorn_knopp(out, self.sinkhorn_eps, self.sinkhorn_iterations)[-batch:])
            if use_queue:
                emb = z.detach().float().split(batch)
                length = self.queue.shape[1]
                for slot, crop in enumerate(self.crops_for_assign):
                    self.queue[slot] = torch.cat([emb[crop], self.queue[slot]])[:length]
                self.queue_filled = min(self.queue_filled + batch, length)
        loss = swav_loss(scores_per_view, assignments, self.temperature, self.crops_for_assign)
        return {"loss": loss, "embeddings": z[:batch].detach()}

    # -- hooks ---------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, iteration: int) -> None:
        """Drop the prototypes' gradient during steps 1..``freeze_prototypes_iterations``."""
        if iteration <= self.freeze_prototypes_iterations:
            self.prototypes.weight.grad = None

    def on_after_optimizer_step(self, iteration: int, max_iterations: int) -> dict[str, float]:
        """Re-normalise the prototypes and record the step count (drives the queue start)."""
        self.prototypes.normalize_()
        self.steps_done = int(iteration)
        return {}

    def extra_state(self) -> dict[str, Any]:
        """``{"steps_done", "queue" (tensor on CPU or None), "queue_filled"}`` of this rank."""
        return {
            "steps_done": self.steps_done,
            "queue": None if self.queue is None else self.queue.detach().cpu().clone(),
            "queue_filled": self.queue_filled,
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`; the queue moves to the prototypes' device."""
        try:
            self.steps_done = int(state.get("steps_done", 0))
            queue = state.get("queue")
            self.queue_filled = int(state.get("queue_filled", 0))
        except (TypeError, ValueError, AttributeError) as exc:
            raise MedsslError(f"SwAV extra state is malformed: {exc}") from exc
        if queue is not None:
            expected = (len(self.crops_for_assign), self.projector.out_dim)
            if not isinstance(queue, torch.Tensor) or queue.ndim != 3 or (queue.shape[0], queue.shape[2]) != expected:
                raise MedsslError(f"SwAV queue in the checkpoint does not fit this model (expected (.., {expected}))")
            queue = queue.to(self.prototypes.weight.device, torch.float32)
        self.queue = queue
