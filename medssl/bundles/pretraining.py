"""The MONAI-argument trainer of a bundle's ``configs/train.yaml``; everything else the config builds comes from
the library.

The train config builds each component with the builders both front doors use
(:mod:`medssl.engines.components`: network, SSL method, optimizer, schedule, loader, view augmentation; the
run-folder handlers of :mod:`medssl.engines.run_handlers` and :class:`medssl.engines.run_folder.RunFolder`:
lock, resume verification with the run record, checkpoints, logs, kNN and collapse monitors, backbone and
``models/model.pt``). This module holds only what MONAI's conventions add on top:

- :func:`build_ssl_method`: :func:`medssl.engines.components.build_ssl_method` with its epoch-based knobs
  converted to this run's steps before a ``torchrun`` config wraps it in DistributedDataParallel;
- :class:`SSLTrainer`: :class:`~medssl.engines.trainer.PretrainingTrainer` with MONAI's trainer arguments
  (``max_epochs``, ``epoch_length``, ``inferer``, ``train_handlers``), so ``ConfigWorkflow.check_properties``
  and ``--tracking mlflow`` find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medssl.engines.trainer import PretrainingTrainer
from medssl.errors import MedsslError


def build_ssl_method(method: str, network: nn.Module, *, steps_per_epoch: int, global_batch_size: int,
                     max_iterations: int, **options: Any) -> nn.Module:
    """:func:`medssl.engines.components.build_ssl_method` (``options``: its keywords), then
    ``SSLMethod.configure_run`` (SwAV prototype freezing and queue as steps of this run; what
    :func:`medssl.engines.components.build_pretraining_trainer` does for the CLI). The result is kept as
    ``method.method_schedule`` (recorded in ``config.json`` by the run folder)."""
    from medssl.engines.components import build_ssl_method as build

    ssl = build(method, network, **options)
    ssl.method_schedule = ssl.configure_run(steps_per_epoch=int(steps_per_epoch),
                                            global_batch_size=int(global_batch_size),
                                            max_iterations=int(max_iterations))
    return ssl


class _InfererNetwork(nn.Module):
    """``views -> inferer(views, network)``; ``no_sync`` of a DDP-wrapped network passes through."""

    def __init__(self, network: nn.Module, inferer: Any) -> None:
        super().__init__()
        self.network = network
        self.inferer = inferer
        if hasattr(network, "no_sync"):
            self.no_sync = network.no_sync

    def forward(self, views: list[torch.Tensor]) -> Any:
        return self.inferer(views, self.network)


class SSLTrainer(PretrainingTrainer):
    """:class:`~medssl.engines.trainer.PretrainingTrainer` with MONAI trainer arguments.

    Args:
        max_epochs: epochs of the run; the run stops after ``max_iterations`` optimizer steps, default
            ``max_epochs * epoch_length``.
        epoch_length: optimizer steps per epoch (``len(records) // (batch_size * world_size)``).
        network: the method, or its DistributedDataParallel wrapper (called through ``inferer``).
        inferer: MONAI inferer called as ``inferer(views, network)`` (``SimpleInferer``: ``network(views)``).
        train_handlers: objects with ``attach(engine)`` (MONAI/Ignite handlers), attached in order; None
            entries (handlers disabled in the config) are skipped.
        **kwargs: the other :class:`PretrainingTrainer` arguments (method, optimizer, schedule, normalization,
            data_loader, device, precision, accumulate, view_augment, augment_seed, rank, ...).
    """

    def __init__(self, *, max_epochs: int, epoch_length: int, max_iterations: int | None = None,
                 network: nn.Module | None = None, inferer: Any = None, train_handlers: Sequence[Any] = (),
                 **kwargs: Any) -> None:
        total = int(max_iterations) if max_iterations is not None else int(max_epochs) * int(epoch_length)
        if total > int(max_epochs) * int(epoch_length):
            raise MedsslError(f"max_iterations {total} is more than max_epochs x epoch_length "
                              f"({max_epochs} x {epoch_length})")
        method = kwargs["method"]
        network = network if network is not None else method
        if inferer is not None:
            network = _InfererNetwork(network, inferer)
        super().__init__(max_iterations=total, epoch_length=int(epoch_length), network=network, **kwargs)
        self.inferer = inferer
        self.method_schedule = getattr(method, "method_schedule", None)
        for handler in train_handlers or ():
            if handler is not None:  # a handler disabled in the config (``_disabled_``) instantiates to None
                handler.attach(self)
