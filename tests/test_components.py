"""One pipeline definition, two front doors: the ``medssl pretrain`` CLI and a bundle-style config that calls
the component builders of :mod:`medssl.engines.components` (through ``monai.bundle.ConfigParser``) build the same
objects: identical parameters and the same first-step loss on a seed (CPU)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl.cli import main as medssl_main
from medssl.engines import components
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from tests.conftest import write_image_folder

OPTIONS = {
    "simclr": {"projector_hidden_dim": 16, "projector_out_dim": 8},
    "byol": {"projector_hidden_dim": 16, "projector_out_dim": 8},
    "swav": {"projector_hidden_dim": 16, "projector_out_dim": 8, "num_prototypes": 6, "num_local_crops": 2},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), height=40, width=36, seed=1)


def _bundle_config(data: Path, method: str) -> dict:
    """What a bundle's train config writes: one ``_target_`` per component, library defaults for the rest."""
    target = "medssl.engines.components."
    return {
        "imports": ["$import medssl.engines.components as components"],
        "data": str(data), "method": method, "seed": 0, "image_size": 32, "batch_size": 8, "iterations": 1,
        "device": "cpu", "method_options": OPTIONS[method],
        "records": "$components.pretraining_records(@data)",
        "steps_per_epoch": "$len(@records) // @batch_size",
        "network_def": {"_target_": target + "build_network", "arch": "resnet18", "small_stem": True,
                        "widen_factor": 0.125, "seed": "@seed"},
        "ssl_method": {"_target_": target + "build_ssl_method", "method": "@method", "network": "@network_def",
                       "method_options": "@method_options", "seed": "@seed", "device": "@device"},
        "optimizer": {"_target_": target + "build_optimizer", "ssl_method": "@ssl_method",
                      "batch_size": "@batch_size", "world_size": 1},
        "lr_scheduler": {"_target_": target + "build_lr_scheduler", "optimizer": "@optimizer",
                         "iterations": "@iterations", "steps_per_epoch": "@steps_per_epoch", "method": "@method"},
        "train": {
            "dataset": {"_target_": target + "build_pretraining_dataset", "records": "@records",
                        "ssl_method": "@ssl_method", "image_size": "@image_size", "seed": "@seed"},
            "dataloader": {"_target_": target + "build_pretraining_dataloader", "dataset": "@train#dataset",
                           "batch_size": "@batch_size", "iterations": "@iterations", "seed": "@seed",
                           "workers": 0, "device": "@device"},
            "trainer": {"_target_": target + "build_pretraining_trainer", "ssl_method": "@ssl_method",
                        "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                        "dataloader": "@train#dataloader", "iterations": "@iterations",
                        "steps_per_epoch": "@steps_per_epoch", "batch_size": "@batch_size", "device": "@device",
                        "seed": "@seed"},
        },
    }


@pytest.mark.parametrize("method", ["simclr", "byol", "swav"])
def test_cli_and_bundle_build_identical_components(folder, tmp_path, method):
    # CLI front door: one step, checkpointed
    out = tmp_path / "cli"
    rc = medssl_main(["pretrain", "--data", str(folder), "--method", method, "--out", str(out), "--arch", "resnet18",
                      "--small-stem", "--widen-factor", "0.125", "--image-size", "32", "--batch-size", "8",
                      "--iterations", "1", "--workers", "0", "--device", "cpu", "--knn-every", "0",
                      "--checkpoint-every", "1", "--method-options", json.dumps(OPTIONS[method]), "--no-progress"])
    assert rc == 0
    cli_state = load_checkpoint_file(list_checkpoints(out)[-1][1])
    cli_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # bundle front door: the same settings through ConfigParser, objects built from the config
    parser = ConfigParser(_bundle_config(folder, method))
    parser.parse()
    network = parser.get_parsed_content("network_def")
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    trainer = parser.get_parsed_content("train#trainer")
    # the config's network is the seeded random init (independent reference: the plain backbone under the seed)
    from medssl.models import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(components.component_seed(0, "network"))
        reference = build_backbone("resnet18", small_stem=True, widen_factor=0.125).state_dict()
    assert initial.keys() == reference.keys()
    assert all(torch.equal(initial[k], reference[k]) for k in reference)
    assert trainer.optimizer.defaults["lr"] == pytest.approx(cli_state["config"]["lr"])
    trainer.run()
    assert trainer.state.iteration == 1
    bundle_loss = float(trainer.state.output["loss"])
    assert bundle_loss == cli_loss
    bundle_state = trainer.method.state_dict()
    assert bundle_state.keys() == cli_state["method"].keys()
    for key, value in bundle_state.items():
        assert torch.equal(value.cpu(), cli_state["method"][key]), key
    assert any(not torch.equal(bundle_state["backbone." + k], initial[k]) for k in initial
               if initial[k].is_floating_point())  # the step changed the weights


def test_builder_defaults_are_the_pretrain_config_defaults():
    defaults = PretrainConfig()
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    builders = [getattr(components, name) for name in dir(components) if name.startswith("build_")]
    checked = 0
    for builder in builders:
        for name, param in inspect.signature(builder).parameters.items():
            if name in fields and param.default is not param.empty:
                expected = getattr(defaults, name)
                if expected == {}:  # a mutable default: None in a signature stands for the empty dict
                    assert param.default in (None, {}), (builder.__name__, name)
                else:
                    assert param.default == expected, (builder.__name__, name)
                checked += 1
    assert checked >= 30


def test_cli_options_default_to_none():
    """No second copy of the defaults in argparse: a setting not given is the PretrainConfig default."""
    import argparse

    from medssl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["pretrain"]
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    settings = [a for a in sub._actions if a.dest in fields]
    assert len(settings) >= 40
    assert all(a.default is None for a in settings), [a.dest for a in settings if a.default is not None]


def test_config_kwargs_picks_settings_not_objects():
    cfg = PretrainConfig(optimizer="sgd", iterations=7, warmup_epochs=0.5, final_lr=0.01)
    picked = components.config_kwargs(cfg, components.build_lr_scheduler, steps_per_epoch=3)
    assert picked == {"iterations": 7, "warmup_epochs": 0.5, "final_lr": 0.01, "method": "simclr",
                      "steps_per_epoch": 3}
    picked = components.config_kwargs(cfg, components.build_optimizer)
    assert picked["optimizer"] == "sgd" and "ssl_method" not in picked


def test_feature_extractor_is_normalisation_then_pooled_features(tmp_path):
    """The one FeatureExtractor: ``(x - mean) / std`` per channel, then ``forward_features``; scripted export and
    a model file written from a medssl checkpoint give the same features."""
    from medssl.models import FeatureExtractor, build_backbone
    from medssl.weights import save_medssl_file
    from medssl.weights.export import load_feature_extractor, write_model_file

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125).eval()
    spec = {"mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.125]}
    extractor = FeatureExtractor(backbone, spec).eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = backbone.forward_features((x - mean) / std)
        out = extractor(x)
        assert out.shape == (3, extractor.num_features)
        assert torch.allclose(out, reference, atol=1e-6)
        assert torch.allclose(torch.jit.script(extractor)(x), reference, atol=1e-6)
    ckpt = tmp_path / "backbone.safetensors"
    save_medssl_file(ckpt, backbone.state_dict(), arch=backbone.arch, arch_kwargs=backbone.arch_kwargs,
                     input_normalization=spec, provenance={})
    loaded = load_feature_extractor(ckpt)
    model_file = write_model_file(ckpt, tmp_path / "models" / "model.pt")
    state = torch.load(model_file, weights_only=True)
    assert state.keys() == extractor.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference, atol=1e-6)
    fresh = FeatureExtractor(build_backbone("resnet18", small_stem=True, widen_factor=0.125), None).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(fresh(x), reference, atol=1e-6)


def test_launch_environment_is_read_in_one_place(monkeypatch):
    """Outside a process group the launcher's RANK / WORLD_SIZE / LOCAL_RANK decide (defaults: rank 0 of 1)."""
    from medssl.engines import launch

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (launch.launch_rank(), launch.launch_world_size(), launch.is_launch_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (launch.launch_rank(), launch.launch_world_size(), launch.is_launch_main_process()) == (1, 2, False)
    assert str(launch.launch_device()) == ("cuda:1" if torch.cuda.is_available() else "cpu")


def test_pretraining_records_checks_required_splits(folder):
    from medssl.errors import MedsslError

    records = components.pretraining_records(str(folder))
    assert len(records) == 16  # a class-folder tree has no split: every image pretrains
    with pytest.raises(MedsslError, match="no record in split.*pretrain") as err:
        components.pretraining_records(str(folder), ["pretrain", "train"])
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("method", ["simclr", "swav"])
def test_cli_and_shipped_bundle_build_identical_components(folder, tmp_path, method):
    """The shipped ultrasound bundle (configs/train.yaml as ``monai.bundle run`` reads it) and ``medssl pretrain
    --modality ultrasound`` with the same settings: the same initial weights, learning rate, first-step loss and
    weights after the step (CPU, one process)."""
    from medssl.bundles import init_bundle

    settings = {"arch": "resnet18", "small_stem": True, "widen_factor": 0.125, "image_size": 32, "batch_size": 8,
                "iterations": 1}
    out = tmp_path / "cli"
    rc = medssl_main(["pretrain", "--data", str(folder), "--method", method, "--modality", "ultrasound",
                      "--out", str(out), "--arch", "resnet18", "--small-stem", "--widen-factor", "0.125",
                      "--image-size", "32", "--batch-size", "8", "--iterations", "1", "--workers", "0",
                      "--device", "cpu", "--knn-every", "0", "--precision", "fp32",
                      "--method-options", json.dumps(OPTIONS[method]), "--no-progress"])
    assert rc == 0
    cli_state = load_checkpoint_file(list_checkpoints(out)[-1][1])
    cli_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    bundle = init_bundle("ultrasound", tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(bundle), "data": str(folder), "method": method, "init": "random",
                   "workers": 0, "knn_every": 0, "device": "$torch.device('cpu')", "precision": "fp32",
                   "method_options": OPTIONS[method], **settings})
    parser.parse()
    parser.get_parsed_content("initialize")  # seed, then take the run folder
    trainer = parser.get_parsed_content("train#trainer")
    config = parser.get_parsed_content("resolved")
    for name in ("lr", "weight_decay", "optimizer", "warmup_epochs", "iterations", "method_options"):
        assert getattr(config, name) == cli_state["config"][name], name
    assert trainer.optimizer.defaults["lr"] == pytest.approx(cli_state["config"]["lr"])
    trainer.run()
    parser.get_parsed_content("finalize")
    assert trainer.state.iteration == 1 and float(trainer.state.output["loss"]) == cli_loss
    bundle_state = trainer.method.state_dict()
    assert bundle_state.keys() == cli_state["method"].keys()
    for key, value in bundle_state.items():
        assert torch.equal(value.cpu(), cli_state["method"][key]), key
    run_dir = bundle / "runs" / f"pretrain_{method}"
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["method_schedule"] == cli_state["config"]["method_schedule"]


def test_config_json_records_the_architecture_built_from_a_checkpoint(folder, tmp_path):
    """A run started from a checkpoint with ``arch`` None (the checkpoint's layout) writes that layout into
    config.json: ``arch``, ``small_stem``, ``widen_factor`` and ``arch_kwargs``, from which ``build_backbone``
    rebuilds exactly the tensors of the trained backbone file; a resume still verifies config.json against the
    checkpoint's run record and continues."""
    from medssl.engines.run import run_pretraining
    from medssl.models import build_backbone
    from medssl.weights import load_checkpoint

    base = {"data": str(folder), "method": "simclr", "image_size": 32, "batch_size": 8, "knn_every": 0,
            "method_options": OPTIONS["simclr"], "workers": 0, "warmup_epochs": 0.0, "checkpoint_every_epochs": 0}
    first = run_pretraining(PretrainConfig(out=str(tmp_path / "stage1"), arch="resnet18", small_stem=True,
                                           widen_factor=0.125, iterations=1, **base), progress=False)
    init = first / "backbone.safetensors"
    second = run_pretraining(PretrainConfig(out=str(tmp_path / "stage2"), init=str(init), iterations=2,
                                            checkpoint_every=1, **base), progress=False)
    config = json.loads((second / "config.json").read_text())
    assert (config["arch"], config["small_stem"], config["widen_factor"]) == ("resnet18", True, 0.125)
    trained = load_checkpoint(second / "backbone.safetensors").backbone
    rebuilt = build_backbone(config["arch"], **config["arch_kwargs"]).state_dict()
    assert {k: tuple(v.shape) for k, v in rebuilt.items() if k in trained} == \
        {k: tuple(v.shape) for k, v in trained.items()}
    assert set(trained) <= set(rebuilt)
    # the hash of the recorded config.json is the checkpoints' run record: a resume accepts it
    run_pretraining(PretrainConfig(out=str(second)), resume=True, progress=False, resume_options={"iterations": 3})
    steps = [json.loads(x)["iteration"] for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][-1] == 3
    assert json.loads((second / "config.json").read_text()) == config
