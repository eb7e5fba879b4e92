"""``medssl weights convert|stats`` (CLI item 6): convert writes a medssl file that inspect recognises as format
"medssl", whose weights rebuild exactly the prepared model, with provenance listing the operations; stats
counts filters as a naive loop over the raw tensors does."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from medssl.cli import main as cli_main
from medssl.weights import build_from_checkpoint, load_checkpoint
from tests.test_weights_readers_bit import bit_arrays
from tests.test_weights_readers_resnet import head_state, prefixed, torchvision_state


def _run(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert cli_main(list(argv)) == 0
    return capsys.readouterr().out


def _features(model, seed: int = 0) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_convert_roundtrip_keeps_weights_heads_and_provenance(tmp_path, capsys):
    raw = torchvision_state()
    proj = head_state([256, 32, 32, 16], hidden_bias=False, last_bias=True, last_bn=True, last_affine=False)
    src = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet50",
                "state_dict": {**prefixed(raw, "module.encoder."), **prefixed(proj, "module.encoder.fc.")}}, src)
    out = tmp_path / "out" / "simsiam.safetensors"
    printed = _run(capsys, "weights", "convert", str(src), "-o", str(out))
    assert "simsiam -> medssl" in printed
    record = json.loads(_run(capsys, "weights", "inspect", str(out), "--json"))
    assert record["format"] == "medssl" and record["arch"] == "resnet50"
    assert record["missing"] == [] and record["unexpected"] == []
    assert record["input_normalization"]["std"] == [0.229, 0.224, 0.225]
    assert set(record["heads"]) == {"projector"} and record["heads"]["projector"]["0.weight"] == [32, 256]
    prov = load_checkpoint(out).provenance
    assert prov["source_format"] == "simsiam" and prov["source_file"] == src.name
    assert prov["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and prov["operations"] == []
    original, _ = build_from_checkpoint(src)
    converted, loaded = build_from_checkpoint(out)
    assert torch.equal(_features(original), _features(converted))
    for k, v in proj.items():
        assert torch.equal(loaded.heads["projector"][k], v)


def test_convert_with_surgery_matches_in_memory_preparation(tmp_path, capsys):
    from medssl.weights.prepare import prepare_backbone

    raw = torchvision_state(seed=4)
    raw["layer1.0.conv2.weight"][:3] *= 1e-3  # three dead filters
    src = tmp_path / "byol_port.pth"
    torch.save(raw, src)
    out = tmp_path / "prepared.safetensors"
    _run(capsys, "weights", "convert", str(src), "-o", str(out), "--scale-frobenius", "--dead-filters", "copy",
         "--seed", "3")
    expected, _ = build_from_checkpoint(src)
    ops = prepare_backbone(expected, scale_frobenius=True, dead_filters="copy", seed=3)
    converted, loaded = build_from_checkpoint(out)
    assert [op["operation"] for op in loaded.provenance["operations"]] == [op["operation"] for op in ops]
    assert loaded.provenance["source_format"] == "byol_torch"
    for key, value in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    record = json.loads(_run(capsys, "weights", "inspect", str(out), "--json"))
    assert record["format"] == "medssl"


def test_convert_bit_to_bn_and_folded_ws(tmp_path, capsys):
    from medssl.models import StdConv2d
    from medssl.weights.prepare import prepare_backbone

    src = tmp_path / "BiT-S-R50x1.npz"
    np.savez(src, **bit_arrays(seed=5))
    out = tmp_path / "bit_bn.safetensors"
    _run(capsys, "weights", "convert", str(src), "-o", str(out), "--norm", "bn", "--fold-ws")
    record = json.loads(_run(capsys, "weights", "inspect", str(out), "--json"))
    assert record["format"] == "medssl" and record["arch_kwargs"]["norm"] == "bn"
    assert record["missing"] == [] and record["unexpected"] == []
    assert record["input_normalization"]["mean"] == [0.5, 0.5, 0.5]
    expected, _ = build_from_checkpoint(src)
    prepare_backbone(expected, norm="bn", fold_ws=True)
    converted, _ = build_from_checkpoint(out)
    convs = [m for m in converted.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(not (isinstance(m, StdConv2d) and m.standardize) for m in convs)
    for key, value in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    # default-initialised BN is meaningful with batch statistics (eval mode would be an identity per BN)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted.train().forward_features(x), expected.train().forward_features(x),
                                   atol=1e-6, rtol=1e-6)


def test_stats_json_counts_filters_and_plot(tmp_path, capsys):
    raw = torchvision_state(seed=6)
    raw["layer2.0.conv1.weight"][:2] = 0.0
    src = tmp_path / "resnet50.pth"
    torch.save(raw, src)
    png = tmp_path / "hist.png"
    stats = json.loads(_run(capsys, "weights", "stats", str(src), "--json", "--plot", str(png)))
    norms = [w[i].norm().item() for k, w in raw.items() if k.endswith("weight") and w.ndim == 4
             for i in range(w.shape[0])]
    assert stats["overall"]["filters"] == len(norms)
    assert stats["overall"]["above"] == sum(n > 1.0 for n in norms)
    assert stats["overall"]["below"] == sum(n < 0.1 for n in norms) >= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _run(capsys, "weights", "stats", str(src))
    assert "overall" in table and str(len(norms)) in table


def test_convert_refuses_other_output_suffix(tmp_path, capsys):
    src = tmp_path / "tv.pth"
    torch.save(torchvision_state(bottleneck=False, layers=(2, 2, 2, 2), base=4), src)
    capsys.readouterr()
    assert cli_main(["weights", "convert", str(src), "-o", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out.pth" in err[0] and ".safetensors" in err[0]
    assert not (tmp_path / "out.pth").exists()


def _fail(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_convert_groupnorm_bit_frobenius_needs_bn_and_folding_then_reports_count(tmp_path, capsys):
    from medssl.weights.norm import convert_gn_to_bn, fold_weight_standardization

    src = tmp_path / "BiT-S-R50x1.npz"
    np.savez(src, **bit_arrays(seed=8))
    out = tmp_path / "scaled.safetensors"
    err = _fail(capsys, "weights", "convert", str(src), "-o", str(out), "--scale-frobenius", "--norm", "keep")
    assert src.name in err and "--norm bn" in err and "GroupNorm" in err
    err = _fail(capsys, "weights", "convert", str(src), "-o", str(out), "--scale-frobenius", "--norm", "bn")
    assert src.name in err and "--fold-ws" in err and "weight-standardised" in err
    assert not out.exists()
    printed = _run(capsys, "weights", "convert", str(src), "-o", str(out), "--scale-frobenius", "--norm", "bn",
                   "--fold-ws")
    # reference: GN -> BN and folding in memory; in pre-activation units conv1 feeds norm2 and conv2 feeds norm3
    expected, _ = build_from_checkpoint(src)
    convert_gn_to_bn(expected)
    fold_weight_standardization(expected)
    scaled = {n: m for n, m in expected.named_modules() if n.endswith((".conv1", ".conv2")) and ".blocks." in n}
    norms = {n: float(m.weight.detach().double().norm()) for n, m in scaled.items()}
    assert len(norms) == 32 and min(norms.values()) > 1
    assert "32 conv+BN layers scaled (paper rule), 0 dead filters repaired" in printed
    converted, loaded = build_from_checkpoint(out)
    prov = loaded.provenance
    assert prov["preparation"]["layers_scaled"] == 32 and prov["preparation"]["frobenius_rule"] == "paper"
    assert prov["bn_statistics"] == "uncalibrated"  # GN -> BN without calibration
    for name, s in norms.items():
        torch.testing.assert_close(converted.get_submodule(name).weight.double(),
                                   expected.get_submodule(name).weight.double() / s**0.5)
    # converting the uncalibrated file again keeps saying so; calibrating needs BatchNorm layers
    again = tmp_path / "again.safetensors"
    _run(capsys, "weights", "convert", str(out), "-o", str(again))
    assert load_checkpoint(again).provenance["bn_statistics"] == "uncalibrated"
    err = _fail(capsys, "weights", "convert", str(src), "-o", str(again), "--recalibrate", str(tmp_path))
    assert "--norm bn" in err and src.name in err
    err = _fail(capsys, "weights", "convert", str(src), "-o", str(again), "--norm", "bn", "--image-size", "32")
    assert "--image-size only apply with --recalibrate" in err  # calibration options are never silently ignored


def _busi_calibration_folder(shared_data, dest, per_class: int = 4):
    import os

    busi = shared_data / "busi"
    if not busi.is_dir():
        import pytest

        pytest.skip("BUSI images not in the shared data folder")
    for label in ("benign", "malignant", "normal"):
        (dest / label).mkdir(parents=True)
        for src in sorted((busi / label).glob("*.png"))[:per_class]:
            os.symlink(src, dest / label / src.name.replace(" ", "_"))
    return dest


def test_convert_bit_gn_to_bn_recalibrated_on_busi(shared_data, tmp_path, capsys):
    from medssl.data.sources import records_from_path
    from medssl.transforms.presets import build_eval_transform
    from medssl.weights.norm import convert_gn_to_bn

    calib = _busi_calibration_folder(shared_data, tmp_path / "calib")
    src = tmp_path / "BiT-M-R50x1.npz"
    np.savez(src, **bit_arrays(seed=9))
    out = tmp_path / "bit_bn_recalibrated.safetensors"
    printed = _run(capsys, "weights", "convert", str(src), "-o", str(out), "--norm", "bn", "--recalibrate",
                   str(calib), "--recalibrate-batch-size", "16", "--image-size", "32", "--modality", "ultrasound")
    assert "BatchNorm statistics: recalibrated on 12 images" in printed
    converted, loaded = build_from_checkpoint(out)
    assert loaded.provenance["bn_statistics"] == "recalibrated"
    assert loaded.provenance["bn_recalibration"]["num_samples"] == 12
    # the 12 calibration images, normalised as BiT expects ([-1, 1])
    transform = build_eval_transform("ultrasound", 32)
    x = torch.stack([transform(r)["image"] for r in records_from_path(calib)]) * 2.0 - 1.0
    # naive loop: the inputs of every BatchNorm of the converted network (batch statistics, as in training)
    # over all calibration images; per channel the mean and the unbiased variance
    reference, _ = build_from_checkpoint(src)
    convert_gn_to_bn(reference)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: inputs.__setitem__(name, args[0].clone()))
             for n, m in reference.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        reference.train()(x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 49
    for name, t in inputs.items():
        values = t.double().numpy().transpose(1, 0, 2, 3).reshape(t.shape[1], -1)
        bn = converted.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), values.mean(axis=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.running_var.double().numpy(), values.var(axis=1, ddof=1), rtol=1e-4,
                                   atol=1e-5)
    # eval-mode features: finite and on the GroupNorm original's scale; without calibration they are not
    original, _ = build_from_checkpoint(src)
    uncalibrated = tmp_path / "bit_bn.safetensors"
    _run(capsys, "weights", "convert", str(src), "-o", str(uncalibrated), "--norm", "bn")
    raw, raw_loaded = build_from_checkpoint(uncalibrated)
    assert raw_loaded.provenance["bn_statistics"] == "uncalibrated"
    with torch.no_grad():
        f_gn = original.eval().forward_features(x)
        f_bn = converted.eval().forward_features(x)
        f_raw = raw.eval().forward_features(x)
    assert torch.isfinite(f_bn).all()
    ratio = float(f_bn.std() / f_gn.std())
    assert 0.1 <= ratio <= 10, ratio
    assert not (float(f_raw.std() / f_gn.std()) <= 10), float(f_raw.std() / f_gn.std())
