"""Acceptance 7 of "Results a paper can stand on": every bundle's recipe equals the papers' values.

The bundle configs are read as MONAI reads them (``monai.bundle.ConfigParser``, expressions evaluated) and the
numbers a run would use are compared with tables written here from the papers, not from the YAML:

- dermatoscopy = Lu, Jha, Huo, "Contrastive learning meets transfer learning: a case study in medical image
  analysis" (2021): BiT-S R50x1, GroupNorm -> BatchNorm, no Frobenius / dead-filter steps, SimSiam with SGD
  momentum 0.9, lr 0.03 x batch / 256, weight decay 5e-4, cosine, batch 128, 400 epochs, mixed precision on GPU,
  kNN monitor, 60/20/20 split, focal-loss (gamma 4) linear probe on the 20 % split, 3 trials.
- histology, xray, mri, ultrasound = Ciga, Xu, Martel, "Resource and data efficient self supervised learning"
  (2021): P2X from the ImageNet weights of the same SSL method, Frobenius scaling with the paper's rule, dead
  filters replaced by copies, each method's published hyperparameters, fine-tuning with Adam lr 3e-4 and weight
  decay 1e-4, 10 % of the labels in 3 subsets.

Parsing only: no data, no network, no training.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "medssl" / "bundles"  # the bundles ship inside the package (bundles/<modality> links here)
CIGA_BUNDLES = ("histology", "xray", "mri", "ultrasound")
METHODS = ("simclr", "swav", "byol", "simsiam")

#: Lu et al.'s recipe
LU = {
    "init": "bit_s_r50x1", "arch": "resnetv2_50x1", "norm": "bn", "scale_frobenius": False, "dead_filters": "none",
    "fold_ws": False, "method": "simsiam", "optimizer": "sgd", "momentum": 0.9, "lr_per_256": 0.03,
    "weight_decay": 5e-4, "warmup_epochs": 0.0, "batch_size": 128, "epochs": 400,
    "splits": ["pretrain", "train", "test"], "protocol": "linear", "loss": "focal", "gamma": 4.0,
    "fractions": [1.0], "trials": 3,
}

#: each method's published optimisation (SimCLR Sec. 2.3; SwAV batch-256 recipe; BYOL Sec. 3.3; SimSiam Sec. 3)
PAPER_OPTIM = {
    "simclr": {"optimizer": "lars", "lr_per_256": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10.0},
    "swav": {"optimizer": "lars", "lr_per_256": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10.0},
    "byol": {"optimizer": "lars", "lr_per_256": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10.0},
    "simsiam": {"optimizer": "sgd", "lr_per_256": 0.05, "weight_decay": 1e-4, "warmup_epochs": 0.0},
}

#: each method's published heads (``paper_heads``: not scaled to the backbone) and loss settings (the
#: small-batch values where the papers give them)
PAPER_METHOD = {
    "simclr": {"paper_heads": True, "projector_hidden_dim": 2048, "projector_out_dim": 128, "temperature": 0.5},
    "swav": {"paper_heads": True, "projector_hidden_dim": 2048, "projector_out_dim": 128, "num_prototypes": 3000,
             "temperature": 0.1, "sinkhorn_eps": 0.05, "sinkhorn_iterations": 3, "num_local_crops": 6,
             "freeze_prototypes_epochs": 1, "epoch_queue_starts": 15},
    "byol": {"paper_heads": True, "projector_hidden_dim": 4096, "projector_out_dim": 256, "predictor_hidden_dim": 4096,
             "base_tau": 0.996, "final_tau": 1.0},
    "simsiam": {"paper_heads": True, "projector_hidden_dim": 2048, "projector_out_dim": 2048, "projector_layers": 3,
                "predictor_hidden_dim": 512, "predictor_fixed_lr": True},
}

#: the ImageNet SSL weights P2X starts from, per method (registry names; SimCLR: a converted file)
SSL_IMAGENET = {"swav": "swav_800ep", "byol": "byol_jax_res50x1", "simsiam": "simsiam_100ep"}

#: Ciga et al.'s preparation and evaluation
CIGA = {"scale_frobenius": True, "frobenius_rule": "paper", "dead_filters": "copy", "fold_ws": False,
        "protocol": "finetune", "eval_lr": 3e-4, "eval_weight_decay": 1e-4, "low_data_fraction": 0.1, "trials": 3}


def parse(modality: str, name: str, **override: Any) -> Any:
    """The bundle's ``train.yaml`` (``pretrain``) or ``train.yaml`` + ``evaluate.yaml`` (``evaluate``) as
    ``monai.bundle run`` reads them, with overrides."""
    from monai.bundle import ConfigParser

    names = ("train",) if name == "pretrain" else ("train", name)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / modality / "configs" / f"{n}.yaml") for n in names])
    parser.update({"bundle_root": str(BUNDLES / modality), **override})
    parser.parse()
    return parser


def pretrain_config(modality: str, **override: Any) -> Any:
    return parse(modality, "pretrain", **override).get_parsed_content("pretrain_config", instantiate=True)


def effective_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's constructor defaults with the bundle's options applied: what the run builds."""
    from medssl.methods import METHODS as CLASSES

    params = inspect.signature(CLASSES[method].__init__).parameters
    return {**{k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}, **options}


def test_dermatoscopy_is_lu_et_al(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = parse("dermatoscopy", "pretrain")
    cfg = parser.get_parsed_content("pretrain_config", instantiate=True)
    assert (cfg.init, parser.get_parsed_content("arch"), cfg.norm, cfg.method) == \
        (LU["init"], LU["arch"], LU["norm"], LU["method"])
    # no Ciga et al. steps, weight standardisation kept
    assert (cfg.scale_frobenius, cfg.dead_filters, cfg.fold_ws) == (LU["scale_frobenius"], LU["dead_filters"],
                                                                    LU["fold_ws"])
    resolved = cfg.resolve(steps_per_epoch=50)
    assert resolved.optimizer == LU["optimizer"] and resolved.momentum == LU["momentum"]
    assert resolved.lr == pytest.approx(LU["lr_per_256"] * LU["batch_size"] / 256)
    assert resolved.weight_decay == LU["weight_decay"] and resolved.warmup_epochs == LU["warmup_epochs"]
    assert (cfg.batch_size, cfg.epochs, resolved.iterations) == (LU["batch_size"], LU["epochs"], LU["epochs"] * 50)
    assert resolved.final_lr == 0.0  # cosine decay to zero
    assert cfg.knn_every >= 1  # kNN balanced-accuracy monitor during pretraining
    assert parser.get_parsed_content("required_splits") == LU["splits"]
    assert effective_method_options("simsiam", cfg.method_options) == \
        effective_method_options("simsiam", PAPER_METHOD["simsiam"])
    # the lr follows the global batch under torchrun: 0.03 x (128 x 2) / 256
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pretrain_config("dermatoscopy").lr == pytest.approx(LU["lr_per_256"] * LU["batch_size"] * 2 / 256)


def test_dermatoscopy_mixed_precision_on_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pretrain_config("dermatoscopy").precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert pretrain_config("dermatoscopy").precision == expected


def test_dermatoscopy_evaluation_is_lu_et_al() -> None:
    parser = parse("dermatoscopy", "evaluate")
    values = {k: parser.get_parsed_content(k) for k in ("protocol", "loss", "gamma", "fractions", "trials")}
    assert values == {k: LU[k] for k in values}
    # Lu et al.'s split has no val part: the evaluation carves it from the 20 % train split
    assert parser.get_parsed_content("required_splits") == LU["splits"]


@pytest.mark.parametrize("modality", CIGA_BUNDLES)
@pytest.mark.parametrize("method", METHODS)
def test_ciga_bundles_pretrain_with_each_methods_paper_values(modality: str, method: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.methods import method_options
    from medssl.methods.swav import swav_schedule

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = pretrain_config(modality, method=method)
    # P2X from the ImageNet SSL weights of the same method
    if method in SSL_IMAGENET:
        assert cfg.init == SSL_IMAGENET[method]
    else:
        assert cfg.init != "random" and Path(cfg.init).suffix == ".pth"
    assert (cfg.scale_frobenius, cfg.frobenius_rule, cfg.dead_filters, cfg.fold_ws) == \
        (CIGA["scale_frobenius"], CIGA["frobenius_rule"], CIGA["dead_filters"], CIGA["fold_ws"])
    paper = PAPER_OPTIM[method]
    resolved = cfg.resolve(steps_per_epoch=200)
    assert resolved.optimizer == paper["optimizer"] and resolved.momentum == 0.9
    assert resolved.lr == pytest.approx(paper["lr_per_256"] * cfg.batch_size / 256)
    assert resolved.weight_decay == paper["weight_decay"] and resolved.warmup_epochs == paper["warmup_epochs"]
    assert resolved.final_lr == 0.0  # cosine decay to zero
    assert set(cfg.method_options) <= set(method_options(method))  # build_method accepts every option
    effective = effective_method_options(method, cfg.method_options)
    assert {k: effective[k] for k in PAPER_METHOD[method]} == PAPER_METHOD[method]
    if method == "swav":  # batch 128 < 256: the queue of the SwAV code's batch-256 recipe (3840 embeddings)
        schedule = swav_schedule(steps_per_epoch=200, global_batch_size=cfg.batch_size,
                                 freeze_prototypes_epochs=effective["freeze_prototypes_epochs"],
                                 epoch_queue_starts=effective["epoch_queue_starts"],
                                 queue_length=effective["queue_length"])
        assert (schedule["queue_length"], schedule["queue_start_step"], schedule["freeze_prototypes_steps"]) == \
            (3840, 15 * 200, 200)


@pytest.mark.parametrize("modality", CIGA_BUNDLES)
def test_ciga_bundles_p1x_turns_the_preparation_off(modality: str) -> None:
    cfg = pretrain_config(modality, init="random")
    assert (cfg.init, cfg.scale_frobenius, cfg.dead_filters) == ("random", False, "none")
    assert cfg.arch == "resnet50"


@pytest.mark.parametrize("modality", CIGA_BUNDLES)
def test_ciga_bundles_evaluate_by_fine_tuning(modality: str) -> None:
    from medssl.evaluation.run import EvalConfig

    parser = parse(modality, "evaluate")
    protocol, fractions = parser.get_parsed_content("protocol"), parser.get_parsed_content("fractions")
    assert protocol == CIGA["protocol"]
    assert CIGA["low_data_fraction"] in fractions and parser.get_parsed_content("trials") == CIGA["trials"]
    resolved = EvalConfig(protocol=protocol, lr=parser.get_parsed_content("lr"),
                          weight_decay=parser.get_parsed_content("weight_decay")).resolved()
    assert (resolved["lr"], resolved["weight_decay"]) == (CIGA["eval_lr"], CIGA["eval_weight_decay"])
    # switching the protocol does not carry the fine-tuning optimiser over to the linear probe
    linear = parse(modality, "evaluate", protocol="linear")
    assert linear.get_parsed_content("lr") is None and linear.get_parsed_content("weight_decay") is None
    assert parser.get_parsed_content("required_splits") == []
    assert parser.get_parsed_content("cluster_by") == "auto"
    assert (parser.get_parsed_content("eval_norm"), parser.get_parsed_content("recalibrate_bn")) == ("keep", False)


def test_dermatoscopy_bit_baseline_evaluates_with_gn_to_bn_and_recalibration() -> None:
    """Lu et al.'s BiT baseline (BiT weights without SSL) is probed after GroupNorm -> BatchNorm with the new
    statistics estimated on the train images; the bundle's own pretrained backbone (already BatchNorm) is not."""
    own = parse("dermatoscopy", "evaluate")
    assert (own.get_parsed_content("eval_norm"), own.get_parsed_content("recalibrate_bn")) == ("keep", False)
    for backbone in ("bit_s_r50x1", "/weights/BiT-S-R50x1.npz"):
        bit = parse("dermatoscopy", "evaluate", backbone=backbone)
        assert (bit.get_parsed_content("eval_norm"), bit.get_parsed_content("recalibrate_bn")) == ("bn", True)
    assert own.get_parsed_content("cluster_by") == "auto"


def test_no_bundle_file_names_a_file_outside_the_repository() -> None:
    for path in BUNDLES.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".md", ".json"):
            text = path.read_text(encoding="utf-8")
            assert "DESIGN.md" not in text and "../shared" not in text, path
