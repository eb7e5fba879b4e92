"""Lean per-sample path: grayscale stays 1 channel until each view is expanded (a stride-0 view), float32
throughout, downsampling before the float scaling, one generator per sample, flips/rotations/blur equal to their
MONAI/kornia references, and a batched base that never enlarges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from monai.transforms import Rotate
from PIL import Image

from medssl.engines.sampling import SeededSampleDataset
from medssl.transforms import intensity
from medssl.transforms.batched import BatchedSSLAugment, build_batched_base_transform, stack_images
from medssl.transforms.geometric import RandRot90d, rotate
from medssl.transforms.intensity import ScaleToUnitd, resize_shorter_side, rgb_to_gray, to_unit_range
from medssl.transforms.multiview import random_transforms
from medssl.transforms.presets import build_eval_transform, build_ssl_transform
from medssl.transforms.ssl import _RandDict, reflect_blur_matrix


def _gray_png(tmp_path, h=300, w=260) -> dict:
    """A 16-bit grayscale PNG with structure (gradient + disc), as a record."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (yy * 120 + xx * 90 + 20000 * ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 3000)).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(img).save(path)
    return {"id": "g", "image": str(path), "source": "image"}


def _spy_apply(monkeypatch) -> list[tuple[int, torch.dtype]]:
    """Record (channels, dtype) of every tensor a random transform is applied to."""
    seen: list[tuple[int, torch.dtype]] = []
    original = _RandDict.__call__

    def spy(self, data):
        out = original(self, data)
        for key in self.key_iterator(out):
            seen.append((int(out[key].shape[-3]), out[key].dtype))
        return out

    monkeypatch.setattr(_RandDict, "__call__", spy)
    return seen


@pytest.mark.parametrize("modality", ["xray", "ultrasound", "generic"])
def test_gray_record_stays_one_channel_float32_until_each_view_is_expanded(tmp_path, monkeypatch, modality):
    seen = _spy_apply(monkeypatch)
    resized: list[tuple[int, torch.dtype]] = []
    original_interpolate = F.interpolate

    def spy_interpolate(x, *args, **kwargs):
        resized.append((int(x.shape[1]), x.dtype))
        return original_interpolate(x, *args, **kwargs)

    monkeypatch.setattr(intensity.F, "interpolate", spy_interpolate)
    transform = build_ssl_transform(modality, 64, base_shorter_side=128)
    transform.set_random_state(seed=3)
    views = transform(_gray_png(tmp_path))["views"]
    assert len(views) == 2 and seen and resized
    assert set(seen) == {(1, torch.float32)}  # every augmentation ran on one float32 channel
    assert resized == [(1, torch.float32)] * 3  # the base shrink (300 x 260 -> 148 x 128) and both crops too
    for v in views:
        assert v.shape == (3, 64, 64) and v.dtype == torch.float32
        assert v.stride(0) == 0  # expanded last, as a view of the one channel (no copy)
        assert torch.equal(v[0], v[2])


def test_one_channel_views_equal_augmenting_three_identical_channels(tmp_path):
    """Same generator state -> the same crop boxes and parameters -> the lean views equal the 3-channel path."""
    record = _gray_png(tmp_path)
    lean = build_ssl_transform("xray", 48, base_shorter_side=96)
    lean.set_random_state(seed=11)
    got = lean(record)["views"]
    base = lean.base(dict(record))["image"]
    assert base.shape[0] == 1
    ref = build_ssl_transform("xray", 48, base_shorter_side=96)
    ref.set_random_state(seed=11)
    rgb = {"image": base.expand(3, -1, -1).contiguous()}  # the old path: 3 channels before the views
    expected = [t(dict(rgb))["image"] for t in ref.views.view_transforms]
    for a, b in zip(got, expected):
        assert b.shape == (3, 48, 48) and b.stride(0) != 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    boxes = [next(t for t in random_transforms(v) if hasattr(t, "box")).box for v in lean.views.view_transforms]
    again = [next(t for t in random_transforms(v) if hasattr(t, "box")).box for v in ref.views.view_transforms]
    assert boxes == again and boxes[0] != boxes[1]


def test_scaling_downsamples_first_and_equals_scaling_at_full_resolution(monkeypatch):
    shrunk: list[tuple[tuple[int, ...], float]] = []
    original_interpolate = F.interpolate

    def spy_interpolate(x, *args, **kwargs):
        shrunk.append((tuple(x.shape[1:]), float(x.max())))
        return original_interpolate(x, *args, **kwargs)

    monkeypatch.setattr(intensity.F, "interpolate", spy_interpolate)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 4096, (1, 500, 430)).astype(np.float32)
    colour = rng.integers(0, 256, (3, 410, 600)).astype(np.float32)
    for x, rng_, gray_mode in ((gray, (800.0, 3000.0), False), (colour, (0.0, 255.0), True)):
        got = ScaleToUnitd(force_gray=gray_mode, three_channels=False, shorter_side=128)(
            {"image": x, "image_range": rng_})["image"]
        ref = to_unit_range(x, *rng_)  # the old order: [0, 1] (with clipping) and luma at full size, then shrink
        if gray_mode:
            ref = rgb_to_gray(ref)
        shape, top = shrunk[-1]
        assert shape == (1, *x.shape[1:]) and top > 1.5  # one channel, shrunk in native units, before the [0, 1] map
        ref = resize_shorter_side(ref, 128, only_shrink=True)
        assert got.dtype == torch.float32 and got.shape == ref.shape and got.shape[0] == 1
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


def test_identical_rgb_channels_are_read_as_one_gray_channel(shared_data):
    path = sorted((shared_data / "busi" / "benign").glob("*.png"))[0]
    raw = np.asarray(Image.open(path))
    assert raw.ndim == 3 and (raw[..., 0] == raw[..., 2]).all()  # BUSI: gray saved as RGB
    record = {"id": "b", "image": str(path), "source": "image"}
    image = build_eval_transform("ultrasound", 64)(record)["image"]
    assert image.shape == (3, 64, 64) and image.stride(0) == 0
    full = torch.from_numpy(raw[..., 0].astype(np.float32) / 255.0)[None]
    ref = resize_shorter_side(full, 64)
    torch.testing.assert_close(image[0], ref[0, : 64, : 64], atol=1e-5, rtol=0)
    colour = np.random.default_rng(0).integers(0, 256, (3, 20, 20)).astype(np.float32)
    assert ScaleToUnitd(three_channels=False)({"image": colour, "image_range": (0, 255)})["image"].shape[0] == 3


def test_one_generator_setup_per_sample_and_exact_replay(tmp_path, monkeypatch):
    record = _gray_png(tmp_path)
    dataset = SeededSampleDataset([record] * 4, build_ssl_transform("xray", 32, base_shorter_side=64), seed=5)
    first = dataset[(2, 1)]["views"]
    created = []
    original = np.random.RandomState

    class Counting(original):
        def __init__(self, *args, **kwargs):
            created.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(np.random, "RandomState", Counting)
    dataset[(0, 3)]
    assert len(created) == 1  # one RandomState per sample (was one per transform and view: 15 for x-ray)
    monkeypatch.undo()
    again = dataset[(2, 1)]["views"]  # after other samples: the same key gives the same views
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], dataset[(2, 2)]["views"][0])


def test_rotation_flip_and_blur_equal_their_references():
    x = torch.rand(1, 37, 50)
    for angle in (0.17, -0.12):
        ref = Rotate(angle=angle, keep_size=True, padding_mode="border", mode="bilinear", align_corners=False)(x)
        torch.testing.assert_close(rotate(x, angle), ref.as_tensor(), atol=1e-4, rtol=0)
    for n, k, sigma in ((50, 5, 1.3), (37, 37, 0.7), (9, 3, 2.0)):
        v = torch.rand(n)
        padded = F.pad(v[None, None], (k // 2, k // 2), mode="reflect")[0, 0]
        taps = torch.exp(-((torch.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
        taps = taps / taps.sum()
        naive = torch.stack([(padded[i:i + k] * taps).sum() for i in range(n)])  # direct convolution
        torch.testing.assert_close(reflect_blur_matrix(n, k, sigma) @ v, naive, atol=1e-6, rtol=0)
    image = torch.rand(1, 37, 50)
    blurred = reflect_blur_matrix(37, 7, 1.5) @ image @ reflect_blur_matrix(50, 7, 1.5).T
    ref = gaussian_blur2d(image[None], (7, 7), (1.5, 1.5), border_type="reflect")[0]
    torch.testing.assert_close(blurred, ref, atol=1e-6, rtol=0)


def test_rot90_poses_uniform_with_monai_draws():
    t = RandRot90d("image", prob=0.75, max_k=3)
    t.set_random_state(0)
    x = torch.arange(4.0).view(1, 2, 2)
    counts: dict[bytes, int] = {}
    for _ in range(4000):
        key = t({"image": x})["image"].numpy().tobytes()
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 4 and all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


def test_batched_base_never_enlarges_and_gray_batches_stay_one_channel(tmp_path):
    record = _gray_png(tmp_path, 120, 100)
    base = build_batched_base_transform("xray", 2 * 64)(record)["image"]
    assert base.shape == (1, 100, 100)  # stored size kept (the old base enlarged it to 128 x 128)
    small = build_batched_base_transform("xray", 80)(record)["image"]
    assert small.shape == (1, 80, 80)
    batch = stack_images([base, small])
    assert batch.shape == (2, 1, 80, 80)
    torch.testing.assert_close(batch[1], small)
    torch.manual_seed(4)
    lean = BatchedSSLAugment("xray", 32)(batch)
    torch.manual_seed(4)
    old = BatchedSSLAugment("xray", 32)(batch.expand(-1, 3, -1, -1).contiguous())  # 3 identical channels
    for a, b in zip(lean, old):
        assert a.shape == b.shape == (2, 3, 32, 32) and a.stride(1) == 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert stack_images([base, torch.rand(3, 90, 90)]).shape == (2, 3, 90, 90)


def test_degrees_of_rotation_preset_kept():
    transform = build_ssl_transform("xray", 32)
    rot = [t for t in random_transforms(transform.views.view_transforms[0]) if hasattr(t, "max_radians")]
    assert len(rot) == 1 and rot[0].max_radians == pytest.approx(math.radians(10.0)) and rot[0].prob == 0.5
