"""BYOL's asymmetric view pair (Grill et al. 2020, Table 6) in both augmentation paths: the pipelines carry the
paper's probabilities and jitter, and seeded draws show it: view 1 always blurs and never solarizes, view 2
solarizes about 20 % and blurs about 10 % of the images. Other methods keep symmetric views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.io import imsave

from medssl.engines.config import PretrainConfig
from medssl.engines.loaders import view_options
from medssl.methods import build_method
from medssl.models import build_backbone
from medssl.transforms.batched import BatchedSSLAugment
from medssl.transforms.presets import MODALITIES, build_ssl_transform
from medssl.transforms.ssl import RandColorJitterd, RandGaussianBlurd, RandSolarized


def _steps(view, kind):
    return [t for t in view.transforms if isinstance(t, kind)]


def _pipeline_params(view):
    """(blur p, solarize p, jitter strengths or None, blur sigma range) of one per-sample view pipeline."""
    blur, sol, jit = _steps(view, RandGaussianBlurd), _steps(view, RandSolarized), _steps(view, RandColorJitterd)
    return (blur[0].prob if blur else 0.0, sol[0].prob if sol else 0.0, jit[0].strengths if jit else None,
            blur[0].sigma_range if blur else None)


# modality -> BYOL jitter: BYOL's (0.4, 0.4, 0.2, 0.1) capped by what the preset allows (no colour on gray)
EXPECTED_JITTER = {"generic": (0.4, 0.4, 0.2, 0.1), "dermatoscopy": (0.4, 0.4, 0.2, 0.1),
                   "histology": (0.4, 0.4, 0.2, 0.05), "xray": (0.4, 0.4, 0.0, 0.0), "mri": (0.4, 0.4, 0.0, 0.0),
                   "ultrasound": (0.4, 0.4, 0.0, 0.0)}


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_byol_pipelines_carry_the_paper_parameters(modality):
    spec = MODALITIES[modality]
    views = build_ssl_transform(modality, 32, view_recipe="byol").views.view_transforms
    assert len(views) == 2
    first, second = (_pipeline_params(v) for v in views)
    assert first[:2] == (1.0, 0.0) and second[:2] == (0.1, 0.2)
    assert first[2] == second[2] == pytest.approx(EXPECTED_JITTER[modality])
    assert first[3] == second[3] == spec.blur_sigma  # the preset's blur sigma (ultrasound: 0.1-3 px)
    # the same in the batched path: kornia modules of each view
    batched = BatchedSSLAugment(modality, 32, view_recipe="byol").views
    for view, (blur_p, sol_p) in zip(batched, [(1.0, 0.0), (0.1, 0.2)]):
        names = {type(m).__name__: m for m in view}
        assert names["RandomGaussianBlur"].p == blur_p
        assert ("RandomSolarize" in names) == (sol_p > 0)
        if sol_p:
            assert names["RandomSolarize"].p == sol_p
    # every other method: the preset itself for both views
    symmetric = [_pipeline_params(v) for v in build_ssl_transform(modality, 32).views.view_transforms]
    expected_sym = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    assert symmetric == [(spec.blur_p, 0.0, expected_sym if spec.jitter_p else None, spec.blur_sigma)] * 2


def _bright_image(tmp_path):
    """An almost white photo (values 0.95-1): unless solarized, every view keeps pixels above 0.5 (the
    harshest jitter dims it by at most 0.4); a solarized view (``x -> 1 - x`` above 0.5, applied last) has none."""
    rng = np.random.default_rng(0)
    path = tmp_path / "bright.png"
    imsave(path, (242 + rng.random((48, 48, 3)) * 13).astype(np.uint8), check_contrast=False)
    return {"id": "0", "image": str(path), "source": "image", "label": "a"}


def test_seeded_per_sample_views_blur_and_solarize_as_the_paper(tmp_path):
    record = _bright_image(tmp_path)
    transform = build_ssl_transform("generic", 24, view_recipe="byol").set_random_state(seed=0)
    blur = [_steps(v, RandGaussianBlurd)[0] for v in transform.views.view_transforms]
    solarized, blurred = [[], []], [[], []]
    for _ in range(200):
        views = transform(record)["views"]
        for i, v in enumerate(views):
            solarized[i].append(float(v.max()) <= 0.5)
            blurred[i].append(blur[i]._do)  # the blur's draw for this call
    assert not any(solarized[0]) and all(blurred[0])
    # view 2: solarize p 0.2, blur p 0.1 (binomial n=200: 3-sigma bands)
    assert 0.11 <= np.mean(solarized[1]) <= 0.29
    assert 0.035 <= np.mean(blurred[1]) <= 0.165


def test_seeded_batched_views_blur_and_solarize_as_the_paper():
    torch.manual_seed(0)
    batch = 0.95 + 0.05 * torch.rand(200, 3, 48, 48)
    augment = BatchedSSLAugment("generic", 24, view_recipe="byol")
    views = augment(batch)
    solarized = [v.flatten(1).amax(dim=1) <= 0.5 for v in views]
    assert not solarized[0].any()
    assert 0.11 <= float(solarized[1].float().mean()) <= 0.29
    blur = [next(m for m in view if type(m).__name__ == "RandomGaussianBlur") for view in augment.views]
    assert bool(blur[0]._params["batch_prob"].bool().all())
    assert 0.035 <= float(blur[1]._params["batch_prob"].float().mean()) <= 0.165


@pytest.mark.parametrize("method", ["simclr", "swav", "byol", "simsiam"])
def test_engine_builds_byol_views_only_for_byol(method):
    backbone = build_backbone("resnet18", widen_factor=0.125, small_stem=True)
    options = {"num_local_crops": 2} if method == "swav" else {}
    config = PretrainConfig(method=method, image_size=32, method_options=options)
    opts = view_options(config, build_method(method, backbone, **options))
    assert opts["view_recipe"] == ("byol" if method == "byol" else "symmetric")
    views = build_ssl_transform("generic", 32, **opts).views.view_transforms
    probs = [_pipeline_params(v)[:2] for v in views[:2]]
    assert probs == ([(1.0, 0.0), (0.1, 0.2)] if method == "byol" else [(0.5, 0.0)] * 2)
