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
