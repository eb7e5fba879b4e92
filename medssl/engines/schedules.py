"""Per-iteration learning-rate schedule: linear warmup then cosine decay.

The schedule is a pure function of the optimizer-step index, so resuming a run only needs the iteration
counter (the scheduler's ``state_dict`` stores it anyway for clarity).
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer


def warmup_cosine_lr(
    iteration: int,
    *,
    base_lr: float,
    max_iterations: int,
    warmup_iterations: int = 0,
    final_lr: float = 0.0,
) -> float:
    """Learning rate at optimizer step ``iteration`` (0-based).

    Warmup (``iteration < warmup_iterations``): ``base_lr * (iteration + 1) / warmup_iterations``.
    Afterwards: ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t / T)) / 2`` with
    ``t = iteration - warmup_iterations`` and ``T = max_iterations - warmup_iterations`` (t clipped to T),
    i.e. ``base_lr`` at the first post-warmup step and ``final_lr`` at the end, as in SimCLR/BYOL/SimSiam.

    Args:
        iteration: optimizer step index, 0-based.
        base_lr: peak learning rate (already scaled by the batch size).
        max_iterations: total number of optimizer steps of the run (> 0).
        warmup_iterations: linear-warmup steps, default 0.
        final_lr: learning rate at the end of the cosine, default 0.
    """
    if max_iterations <= 0:
        raise ValueError("max_iterations must be positive")
    warmup_iterations = max(0, min(warmup_iterations, max_iterations))
    if iteration < warmup_iterations:
        return base_lr * (iteration + 1) / warmup_iterations
    span = max_iterations - warmup_iterations
    if span <= 0:
        return base_lr
    t = min(iteration - warmup_iterations, span)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t / span))


class WarmupCosineSchedule:
    """Set the learning rate of every param group before each optimizer step.

    Groups with ``fixed_lr=True`` (SimSiam predictor) keep ``base_lr`` (times the group's ``lr_scale``,
    default 1) for the whole run; the others follow :func:`warmup_cosine_lr` times their ``lr_scale``.

    Args:
        optimizer: the optimizer whose groups are updated.
        base_lr, max_iterations, warmup_iterations, final_lr: see :func:`warmup_cosine_lr`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        base_lr: float,
        max_iterations: int,
        warmup_iterations: int = 0,
        final_lr: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.max_iterations = max_iterations
        self.warmup_iterations = warmup_iterations
        self.final_lr = final_lr
        self.last_iteration = -1

    def lr_at(self, iteration: int) -> float:
        """The scheduled (non-fixed) learning rate at ``iteration``."""
        return warmup_cosine_lr(iteration, base_lr=self.base_lr, max_iterations=self.max_iterations,
                                warmup_iterations=self.warmup_iterations, final_lr=self.final_lr)

    def step(self, iteration: int) -> float:
        """Apply the rates for optimizer step ``iteration``; returns the scheduled learning rate."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            scale = float(group.get("lr_scale", 1.0))
            group["lr"] = (self.base_lr if group.get("fixed_lr", False) else lr) * scale
        self.last_iteration = iteration
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "max_iterations": self.max_iterations,
                "warmup_iterations": self.warmup_iterations, "final_lr": self.final_lr,
                "last_iteration": self.last_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the iteration counter (the schedule constants come from the current config)."""
        self.last_iteration = int(state["last_iteration"])
