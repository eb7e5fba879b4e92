"""Readers of torchvision-named ResNet checkpoints (Acceptance 2, 3): every file is written in the published
layout from random tensors, ``medssl weights inspect --json`` must name the format, and the loaded model must
match a plain functional ResNet forward over the raw tensors (or MONAI's ResNet under a strict load)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
import torch.nn.functional as F

from medssl.cli import main as cli_main
from medssl.errors import UntrustedPickleError
from medssl.models import MLPHead
from medssl.weights import build_from_checkpoint, build_heads, load_checkpoint

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TOL = 1e-5


# ---------------------------------------------------------------- raw tensors and the reference forward
def random_bn(prefix: str, c: int, gen: torch.Generator, sd: dict) -> None:
    sd[f"{prefix}.weight"] = 1 + 0.2 * torch.randn(c, generator=gen)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=gen)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
    sd[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=gen)
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)


def random_conv(o: int, i: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(o, i, k, k, generator=gen) * (2.0 / (i * k * k)) ** 0.5


def torchvision_state(bottleneck: bool = True, layers=(3, 4, 6, 3), base: int = 8, num_classes: int = 0,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-named ResNet state_dict (stage widths base*[1,2,4,8]) with random weights and BN stats."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"conv1.weight": random_conv(base, 3, 7, gen)}
    random_bn("bn1", base, gen, sd)
    exp = 4 if bottleneck else 1
    in_ch = base
    for s, n in enumerate(layers):
        width = base * 2 ** s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            if bottleneck:
                shapes = [(width, in_ch, 1), (width, width, 3), (width * exp, width, 1)]
            else:
                shapes = [(width, in_ch, 3), (width, width, 3)]
            for j, (o, i, k) in enumerate(shapes, 1):
                sd[f"{p}.conv{j}.weight"] = random_conv(o, i, k, gen)
                random_bn(f"{p}.bn{j}", o, gen, sd)
            if b == 0 and (s > 0 or in_ch != width * exp):
                sd[f"{p}.downsample.0.weight"] = random_conv(width * exp, in_ch, 1, gen)
                random_bn(f"{p}.downsample.1", width * exp, gen, sd)
            in_ch = width * exp
    if num_classes:
        sd["fc.weight"] = 0.05 * torch.randn(num_classes, in_ch, generator=gen)
        sd["fc.bias"] = 0.05 * torch.randn(num_classes, generator=gen)
    return sd


def reference_resnet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Plain functional ResNet v1.5 forward (eval-mode BN) over a torchvision-named dict -> pooled features."""
    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for s in range(1, 5):
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
        for b in blocks:
            p = f"layer{s}.{b}"
            stride = 2 if s > 1 and b == 0 else 1
            if f"{p}.conv3.weight" in sd:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = x
            if f"{p}.downsample.0.weight" in sd:
                short = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + short)
    return x.mean(dim=(2, 3))


def head_state(dims: list[int], *, hidden_bias: bool, last_bias: bool, last_bn: bool, last_affine: bool = True,
               seed: int = 1) -> dict[str, torch.Tensor]:
    """A random MLP head state_dict in the published [Linear, BN, ReLU]* + Linear (+BN) layout."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    n = len(dims) - 1
    for i in range(n):
        sd[f"{3 * i}.weight"] = 0.1 * torch.randn(dims[i + 1], dims[i], generator=gen)
        if (i < n - 1 and hidden_bias) or (i == n - 1 and last_bias):
            sd[f"{3 * i}.bias"] = 0.1 * torch.randn(dims[i + 1], generator=gen)
        if i < n - 1 or last_bn:
            random_bn(str(3 * i + 1), dims[i + 1], gen, sd)
            if i == n - 1 and not last_affine:
                del sd[f"{3 * i + 1}.weight"], sd[f"{3 * i + 1}.bias"]
    return sd


def reference_head(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward of a head state_dict in [Linear, BN, ReLU]* layout."""
    idx = sorted({int(k.split(".")[0]) for k in sd})
    last_linear = max(i for i in idx if i % 3 == 0)
    for i in idx:
        if i % 3 == 0:
            z = F.linear(z, sd[f"{i}.weight"], sd.get(f"{i}.bias"))
        else:
            z = F.batch_norm(z, sd[f"{i}.running_mean"], sd[f"{i}.running_var"], sd.get(f"{i}.weight"),
                             sd.get(f"{i}.bias"), False, 0.0, 1e-5)
            if i < last_linear:
                z = F.relu(z)
    return z


def prefixed(sd: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in sd.items()}


def inspect_json(path, capsys, *extra: str) -> dict:
    """Run ``medssl weights inspect --json`` in-process and parse its single JSON line."""
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path), "--json", *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def check_backbone(path, raw: dict, capsys, fmt: str, norm, *, trust: bool = False) -> object:
    """inspect names ``fmt``; the loaded backbone equals the reference forward on ``raw`` within 1e-5."""
    record = inspect_json(path, capsys, *(["--trust"] if trust else []))
    assert record["format"] == fmt
    assert record["missing"] == [] and record["unexpected"] == []
    assert record["input_normalization"]["mean"] == pytest.approx(norm[0])
    assert record["input_normalization"]["std"] == pytest.approx(norm[1])
    model, loaded = build_from_checkpoint(path, trust=trust)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.forward_features(x)
    want = reference_resnet(raw, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    return loaded


# ---------------------------------------------------------------- tests
def test_torchvision_resnet50_320_entries_strict_and_monai_reference(tmp_path, capsys):
    from monai.networks.nets import resnet50

    ref = resnet50(spatial_dims=2, n_input_channels=3, shortcut_type="B", bias_downsample=False,
                   conv1_t_stride=2, num_classes=1000).eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # non-trivial BN statistics so eval mode matters
        if k.endswith("running_mean"):
            v.normal_(0, 0.1, generator=gen)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5, generator=gen)
    ref.load_state_dict(sd, strict=True)
    assert len(sd) == 320
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(sd, path)
    record = inspect_json(path, capsys)
    assert (record["format"], record["arch"]) == ("torchvision", "resnet50")
    assert len(record["loaded"]) == 320 and record["missing"] == [] and record["unexpected"] == []
    model, loaded = build_from_checkpoint(path)
    assert loaded.arch_kwargs["num_classes"] == 1000 and model.arch == "resnet50"
    # strict key matching into build_backbone("resnet50", num_classes=1000)
    model.load_state_dict(loaded.backbone, strict=True)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=TOL, rtol=TOL)


def test_torchvision_resnet18_basic_blocks(tmp_path, capsys):
    raw = torchvision_state(bottleneck=False, layers=(2, 2, 2, 2), base=16, num_classes=5)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(raw, path)
    loaded = check_backbone(path, raw, capsys, "torchvision", IMAGENET)
    assert loaded.arch == "resnet18" and loaded.arch_kwargs["widen_factor"] == 0.25


def test_resnet34_inferred(tmp_path):
    raw = torchvision_state(bottleneck=False, layers=(3, 4, 6, 3), base=8)
    path = tmp_path / "r34.pth"
    torch.save(raw, path)
    assert load_checkpoint(path).arch == "resnet34"


def test_simclr_v1_tonylins_skips_fc(tmp_path, capsys):
    raw = torchvision_state(num_classes=10)
    path = tmp_path / "resnet50-1x.pth"
    torch.save({"state_dict": raw}, path)
    body = {k: v for k, v in raw.items() if not k.startswith("fc.")}
    loaded = check_backbone(path, body, capsys, "simclr_v1", ([0, 0, 0], [1, 1, 1]))
    assert set(loaded.skipped) == {"fc.weight", "fc.bias"} and "fc.weight" not in loaded.backbone
    assert any("random fc.bias" in n for n in loaded.notes)


def _separius(raw: dict) -> dict:
    """Rename torchvision keys to the layout of Separius' SimCLR v2 converter (written independently)."""
    out = {}
    for k, v in raw.items():
        if k.startswith("conv1."):
            out["net.0.0.weight"] = v
        elif k.startswith("bn1."):
            out["net.0.1.0." + k.split(".", 1)[1]] = v
        elif k.startswith("fc."):
            out[k] = v
        else:
            layer, block, mod, *rest = k.split(".")
            base = f"net.{layer[-1]}.blocks.{block}."
            if mod == "downsample":
                idx, param = rest
                out[base + ("projection.shortcut.weight" if idx == "0" else f"projection.bn.0.{param}")] = v
            elif mod.startswith("conv"):
                out[base + f"net.{2 * (int(mod[-1]) - 1)}.weight"] = v
            else:
                out[base + f"net.{2 * (int(mod[-1]) - 1) + 1}.0.{rest[0]}"] = v
    return out


def test_simclr_v2_separius(tmp_path, capsys):
    raw = torchvision_state(num_classes=7)
    head = head_state([256, 256, 256, 16], hidden_bias=False, last_bias=False, last_bn=True)
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save({"resnet": _separius(raw), "head": prefixed(head, "layers.")}, path)
    loaded = check_backbone(path, raw, capsys, "simclr_v2", ([0, 0, 0], [1, 1, 1]))
    assert loaded.arch_kwargs["num_classes"] == 7
    projector = build_heads(loaded)["projector"].eval()
    assert projector.config["num_layers"] == 3 and projector.config["last_bn"]
    z = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(projector(z), reference_head(head, z), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("wrapped", [False, True])
def test_swav(tmp_path, capsys, wrapped):
    raw = torchvision_state()
    head = head_state([256, 64, 16], hidden_bias=True, last_bias=True, last_bn=False)
    protos = torch.randn(30, 16)
    sd = prefixed({**raw, **prefixed(head, "projection_head."), "prototypes.weight": protos}, "module.")
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "amp": {}}
               if wrapped else sd, path)
    loaded = check_backbone(path, raw, capsys, "swav", (IMAGENET[0], [0.228, 0.224, 0.225]))
    assert torch.equal(loaded.heads["prototypes"]["weight"], protos)
    heads = build_heads(loaded)
    for k, v in head.items():
        assert torch.equal(heads["projector"].state_dict()[k], v)


def test_byol_flat_port(tmp_path, capsys):
    raw = torchvision_state()
    path = tmp_path / "byol_r50.pth"
    torch.save(raw, path)
    check_backbone(path, raw, capsys, "byol_torch", IMAGENET)


def test_byol_solo_learn(tmp_path, capsys):
    raw = torchvision_state()
    proj = head_state([256, 64, 16], hidden_bias=True, last_bias=True, last_bn=False, seed=2)
    pred = head_state([16, 64, 16], hidden_bias=True, last_bias=True, last_bn=False, seed=3)
    sd = {**prefixed(raw, "backbone."), **prefixed(torchvision_state(seed=9), "momentum_backbone."),
          **prefixed(proj, "projector."), **prefixed(proj, "momentum_projector."), **prefixed(pred, "predictor."),
          "classifier.weight": torch.randn(10, 256), "classifier.bias": torch.zeros(10)}
    path = tmp_path / "byol-imagenet.ckpt"
    torch.save({"epoch": 100, "global_step": 5, "state_dict": sd}, path)
    loaded = check_backbone(path, raw, capsys, "byol_solo", IMAGENET)
    assert set(loaded.heads) == {"projector", "predictor"}
    assert any(k.startswith("momentum_backbone.") for k in loaded.skipped)
    assert "classifier.weight" in loaded.skipped
    for k, v in pred.items():
        assert torch.equal(loaded.heads["predictor"][k], v)


def test_byol_mmselfsup(tmp_path, capsys):
    raw = torchvision_state()
    sd = {**prefixed(raw, "backbone."), "neck.mlp.0.weight": torch.randn(8, 256)}
    path = tmp_path / "byol_mmselfsup.pth"
    torch.save({"state_dict": sd, "author": "mmselfsup"}, path)
    loaded = check_backbone(path, raw, capsys, "byol_mmselfsup", IMAGENET)
    assert loaded.skipped == ["neck.mlp.0.weight"]


def test_simsiam(tmp_path, capsys):
    raw = torchvision_state()
    proj = head_state([256, 32, 32, 16], hidden_bias=False, last_bias=True, last_bn=True, last_affine=False)
    pred = head_state([16, 8, 16], hidden_bias=False, last_bias=True, last_bn=False, seed=4)
    sd = {**prefixed(raw, "module.encoder."), **prefixed(proj, "module.encoder.fc."),
          **prefixed(pred, "module.predictor.")}
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
               path)
    loaded = check_backbone(path, raw, capsys, "simsiam", IMAGENET)
    heads = build_heads(loaded)
    assert heads["projector"].config == MLPHead.config_from_state_dict(proj)
    assert heads["projector"].config["last_bn"] and not heads["projector"].config["last_bn_affine"]
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(heads["predictor"].eval()(z), reference_head(pred, z), atol=TOL, rtol=TOL)


def test_moco_v2(tmp_path, capsys):
    raw = torchvision_state()
    mlp = {"fc.0.weight": torch.randn(256, 256), "fc.0.bias": torch.zeros(256),
           "fc.2.weight": torch.randn(16, 256), "fc.2.bias": torch.zeros(16)}
    sd = {**prefixed({**raw, **mlp}, "module.encoder_q."), **prefixed({**raw, **mlp}, "module.encoder_k."),
          "module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, path)
    loaded = check_backbone(path, raw, capsys, "moco_v2", IMAGENET)
    assert "module.queue" not in loaded.skipped and "queue" in loaded.skipped
    assert any(k.startswith("encoder_k.") for k in loaded.skipped) and loaded.heads == {}


def test_moco_v3(tmp_path, capsys):
    raw = torchvision_state()
    proj = head_state([256, 32, 16], hidden_bias=False, last_bias=False, last_bn=True, last_affine=False)
    pred = head_state([16, 32, 16], hidden_bias=False, last_bias=False, last_bn=False, seed=8)
    sd = {**prefixed(raw, "module.base_encoder."), **prefixed(proj, "module.base_encoder.fc."),
          **prefixed(raw, "module.momentum_encoder."), **prefixed(pred, "module.predictor.")}
    path = tmp_path / "r-50-1000ep.pth.tar"
    torch.save({"epoch": 1000, "arch": "resnet50", "state_dict": sd, "optimizer": {}, "scaler": {}}, path)
    loaded = check_backbone(path, raw, capsys, "moco_v3", IMAGENET)
    heads = build_heads(loaded)
    assert heads["projector"].config["num_layers"] == 2 and not heads["projector"].config["last_bn_affine"]
    assert any(k.startswith("momentum_encoder.") for k in loaded.skipped)


def test_dino_backbone_flat(tmp_path, capsys):
    raw = torchvision_state()
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(raw, path)
    check_backbone(path, raw, capsys, "dino", IMAGENET)


def test_dino_full_checkpoint_needs_trust(tmp_path, capsys):
    teacher = torchvision_state(seed=1)
    student = torchvision_state(seed=2)
    dino_head = {"head.mlp.0.weight": torch.randn(32, 256), "head.last_layer.weight_g": torch.ones(64, 1),
                 "head.last_layer.weight_v": torch.randn(64, 16)}
    ckpt = {"student": prefixed({**prefixed(student, "backbone."), **dino_head}, "module."),
            "teacher": prefixed({**prefixed(teacher, "backbone."), **dino_head}, "module."),
            "optimizer": {}, "epoch": 10, "args": argparse.Namespace(arch="resnet50", lr=0.3),
            "dino_loss": {"center": torch.zeros(1, 64)}}
    path = tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth"
    torch.save(ckpt, path)
    with pytest.raises(UntrustedPickleError, match=r"argparse\.Namespace.*--trust"):
        load_checkpoint(path)
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "--trust" in err[0]
    loaded = check_backbone(path, teacher, capsys, "dino", IMAGENET, trust=True)
    assert any(k.startswith("student.") for k in loaded.skipped)


def test_dataparallel_torchvision_is_not_mistaken_for_swav(tmp_path):
    raw = torchvision_state(bottleneck=False, layers=(2, 2, 2, 2), base=4, num_classes=3)
    path = tmp_path / "finetuned.pth"
    torch.save({"epoch": 1, "state_dict": prefixed(raw, "module.")}, path)
    loaded = load_checkpoint(path)
    assert loaded.format == "torchvision" and loaded.input_normalization["std"] == IMAGENET[1]
    assert loaded.missing == [] and set(loaded.loaded) == set(raw)
