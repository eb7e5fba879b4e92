"""Random flips and rotations of ``(C, H, W)`` float tensors, as lean MONAI ``Randomizable`` dictionary transforms.

Same parameters and draws as MONAI's ``RandFlipd``, ``RandRotate90d`` and ``RandRotated`` (one ``self.R.rand()``
gate per call, then the parameters), but plain torch tensors in and out (no ``MetaTensor``, no affine
bookkeeping), any channel count, and a 2-D rotation by one ``affine_grid``/``grid_sample`` call:

- :class:`RandFlipd`: ``torch.flip`` along ``spatial_axis`` (0 = rows/vertical, 1 = columns/horizontal).
- :class:`RandRot90d`: ``k`` quarter turns, ``k = R.randint(max_k) + 1`` when applied (MONAI's draw), so with
  ``prob = 0.75`` and ``max_k = 3`` the pose is uniform over the 4 rotations.
- :class:`RandRotated`: angle ``U(-max_radians, max_radians)`` about the image centre, output of the input's
  size, bilinear interpolation, border padding (MONAI ``Rotate(keep_size=True, padding_mode="border",
  align_corners=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medssl.transforms.ssl import _RandDict


class RandFlipd(_RandDict):
    """Flip along ``spatial_axis`` (0: vertical, 1: horizontal) with probability ``prob``."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.5, spatial_axis: int = 1) -> None:
        super().__init__(keys, prob)
        if spatial_axis not in (0, 1):
            raise ValueError(f"spatial_axis must be 0 or 1, got {spatial_axis}")
        self.spatial_axis = int(spatial_axis)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=(x.ndim - 2 + self.spatial_axis,))


class RandRot90d(_RandDict):
    """``k`` counter-clockwise quarter turns in the (H, W) plane with probability ``prob``, ``k`` uniform in
    ``1..max_k`` (MONAI ``RandRotate90d(spatial_axes=(0, 1))``)."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.1, max_k: int = 3) -> None:
        super().__init__(keys, prob)
        self.max_k = int(max_k)
        self.k = 1

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        if self._do:
            self.k = int(self.R.randint(self.max_k)) + 1

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, self.k, dims=(x.ndim - 2, x.ndim - 1))


def rotate(x: torch.Tensor, radians: float) -> torch.Tensor:
    """Rotate ``(C, H, W)`` by ``radians`` about the image centre (MONAI ``Rotate`` convention), same size,
    bilinear, border padding. Formula: output pixel ``p`` (relative to the centre, in px) samples the input at
    ``R(-radians) p``; the pixel-space matrix is conjugated into ``affine_grid``'s normalised coordinates."""
    h, w = x.shape[-2:]
    c, s = math.cos(radians), math.sin(radians)
    theta = torch.tensor([[c, s * h / w, 0.0], [-s * w / h, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta[None], [1, x.shape[-3], h, w], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class RandRotated(_RandDict):
    """Rotate by an angle ``U(-max_radians, max_radians)`` with probability ``prob`` (see :func:`rotate`)."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, max_radians: float, prob: float = 0.1) -> None:
        super().__init__(keys, prob)
        self.max_radians = abs(float(max_radians))
        self.angle = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        if self._do:
            self.angle = float(self.R.uniform(-self.max_radians, self.max_radians))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.angle)
