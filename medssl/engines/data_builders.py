"""Data builders of a pretraining run (re-exported by :mod:`medssl.engines.components`, whose names bundles use).

The SSL records of a manifest or folder, the dataset with the modality's transform chain, the batched view
augmentation (``augment_on="device"``) and the step loader. Keyword defaults are the
:class:`~medssl.engines.config.PretrainConfig` defaults; the rank and world size come from ``ignite.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

from medssl.engines.config import PretrainConfig
from medssl.errors import MedsslError

DEFAULTS = PretrainConfig()


def _view_options(ssl_method: nn.Module | None, method: str, method_options: dict[str, Any] | None,
                  image_size: int) -> dict[str, Any]:
    from medssl.engines.loaders import view_options

    probe = ssl_method if ssl_method is not None else nn.Module()
    return view_options(PretrainConfig(method=getattr(ssl_method, "name", None) or method,
                                       method_options=dict(method_options or {}), image_size=image_size), probe)


def build_pretraining_dataset(data: str = DEFAULTS.data, *, ssl_method: nn.Module | None = None,
                              method: str = DEFAULTS.method, method_options: dict[str, Any] | None = None,
                              modality: str = DEFAULTS.modality, image_size: int = DEFAULTS.image_size,
                              augment_on: str = DEFAULTS.augment_on, seed: int = DEFAULTS.seed,
                              skip_bad_records: int = DEFAULTS.skip_bad_records,
                              records: list[dict[str, Any]] | None = None) -> Any:
    """The SSL training images with the modality's transform chain, keyed by ``(epoch, index)``.

    Records: ``records``, or those of ``data`` (manifest or folder) selected by
    :func:`select_pretraining_records`. ``augment_on="loader"``: each item is ``{"views": [...]}`` cut by the
    modality's per-sample pipeline (:func:`medssl.transforms.presets.build_ssl_transform`); ``"device"``: the
    base image only (the views are cut by :func:`build_view_augment`). The number of views and their recipe
    follow ``ssl_method`` (or ``method`` with ``method_options``).
    """
    from medssl.engines.loaders import GuardedRecords
    from medssl.engines.sampling import SeededSampleDataset

    records = pretraining_records(data) if records is None else records
    if not records:
        raise MedsslError("no images to pretrain on", data)
    if augment_on == "device":
        from medssl.transforms.batched import build_batched_base_transform

        transform = build_batched_base_transform(modality, 2 * image_size)
    else:
        from medssl.transforms.presets import build_ssl_transform

        transform = build_ssl_transform(modality, image_size,
                                        **_view_options(ssl_method, method, method_options, image_size))
    return GuardedRecords(SeededSampleDataset(records, transform, seed=seed), skip_bad_records)


def build_view_augment(ssl_method: nn.Module | None = None, *, method: str = DEFAULTS.method,
                       method_options: dict[str, Any] | None = None, modality: str = DEFAULTS.modality,
                       image_size: int = DEFAULTS.image_size, augment_on: str = DEFAULTS.augment_on,
                       device: str | torch.device | None = DEFAULTS.device) -> nn.Module | None:
    """For ``augment_on="device"``, the batched (kornia) view augmentation on ``device``; else None."""
    if augment_on != "device":
        return None
    from medssl.transforms.batched import BatchedSSLAugment

    device = torch.device(device) if device else idist.device()
    options = _view_options(ssl_method, method, method_options, image_size)
    return BatchedSSLAugment(modality, image_size, **options).to(device)


def build_pretraining_dataloader(dataset: Any, *, batch_size: int = DEFAULTS.batch_size, iterations: int,
                                 seed: int = DEFAULTS.seed, workers: int = DEFAULTS.workers,
                                 augment_on: str = DEFAULTS.augment_on,
                                 skip_bad_records: int = DEFAULTS.skip_bad_records, start_step: int = 0,
                                 device: str | torch.device | None = DEFAULTS.device,
                                 errors_path: str | Path | None = None, skipped: set[Any] | None = None) -> Any:
    """Loader of optimizer steps ``[start_step, iterations)``: this process's share of each global batch.

    Data order is a pure function of ``(seed, epoch, index)`` (:class:`~medssl.engines.sampling.StepBatchSampler`),
    so a resumed run sees the same batches. Unreadable records are replaced or stop the run
    (:class:`~medssl.engines.loaders.BadRecordGate`, logged to ``errors_path``).
    """
    from torch.utils.data import DataLoader

    from medssl.engines.loaders import BadRecordGate, GuardedCollate, collate_images
    from medssl.engines.sampling import StepBatchSampler, collate_views

    rank, world = idist.get_rank(), idist.get_world_size()
    device = torch.device(device) if device else idist.device()
    sampler = StepBatchSampler(len(dataset), batch_size, int(iterations), seed=seed, rank=rank, world_size=world,
                               start_step=start_step)
    collate = collate_images if augment_on == "device" else collate_views
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=GuardedCollate(collate),
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    return BadRecordGate(loader, limit=skip_bad_records, start_step=start_step, errors_path=errors_path,
                         skipped=skipped, rank=rank if world > 1 else None)


def pretraining_records(data: str, required_splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The SSL records of ``data`` (manifest or folder): :func:`select_pretraining_records` of all of them.

    Args:
        data: manifest or folder.
        required_splits: splits ``data`` must have (:func:`medssl.data.splits.require_splits`; Lu et al.'s
            dermatoscopy protocol: ``pretrain``, ``train``, ``test``); empty = any.

    Raises:
        MedsslError: unreadable data, a missing required split, or no record left to pretrain on.
    """
    from medssl.data.sources import records_from_path
    from medssl.data.splits import require_splits

    if not data:
        raise MedsslError("no data given (a manifest .jsonl or a folder of images)")
    require_splits(str(data), required_splits)
    records = select_pretraining_records(records_from_path(data))
    if not records:
        raise MedsslError("no images to pretrain on", data)
    return records


def select_pretraining_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records used for SSL: the ``pretrain`` split when the data has one, else all but ``val``/``test``."""
    if any(r.get("split") == "pretrain" for r in records):
        return [r for r in records if r.get("split") == "pretrain"]
    return [r for r in records if r.get("split") not in ("val", "test")]
