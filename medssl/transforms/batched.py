"""Batched SSL augmentation with kornia: the random part of a preset applied to whole batches, on GPU or CPU.

Per-sample path (:func:`medssl.transforms.presets.build_ssl_transform`) runs every augmentation in the data
loader workers; this path lets the loader do only the deterministic part (read, scale, shrink so the shorter
side is at most ``base_size`` and centre crop the largest square, :func:`build_batched_base_transform`; images
are never enlarged, so views are cut from the stored size) and then draws every view's random parameters per
sample inside one kornia call per augmentation (``same_on_batch=False``), typically on the GPU right before the
model. Randomness comes from torch's generator (``torch.manual_seed`` for reproducibility). A batch whose images
differ in size is shrunk to its smallest side (:func:`stack_images`). Grayscale batches stay ``(N, 1, H, W)``
through the augmentations (saturation, hue and random grayscale are identities on gray images and are left out)
and each view is expanded to 3 channels last, as a stride-0 ``expand`` view.

The same :class:`~medssl.transforms.presets.AugmentSpec` drives both paths; differences: rotations by a few
degrees use kornia's zero padding instead of border padding, and the blur kernel size is fixed per batch
(about 10 % of the view side) while sigma is drawn per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from kornia import augmentation as K
from torch import nn

from medssl.transforms.intensity import center_crop
from medssl.transforms.multiview import as_rgb_view
from medssl.transforms.presets import AugmentSpec, build_base_transform, get_spec, view_plan
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


def gray_spec(spec: AugmentSpec) -> AugmentSpec:
    """The spec as applied to a gray image: saturation, hue and random grayscale dropped (identities on gray)."""
    return replace(spec, saturation=0.0, hue=0.0, gray_p=0.0)


class BatchedSSLAugment(nn.Module):
    """``forward(batch (N, C, H, W) in [0, 1], C = 1 or 3) -> [view (N, 3, S, S)] * num_views (+ local views)``,
    each view independently augmented per sample; a 1-channel batch is augmented as 1 channel and each view
    expanded to 3 last (stride-0 view). Move it to the batch's device with ``.to(device)``.

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
        specs = view_plan(spec, image_size, num_views, multicrop, view_recipe)
        self.views = nn.ModuleList([build_kornia_view(s, size) for s, size in specs])
        self.gray_views = nn.ModuleList([build_kornia_view(gray_spec(s), size) for s, size in specs])

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected a batch (N, 3, H, W) or (N, 1, H, W), got {tuple(batch.shape)}")
        if batch.shape[1] == 1:
            return [view(batch).clamp_(0.0, 1.0).expand(-1, 3, -1, -1) for view in self.gray_views]
        return [view(batch).clamp_(0.0, 1.0) for view in self.views]


class BatchedBaseTransform:
    """``record -> {"image": Tensor(C, s, s) in [0, 1], "label", "id"}``: read and scale (1 channel for gray),
    shrink so the shorter side is at most ``base_size`` (never enlarge), centre crop the largest square
    ``s = min(H, W, base_size)``."""

    def __init__(self, modality: str, base_size: int) -> None:
        self.base = build_base_transform(modality, int(base_size))
        self.base_size = int(base_size)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        image = self.base(dict(record))["image"]
        image = center_crop(image, min(image.shape[-2:])).contiguous()
        return {"image": image, "label": record.get("label"), "id": record.get("id")}


def build_batched_base_transform(modality: str, base_size: int) -> BatchedBaseTransform:
    """Per-sample deterministic part of the batched path (:class:`BatchedBaseTransform`); records stack into a
    batch for :class:`BatchedSSLAugment` with :func:`stack_images`. ``base_size``: e.g. 2x the view size (a
    larger image is shrunk before any float work; a smaller one is kept at its size)."""
    get_spec(modality)
    return BatchedBaseTransform(modality, base_size)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack square ``(C, s, s)`` images into ``(N, C, S, S)``, ``S`` the smallest ``s`` (larger ones are shrunk,
    antialiased bilinear; none is enlarged). All 1-channel stays 1 channel; a mix is expanded to 3."""
    side = min(int(x.shape[-1]) for x in images)
    gray = all(x.shape[-3] == 1 for x in images)
    out = []
    for x in images:
        x = torch.as_tensor(x)
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0.0, 1.0)
        out.append(x if gray else as_rgb_view(x))
    return torch.stack(out)
