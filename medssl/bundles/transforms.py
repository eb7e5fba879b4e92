"""Transforms the bundle configs list besides MONAI's and :mod:`medssl.transforms`.

- :class:`ShorterSideCenterCropd`: the deterministic evaluation geometry (shorter side resized to ``size`` px,
  bilinear antialiased, then the central ``size x size`` square), the same as
  :class:`medssl.transforms.presets.EvalTransform`.
- :func:`method_views`: the per-view copies of a bundle's view augmentation (``train#preprocessing#views``)
  for the SSL method: every view the chain as written (SimCLR, SimSiam, SwAV global views); BYOL's asymmetric
  pair (Grill et al. 2020, Table 6: view 1 blur p 1.0 and solarize p 0, view 2 blur p 0.1 and solarize p 0.2,
  colour jitter strengths ``min(chain, (0.4, 0.4, 0.2, 0.1))``); SwAV multi-crop (Caron et al. 2020: global
  crops scale (0.14, 1), ``num_local`` local crops of ``round(S * 96 / 224)`` px at scale (0.05, 0.14)). These
  are the rules of :func:`medssl.transforms.presets.view_specs` and ``multicrop_options``, applied to the
  chain the config lists, so an edited or overridden parameter reaches every view.
- :func:`describe_transform`: the text of a ``Compose`` that keys ``configs/evaluate.yaml``'s feature cache.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, MapTransform

from medssl.transforms.intensity import center_crop, resize_shorter_side
from medssl.transforms.multiview import MultiViewd
from medssl.transforms.presets import BYOL_JITTER, BYOL_VIEW_PROBABILITIES
from medssl.transforms.ssl import RandColorJitterd, RandGaussianBlurd, RandResizedCropd, RandSolarized


class ShorterSideCenterCropd(MapTransform):
    """``(C, H, W)`` in [0, 1] -> ``(C, size, size)``: shorter side to ``size`` px (aspect kept), central square."""

    def __init__(self, keys: Sequence[Hashable] | Hashable = ("image",), size: int = 224) -> None:
        super().__init__(keys)
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            x = out[key]
            x = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x, dtype=torch.float32)
            out[key] = center_crop(resize_shorter_side(x, self.size), self.size).contiguous()
        return out


def _steps(chain: Compose) -> list[Any]:
    return list(chain.transforms)


def _byol_view(chain: Compose, probs: Mapping[str, float]) -> Compose:
    view = copy.deepcopy(chain)
    steps = _steps(view)
    for step in steps:
        if isinstance(step, RandColorJitterd):
            step.strengths = tuple(min(s, b) for s, b in zip(step.strengths, BYOL_JITTER))
        if isinstance(step, RandGaussianBlurd):
            step.prob = float(probs["blur_p"])
    solarize = [s for s in steps if isinstance(s, RandSolarized)]
    if solarize:
        solarize[0].prob = float(probs["solarize_p"])
    elif probs["solarize_p"] > 0:
        keys = steps[0].keys if steps else ("image",)
        steps.append(RandSolarized(keys, prob=float(probs["solarize_p"])))
    return Compose(steps)


def _crop_view(chain: Compose, *, scale: tuple[float, float], size: int | None = None) -> Compose:
    view = copy.deepcopy(chain)
    for step in _steps(view):
        if isinstance(step, RandResizedCropd):
            step.scale = tuple(float(s) for s in scale)
            if size is not None:
                step.size = (int(size), int(size))
    return view


def method_views(augmentation: Compose, *, num_views: int = 2, view_recipe: str = "symmetric",
                 num_local: int = 0, local_size: int | None = None,
                 global_scale: Sequence[float] = (0.14, 1.0),
                 local_scale: Sequence[float] = (0.05, 0.14)) -> MultiViewd:
    """One independently seeded copy of ``augmentation`` per view (see the module docstring).

    Args:
        augmentation: the view chain of ``train#preprocessing`` (a ``Compose`` starting with a
            :class:`~medssl.transforms.ssl.RandResizedCropd`).
        num_views: global views (the method's ``views_required`` minus ``num_local``).
        view_recipe: ``symmetric`` or ``byol`` (the method's ``view_recipe``).
        num_local, local_size, global_scale, local_scale: SwAV multi-crop (``num_local = 0``: none).

    Returns:
        :class:`~medssl.transforms.multiview.MultiViewd` cutting ``num_views + num_local`` views.
    """
    if view_recipe == "byol":
        if num_views != 2:
            raise ValueError(f"the BYOL view recipe makes 2 views, not {num_views}")
        views = [_byol_view(augmentation, probs) for probs in BYOL_VIEW_PROBABILITIES]
    elif view_recipe == "symmetric":
        if num_local > 0:
            views = [_crop_view(augmentation, scale=tuple(global_scale)) for _ in range(num_views)]
        else:
            views = [copy.deepcopy(augmentation) for _ in range(num_views)]
    else:
        raise ValueError(f"unknown view recipe {view_recipe!r}: choose symmetric or byol")
    if num_local > 0:
        if local_size is None:
            raise ValueError("local_size is needed with local crops")
        views += [_crop_view(augmentation, scale=tuple(local_scale), size=int(local_size))
                  for _ in range(int(num_local))]
    return MultiViewd(views)


def describe_transform(transform: Any) -> str:
    """A stable text of a ``Compose``: each step's class and its scalar/str/tuple settings (the feature-cache
    key of a custom pipeline: an edited parameter gives another key)."""
    steps = getattr(transform, "transforms", [transform])
    parts = []
    for step in steps:
        settings = {k: v for k, v in sorted(vars(step).items()) if not k.startswith("_") and k != "R"
                    and isinstance(v, (int, float, str, bool, tuple, type(None)))}
        parts.append(f"{type(step).__module__}.{type(step).__name__}{settings}")
    return "bundle validate#preprocessing: " + "; ".join(parts)
