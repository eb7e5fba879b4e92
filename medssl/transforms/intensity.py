"""Deterministic steps between a reader and the random augmentations: intensity scaling to [0, 1], channel
handling and resizing. All operate on ``(C, H, W)`` arrays/tensors and return float32 torch tensors.

Order in :class:`ScaleToUnitd` (lean, downsample before the float arithmetic): clip to the range in native units
(the only full-resolution float pass besides the reader's), luma for ``force_gray`` colour images, shrink, then
the affine map to [0, 1] on the small image. The affine map and the luma (weights sum to 1) commute with the
antialiased bilinear resize (its weights sum to 1), so this equals scaling first and resizing after up to float32
rounding (~1e-6), with one channel and a fraction of the pixels in the float steps."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform

from medssl.errors import MedsslError

# ITU-R BT.601 luma weights, as used by torchvision/kornia rgb_to_grayscale
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def to_unit_range(x: np.ndarray | torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map ``low -> 0`` and ``high -> 1`` linearly and clip to [0, 1]; float32 tensor of the same shape.

    A degenerate range (``high <= low``) gives zeros.
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    if not high > low:
        return torch.zeros_like(t)
    return ((t - float(low)) / (float(high) - float(low))).clamp_(0.0, 1.0)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) RGB -> (…, 1, H, W) luma with BT.601 weights."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(dim=-3, keepdim=True)


def to_three_channels(x: torch.Tensor, force_gray: bool = False) -> torch.Tensor:
    """(C, H, W) -> (3, H, W): grayscale replicated as a stride-0 ``expand`` view (no copy); RGB kept, or made
    gray and replicated if ``force_gray``."""
    if x.shape[0] == 1:
        return x.expand(3, *x.shape[1:])
    if x.shape[0] == 3:
        return rgb_to_gray(x).expand(3, *x.shape[1:]) if force_gray else x
    raise MedsslError(f"cannot make 3 channels from an image with {x.shape[0]} channels")


def resize_shorter_side(x: torch.Tensor, size: int, *, only_shrink: bool = False, clamp: bool = True) -> torch.Tensor:
    """Resize (C, H, W) so its shorter side is ``size`` px (bilinear, antialiased), keeping the aspect ratio;
    ``clamp`` clips the result to [0, 1] (off for values in native units)."""
    h, w = x.shape[-2:]
    if only_shrink and min(h, w) <= size:
        return x
    scale = size / min(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return x
    out = F.interpolate(x[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0) if clamp else out


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size x size`` crop of (C, H, W) (the image must be at least that large)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


class ScaleToUnitd(MapTransform):
    """``data[key]`` (native units) -> float32 tensor in [0, 1] using ``data[f"{key}_range"]`` from the reader.

    Args:
        keys: image keys.
        force_gray: colour images become grayscale (for grayscale modalities stored as RGB).
        three_channels: replicate grayscale to 3 channels at the end (a stride-0 ``expand`` view; ImageNet
            backbones expect RGB). The presets keep 1 channel here and expand after the augmentations.
        shorter_side: if set, shrink (never enlarge) so the shorter side is at most this many px; done before the
            affine scaling (module docstring).
        gray_if_equal: a 3-channel image whose channels are identical (grayscale saved as RGB, e.g. most BUSI
            PNGs) is kept as its one channel: every later step gives identical channels anyway (saturation, hue
            and luma are identities on gray), at a third of the cost.

    Integer inputs (uint8/uint16 from a prepared store) are converted to float32 once; float64 never appears.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable = ("image",),
        *,
        force_gray: bool = False,
        three_channels: bool = True,
        shorter_side: int | None = None,
        gray_if_equal: bool = True,
    ) -> None:
        super().__init__(keys)
        self.force_gray = force_gray
        self.three_channels = three_channels
        self.shorter_side = shorter_side
        self.gray_if_equal = gray_if_equal

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            x = out[key]
            if self.gray_if_equal and equal_channels(x):
                x = x[:1]
            t = _float_tensor(x)
            rng = out.get(f"{key}_range")
            low, high = (float(t.min()), float(t.max())) if rng is None else (float(rng[0]), float(rng[1]))
            if not high > low:
                t = torch.zeros_like(t)
            else:
                t = t.clamp(low, high)
            if self.force_gray and t.shape[0] == 3:
                t = rgb_to_gray(t)
            if self.shorter_side is not None:
                t = resize_shorter_side(t, self.shorter_side, only_shrink=True, clamp=False)
            if high > low:
                t = t.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)  # t is ours: clamp/gray/shrink copied
            if self.three_channels:
                t = to_three_channels(t)
            out[key] = t
        return out


def equal_channels(x: Any) -> bool:
    """Whether a (3, H, W) array/tensor has three identical channels."""
    if getattr(x, "ndim", 0) != 3 or x.shape[0] != 3:
        return False
    if isinstance(x, torch.Tensor):
        return bool(torch.equal(x[0], x[1]) and torch.equal(x[0], x[2]))
    return bool(np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2]))


def _float_tensor(x: Any) -> torch.Tensor:
    """A float32 torch view/copy of an array or tensor (read-only memory-mapped arrays are copied)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    arr = np.asarray(x)
    if arr.dtype == np.float32 and arr.flags.writeable:
        return torch.from_numpy(arr)
    return torch.from_numpy(arr.astype(np.float32))

