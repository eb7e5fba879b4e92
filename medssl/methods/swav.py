"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp cluster assignments, with multi-crop.

Defaults (SwAV paper, Caron et al. 2020, and its code): projector 2048-2048-128, 3000 prototypes kept
L2-normalised and frozen during the first epoch, Sinkhorn eps 0.05 with 3 iterations, temperature 0.1,
assignments computed on the two global crops, a queue of past embeddings for small batches, multi-crop
2 global + 6 local views.

Schedules in epochs, as the SwAV code (``main_swav.py``) and its published recipes set them, converted to
optimizer steps with the run's real steps per epoch by :meth:`SwAV.configure_run` (the training engine calls it):

- prototypes frozen for ``freeze_prototypes_epochs`` (default 1): the recipes' ``--freeze_prototypes_niters``
  is one ImageNet epoch at their batch (313 steps at batch 4096, 5005 at batch 256);
- queue filled from epoch ``epoch_queue_starts`` (0-based, i.e. after that many epochs; code default 15) and
  used once full; length ``queue_length`` embeddings over all ranks, rounded down to a multiple of the global
  batch as the SwAV code does. Default (``None``): on for global batches below 256 (the paper's advice for
  small batches; its batch-256 recipes use 3840), with ``min(3840, one epoch's images)``, so that the queue
  never holds two stale embeddings of one image; off for larger batches. ``queue_length=0`` turns it off.

Optimisation as the SwAV code sets it: ``main_swav.py`` passes ``model.parameters()`` (all of them) to SGD with
``weight_decay`` and wraps it in LARC, so weight decay and the trust ratio apply to biases and normalisation
weights too (:attr:`SwAV.decay_all_parameters`, :attr:`SwAV.lars_all_parameters`), unlike SimCLR and BYOL whose
papers exclude them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import MedsslError
from medssl.methods.base import SSLMethod, head_width, resolve_mlp_head, resolve_prototypes
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


logger = logging.getLogger("medssl.methods.swav")

#: global batches below this get a queue by default (SwAV paper: a queue for small batches; its batch-256
#: recipes use one)
SMALL_BATCH = 256
#: queue length of the SwAV code's batch-256 recipes (``--queue_length 3840``, 15 batches of 256)
DEFAULT_QUEUE_LENGTH = 3840


def swav_schedule(*, steps_per_epoch: int, global_batch_size: int, freeze_prototypes_epochs: float = 1.0,
                  epoch_queue_starts: int = 15, queue_length: int | None = None) -> dict[str, Any]:
    """SwAV's epoch-based knobs converted to optimizer steps for one run.

    - ``freeze_prototypes_steps = round(freeze_prototypes_epochs * steps_per_epoch)``: optimizer steps
      1..N take no prototype gradient;
    - ``queue_start_step = epoch_queue_starts * steps_per_epoch``: the queue is filled from the step after
      this many steps (the first step of 0-based epoch ``epoch_queue_starts``, as in ``main_swav.py``);
    - ``queue_length``: ``None`` -> ``min(3840, steps_per_epoch * global_batch_size)`` when
      ``global_batch_size < 256``, else 0; then rounded down to a multiple of ``global_batch_size``
      (``main_swav.py``: ``queue_length -= queue_length % (batch_size * world_size)``).

    Args:
        steps_per_epoch: optimizer steps per epoch of the run (>= 1).
        global_batch_size: images per optimizer step over all processes (>= 1).
        freeze_prototypes_epochs: epochs (may be fractional) with frozen prototypes (>= 0).
        epoch_queue_starts: epochs done before the queue starts (>= 0).
        queue_length: embeddings in the queue over all ranks; 0 = no queue; None = the default above.

    Returns:
        ``{"steps_per_epoch", "global_batch_size", "freeze_prototypes_epochs", "freeze_prototypes_steps",
        "epoch_queue_starts", "queue_start_step", "queue_length", "queue_length_requested"}`` (JSON-safe).

    Raises:
        MedsslError: negative or non-integer knobs.
    """
    if steps_per_epoch < 1 or global_batch_size < 1:
        raise MedsslError(f"SwAV needs steps_per_epoch >= 1 and global_batch_size >= 1, got {steps_per_epoch}, "
                          f"{global_batch_size}")
    if not freeze_prototypes_epochs >= 0:
        raise MedsslError(f"freeze_prototypes_epochs must be >= 0, got {freeze_prototypes_epochs}")
    if int(epoch_queue_starts) != epoch_queue_starts or epoch_queue_starts < 0:
        raise MedsslError(f"epoch_queue_starts must be a whole number >= 0, got {epoch_queue_starts}")
    if queue_length is not None and (int(queue_length) != queue_length or queue_length < 0):
        raise MedsslError(f"queue_length must be a whole number >= 0 (0 = no queue), got {queue_length}")
    length = queue_length
    if length is None:
        length = min(DEFAULT_QUEUE_LENGTH, steps_per_epoch * global_batch_size) \
            if global_batch_size < SMALL_BATCH else 0
    length = int(length) - int(length) % global_batch_size
    return {
        "steps_per_epoch": int(steps_per_epoch),
        "global_batch_size": int(global_batch_size),
        "freeze_prototypes_epochs": float(freeze_prototypes_epochs),
        "freeze_prototypes_steps": int(round(freeze_prototypes_epochs * steps_per_epoch)),
        "epoch_queue_starts": int(epoch_queue_starts),
        "queue_start_step": int(epoch_queue_starts) * int(steps_per_epoch),
        "queue_length": length,
        "queue_length_requested": None if queue_length is None else int(queue_length),
    }


class SwAV(SSLMethod):
    """SwAV with multi-crop, prototype freezing and a queue; freezing and queue start are set in epochs.

    Call :meth:`configure_run` with the run's steps per epoch and global batch before training (the engine
    does); until then a training forward or step raises :class:`MedsslError`.

    Args:
        backbone: a medssl backbone.
        projector_hidden_dim: hidden width of the projector. Default 2048.
        projector_out_dim: embedding dimension (= prototype dimension). Default 128.
        num_prototypes: K. Default 3000.
        temperature: softmax temperature. Default 0.1.
        sinkhorn_eps: Sinkhorn regularisation. Default 0.05.
        sinkhorn_iterations: Sinkhorn rounds. Default 3.
        freeze_prototypes_epochs: the prototypes take no gradient during the first this many epochs (may be
            fractional). Default 1: the SwAV recipes freeze them for one ImageNet epoch
            (``--freeze_prototypes_niters`` 313 at batch 4096, 5005 at batch 256).
        num_local_crops: local (small) views after the 2 global ones; ``views_required = 2 + num_local_crops``.
            Default 6.
        local_crop_size: side in pixels of the local crops, read by the training engine when it builds the
            multi-crop transform (the method itself accepts any size); None leaves the engine's default.
        crops_for_assign: views whose Sinkhorn assignments are predicted. Default (0, 1).
        queue_length: total queue length (embeddings per assigned crop) over all ranks; 0 = no queue; None
            (default) = on for global batches below 256 with ``min(3840, one epoch's images)`` (3840: the SwAV
            batch-256 recipes), see :func:`swav_schedule`. Rounded down to a multiple of the global batch; each
            rank keeps ``queue_length // world_size``.
        epoch_queue_starts: epochs done before the queue is filled (SwAV code default 15); it enters the
            Sinkhorn scores only once full.
        paper_heads: use the paper's hidden width (2048) whatever the backbone; default False: the hidden width
            left at its default is scaled to the backbone (:func:`medssl.methods.base.head_width`).
        heads: heads from an imported checkpoint; ``projector`` and ``prototypes`` are used when present.
        heads_source: the checkpoint path, for error messages.
    """

    name = "swav"
    #: the SwAV code (``main_swav.py``) builds ``SGD(model.parameters(), weight_decay=wd)`` wrapped in ``LARC``:
    #: weight decay and the LARS trust ratio apply to every parameter, biases and norm weights included
    decay_all_parameters = True
    lars_all_parameters = True

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
        freeze_prototypes_epochs: float = 1.0,
        num_local_crops: int = 6,
        local_crop_size: int | None = None,
        crops_for_assign: Sequence[int] = (0, 1),
        queue_length: int | None = None,
        epoch_queue_starts: int = 15,
        paper_heads: bool = False,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__(backbone)
        projector_hidden_dim = head_width(projector_hidden_dim, 2048, self.num_features, paper_heads=paper_heads)
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
        self.freeze_prototypes_epochs = float(freeze_prototypes_epochs)
        self.epoch_queue_starts = epoch_queue_starts
        self.requested_queue_length = queue_length
        # checked now, converted to steps by configure_run
        swav_schedule(steps_per_epoch=1, global_batch_size=1, freeze_prototypes_epochs=self.freeze_prototypes_epochs,
                      epoch_queue_starts=epoch_queue_starts, queue_length=queue_length)
        self.schedule: dict[str, Any] | None = None
        self.steps_done = 0  # optimizer steps actually taken (skipped fp16 steps do not count)
        self.queue: torch.Tensor | None = None  # (len(crops_for_assign), L, D), kept out of state_dict
        self.queue_filled = 0

    def configure_run(self, *, steps_per_epoch: int, global_batch_size: int,
                      max_iterations: int | None = None) -> dict[str, Any]:
        """Convert the epoch knobs to steps (:func:`swav_schedule`), log them and return them."""
        schedule = swav_schedule(steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size,
                                 freeze_prototypes_epochs=self.freeze_prototypes_epochs,
                                 epoch_queue_starts=self.epoch_queue_starts,
                                 queue_length=self.requested_queue_length)
        self.schedule = schedule
        logger.info("SwAV: prototypes frozen for %g epoch(s) = steps 1-%d (%d steps per epoch)",
                    schedule["freeze_prototypes_epochs"], schedule["freeze_prototypes_steps"], steps_per_epoch)
        if schedule["queue_length"] > 0:
            start = schedule["queue_start_step"]
            logger.info("SwAV queue: %d embeddings (global batch %d), filled after %d epoch(s) from step %d, "
                        "used once full", schedule["queue_length"], global_batch_size,
                        schedule["epoch_queue_starts"], start + 1)
            if max_iterations is not None and start >= max_iterations:
                logger.warning("SwAV queue starts at step %d, after the run's last step %d: it is never used",
                               start + 1, max_iterations)
        elif self.requested_queue_length:
            logger.warning("SwAV queue off: queue_length %d rounds down to 0 at global batch %d",
                           self.requested_queue_length, global_batch_size)
        elif self.requested_queue_length is None:
            logger.info("SwAV queue off: global batch %d >= %d (set queue_length to use one)", global_batch_size,
                        SMALL_BATCH)
        else:
            logger.info("SwAV queue off (queue_length 0)")
        return dict(schedule)

    def _configured(self) -> dict[str, Any]:
        if self.schedule is None:
            raise MedsslError("SwAV's prototype freezing and queue are set in epochs: call "
                              "configure_run(steps_per_epoch=..., global_batch_size=...) before training")
        return self.schedule

    @property
    def queue_length(self) -> int:
        """Resolved queue length over all ranks (0 until :meth:`configure_run` or when off)."""
        return 0 if self.schedule is None else int(self.schedule["queue_length"])

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
        if not self.training:
            return False
        schedule = self._configured()
        return schedule["queue_length"] > 0 and self.steps_done >= schedule["queue_start_step"]

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
        """Drop the prototypes' gradient while fewer than ``freeze_prototypes_steps`` steps are done."""
        if self.steps_done < self._configured()["freeze_prototypes_steps"]:
            self.prototypes.weight.grad = None

    def on_after_optimizer_step(self, iteration: int, max_iterations: int) -> dict[str, float]:
        """Count the step taken (drives freezing and the queue start) and re-normalise the prototypes after a
        step that updated them (during the freeze they are untouched, hence still unit-norm)."""
        self.steps_done += 1
        if self.steps_done > self._configured()["freeze_prototypes_steps"]:
            self.prototypes.normalize_()
        return {"queue_filled": float(self.queue_filled)} if self.queue_length > 0 else {}

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
