"""Batched SSL augmentation with kornia: the random part of a preset applied to whole batches, on GPU or CPU.

Per-sample path (:func:`medssl.transforms.presets.build_ssl_transform`) runs every augmentation in the data
loader workers; this path lets the loader do only the deterministic part (read, scale, shorter side to
``base_size`` and centre crop, :func:`build_batched_base_transform`) and then draws every view's random
parameters per sample inside one kornia call per augmentation (``same_on_batch=False``), typically on the GPU
right before the model. Randomness comes from torch's generator (``torch.manual_seed`` for reproducibility).

The same :class:`~medssl.transforms.presets.AugmentSpec` drives both paths; differences: rotations by a few
degrees use kornia's zero padding instead of border padding, and the blur kernel size is fixed per batch
(about 10 % of the view side) while sigma is drawn per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from kornia import augmentation as K
from torch import nn

from medssl.transforms.presets import (
    AugmentSpec,
    EvalTransform,
    build_eval_transform,
    get_spec,
    multicrop_options,
    view_specs,
)
from medssl.transforms.ssl import blur_kernel_size


def build_kornia_view(spec: AugmentSpec, size: int) -> nn.Sequential:
    """kornia pipeline for one view: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, size, size)`` in [0, 1]."""
    steps: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=spec.crop_scale, ratio=spec.crop_ratio, align_corners=False)
    ]
    if spec.hflip_p > 0:
        steps.append(K.RandomHorizontalFlip(p=spec.hflip_p))
    if spec.vflip_p > 0:
        steps.append(K.RandomVerticalFlip(p=spec.vflip_p))
    if spec.rot90_p > 0:
        steps.append(K.RandomRotation90(times=(0, 3), p=1.0))
    if spec.rotate_p > 0 and spec.rotate_degrees > 0:
        steps.append(K.RandomRotation(degrees=spec.rotate_degrees, p=spec.rotate_p))
    if spec.jitter_p > 0 and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        steps.append(
            K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.jitter_p)
        )
    if spec.gray_p > 0:
        steps.append(K.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p > 0:
        k = blur_kernel_size(size)
        steps.append(K.RandomGaussianBlur((k, k), sigma=spec.blur_sigma, p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_p))
    return nn.Sequential(*steps)


class BatchedSSLAugment(nn.Module):
    """``forward(batch (N, 3, H, W) in [0, 1]) -> [view (N, 3, S, S)] * num_views (+ local views)``, each view
    independently augmented per sample. Move it to the batch's device with ``.to(device)``.

    Args:
        modality: one of :data:`medssl.transforms.presets.MODALITIES`.
        image_size: global view side S (px).
        num_views: number of global views.
        multicrop: SwAV local crops as in :func:`~medssl.transforms.presets.build_ssl_transform` (int count or
            options dict); local views of ``local_size`` px follow the global ones, and the global views then
            use ``global_scale``.
        view_recipe: ``"symmetric"`` (default) or ``"byol"`` (BYOL's asymmetric pair, as the per-sample path;
            :func:`~medssl.transforms.presets.view_specs`).
    """

    def __init__(self, modality: str, image_size: int, num_views: int = 2,
                 multicrop: int | Mapping[str, Any] | None = None, view_recipe: str | None = None) -> None:
        super().__init__()
        if num_views < 1:
            raise ValueError("num_views must be >= 1")
        spec = get_spec(modality)
        if multicrop:
            opts = multicrop_options(multicrop, image_size)
            global_specs = view_specs(replace(spec, crop_scale=tuple(opts["global_scale"])), num_views, view_recipe)
            local_spec = replace(spec, crop_scale=tuple(opts["local_scale"]))
            views = [build_kornia_view(s, image_size) for s in global_specs]
            views += [build_kornia_view(local_spec, int(opts["local_size"])) for _ in range(int(opts["num_local"]))]
        else:
            views = [build_kornia_view(s, image_size) for s in view_specs(spec, num_views, view_recipe)]
        self.views = nn.ModuleList(views)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got {tuple(batch.shape)}")
        return [view(batch).clamp_(0.0, 1.0) for view in self.views]


def build_batched_base_transform(modality: str, base_size: int) -> EvalTransform:
    """Per-sample deterministic part of the batched path: ``record -> {"image": Tensor(3, B, B) in [0, 1], "label",
    "id"}`` (read, scale, shorter side to ``base_size`` B, centre crop; the evaluation pipeline at size B), so
    records stack into a batch for :class:`BatchedSSLAugment`. ``base_size``: e.g. 2x the view size."""
    return build_eval_transform(modality, base_size)
