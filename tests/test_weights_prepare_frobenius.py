"""Ciga et al. preparation choices (issue 10, build item 2): Frobenius scaling refuses networks it cannot scale
before touching them (GroupNorm: --norm bn; weight standardisation: --fold-ws), the log and the provenance
count the scaled layers and repaired filters, and ``bn_statistics`` says where BatchNorm statistics come from."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from medssl.cli import main as cli_main
from medssl.errors import MedsslError
from medssl.models import build_backbone
from medssl.weights import load_checkpoint
from medssl.weights.norm import recalibrate_bn
from medssl.weights.prepare import bn_statistics_state, preparation_summary, prepare_backbone
from tests.test_weights_readers_bit import bit_arrays


def _bit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnetv2_50x1", widen_factor=0.125, small_stem=True).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("options", "needs"), [({"norm": "keep"}, "--norm bn"), ({"norm": "bn"}, "--fold-ws")])
def test_prepare_refuses_unscalable_bit_before_touching_it(options: dict, needs: str) -> None:
    model = _bit()
    before = _state(model)
    with pytest.raises(MedsslError, match=needs) as info:
        prepare_backbone(model, scale_frobenius=True, dead_filters="copy", **options)
    assert "\n" not in str(info.value)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 49  # not even converted
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_prepare_logs_and_summarises_scaled_layers_and_repaired_filters(caplog) -> None:
    model = _bit()
    with torch.no_grad():
        model.get_submodule("stages.2.blocks.0.conv2").weight[[1, 4, 6]] = 0.0
    with caplog.at_level(logging.INFO, logger="medssl.weights.prepare"):
        records = prepare_backbone(model, norm="bn", fold_ws=True, scale_frobenius=True, dead_filters="copy")
    # naive counts: every unit's conv1 -> norm2 and conv2 -> norm3 pair has norm > 1 after folding
    pairs = [n for n, m in model.named_modules() if ".blocks." in n and n.endswith((".conv1", ".conv2"))]
    assert len(pairs) == 32
    summary = preparation_summary(records)
    assert summary == {"layers_scaled": 32, "frobenius_rule": "paper", "filters_repaired": 3, "layers_repaired": 1,
                       "gn_to_bn_layers": 49, "ws_folded_layers": 53}
    line = [r.getMessage() for r in caplog.records if r.name == "medssl.weights.prepare"]
    assert len(line) == 1 and "32 conv+BN layers scaled (paper rule), 3 dead filters repaired" in line[0]


def test_bn_statistics_state_names_the_source_of_the_statistics() -> None:
    torch.manual_seed(0)
    resnet = build_backbone("resnet18", widen_factor=0.125, small_stem=True)
    with torch.no_grad():
        resnet.layer1[0].conv1.weight[2] = 0.0
    assert bn_statistics_state(resnet, []) == "original"
    assert bn_statistics_state(resnet, [], parent="trained") == "trained"
    copied = copy.deepcopy(resnet)
    assert bn_statistics_state(copied, prepare_backbone(copied, dead_filters="copy")) == "original"
    # random repair resets the repaired channel's statistics to 0/1
    randomised = copy.deepcopy(resnet)
    records = prepare_backbone(randomised, dead_filters="random")
    assert float(randomised.layer1[0].bn1.running_var[2]) == 1.0
    assert bn_statistics_state(randomised, records) == "uncalibrated"
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recal = copy.deepcopy(resnet)
    records = prepare_backbone(recal, dead_filters="random", calibrate=lambda m: recalibrate_bn(m, batches, 2))
    assert [r["operation"] for r in records] == ["dead_filter_repair", "bn_recalibration"]
    assert float(recal.layer1[0].bn1.running_var[2]) != 1.0
    assert bn_statistics_state(recal, records) == "recalibrated"
    bit = _bit()
    assert bn_statistics_state(bit, []) is None  # GroupNorm only: nothing to calibrate
    assert bn_statistics_state(bit, prepare_backbone(bit, norm="bn")) == "uncalibrated"


@pytest.fixture()
def tiny_images(shared_data, tmp_path):
    busi = shared_data / "busi"
    if not busi.is_dir():
        pytest.skip("BUSI images not in the shared data folder")
    dest = tmp_path / "images"
    for label in ("benign", "malignant"):
        (dest / label).mkdir(parents=True)
        for src in sorted((busi / label).glob("*.png"))[:2]:
            os.symlink(src, dest / label / src.name.replace(" ", "_"))
    return dest


def _pretrain_args(data, init, out, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--method", "simsiam", "--init", str(init), "--out", str(out),
            "--iterations", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu",
            "--knn-every", "0", "--checkpoint-every-epochs", "0", "--no-progress", "--modality", "ultrasound",
            "--method-options", '{"projector_hidden_dim": 16, "projector_out_dim": 16, "predictor_hidden_dim": 8}',
            *extra]


def test_pretrain_refuses_groupnorm_scaling_then_scales_and_records_counts(tiny_images, tmp_path, capsys):
    src = tmp_path / "BiT-S-R50x1.npz"
    np.savez(src, **bit_arrays(scale=0.125, seed=3))
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli_main(_pretrain_args(tiny_images, src, run, "--scale-frobenius", "--norm", "keep")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medssl: error")]
    assert len(err) == 1 and src.name in err[0] and "--norm bn" in err[0]  # (ignite's own log lines aside)
    assert not (run / "config.json").exists()
    assert cli_main(_pretrain_args(tiny_images, src, run, "--scale-frobenius", "--norm", "bn", "--fold-ws",
                                   "--overwrite")) == 0
    prov = load_checkpoint(run / "backbone.safetensors").provenance
    assert prov["preparation"]["layers_scaled"] == 32 and prov["preparation"]["frobenius_rule"] == "paper"
    assert [op["operation"] for op in prov["operations"]] == ["gn_to_bn", "fold_weight_standardization",
                                                              "frobenius_scaling"]
    assert prov["bn_statistics"] == "trained"
