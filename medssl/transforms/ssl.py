"""SSL augmentations that MONAI lacks, as MONAI ``Randomizable`` dictionary transforms on ``(C, H, W)`` float
tensors in [0, 1]: random resized crop, colour jitter, random grayscale, Gaussian blur, solarize.

Each draws its parameters from its own ``self.R`` (``numpy.random.RandomState``), so
``set_random_state(seed)`` makes it reproducible and two instances give independent randomness. One draw per
call is shared by all ``keys`` (e.g. an image and its mask). Definitions follow torchvision/SimCLR/BYOL:

- RandomResizedCrop: area fraction ``U(scale)``, log-uniform aspect ratio, 10 tries then a central crop
  (SimCLR: scale (0.08, 1), ratio (3/4, 4/3)); resize with antialiased bilinear interpolation.
- ColorJitter: brightness/contrast/saturation factors ``U(1-s, 1+s)``, hue shift ``U(-h, h)`` of a full turn,
  applied in random order with probability ``prob`` (SimCLR 0.4/0.4/0.4/0.1, p 0.8). Contrast blends with
  the mean gray level, saturation with the gray image (torchvision semantics; brightness and contrast as plain
  torch arithmetic with kornia's formulas, saturation and hue via kornia.enhance).
  Saturation and hue are skipped for 1-channel images.
- RandomGrayscale: BT.601 luma replicated to all channels (p 0.2 in SimCLR).
- GaussianBlur: sigma ``U(0.1, 2.0)`` px, kernel ~10 % of the image side (SimCLR), reflect padding; computed as
  two matrix products with a band matrix (:func:`reflect_blur_matrix`), 4x faster than a convolution on one core.
- Solarize: ``x -> 1 - x`` where ``x >= threshold`` (0.5), BYOL p 0.2 on the second view.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_hue, adjust_saturation_with_gray_subtraction
from monai.transforms import MapTransform, Randomizable

from medssl.transforms.intensity import rgb_to_gray


def _plain(x: Any) -> torch.Tensor:
    """A plain float32 torch tensor (MetaTensor -> Tensor; numpy -> Tensor)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


class _RandDict(Randomizable, MapTransform):
    """Shared plumbing: probability gate + one parameter draw per call applied to every key."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float) -> None:
        MapTransform.__init__(self, keys)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self._do = False

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.rand() < self.prob

    @abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform one (C, H, W) float32 tensor with the parameters drawn by :meth:`randomize`."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        first = next(iter(self.key_iterator(out)), None)
        self.randomize(None if first is None else out[first])
        if not self._do:
            return out
        for key in self.key_iterator(out):
            out[key] = self._apply(_plain(out[key]))
        return out


class RandResizedCropd(_RandDict):
    """Random resized crop to ``size`` px (square int or (H, W)); always applied (prob 1)."""

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__(keys, 1.0)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.box = (0, 0, 1, 1)

    def randomize(self, data: Any = None) -> None:
        self._do = True
        h, w = data.shape[-2:]
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_r))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                self.box = (int(self.R.randint(0, h - ch + 1)), int(self.R.randint(0, w - cw + 1)), ch, cw)
                return
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            cw, ch = w, h
        self.box = ((h - ch) // 2, (w - cw) // 2, ch, cw)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        top, left, ch, cw = self.box
        crop = x[..., top : top + ch, left : left + cw]
        out = F.interpolate(crop[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return out[0].clamp_(0.0, 1.0)


class RandColorJitterd(_RandDict):
    """Colour jitter (torchvision semantics) with probability ``prob``; strengths 0 disable a component."""

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        prob: float = 0.8,
    ) -> None:
        super().__init__(keys, prob)
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.strengths = (float(brightness), float(contrast), float(saturation), float(hue))
        self.factors = (1.0, 1.0, 1.0, 0.0)
        self.order = (0, 1, 2, 3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        b, c, s, h = self.strengths
        self.factors = (
            self.R.uniform(max(0.0, 1 - b), 1 + b),
            self.R.uniform(max(0.0, 1 - c), 1 + c),
            self.R.uniform(max(0.0, 1 - s), 1 + s),
            self.R.uniform(-h, h),
        )
        self.order = tuple(int(i) for i in self.R.permutation(4))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.shape[-3] == 3
        for op in self.order:
            if self.strengths[op] == 0:
                continue
            f = float(self.factors[op])
            if op == 0:  # kornia adjust_brightness_accumulative: x * f, clipped
                x = (x * f).clamp_(0.0, 1.0)
            elif op == 1:  # kornia adjust_contrast_with_mean_subtraction: blend with the mean gray level
                mean = (rgb_to_gray(x) if colour else x).mean()
                x = (x * f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)
            elif op == 2 and colour:
                x = adjust_saturation_with_gray_subtraction(x, f)
            elif op == 3 and colour:
                x = adjust_hue(x, f * 2.0 * math.pi)
        return x.clamp(0.0, 1.0)


class RandGrayscaled(_RandDict):
    """Replace an RGB image by its BT.601 luma on all three channels with probability ``prob``."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.2) -> None:
        super().__init__(keys, prob)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 3:
            return x
        return rgb_to_gray(x).clamp_(0.0, 1.0).expand_as(x).contiguous()


class RandGaussianBlurd(_RandDict):
    """Gaussian blur with sigma ~ U(sigma) px and an odd kernel of ``kernel_fraction`` of the shorter side."""

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        sigma: tuple[float, float] = (0.1, 2.0),
        prob: float = 0.5,
        kernel_fraction: float = 0.1,
    ) -> None:
        super().__init__(keys, prob)
        self.sigma_range = tuple(sigma)
        self.kernel_fraction = float(kernel_fraction)
        self.sigma = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self.sigma = float(self.R.uniform(*self.sigma_range))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = blur_kernel_size(min(h, w), self.kernel_fraction)
        rows = reflect_blur_matrix(h, k, self.sigma, x.dtype, x.device)
        cols = rows if w == h else reflect_blur_matrix(w, k, self.sigma, x.dtype, x.device)
        return (rows @ x @ cols.T).clamp_(0.0, 1.0)  # the weights sum to 1 up to rounding: keep [0, 1] exact


def reflect_blur_matrix(n: int, k: int, sigma: float, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, n)`` matrix ``B`` of a 1-D Gaussian blur with reflect padding: ``(B v)[i] = sum_j g[j] v[r(i + j -
    k // 2)]`` with ``g[j] ∝ exp(-(j - (k - 1) / 2)^2 / (2 sigma^2))`` (normalised to sum 1, kornia's
    ``get_gaussian_kernel1d``) and ``r`` the reflection without edge repeat (``F.pad(mode="reflect")``). A 2-D
    blur of ``(C, H, W)`` is ``B_H @ x @ B_W.T``: two matrix products instead of a depthwise convolution with a
    ~10 %-of-the-side kernel, the same result as ``kornia.filters.gaussian_blur2d(border_type="reflect")``."""
    if k <= 1:
        return torch.eye(n, dtype=dtype, device=device)
    taps = torch.arange(k, dtype=dtype) - (k - 1) / 2.0
    g = torch.exp(-(taps**2) / (2.0 * float(sigma) ** 2))
    g = g / g.sum()
    idx = (torch.arange(n)[:, None] + torch.arange(k)[None, :] - k // 2).abs()
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    out = torch.zeros(n, n, dtype=dtype)
    out.scatter_add_(1, idx, g.expand(n, k).contiguous())
    return out if device is None else out.to(device)


def blur_kernel_size(side: int, fraction: float = 0.1) -> int:
    """Odd Gaussian kernel size of about ``fraction`` of the image side (at least 3, at most the side if odd)."""
    k = max(3, int(round(side * fraction)) | 1)
    return min(k, side if side % 2 else side - 1) if side >= 3 else 1


class RandSolarized(_RandDict):
    """Invert pixels at or above ``threshold`` (``x -> 1 - x``) with probability ``prob``."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.2, threshold: float = 0.5) -> None:
        super().__init__(keys, prob)
        self.threshold = float(threshold)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= self.threshold, 1.0 - x, x)
