"""BiT-S/BiT-M npz and timm ResNetV2 readers (Acceptance 2): files in the published layouts (HWIO kernels,
``resnet/`` prefix, 153 arrays for R50x1; timm names as safetensors or state_dict) must load into medssl's
ResNetV2 and match a functional BiT forward written here over the raw arrays."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from medssl.cli import main as cli_main
from medssl.weights import build_from_checkpoint, load_checkpoint

TOL = 1e-5
UNITS = (3, 4, 6, 3)


def bit_arrays(scale: float = 0.25, num_classes: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Random BiT R50 arrays in Google's npz layout (float32, HWIO, gamma/beta (C,))."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def kernel(name, kh, cin, cout):
        arrays[name] = rng.normal(0.1, 1.0, (kh, kh, cin, cout)).astype(np.float32)

    def gn(prefix, c):
        # the last norm of each unit gets small gammas, as in trained BiT nets (keeps float32 well conditioned)
        scale = 0.1 if prefix.endswith("c/group_norm") else 1.0
        arrays[f"{prefix}/gamma"] = (scale * (1 + 0.2 * rng.standard_normal(c))).astype(np.float32)
        arrays[f"{prefix}/beta"] = (0.1 * rng.standard_normal(c)).astype(np.float32)

    stem = int(64 * scale)
    kernel("resnet/root_block/standardized_conv2d/kernel", 7, 3, stem)
    cin = stem
    for b, n in enumerate(UNITS, 1):
        cout = int(256 * scale * 2 ** (b - 1))
        mid = cout // 4
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            gn(f"{p}/a/group_norm", cin)
            kernel(f"{p}/a/standardized_conv2d/kernel", 1, cin, mid)
            gn(f"{p}/b/group_norm", mid)
            kernel(f"{p}/b/standardized_conv2d/kernel", 3, mid, mid)
            gn(f"{p}/c/group_norm", mid)
            kernel(f"{p}/c/standardized_conv2d/kernel", 1, mid, cout)
            if u == 1:
                kernel(f"{p}/a/proj/standardized_conv2d/kernel", 1, cin, cout)
            cin = cout
    gn("resnet/group_norm", cin)
    arrays["resnet/head/conv2d/kernel"] = (0.05 * rng.standard_normal((1, 1, cin, num_classes))).astype(np.float32)
    arrays["resnet/head/conv2d/bias"] = (0.05 * rng.standard_normal(num_classes)).astype(np.float32)
    return arrays


def reference_bit(arrays: dict[str, np.ndarray], x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BiT forward straight from the npz arrays: (features, logits)."""
    def conv(t, name, stride=1, padding=0):
        w = torch.from_numpy(arrays[name]).permute(3, 2, 0, 1)
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(t, (w - mean) / torch.sqrt(var + eps), stride=stride, padding=padding)

    def gn_relu(t, prefix):
        c = t.shape[1]
        return F.relu(F.group_norm(t, math.gcd(c, 32), torch.from_numpy(arrays[f"{prefix}/gamma"]),
                                   torch.from_numpy(arrays[f"{prefix}/beta"]), 1e-5))

    x = conv(x, "resnet/root_block/standardized_conv2d/kernel", 2, 3)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
    for b, n in enumerate(UNITS, 1):
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            stride = 2 if b > 1 and u == 1 else 1
            pre = gn_relu(x, f"{p}/a/group_norm")
            proj = f"{p}/a/proj/standardized_conv2d/kernel"
            short = conv(pre, proj, stride) if proj in arrays else x
            out = conv(pre, f"{p}/a/standardized_conv2d/kernel")
            out = conv(gn_relu(out, f"{p}/b/group_norm"), f"{p}/b/standardized_conv2d/kernel", stride, 1)
            out = conv(gn_relu(out, f"{p}/c/group_norm"), f"{p}/c/standardized_conv2d/kernel")
            x = out + short
    feats = gn_relu(x, "resnet/group_norm").mean(dim=(2, 3))
    head = torch.from_numpy(arrays["resnet/head/conv2d/kernel"])[0, 0]
    return feats, feats @ head + torch.from_numpy(arrays["resnet/head/conv2d/bias"])


def timm_names(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same weights under timm's resnetv2 names (OIHW), renamed here independently of the reader."""
    out = {}
    for key, arr in arrays.items():
        t = torch.from_numpy(arr.transpose(3, 2, 0, 1).copy()) if arr.ndim == 4 else torch.from_numpy(arr)
        parts = key.split("/")
        if parts[1] == "root_block":
            out["stem.conv.weight"] = t
        elif parts[1] == "group_norm":
            out[f"norm.{'weight' if parts[2] == 'gamma' else 'bias'}"] = t
        elif parts[1] == "head":
            out[f"head.fc.{'weight' if parts[3] == 'kernel' else 'bias'}"] = t
        else:
            s, j = int(parts[1][5:]) - 1, int(parts[2][4:]) - 1
            p = f"stages.{s}.blocks.{j}"
            idx = "abc".index(parts[3]) + 1
            if parts[4] == "proj":
                out[f"{p}.downsample.conv.weight"] = t
            elif parts[4] == "standardized_conv2d":
                out[f"{p}.conv{idx}.weight"] = t
            else:
                out[f"{p}.norm{idx}.{'weight' if parts[5] == 'gamma' else 'bias'}"] = t
    return out


def _inspect(path, capsys) -> dict:
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _check(path, arrays, capsys, fmt: str, eps: float) -> None:
    record = _inspect(path, capsys)
    assert record["format"] == fmt and record["arch"] == "resnetv2_50x1"
    assert record["missing"] == [] and record["unexpected"] == []
    assert record["input_normalization"]["mean"] == [0.5] * 3 and record["input_normalization"]["std"] == [0.5] * 3
    model, loaded = build_from_checkpoint(path)
    assert model.arch_kwargs["ws_eps"] == eps and loaded.arch_kwargs["num_classes"] == 10
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats, logits = reference_bit(arrays, x, eps)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), feats, atol=TOL, rtol=TOL)
        torch.testing.assert_close(model(x), logits, atol=TOL, rtol=TOL)


def test_bit_npz_153_arrays(tmp_path, capsys):
    arrays = bit_arrays()
    assert len(arrays) == 153
    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **arrays)
    _check(path, arrays, capsys, "bit_npz", 1e-10)


def test_timm_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    arrays = bit_arrays(seed=1)
    path = tmp_path / "model.safetensors"
    save_file(timm_names(arrays), str(path))
    _check(path, arrays, capsys, "timm_resnetv2", 1e-8)


def test_timm_state_dict_and_forced_arch(tmp_path):
    arrays = bit_arrays(seed=2)
    path = tmp_path / "resnetv2_50x1_bit.pth"
    torch.save(timm_names(arrays), path)
    loaded = load_checkpoint(path)
    assert loaded.format == "timm_resnetv2" and loaded.missing == []
    # forcing a deeper architecture reports what the file lacks
    deeper = load_checkpoint(path, arch="resnetv2_101x1")
    assert deeper.arch == "resnetv2_101x1"
    assert "stages.2.blocks.22.conv1.weight" in deeper.missing and not deeper.unexpected
