"""The pretraining trainer: a ``monai.engines.Trainer`` whose iteration is one SSL optimizer step.

Per step (Ignite iteration ``t``, 1-based, covering optimizer step ``t - 1`` of the lr schedule):

1. set the learning rate of every param group (warmup + cosine, fixed-lr groups untouched); with a
   ``view_augment`` module, cut the views from the batch's images on the device (torch generators seeded from
   ``(augment_seed, step, rank)`` and restored afterwards, so a resumed run draws the same views);
2. for each of ``accumulate`` micro-batches: views -> device (channels_last if asked) -> InputNormalization ->
   method -> loss / accumulate -> non-finite guard -> backward (through a GradScaler for fp16);
3. ``method.on_before_optimizer_step(t)``, optimizer step, ``method.on_after_optimizer_step(t, T)`` (EMA tau,
   prototype normalisation, step counters); the returned scalars are logged. When the fp16 ``GradScaler``
   skips the optimizer step (inf/NaN gradients: it lowers its scale instead), the method's after-step hook is
   skipped too, so the EMA target, SwAV's step counter (prototype freezing, queue start) and normalisations
   only follow steps that changed the weights; the step logs ``skipped_step: 1`` and a warning.

AMP runs only on CUDA (bf16 autocast, or fp16 autocast with ``torch.amp.GradScaler``); on CPU the step is fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.engines import Trainer
from torch import nn

from medssl.engines.handlers import CollapseMonitor, check_finite_loss
from medssl.engines.sampling import step_seed

logger = logging.getLogger("medssl.engines.trainer")


class PretrainingTrainer(Trainer):
    """MONAI trainer running SSL steps for a fixed number of optimizer steps.

    Args:
        method: the SSL method (``medssl.methods.SSLMethod``), already on ``device``.
        optimizer: optimizer over ``method.param_groups(...)``.
        schedule: :class:`~medssl.engines.schedules.WarmupCosineSchedule`.
        normalization: input normalisation applied to every view (on ``device``).
        data_loader: yields ``{"views": [Tensor(B, C, H, W)] * V}``, or ``{"image": Tensor(B, C, H, W)}`` when
            ``view_augment`` is given.
        max_iterations: optimizer steps of the whole run.
        epoch_length: optimizer steps per epoch.
        device: training device.
        precision: ``fp32`` | ``bf16`` | ``fp16`` (AMP on CUDA only).
        channels_last: convert views to channels-last memory format.
        accumulate: micro-batches per optimizer step.
        network: what to call for the forward pass (``method`` itself, its DDP wrapper or a compiled
            version); the hooks are always called on ``method``.
        collapse_monitor: optional :class:`CollapseMonitor` fed with the first micro-batch's embeddings.
        last_checkpoint: callable returning the newest checkpoint path (named in non-finite loss errors).
        view_augment: optional batched augmentation ``images -> [views]`` already on ``device``
            (:class:`~medssl.transforms.batched.BatchedSSLAugment`).
        augment_seed, rank: seed and process rank for ``view_augment``'s randomness.
    """

    def __init__(self, *, method: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
                 normalization: nn.Module, data_loader: Any, max_iterations: int, epoch_length: int,
                 device: torch.device, precision: str = "fp32", channels_last: bool = False, accumulate: int = 1,
                 network: nn.Module | None = None, collapse_monitor: CollapseMonitor | None = None,
                 last_checkpoint: Callable[[], Path | None] | None = None, view_augment: nn.Module | None = None,
                 augment_seed: int = 0, rank: int = 0) -> None:
        super().__init__(device=device, max_epochs=-(-max_iterations // epoch_length), data_loader=data_loader,
                         epoch_length=epoch_length, decollate=False, amp=False)
        self.method = method
        self.network = network if network is not None else method
        self.optimizer = optimizer
        self.schedule = schedule
        self.normalization = normalization
        self.max_iterations = max_iterations
        self.channels_last = channels_last
        self.accumulate = accumulate
        self.collapse_monitor = collapse_monitor
        self.last_checkpoint = last_checkpoint or (lambda: None)
        self.view_augment = view_augment
        self.augment_seed = augment_seed
        self.rank = rank
        cuda = torch.device(device).type == "cuda"
        if precision != "fp32" and not cuda:
            logger.warning("precision %s needs CUDA; running in fp32 on %s", precision, device)
            precision = "fp32"
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.grad_scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def run(self) -> None:  # type: ignore[override]
        """Run (or continue, when ``state.iteration`` was restored) until ``max_iterations`` steps.

        Ignite stops the run through ``state.max_iters`` (after step ``max_iterations``, mid-epoch when it is not
        a multiple of ``epoch_length``: ``TERMINATE`` then ``COMPLETED`` fire, the partial epoch's
        ``EPOCH_COMPLETED`` does not). ``state.max_epochs`` is ``ceil(max_iterations / epoch_length)``, the last
        epoch the run reaches, so it never ends the run earlier and logs read ``Epoch: e/E`` (MONAI's
        ``StatsHandler``)."""
        self.state.max_iters = self.max_iterations
        self.state.max_epochs = -(-self.max_iterations // int(self.state.epoch_length))
        if self.state.iteration >= self.max_iterations:
            logger.info("run already finished (%d steps)", self.state.iteration)
            return
        from ignite.engine import Engine

        Engine.run(self, data=self.data_loader)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _views(self, batchdata: dict[str, Any], iteration: int) -> list[torch.Tensor]:
        """The batch's views: as loaded, or cut on the device by ``view_augment`` (seeded per step and rank)."""
        if self.view_augment is None:
            return batchdata["views"]
        images = batchdata["image"].to(self.state.device, non_blocking=True)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.augment_seed, iteration, self.rank))
            return self.view_augment(images)

    def _prepare_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for v in views:
            v = v.to(self.state.device, non_blocking=True)
            v = self.normalization(v)
            if self.channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            out.append(v)
        return out

    @staticmethod
    def _agree_on_finiteness(loss: torch.Tensor) -> torch.Tensor:
        """With several processes, make every rank see a non-finite loss when any rank has one."""
        import ignite.distributed as idist

        if idist.get_world_size() <= 1:
            return loss
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        flag = idist.all_reduce(flag, op="MAX")
        return loss if float(flag) == 0 else loss + float("nan")

    def _mean_over_ranks(self, value: float) -> float:
        """The loss averaged over processes (what a single process with the global batch would report)."""
        import ignite.distributed as idist

        world = idist.get_world_size()
        if world <= 1:
            return value
        total = idist.all_reduce(torch.tensor([value], dtype=torch.float64, device=self.state.device))
        return float(total) / world

    def _optimizer_step(self) -> bool:
        """Step the optimizer (through the GradScaler when there is one); False when the step was skipped.

        ``GradScaler.step`` skips ``optimizer.step()`` when the unscaled gradients hold inf/NaN, and ``update``
        then multiplies the scale by ``backoff_factor`` (< 1); the scale drops in no other case, so a lower
        scale after ``update`` means the step was skipped (the same on every rank: the scaler's inf check is
        made on the all-reduced gradients under DDP).
        """
        if self.grad_scaler is None:
            self.optimizer.step()
            return True
        before = self.grad_scaler.get_scale()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return not self.grad_scaler.get_scale() < before

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        iteration = engine.state.iteration  # 1-based optimizer step
        epoch = engine.state.epoch
        lr = self.schedule.step(iteration - 1)
        views = self._views(batchdata, iteration)
        chunks = [list(vs) for vs in zip(*(v.chunk(self.accumulate) for v in views))]
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        embeddings = None
        for i, chunk in enumerate(chunks):
            sync = i == len(chunks) - 1 or not hasattr(self.network, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.network.no_sync()
            with ctx:
                with self._autocast():
                    out = self.network(self._prepare_views(chunk))
                loss = self._agree_on_finiteness(out["loss"].float())
                check_finite_loss(loss, iteration=iteration, epoch=epoch, last_checkpoint=self.last_checkpoint())
                scaled = loss / len(chunks)
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total_loss += float(loss.detach()) / len(chunks)
            if embeddings is None:
                embeddings = out.get("embeddings")
        self.method.on_before_optimizer_step(iteration)
        output: dict[str, Any] = {"loss": self._mean_over_ranks(total_loss), "lr": lr}
        if self._optimizer_step():
            logs = self.method.on_after_optimizer_step(iteration, self.max_iterations) or {}
            output.update({k: float(v) for k, v in logs.items()})
        else:
            logger.warning("optimizer step %d skipped (fp16 gradients not finite); method hooks skipped too",
                           iteration)
            output["skipped_step"] = 1.0
        if embeddings is not None and self.collapse_monitor is not None:
            output["collapse_std"] = self.collapse_monitor.update(embeddings, iteration=iteration, epoch=epoch)
        return output
