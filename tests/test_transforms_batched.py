"""Batched kornia path: shapes, range, per-sample and per-view randomness, seeding, grayscale modalities."""

from __future__ import annotations

import pytest
import torch

from medssl.transforms.batched import BatchedSSLAugment, build_batched_base_transform, stack_images
from medssl.transforms.presets import MODALITIES


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_batched_views_shape_range_and_per_sample_randomness(modality):
    torch.manual_seed(0)
    image = torch.rand(3, 48, 48)
    if MODALITIES[modality].force_gray:
        image = image[:1].expand(3, 48, 48)
    batch = image.expand(6, 3, 48, 48).contiguous()  # the same picture six times
    torch.manual_seed(1)
    views = BatchedSSLAugment(modality, 24, num_views=2)(batch)
    assert len(views) == 2
    for v in views:
        assert v.shape == (6, 3, 24, 24) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        # identical inputs, different outputs: parameters are drawn per sample
        assert len({v[i].numpy().tobytes() for i in range(6)}) == 6
    assert not torch.equal(views[0], views[1])
    if MODALITIES[modality].force_gray:
        assert torch.allclose(views[0][:, 0], views[0][:, 2], atol=1e-6)
    torch.manual_seed(1)
    again = BatchedSSLAugment(modality, 24, num_views=2)(batch)
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_batched_base_transform_stacks_real_images(shared_data):
    base = build_batched_base_transform("ultrasound", 40)
    records = [
        {"id": str(i), "image": str(p), "source": "image", "label": "benign"}
        for i, p in enumerate(sorted((shared_data / "busi" / "benign").glob("*.png"))[:3])
    ]
    batch = stack_images([base(r)["image"] for r in records])
    # BUSI PNGs are gray saved as RGB: kept as 1 channel, shrunk 256 -> 40 px
    assert batch.shape == (3, 1, 40, 40) and 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    views = BatchedSSLAugment("ultrasound", 24)(batch)
    assert [tuple(v.shape) for v in views] == [(3, 3, 24, 24)] * 2
    assert all(v.stride(1) == 0 for v in views)  # expanded to 3 channels last, as a view


def test_batched_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        BatchedSSLAugment("generic", 16)(torch.rand(3, 16, 16))


def test_batched_multicrop_views_follow_the_global_ones():
    torch.manual_seed(0)
    batch = torch.rand(4, 3, 48, 48)
    views = BatchedSSLAugment("histology", 24, num_views=2, multicrop={"num_local": 3, "local_size": 12})(batch)
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    crops = BatchedSSLAugment("generic", 24, multicrop=2).views
    assert "scale=(0.14, 1.0)" in repr(crops[0][0])  # SwAV global crop scale
    assert "scale=(0.05, 0.14)" in repr(crops[2][0])  # and local
