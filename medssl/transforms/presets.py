"""Per-modality SSL and evaluation pipelines (MONAI dictionary transforms).

``build_ssl_transform(modality, image_size, *, num_views=2, multicrop=None)`` returns a callable
``record -> {"views": [Tensor(3,S,S) float32 in [0,1]], "label", "id"}``; ``build_eval_transform(modality,
image_size)`` returns ``record -> {"image": Tensor(3,S,S), "label", "id"}``. Intensities stay in native units
until :class:`~medssl.transforms.intensity.ScaleToUnitd`, which downsamples before its float arithmetic.

Lean per-sample path: a grayscale image stays 1-channel through reading, scaling, resizing and every
augmentation, and becomes 3 channels only at the end of each view, as a stride-0 ``expand`` view (no copy); the
augmentations that only make sense on colour (saturation, hue, random grayscale) are identities on gray images,
so this gives the same views as augmenting 3 identical channels, at a third of the cost. Everything is float32;
flips and rotations are the plain-torch :mod:`medssl.transforms.geometric` transforms (MONAI's parameters and
draws, no ``MetaTensor``).

Reproducibility: each view has its own transform instances; all of a sample's draws come from one generator.
Call ``t.set_random_state(seed)`` on the returned transform (one ``RandomState(seed)`` per sample, shared by every
view's transforms), or call ``monai.utils.set_determinism(seed)`` before building it (the initial seed is drawn
from NumPy's global generator). MONAI's ``DataLoader`` reseeds it per worker.

Preset choices (:data:`MODALITIES`), each a :class:`AugmentSpec`:

- ``generic``: SimCLR (Chen et al. 2020) ImageNet recipe: crop scale (0.08, 1), horizontal flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5 (sigma 0.1-2), no solarize.
- ``histology``: tissue has no orientation, so rot90 (uniform over 4) + both flips give all 8 dihedral poses
  (Veeling et al. 2018, rotation-equivariant PCam; Ciga et al. 2022). H&E colour jitter: stain variation is
  mostly brightness/contrast/saturation with a small hue shift (Tellez et al. 2019: light HED/HSV jitter), so
  (0.4, 0.4, 0.25, 0.05) p 0.8; no grayscale (colour carries the stain signal); blur p 0.5 (focus variation).
- ``xray``: radiographs are grayscale: forced to one gray channel and replicated; brightness/contrast jitter
  only (no saturation/hue), no vertical flip (anatomy has a fixed up-down), horizontal flip kept and small
  rotations of +-10 degrees (MoCo-CXR, Sowrirajan et al. 2021; Azizi et al. 2021); crop scale (0.2, 1) so a view
  keeps some anatomy; no CLAHE (native dynamic range is kept until scaling); blur p 0.5.
- ``mri``: slices normalised per volume by the reader (0.5-99.5 % of non-zero voxels), grayscale;
  brightness/contrast jitter, no hue/saturation; horizontal flip (left-right brain symmetry), no vertical
  flip; crop scale (0.2, 1); blur p 0.5.
- ``ultrasound``: no vertical flip (the transducer is at the top), no hue (colour Doppler overlays keep their
  meaning), horizontal flip, brightness/contrast 0.4 p 0.8, crop scale (0.2, 1); speckle-tolerant blur: a
  wider sigma range 0.1-3 px at p 0.5 (SimCLR's is 0.1-2), so views differ in speckle texture and the
  features learn to ignore it (our choice: speckle grain spans a few pixels at typical B-mode resolutions).
- ``dermatoscopy``: full SimCLR colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8 and grayscale p 0.2 (lighting and
  camera colour vary widely; Azizi et al. 2021 and ISIC practice), rot90 + both flips (no canonical orientation
  of a dermoscopic image), blur p 0.5.

BYOL (Grill et al. 2020, App. B, Table 6) uses an asymmetric pair of views, built from the preset by
:func:`view_specs` with ``view_recipe="byol"``: view 1 blur p 1.0 and solarize p 0, view 2 blur p 0.1 and
solarize p 0.2; colour jitter strengths ``min(preset, BYOL)`` with BYOL's (0.4, 0.4, 0.2, 0.1), so colour
presets get BYOL's jitter (histology keeps its smaller hue shift) and grayscale presets keep brightness/contrast
only. Crops, flips, rotations, grayscale and blur sigma stay the preset's. Other methods use the preset as is
for every view.

Multi-crop (SwAV, Caron et al. 2020): ``multicrop=6`` or ``{"num_local": 6, "local_size": ..., "global_scale":
(0.14, 1), "local_scale": (0.05, 0.14)}`` adds local views of ``round(image_size * 96 / 224)`` px after the
``num_views`` global views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from monai.utils import MAX_SEED

from medssl.data.readers.load import LoadRecordd
from medssl.transforms.geometric import RandFlipd, RandRot90d, RandRotated
from medssl.transforms.intensity import ScaleToUnitd, center_crop, resize_shorter_side
from medssl.transforms.multiview import MultiViewd, SSLTransform, as_rgb_view, compose
from medssl.transforms.ssl import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandResizedCropd,
    RandSolarized,
)


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation parameters of one modality (probabilities in [0, 1], jitter strengths as in torchvision)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    rot90_p: float = 0.0
    rotate_degrees: float = 0.0
    rotate_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    force_gray: bool = False


MODALITIES: dict[str, AugmentSpec] = {
    "generic": AugmentSpec(),
    "histology": AugmentSpec(
        crop_scale=(0.2, 1.0), vflip_p=0.5, rot90_p=0.75, saturation=0.25, hue=0.05, gray_p=0.0
    ),
    "xray": AugmentSpec(
        crop_scale=(0.2, 1.0), rotate_degrees=10.0, rotate_p=0.5, saturation=0.0, hue=0.0, gray_p=0.0,
        force_gray=True,
    ),
    "mri": AugmentSpec(crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, gray_p=0.0, force_gray=True),
    "ultrasound": AugmentSpec(crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, gray_p=0.0, blur_sigma=(0.1, 3.0)),
    "dermatoscopy": AugmentSpec(vflip_p=0.5, rot90_p=0.75),
}


#: view recipes: ``symmetric`` (every view the preset; SimCLR, SwAV, SimSiam) and ``byol`` (asymmetric pair)
VIEW_RECIPES = ("symmetric", "byol")
#: BYOL's per-view blur / solarize probabilities (Grill et al. 2020, Table 6: T and T')
BYOL_VIEW_PROBABILITIES = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
#: BYOL's colour jitter strengths (brightness, contrast, saturation, hue), p 0.8 as the presets
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)


def byol_view_specs(spec: AugmentSpec) -> tuple[AugmentSpec, AugmentSpec]:
    """BYOL's two view specs from a preset: per-view blur/solarize of :data:`BYOL_VIEW_PROBABILITIES` and jitter
    ``min(preset strength, BYOL_JITTER)`` per component (0 stays 0: no colour jitter on grayscale presets)."""
    b, c, s, h = BYOL_JITTER
    jitter = {"brightness": min(spec.brightness, b), "contrast": min(spec.contrast, c),
              "saturation": min(spec.saturation, s), "hue": min(spec.hue, h)}
    first, second = (replace(spec, **jitter, **probs) for probs in BYOL_VIEW_PROBABILITIES)
    return first, second


def view_specs(spec: AugmentSpec, num_views: int, view_recipe: str | None = None) -> list[AugmentSpec]:
    """One :class:`AugmentSpec` per global view: the preset for every view (``symmetric``, default) or BYOL's
    asymmetric pair (``byol``, exactly 2 views)."""
    recipe = view_recipe or "symmetric"
    if recipe not in VIEW_RECIPES:
        raise ValueError(f"unknown view recipe {view_recipe!r}: choose one of {', '.join(VIEW_RECIPES)}")
    if recipe == "byol":
        if num_views != 2:
            raise ValueError(f"the BYOL view recipe makes 2 views, not {num_views}")
        return list(byol_view_specs(spec))
    return [spec] * num_views


def get_spec(modality: str) -> AugmentSpec:
    """The :class:`AugmentSpec` of a modality name (case-insensitive)."""
    spec = MODALITIES.get(modality.lower())
    if spec is None:
        raise ValueError(f"unknown modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    return spec


def build_base_transform(modality: str, shorter_side: int | None = None, key: str = "image") -> Callable:
    """Deterministic part: read the record and scale it to a (C, H, W) float32 tensor in [0, 1], C = 1 for
    grayscale (and for colour images of ``force_gray`` modalities), 3 for colour.

    ``shorter_side`` shrinks large images (never enlarges) before the random crops, to save time; the shrink
    happens before the float arithmetic of the scaling (:class:`~medssl.transforms.intensity.ScaleToUnitd`).
    """
    spec = get_spec(modality)
    return compose(
        [LoadRecordd(keys=(key,)),
         ScaleToUnitd(keys=(key,), force_gray=spec.force_gray, three_channels=False, shorter_side=shorter_side)]
    )


def build_view_transform(spec: AugmentSpec, size: int, key: str = "image") -> Callable:
    """The random pipeline of one view: crop -> flips/rotations -> colour jitter -> grayscale -> blur -> solarize."""
    steps: list[Callable] = [RandResizedCropd(key, size, scale=spec.crop_scale, ratio=spec.crop_ratio)]
    if spec.hflip_p > 0:
        steps.append(RandFlipd(key, prob=spec.hflip_p, spatial_axis=1))
    if spec.vflip_p > 0:
        steps.append(RandFlipd(key, prob=spec.vflip_p, spatial_axis=0))
    if spec.rot90_p > 0:
        steps.append(RandRot90d(key, prob=spec.rot90_p, max_k=3))
    if spec.rotate_p > 0 and spec.rotate_degrees > 0:
        steps.append(RandRotated(key, math.radians(spec.rotate_degrees), prob=spec.rotate_p))
    if spec.jitter_p > 0 and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        steps.append(RandColorJitterd(key, spec.brightness, spec.contrast, spec.saturation, spec.hue, spec.jitter_p))
    if spec.gray_p > 0:
        steps.append(RandGrayscaled(key, prob=spec.gray_p))
    if spec.blur_p > 0:
        steps.append(RandGaussianBlurd(key, sigma=spec.blur_sigma, prob=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(RandSolarized(key, prob=spec.solarize_p))
    return compose(steps)


def multicrop_options(multicrop: int | Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Complete SwAV multi-crop options (``num_local``, ``local_size``, ``global_scale``, ``local_scale``)."""
    opts = {"num_local": multicrop} if isinstance(multicrop, int) else dict(multicrop)
    unknown = set(opts) - {"num_local", "local_size", "global_scale", "local_scale"}
    if unknown:
        raise ValueError(f"unknown multicrop options {sorted(unknown)}")
    opts.setdefault("num_local", 6)
    opts.setdefault("local_size", max(8, round(image_size * 96 / 224)))
    opts.setdefault("global_scale", (0.14, 1.0))
    opts.setdefault("local_scale", (0.05, 0.14))
    return opts


def view_plan(spec: AugmentSpec, image_size: int, num_views: int,
              multicrop: int | Mapping[str, Any] | None = None,
              view_recipe: str | None = None) -> list[tuple[AugmentSpec, int]]:
    """``(spec, size)`` of every view, global views (:func:`view_specs`) then SwAV local ones; shared by the
    per-sample and the batched (:mod:`medssl.transforms.batched`) paths."""
    if not multicrop:
        return [(s, image_size) for s in view_specs(spec, num_views, view_recipe)]
    opts = multicrop_options(multicrop, image_size)
    global_specs = view_specs(replace(spec, crop_scale=tuple(opts["global_scale"])), num_views, view_recipe)
    local_spec = replace(spec, crop_scale=tuple(opts["local_scale"]))
    return [(s, image_size) for s in global_specs] + [(local_spec, int(opts["local_size"]))] * int(opts["num_local"])


def build_ssl_transform(
    modality: str,
    image_size: int,
    *,
    num_views: int = 2,
    multicrop: int | Mapping[str, Any] | None = None,
    base_shorter_side: int | None = -1,
    view_recipe: str | None = None,
) -> SSLTransform:
    """SSL pipeline of a modality: ``record -> {"views": [...], "label", "id"}`` (see module docstring).

    Args:
        modality: one of :data:`MODALITIES`.
        image_size: side S of the global views (px).
        num_views: number of global views (default 2).
        multicrop: SwAV local crops (int count or options dict), default none.
        base_shorter_side: shrink images whose shorter side exceeds this before cropping (default
            ``2 * image_size``; ``None`` keeps full resolution).
        view_recipe: ``"symmetric"`` (default) or ``"byol"`` (BYOL's asymmetric pair, see :func:`view_specs`).
    """
    if num_views < 1:
        raise ValueError("num_views must be >= 1")
    spec = get_spec(modality)
    base = build_base_transform(modality, 2 * image_size if base_shorter_side == -1 else base_shorter_side)
    views = [build_view_transform(s, size) for s, size in view_plan(spec, image_size, num_views, multicrop, view_recipe)]
    transform = SSLTransform(base, MultiViewd(views))
    transform.set_random_state(seed=int(np.random.randint(MAX_SEED)))
    return transform


class EvalTransform:
    """``record -> {"image": Tensor(3,S,S) in [0,1], "label", "id"}``: read, scale, shorter side to S, centre crop
    (a grayscale image is resized as 1 channel and returned as a stride-0 ``expand`` view)."""

    def __init__(self, modality: str, image_size: int) -> None:
        self.base = build_base_transform(modality)
        self.image_size = int(image_size)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        image = self.base(dict(record))["image"]
        image = center_crop(resize_shorter_side(image, self.image_size), self.image_size).contiguous()
        return {"image": as_rgb_view(image), "label": record.get("label"), "id": record.get("id")}


def build_eval_transform(modality: str, image_size: int) -> EvalTransform:
    """Evaluation pipeline of a modality (deterministic; same reader and scaling as the SSL pipeline)."""
    get_spec(modality)
    return EvalTransform(modality, image_size)
