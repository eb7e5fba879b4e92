"""Data loaders of a pretraining run: the SSL view loader (per-sample or batched augmentation) and the kNN
monitor's labelled loaders.

Two augmentation paths (``PretrainConfig.augment_on``):

- ``"loader"`` (default): every view is cut and augmented per sample in the loader workers by the modality's
  MONAI pipeline (:func:`~medssl.transforms.presets.build_ssl_transform`); batches are
  ``{"views": [Tensor(B, 3, S, S)] * V}``.
- ``"device"``: the workers only read, scale and centre-crop each image to ``base_size = 2 * image_size``
  (:func:`~medssl.transforms.batched.build_batched_base_transform`); batches are ``{"image": Tensor(B, 3,
  2S, 2S)}`` and the trainer cuts the views on the training device with one kornia call per augmentation
  (:class:`~medssl.transforms.batched.BatchedSSLAugment`), seeded per optimizer step and rank so resumed runs
  stay exact. Worth it on a GPU when the workers cannot keep up; on CPU the per-sample path is usually faster.
  Non-square images lose their borders outside the centre square.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import label_index, split_reference_query
from medssl.engines.sampling import SeededSampleDataset, StepBatchSampler, collate_views

logger = logging.getLogger("medssl.engines.loaders")


def view_options(config: PretrainConfig, method: nn.Module) -> dict[str, Any]:
    """Keyword arguments (``num_views``, ``multicrop``) of the view pipelines for the method's number of views."""
    views = int(getattr(method, "views_required", 2))
    if config.method == "swav" and views > 2:
        local_size = int(config.method_options.get("local_crop_size", max(8, round(config.image_size * 96 / 224))))
        return {"num_views": 2, "multicrop": {"num_local": views - 2, "local_size": local_size}}
    return {"num_views": views}


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``{"image": Tensor(3, H, W)}`` samples into ``{"image": Tensor(B, 3, H, W)}`` (labels/ids dropped)."""
    return {"image": torch.stack([torch.as_tensor(s["image"]) for s in samples])}


def build_pretraining_loader(config: PretrainConfig, records: list[dict[str, Any]], method: nn.Module, *,
                             rank: int, world_size: int, start_step: int,
                             device: torch.device) -> tuple[DataLoader, nn.Module | None]:
    """The SSL loader for steps ``[start_step, config.iterations)`` and, for ``augment_on="device"``, the
    batched view augmentation to run on ``device`` (else None)."""
    from medssl.transforms.batched import BatchedSSLAugment, build_batched_base_transform
    from medssl.transforms.presets import build_ssl_transform

    options = view_options(config, method)
    augment: nn.Module | None = None
    if config.augment_on == "device":
        transform = build_batched_base_transform(config.modality, 2 * config.image_size)
        augment = BatchedSSLAugment(config.modality, config.image_size, **options).to(device)
        collate = collate_images
    else:
        transform = build_ssl_transform(config.modality, config.image_size, **options)
        collate = collate_views
    sampler = StepBatchSampler(len(records), config.batch_size, int(config.iterations), seed=config.seed,
                               rank=rank, world_size=world_size, start_step=start_step)
    loader = DataLoader(SeededSampleDataset(records, transform, seed=config.seed), batch_sampler=sampler,
                        num_workers=config.workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    return loader, augment


def build_labelled_loaders(config: PretrainConfig,
                           records: list[dict[str, Any]]) -> tuple[DataLoader, DataLoader, int] | None:
    """kNN reference/query loaders (eval transform) or None when there are not two labelled classes."""
    from medssl.data.sources import records_from_path
    from medssl.transforms.presets import build_eval_transform

    labelled = records_from_path(config.knn_data) if config.knn_data else records
    labelled = [r for r in labelled if r.get("label") is not None]
    if len({str(r["label"]) for r in labelled}) < 2 or len(labelled) < 5:
        logger.warning("kNN monitor off: fewer than two labelled classes or five labelled images")
        return None
    if len(labelled) > config.knn_max_images:
        keep = np.random.default_rng(config.seed).choice(len(labelled), config.knn_max_images, replace=False)
        labelled = [labelled[i] for i in sorted(keep)]
    ref, qry = split_reference_query(labelled, config.seed)
    classes = label_index([str(r["label"]) for r in labelled])
    transform = build_eval_transform(config.modality, config.image_size)

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([torch.as_tensor(s["image"]) for s in samples]),
                "label": torch.tensor([classes[str(s["label"])] for s in samples])}

    def loader(recs: list[dict[str, Any]]) -> DataLoader:
        ds = SeededSampleDataset(recs, transform, seed=config.seed)
        return DataLoader(ds, batch_size=max(config.batch_size, 64), shuffle=False, num_workers=config.workers,
                          collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))

    return loader(ref), loader(qry), len(classes)
