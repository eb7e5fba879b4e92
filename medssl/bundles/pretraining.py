"""Pieces of a bundle's ``configs/train.yaml`` that MONAI and the engines do not provide as one object.

The train config builds every component itself (network, SSL method, optimizer, schedule, dataset, loader,
trainer, handlers); this module holds what has no other ``_target_``:

- :func:`pretraining_records`: the records SSL trains on (the ``pretrain`` split, else all but val/test), after
  the bundle's required splits are checked;
- :func:`resolve_weights`: ``init`` as a file (registry names fetched into the cache) for
  :func:`medssl.engines.components.build_network`; :func:`build_ssl_method`: the engines' builder plus the
  method's run schedule;
- :class:`SSLTrainer`: :class:`~medssl.engines.trainer.PretrainingTrainer` with MONAI's trainer arguments
  (``max_epochs``, ``epoch_length``, ``inferer``, ``train_handlers``);
- the handlers of ``train#handlers`` are in :mod:`medssl.bundles.handlers`;
- :func:`resume_step` / :func:`restore` for ``resume: true``.

Only rank 0 writes files under ``torchrun``; checkpoints gather every rank's generator states first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

from medssl.engines.trainer import PretrainingTrainer
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.bundles.pretraining")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (identical initial weights on every rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def world_size() -> int:
    """Processes of the run (``ignite.distributed``: 1 without ``torchrun``)."""
    return int(idist.get_world_size())


def rank() -> int:
    """This process's rank (``ignite.distributed``: 0 without ``torchrun``)."""
    return int(idist.get_rank())


def steps_per_epoch(num_records: int, batch_size: int, world: int, data: Any = None) -> int:
    """Optimizer steps per epoch: ``num_records // (batch_size * world)`` (the last partial batch is dropped).

    Raises:
        MedsslError: fewer images than one global batch (names the data).
    """
    steps = int(num_records) // (int(batch_size) * int(world))
    if steps < 1:
        raise MedsslError(f"{num_records} images are fewer than one batch of {int(batch_size) * int(world)}", data)
    return steps


def build_ssl_method(name: str, backbone: nn.Module, options: dict[str, Any], *, use_checkpoint_heads: bool = False,
                     seed: int = 0, device: torch.device | None = None, sync_bn: bool = False, steps_per_epoch: int,
                     global_batch_size: int, max_iterations: int) -> nn.Module:
    """:func:`medssl.engines.components.build_ssl_method` (heads seeded from ``seed``, on ``device``,
    SyncBatchNorm with several CUDA processes), its epoch-based knobs (SwAV prototype freezing, queue) converted
    to this run's steps (``SSLMethod.configure_run``)."""
    from medssl.engines.components import build_ssl_method as build

    method = build(name, backbone, method_options=dict(options), use_checkpoint_heads=use_checkpoint_heads,
                   seed=seed, device=device, sync_bn=sync_bn)
    method.configure_run(steps_per_epoch=int(steps_per_epoch), global_batch_size=int(global_batch_size),
                         max_iterations=int(max_iterations))
    return method


def batched_views(modality: str, image_size: int, method: nn.Module, options: dict[str, Any],
                  device: torch.device) -> nn.Module:
    """The on-device view augmentation (``augment_on: device``): the modality preset cut in batches by kornia
    (:class:`medssl.transforms.batched.BatchedSSLAugment`) with the method's views."""
    from medssl.transforms.batched import BatchedSSLAugment

    views = int(getattr(method, "views_required", 2))
    kwargs: dict[str, Any] = {"num_views": views, "view_recipe": str(getattr(method, "view_recipe", "symmetric"))}
    if getattr(method, "name", "") == "swav" and views > 2:
        local = options.get("local_crop_size") or max(8, round(image_size * 96 / 224))
        kwargs.update(num_views=2, multicrop={"num_local": views - 2, "local_size": int(local)})
    return BatchedSSLAugment(modality, image_size, **kwargs).to(device)


def batched_base(modality: str, image_size: int) -> Any:
    """Loader-side pipeline of ``augment_on: device``: read, scale and centre-crop to ``2 * image_size``."""
    from medssl.transforms.batched import build_batched_base_transform

    return build_batched_base_transform(modality, 2 * int(image_size))


def provenance(config: Any, network: nn.Module) -> dict[str, Any]:
    """Provenance of the bundle's ``backbone.safetensors``: the start weights (format, file, SHA-256), the
    preparation applied (:class:`medssl.engines.components.NetworkOrigin`) and the run's settings."""
    from medssl.engines.components import network_origin

    origin = network_origin(network)
    return {**origin.source, "operations": list(origin.reports), "pretraining": {
        "method": config.method, "epochs": config.epochs, "batch_size": config.batch_size,
        "image_size": config.image_size, "lr": config.lr, "optimizer": config.optimizer, "seed": config.seed,
        "modality": config.modality, "data": Path(str(config.data)).name}}


def start_run(run_dir: str | os.PathLike[str], config: Any, *, resume: bool = False,
              overwrite: bool = False) -> Path:
    """Check and prepare ``run_dir`` (rank 0): a new run needs an empty folder (or ``overwrite``: its old
    checkpoints, logs and tb/ are removed); it writes ``config.json`` (the resolved settings, atomically)."""
    from medssl.io import atomic_write_json

    folder = Path(run_dir)
    if resume or not _is_rank0():
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise MedsslError("run folder is not empty; use --resume True to continue it or --overwrite True",
                              folder)
        import shutil

        for name in ("checkpoints", "tb"):
            shutil.rmtree(folder / name, ignore_errors=True)
        for name in ("metrics.jsonl", "config.json"):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", config.to_dict())
    return folder


def finish_run(run_dir: str | os.PathLike[str]) -> None:
    """Wait for every process at the end of a run (``torchrun``) so no rank exits while rank 0 writes."""
    if idist.get_world_size() > 1:
        idist.barrier()


def resolve_weights(value: str | os.PathLike[str], *, what: str) -> str:
    """``"random"``, an existing checkpoint file, or a weights-registry name (fetched into the cache).

    Raises:
        MedsslError: neither a file nor a registry name (one line naming the path and the choices).
    """
    from medssl.weights.registry import fetch, registry

    if str(value) == "random":
        return "random"
    if Path(value).is_file():
        return str(value)
    if str(value) in registry():
        return str(fetch(str(value)))
    raise MedsslError(f"{what}: no such checkpoint file; give a checkpoint file, a weights registry name "
                      f"(e.g. {', '.join(sorted(registry())[:3])}, ...) or random", value)


def pretraining_records(data: str | os.PathLike[str], required_splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records SSL trains on: the ``pretrain`` split when the data has one, else every record not in val/test.

    Raises:
        MedsslError: a split named in ``required_splits`` has no record (Lu et al.'s bundle needs
            ``pretrain``/``train``/``test``), or no image is left.
    """
    from medssl.data.sources import records_from_path

    records = records_from_path(data)
    present = {r.get("split") for r in records}
    missing = [s for s in required_splits if s not in present]
    if missing:
        raise MedsslError(f"no record in split(s) {', '.join(missing)}; this bundle's protocol needs splits "
                          f"{', '.join(required_splits)} (make them with `medssl manifest split MANIFEST -o OUT "
                          f"--names {','.join(required_splits)} --ratios ...`, or pass --required_splits \"[]\")",
                          data)
    if any(r.get("split") == "pretrain" for r in records):
        chosen = [r for r in records if r.get("split") == "pretrain"]
    else:
        chosen = [r for r in records if r.get("split") not in ("val", "test")]
    if not chosen:
        raise MedsslError("no images to pretrain on", data)
    return chosen


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
        for handler in train_handlers or ():
            if handler is not None:  # a handler disabled in the config (``_disabled_``) instantiates to None
                handler.attach(self)


def _is_rank0() -> bool:
    return idist.get_rank() == 0


def resume_step(run_dir: str | os.PathLike[str], resume: bool) -> int:
    """Optimizer steps already done: the newest checkpoint's iteration with ``resume``, else 0.

    Raises:
        MedsslError: ``resume`` without any checkpoint in ``<run_dir>/checkpoints``.
    """
    if not resume:
        return 0
    from medssl.engines.checkpoint import latest_checkpoint, load_checkpoint_file

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MedsslError("no checkpoint to resume from in checkpoints/", run_dir)
    return int(load_checkpoint_file(ckpt)["iteration"])


def restore(trainer: PretrainingTrainer, run_dir: str | os.PathLike[str], resume: bool) -> int:
    """With ``resume``, load the newest checkpoint of ``run_dir`` into the trainer's method, optimizer,
    schedule, GradScaler and generators and set its step counter; returns the step (0 without resume)."""
    if not resume:
        return 0
    from medssl.engines.checkpoint import latest_checkpoint, load_checkpoint_file, restore_training_state

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MedsslError("no checkpoint to resume from in checkpoints/", run_dir)
    state = load_checkpoint_file(ckpt)
    restore_training_state(state, method=trainer.method, optimizer=trainer.optimizer, scaler=trainer.grad_scaler,
                           schedule=trainer.schedule, rank=idist.get_rank(), world_size=idist.get_world_size())
    start = int(state["iteration"])
    trainer.state.iteration = start
    trainer.state.epoch = start // trainer.state.epoch_length
    logger.info("resuming %s from iteration %d", run_dir, start)
    return start
