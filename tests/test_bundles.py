"""The five MONAI bundles: metadata, pretraining for every method, evaluation, ckpt_export, torchrun.

Runs go through ``monai.bundle.run`` in-process with the bundles' own config files and command-line style
overrides (tiny network, 32 px, 2 iterations); one ``torchrun ... -m monai.bundle run`` subprocess proves
the command line and the two-process CPU launch.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medssl.bundle_utils import export_network, write_model_file

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
MODALITIES = ("histology", "xray", "mri", "ultrasound", "dermatoscopy")
METHODS = ("simclr", "swav", "byol", "simsiam")
OFFICIAL_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")

#: tiny heads so that two SSL steps take a second; SwAV keeps two small multi-crop views
TINY_HEADS = {
    "simclr": {"projector_hidden_dim": 32, "projector_out_dim": 16},
    "swav": {"projector_hidden_dim": 32, "projector_out_dim": 16, "num_prototypes": 12, "num_local_crops": 2},
    "byol": {"projector_hidden_dim": 32, "projector_out_dim": 16, "predictor_hidden_dim": 32},
    "simsiam": {"projector_hidden_dim": 32, "projector_out_dim": 32, "predictor_hidden_dim": 8},
}
TINY_NET = {"arch": "resnet18", "small_stem": True, "widen_factor": 0.25, "image_size": 32}


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic labelled data: 8 images per class at 32 px with train/val/test splits."""
    from medssl.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny_data"), per_class=8, size=32)


def configs(modality: str, *names: str) -> list[str]:
    return [str(BUNDLES / modality / "configs" / f"{n}.yaml") for n in names]


def run_bundle(modality: str, names: tuple[str, ...], root: Path, **override: object) -> None:
    from monai.bundle import run

    run(config_file=configs(modality, *names), meta_file=str(BUNDLES / modality / "configs" / "metadata.json"),
        bundle_root=str(root), **override)


def pretrain_overrides(manifest: Path, method: str) -> dict:
    """Tiny runs from random init (the bundles' defaults download ImageNet weights) on train/val/test data."""
    return {"data": str(manifest), "method": method, "init": "random", "iterations": 2, "batch_size": 4,
            "workers": 0, "knn_every": 0, "progress": False, "method_options": TINY_HEADS[method],
            "required_splits": [], **TINY_NET}


#: each bundle's evaluation protocol and label fractions (Lu et al. for dermatoscopy, Ciga et al. otherwise)
EVAL_PROTOCOL = {m: ("finetune", [0.1, 1.0]) for m in MODALITIES} | {"dermatoscopy": ("linear", [1.0])}


@pytest.mark.parametrize("modality", MODALITIES)
def test_metadata_verifies_offline(modality: str) -> None:
    from monai.bundle import verify_metadata

    meta_file = BUNDLES / modality / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["schema"] == OFFICIAL_SCHEMA
    # MONAI's verifier with the repository's schema copy (raises on any violation; no download)
    verify_metadata(meta_file=str(meta_file), filepath=str(BUNDLES / "meta_schema.json"))
    # the same schema rejects the file once a required field is gone, so the check above can fail
    schema = json.loads((BUNDLES / "meta_schema.json").read_text())
    broken = copy.deepcopy(meta)
    del broken["network_data_format"]["inputs"]["image"]["value_range"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    for name in ("common", "pretrain", "evaluate", "multi_gpu", "export"):
        assert (BUNDLES / modality / "configs" / f"{name}.yaml").is_file()
    assert (BUNDLES / modality / "LICENSE").is_file() and (BUNDLES / modality / "docs" / "README.md").is_file()


def _inspect(path: Path, capsys: pytest.CaptureFixture) -> dict:
    from medssl.cli import main

    capsys.readouterr()
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_evaluation(eval_dir: Path, fractions: list[float], trials: int) -> None:
    """results.json's balanced accuracies equal sklearn's on the per-image predictions, per trial."""
    import csv

    results = json.loads((eval_dir / "results.json").read_text())
    assert [b["fraction"] for b in results["results"]] == fractions
    rows = list(csv.DictReader((eval_dir / "predictions.csv").open()))
    for block in results["results"]:
        assert len(block["trials"]) == trials
        for trial in block["trials"]:
            sel = [r for r in rows if float(r["fraction"]) == block["fraction"] and int(r["trial"]) == trial["trial"]]
            expected = balanced_accuracy_score([r["true_label"] for r in sel], [r["predicted_label"] for r in sel])
            assert trial["balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert (eval_dir / "report.md").is_file()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modality", MODALITIES)
def test_pretrain_every_bundle_and_method(modality: str, method: str, tiny_manifest: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    augment_on = "device" if method == "swav" else "loader"  # SwAV multi-crop cut in batches by kornia
    run_bundle(modality, ("common", "pretrain"), tmp_path, augment_on=augment_on,
               **pretrain_overrides(tiny_manifest, method))
    run_dir = tmp_path / "runs" / f"pretrain_{method}"
    config = json.loads((run_dir / "config.json").read_text())
    # the overrides reached the run, the bundle's own modality preset was kept
    assert (config["method"], config["modality"], config["image_size"], config["iterations"],
            config["augment_on"]) == (method, modality, 32, 2, augment_on)
    assert config["method_options"] == TINY_HEADS[method]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps if "loss" in s] == [1, 2]
    assert all(np.isfinite(s["loss"]) for s in steps if "loss" in s)
    record = _inspect(run_dir / "backbone.safetensors", capsys)
    assert record["format"] == "medssl" and record["arch"] == "resnet18"
    assert record["arch_kwargs"]["widen_factor"] == 0.25
    # models/model.pt (for ckpt_export) holds exactly the exported network's tensors
    model_pt = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    reference = export_network(run_dir / "backbone.safetensors").state_dict()
    assert model_pt.keys() == reference.keys()
    assert all(torch.equal(model_pt[k], reference[k]) for k in reference)
    if method == "simclr":  # the evaluate config of this bundle, on the backbone just pretrained
        protocol, fractions = EVAL_PROTOCOL[modality]
        run_bundle(modality, ("common", "evaluate"), tmp_path, data=str(tiny_manifest), method=method,
                   epochs=3 if protocol == "linear" else 1, required_splits=[], **TINY_NET)
        eval_dir = tmp_path / "runs" / f"eval_simclr_{protocol}"
        _check_evaluation(eval_dir, fractions, 3)
        results = json.loads((eval_dir / "results.json").read_text())
        assert results["name"] == "pretrain_simclr"
        assert results["backbone"]["sha256"] != ""


def test_dermatoscopy_defaults_from_a_bit_checkpoint(tiny_manifest: Path, tmp_path: Path) -> None:
    """init = a GroupNorm ResNetV2 (BiT layout) checkpoint: the bundle's defaults give GN -> BN and nothing else
    (Lu et al.: no Frobenius scaling, no dead-filter repair, weight standardisation kept)."""
    from medssl.models import build_backbone
    from medssl.weights import load_checkpoint, save_medssl_file

    torch.manual_seed(0)
    bit = build_backbone("resnetv2_50x1", widen_factor=0.125)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bit.modules())
    init = tmp_path / "bit_gn.safetensors"
    save_medssl_file(init, bit.state_dict(), arch=bit.arch, arch_kwargs=bit.arch_kwargs,
                     input_normalization={"mean": [0.5] * 3, "std": [0.5] * 3, "description": "BiT [-1,1]"},
                     provenance={"format": "bit_npz"})
    overrides = pretrain_overrides(tiny_manifest, "simsiam")
    overrides.pop("arch")
    overrides.update(init=str(init), small_stem=False, widen_factor=1.0)  # the checkpoint decides the network
    run_bundle("dermatoscopy", ("common", "pretrain"), tmp_path, **overrides)
    run_dir = tmp_path / "runs" / "pretrain_simsiam"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["norm"], config["scale_frobenius"], config["dead_filters"], config["fold_ws"]) == \
        ("bn", False, "none", False)
    assert config["optimizer"] == "sgd" and config["weight_decay"] == 5e-4 and config["momentum"] == 0.9
    assert config["warmup_epochs"] == 0
    assert config["lr"] == pytest.approx(0.03 * 4 / 256)  # Lu et al.: 0.03 x batch / 256
    out = load_checkpoint(run_dir / "backbone.safetensors")
    assert out.arch == "resnetv2_50x1" and out.arch_kwargs["norm"] == "bn"
    assert out.input_normalization["mean"] == [0.5] * 3
    done = {op["operation"]: op for op in out.provenance["operations"]}
    assert "gn_to_bn" in done and not {"frobenius_scaling", "dead_filter_repair", "fold_weight_standardization"} & set(done)
    assert done["gn_to_bn"]["count"] == sum(isinstance(m, torch.nn.GroupNorm) for m in bit.modules())


def test_ciga_bundle_p2x_from_a_checkpoint_scales_with_the_paper_rule(tiny_manifest: Path, tmp_path: Path) -> None:
    """init = a BatchNorm ResNet checkpoint with conv norms > 1 and a dead filter: the histology bundle's
    defaults apply Ciga et al.'s Frobenius scaling (paper rule) and dead-filter copy before pretraining."""
    from medssl.models import build_backbone
    from medssl.weights import load_checkpoint, save_medssl_file

    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True, widen_factor=0.25)
    with torch.no_grad():
        net.conv1.weight.mul_(10.0)  # Frobenius norm well above 1
        net.layer1[0].conv1.weight[0].zero_()  # a dead filter
    init = tmp_path / "imagenet_ssl.safetensors"
    save_medssl_file(init, net.state_dict(), arch=net.arch, arch_kwargs=net.arch_kwargs,
                     input_normalization={"mean": [0.5] * 3, "std": [0.25] * 3, "description": "test"},
                     provenance={"format": "torchvision"})
    overrides = pretrain_overrides(tiny_manifest, "simclr")
    overrides.update(init=str(init))
    run_bundle("histology", ("common", "pretrain"), tmp_path, **overrides)
    config = json.loads((tmp_path / "runs" / "pretrain_simclr" / "config.json").read_text())
    assert (config["scale_frobenius"], config["frobenius_rule"], config["dead_filters"], config["fold_ws"]) == \
        (True, "paper", "copy", False)
    done = {op["operation"]: op for op in load_checkpoint(
        tmp_path / "runs" / "pretrain_simclr" / "backbone.safetensors").provenance["operations"]}
    assert done["frobenius_scaling"]["rule"] == "paper" and done["frobenius_scaling"]["count"] >= 1
    assert done["dead_filter_repair"]["mode"] == "copy" and done["dead_filter_repair"]["count"] >= 1


def test_bundle_refuses_data_without_the_protocol_splits(tiny_manifest: Path, tmp_path: Path) -> None:
    """The dermatoscopy bundle needs Lu et al.'s pretrain/train/test split: a train/val/test manifest is refused
    with one line naming the file and the missing split, before anything is written."""
    from medssl.errors import MedsslError

    overrides = pretrain_overrides(tiny_manifest, "simsiam")
    overrides.pop("required_splits")
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps the error of a config expression
        run_bundle("dermatoscopy", ("common", "pretrain"), tmp_path, **overrides)
    cause = info.value
    while cause is not None and not isinstance(cause, MedsslError):
        cause = cause.__cause__
    assert cause is not None
    message = str(cause)
    assert "\n" not in message and str(tiny_manifest) in message and "pretrain" in message
    assert not (tmp_path / "runs").exists()


def test_resolve_weights_reads_registry_names_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.bundle_utils import resolve_weights
    from medssl.errors import MedsslError
    from medssl.weights.registry import registry

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path))
    monkeypatch.setenv("MEDSSL_OFFLINE", "1")
    cached = tmp_path / registry()["swav_800ep"].filename
    cached.write_bytes(b"stand-in")  # no checksum in the registry for this entry: the cached file is used
    assert resolve_weights("swav_800ep", what="init") == str(cached)
    assert resolve_weights("random", what="init") == "random"
    assert resolve_weights(cached, what="init") == str(cached)
    with pytest.raises(MedsslError, match="no such checkpoint file"):
        resolve_weights(tmp_path / "missing.pth", what="init")


def test_run_from_the_bundle_folder_with_default_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --bundle_root: data is read from ./data/manifest.jsonl, outputs go to ./runs and ./models."""
    import shutil

    from monai.bundle import run

    from medssl.data.synthetic import write_synthetic_dataset

    bundle = tmp_path / "mri"
    shutil.copytree(BUNDLES / "mri", bundle)
    write_synthetic_dataset(bundle / "data", per_class=4, size=32)
    monkeypatch.chdir(bundle)
    overrides = pretrain_overrides(Path("unused"), "simclr")
    overrides.pop("data")
    run(config_file=["configs/common.yaml", "configs/pretrain.yaml"], **overrides)
    config = json.loads((bundle / "runs" / "pretrain_simclr" / "config.json").read_text())
    assert Path(config["data"]).resolve() == (bundle / "data" / "manifest.jsonl").resolve()
    assert (bundle / "runs" / "pretrain_simclr" / "backbone.safetensors").is_file()
    assert (bundle / "models" / "model.pt").is_file()


def test_evaluate_random_backbone_knn(tiny_manifest: Path, tmp_path: Path) -> None:
    run_bundle("histology", ("common", "evaluate"), tmp_path, data=str(tiny_manifest), backbone="random",
               protocol="knn", fractions=[1.0], trials=1, **TINY_NET)
    eval_dir = tmp_path / "runs" / "eval_simclr_knn"
    _check_evaluation(eval_dir, [1.0], 1)
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["name"] == "Random" and results["backbone"]["arch_kwargs"]["widen_factor"] == 0.25


def test_ckpt_export_gives_the_checkpoint_features(tiny_manifest: Path, tmp_path: Path) -> None:
    from monai.bundle import ckpt_export

    from medssl.models import InputNormalization
    from medssl.weights import build_from_checkpoint

    run_bundle("xray", ("common", "pretrain"), tmp_path, **pretrain_overrides(tiny_manifest, "byol"))
    backbone_file = tmp_path / "runs" / "pretrain_byol" / "backbone.safetensors"
    ts_file = tmp_path / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(tmp_path / "models" / "model.pt"),
                meta_file=str(BUNDLES / "xray" / "configs" / "metadata.json"),
                config_file=configs("xray", "common", "export"), bundle_root=str(tmp_path), method="byol")
    exported = torch.jit.load(str(ts_file))
    model, loaded = build_from_checkpoint(backbone_file)
    normalization = InputNormalization.from_spec(loaded.input_normalization)
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.forward_features(normalization(x))
        got = exported(x)
    assert got.shape == (3, model.num_features)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # mean/std in the export are the checkpoint's (ImageNet for a random-init run), applied to [0,1] inputs
    mean = torch.tensor(loaded.input_normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.input_normalization["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.forward_features((x - mean) / std), atol=1e-5, rtol=0)


def test_write_model_file_skips_unfinished_runs_and_other_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from medssl.models import build_backbone
    from medssl.weights import save_medssl_file

    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    spec = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "description": "test"}
    ckpt = tmp_path / "b.safetensors"
    save_medssl_file(ckpt, net.state_dict(), arch=net.arch, arch_kwargs=net.arch_kwargs, input_normalization=spec,
                     provenance={})
    assert write_model_file(tmp_path / "missing.safetensors", tmp_path / "m.pt") is None
    assert not (tmp_path / "m.pt").exists()
    monkeypatch.setenv("RANK", "1")
    assert write_model_file(ckpt, tmp_path / "m.pt") is None and not (tmp_path / "m.pt").exists()
    monkeypatch.setenv("RANK", "0")
    assert write_model_file(ckpt, tmp_path / "m.pt") == tmp_path / "m.pt"
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(state["normalization.mean"].flatten(), torch.tensor(spec["mean"]))
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in net.state_dict().items())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(export_network(ckpt)(x), net.eval()(2 * (2 * x - 1)), atol=1e-5, rtol=0)


def test_torchrun_two_cpu_processes_write_one_set_of_outputs(tiny_manifest: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m monai.bundle run`` with multi_gpu.yaml, from the bundle folder."""
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run",
           "--config_file", "['configs/common.yaml','configs/pretrain.yaml','configs/multi_gpu.yaml']",
           "--bundle_root", str(root), "--data", str(tiny_manifest), "--method", "simsiam", "--init", "random",
           "--iterations", "2",
           "--batch_size", "2", "--image_size", "32", "--arch", "resnet18", "--small_stem", "True",
           "--widen_factor", "0.25", "--workers", "0", "--knn_every", "0", "--progress", "False",
           "--method_options", json.dumps(TINY_HEADS["simsiam"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=BUNDLES / "ultrasound", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "runs" / "pretrain_simsiam"
    config = json.loads((run_dir / "config.json").read_text())
    # SimSiam default lr scales with the global batch: 0.05 x (2 per process x 2 processes) / 256
    assert config["lr"] == pytest.approx(0.05 * 4 / 256)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines if "loss" in json.loads(line)] == [1, 2]
    assert sorted(p.name for p in root.rglob("*.safetensors")) == ["backbone.safetensors"]
    assert sorted(p.name for p in root.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    assert (root / "models" / "model.pt").is_file()
