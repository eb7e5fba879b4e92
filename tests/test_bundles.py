"""The five MONAI bundles (model-zoo layout), each run from a copy outside the repository on real images.

Data (``shared_data``): BUSI PNGs (ultrasound), PneumoniaMNIST rows (xray), slices of the T1 volume (mri), tiles
cut from the H&E image (histology), and RGB JPEGs with a CSV (dermatoscopy). Runs use a tiny network (ResNet-18
x 0.25, small stem), 32 px, 2 iterations.
"""

from __future__ import annotations

import copy
import csv
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

import medssl
from medssl.bundles import MODALITIES, bundle_path, init_bundle

TINY = {"arch": "resnet18", "small_stem": True, "widen_factor": 0.25, "image_size": 32}
HEADS = {"simclr": {"projector_hidden_dim": 32, "projector_out_dim": 16},
         "simsiam": {"projector_hidden_dim": 32, "projector_out_dim": 32, "predictor_hidden_dim": 8},
         "byol": {"projector_hidden_dim": 32, "projector_out_dim": 16, "predictor_hidden_dim": 32},
         "swav": {"projector_hidden_dim": 32, "projector_out_dim": 16, "num_prototypes": 12, "num_local_crops": 2}}
DEFAULT_METHOD = {m: "simclr" for m in MODALITIES} | {"dermatoscopy": "simsiam"}
FILES = ("configs/train.yaml", "configs/evaluate.yaml", "configs/inference.yaml", "configs/multi_gpu_train.yaml",
         "configs/logging.conf", "configs/metadata.json", "configs/meta_schema.json", "docs/README.md", "LICENSE")


def _assign_splits(records: list[dict], names: tuple[str, ...]) -> list[dict]:
    """Per class, record i goes to ``names[i % len(names)]`` (every split holds every class)."""
    seen: dict[str, int] = {}
    for r in records:
        i = seen.get(r["label"], 0)
        seen[r["label"]] = i + 1
        r["split"] = names[i % len(names)]
    return records


def _write(records: list[dict], path: Path) -> Path:
    from medssl.data.manifest import write_manifest

    write_manifest(path, records)
    return path


@pytest.fixture(scope="module")
def data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small labelled manifest per modality, from the shared real images."""
    from PIL import Image

    from medssl.data.adapters import build_manifest
    from medssl.data.sources import records_from_path

    root = tmp_path_factory.mktemp("bundle_data")
    out: dict[str, Path] = {}
    splits = ("train", "train", "val", "test")
    # ultrasound: BUSI PNGs, 8 benign + 8 malignant
    busi = root / "busi"
    for label in ("benign", "malignant"):
        (busi / label).mkdir(parents=True)
        for src in sorted((shared_data / "busi" / label).glob("*.png"))[:8]:
            (busi / label / src.name).write_bytes(src.read_bytes())
    out["ultrasound"] = _write(_assign_splits(records_from_path(busi), splits), root / "busi.jsonl")
    # xray: PneumoniaMNIST rows (4 per class in train, 2 per class in val and test)
    rows = records_from_path(shared_data / "pneumoniamnist" / "pneumoniamnist_balanced.npz")
    keep = []
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("0", "1"):
            keep += [r for r in rows if r["split"] == split and r["label"] == label][:n]
    out["xray"] = _write(keep, root / "pneumonia.jsonl")
    # mri: 16 axial slices of the T1 volume, labelled by half (inferior / superior)
    slices = records_from_path(shared_data / "mri" / "T1.nii.gz")
    mid = slices[len(slices) // 2]["slice"]
    chosen = slices[10:-10:max(1, (len(slices) - 20) // 16)][:16]
    for r in chosen:
        r["label"] = "superior" if r["slice"] >= mid else "inferior"
    out["mri"] = _write(_assign_splits(chosen, splits), root / "t1.jsonl")
    # histology: 16 tiles of 64 px cut from the H&E image, labelled by half of the image
    he = np.asarray(Image.open(shared_data / "histology" / "tiatoolbox__target_image.png").convert("RGB"))
    tiles = root / "tiles"
    for i in range(16):
        label = "top" if i < 8 else "bottom"
        y, x = (100 if i < 8 else 700) + 64 * (i % 2), 100 + 96 * (i % 8)
        (tiles / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(he[y:y + 64, x:x + 64]).save(tiles / label / f"tile_{i:02d}.png")
    out["histology"] = _write(_assign_splits(records_from_path(tiles), splits), root / "tiles.jsonl")
    # dermatoscopy: RGB JPEGs + a CSV with lesion ids and Lu et al.'s pretrain/train/test split
    derm = root / "derm"
    derm.mkdir()
    lines = [["file", "dx", "lesion", "split"]]
    for i in range(24):
        y, x = 300 + 40 * (i % 6), 60 + 150 * (i // 6)
        Image.fromarray(he[y:y + 48, x:x + 48]).save(derm / f"ISIC_{i:04d}.jpg", quality=95)
        lines.append([f"ISIC_{i:04d}.jpg", "nv" if i % 2 else "mel", f"L{i}", ("pretrain", "train", "test")[i % 3]])
    with (derm / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(lines)
    from medssl.data.deid import Pseudonymizer

    records = build_manifest("csv", derm / "labels.csv", deid=Pseudonymizer(b"bundle-test-key-0123456789abcdef"),
                             image_column="file", label_column="dx",
                             group_column="lesion", group_kind="lesion", split_column="split")
    out["dermatoscopy"] = _write(records, root / "derm.jsonl")
    return out


def _copy(modality: str, tmp_path: Path) -> Path:
    """The installed bundle written outside the repository (as ``medssl bundle init`` does)."""
    return init_bundle(modality, tmp_path / f"{modality}_bundle")


def _train_overrides(modality: str, manifest: Path, method: str | None = None) -> dict:
    method = method or DEFAULT_METHOD[modality]
    return {"data": str(manifest), "method": method, "init": "random", "iterations": 2, "batch_size": 4,
            "workers": 0, "knn_every": 1, "method_options": HEADS[method], **TINY}


def _run(bundle: Path, names: tuple[str, ...], **override: object) -> None:
    from monai.bundle import run

    run(config_file=[str(bundle / "configs" / f"{n}.yaml") for n in names], bundle_root=str(bundle),
        meta_file=str(bundle / "configs" / "metadata.json"), **override)


def test_installed_bundles_hold_the_model_zoo_files() -> None:
    for modality in MODALITIES:
        for name in FILES:
            assert (bundle_path(modality) / name).is_file(), (modality, name)


@pytest.mark.parametrize("modality", MODALITIES)
def test_properties_metadata_and_network_io(modality: str, data: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

    bundle = _copy(modality, tmp_path)
    assert all((bundle / name).is_file() for name in FILES)
    train = ConfigWorkflow(config_file=str(bundle / "configs" / "train.yaml"), workflow_type="train",
                           meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                           **_train_overrides(modality, data[modality]))
    train.initialize()
    assert train.check_properties() == []
    assert train.max_epochs == 1 and len(train.train_dataset) > 0
    infer = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.yaml"), workflow_type="infer",
                           meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                           dataset_dir=str(data[modality].parent), **TINY)
    infer.initialize()
    assert infer.check_properties() == []
    # the default network (ResNet-50 / BiT R50x1) against metadata's input and "pred" output (2048 channels)
    meta_file = bundle / "configs" / "metadata.json"
    verify_net_in_out(net_id="network_def", meta_file=str(meta_file),
                      config_file=str(bundle / "configs" / "inference.yaml"), device="cpu")
    meta = json.loads(meta_file.read_text())
    assert set(meta["network_data_format"]["outputs"]) == {"pred"} and meta["optional_packages_version"] == {}
    assert meta["required_packages_version"] == {"medssl": medssl.__version__}
    # offline: the schema copy inside the bundle (no download); the same schema rejects a broken file
    verify_metadata(meta_file=str(meta_file), filepath=str(bundle / "configs" / "meta_schema.json"))
    broken = copy.deepcopy(meta)
    del broken["network_data_format"]["inputs"]["image"]["value_range"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads((bundle / "configs" / "meta_schema.json").read_text()))


@pytest.mark.parametrize("modality", MODALITIES)
def test_train_preprocessing_is_the_modality_preset_and_follows_overrides(modality: str,
                                                                          data: dict[str, Path]) -> None:
    """train#preprocessing lists the reader, the intensity step and the view augmentations with the parameters of
    the library preset (medssl.transforms.presets.MODALITIES) and cuts the preset's views at a seed; an overridden
    crop scale changes them."""
    import math

    from monai.bundle import ConfigParser

    from medssl.data.manifest import read_manifest
    from medssl.transforms.presets import build_ssl_transform, get_spec

    def parser(**override: object) -> ConfigParser:
        p = ConfigParser()
        p.read_config(str(bundle_path(modality) / "configs" / "train.yaml"))
        p.update({"bundle_root": str(bundle_path(modality)), **_train_overrides(modality, data[modality], "simclr"),
                  **override})
        return p

    p = parser()
    names = [t["_target_"].rsplit(".", 1)[-1] for t in p["train#preprocessing#base#transforms"]]
    assert names == ["LoadRecordd", "ScaleToUnitd"]
    spec = get_spec(modality)
    assert p.get_parsed_content("train#preprocessing#base#transforms#1").force_gray == spec.force_gray
    steps = {}
    for i, t in enumerate(p["train#preprocessing#views#augmentation#transforms"]):
        obj = p.get_parsed_content(f"train#preprocessing#views#augmentation#transforms#{i}")
        steps[type(obj).__name__ + str(t.get("spatial_axis", ""))] = obj
    assert list(steps)[0] == "RandResizedCropd"
    crop = steps["RandResizedCropd"]
    assert (crop.scale, crop.size) == (spec.crop_scale, (32, 32)) and crop.ratio == pytest.approx(spec.crop_ratio)
    assert steps["RandFlipd1"].prob == spec.hflip_p
    assert (steps["RandFlipd0"].prob if "RandFlipd0" in steps else 0.0) == spec.vflip_p
    assert (steps["RandRot90d"].prob if "RandRot90d" in steps else 0.0) == spec.rot90_p
    if spec.rotate_p:
        rotate = steps["RandRotated"]
        assert (rotate.prob, rotate.max_radians) == (spec.rotate_p, pytest.approx(math.radians(spec.rotate_degrees)))
    else:
        assert "RandRotated" not in steps
    jitter = steps["RandColorJitterd"]
    assert jitter.strengths == (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    assert jitter.prob == spec.jitter_p
    assert (steps["RandGrayscaled"].prob if "RandGrayscaled" in steps else 0.0) == spec.gray_p
    blur = steps["RandGaussianBlurd"]
    assert (blur.prob, blur.sigma_range) == (spec.blur_p, spec.blur_sigma)
    # the same views as the library preset at the same seed (the YAML chain is the preset written out)
    record = dict(read_manifest(data[modality])[0])
    views = p.get_parsed_content("train#preprocessing").set_random_state(seed=7)(record)["views"]
    reference = build_ssl_transform(modality, 32).set_random_state(seed=7)(record)["views"]
    assert len(views) == len(reference) == 2 and all(v.shape == (3, 32, 32) for v in views)
    assert all(torch.equal(a, b) for a, b in zip(views, reference))
    key = "train#preprocessing#views#augmentation#transforms#0#scale"
    changed = parser(**{key: [0.01, 0.02]}).get_parsed_content("train#preprocessing")
    other = changed.set_random_state(seed=7)(record)["views"]
    assert not torch.equal(other[0], views[0])
    assert all(torch.equal(a, b) for a, b in zip(other, changed.set_random_state(seed=7)(record)["views"]))


def _features_of(bundle: Path, manifest: Path) -> tuple[list[str], torch.Tensor]:
    """Features computed here from models/model.pt: MONAI CheckpointLoader into a FeatureExtractor, the bundle's
    deterministic pipeline applied record by record."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    from medssl.data.manifest import read_manifest
    from medssl.models import FeatureExtractor, build_backbone

    net = FeatureExtractor(build_backbone("resnet18", small_stem=True, widen_factor=0.25)).eval()
    CheckpointLoader(load_path=str(bundle / "models" / "model.pt"), load_dict={"model": net}, strict=True)(Engine(
        lambda e, b: None))
    p = ConfigParser()
    p.read_config(str(bundle / "configs" / "inference.yaml"))
    p.update({"bundle_root": str(bundle), **TINY})
    transform = p.get_parsed_content("preprocessing")
    records = read_manifest(manifest)
    with torch.no_grad():
        feats = torch.cat([net(transform(dict(r))["image"][None]) for r in records])
    return [r["id"] for r in records], feats


@pytest.mark.parametrize("modality", MODALITIES)
def test_train_evaluate_infer_on_real_images(modality: str, data: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy(modality, tmp_path)
    manifest = data[modality]
    method = DEFAULT_METHOD[modality]
    _run(bundle, ("train",), **_train_overrides(modality, manifest))
    run_dir = bundle / "runs" / f"pretrain_{method}"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in lines if "loss" in s] == [1, 2]
    assert all(np.isfinite(s["loss"]) for s in lines if "loss" in s)
    assert any("knn_balanced_accuracy" in s for s in lines)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["modality"], config["iterations"], config["image_size"]) == (modality, 2, 32)
    # models/model.pt: {"model": normalisation + backbone}, the same tensors as models/backbone.safetensors
    from medssl.weights import load_checkpoint

    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    medssl_file = load_checkpoint(bundle / "models" / "backbone.safetensors")
    assert set(state) == {"model"}
    backbone = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert backbone.keys() == medssl_file.backbone.keys()
    assert all(torch.equal(backbone[k], medssl_file.backbone[k]) for k in backbone)
    # evaluation of the bundle's own backbone (kNN, one trial): balanced accuracy equals sklearn's
    _run(bundle, ("train", "evaluate"), data=str(manifest), method=method, protocol="knn", trials=1,
         fractions=[1.0], **TINY)
    eval_dir = bundle / "runs" / f"eval_{method}_knn"
    results = json.loads((eval_dir / "results.json").read_text())
    rows = list(csv.DictReader((eval_dir / "predictions.csv").open()))
    expected = balanced_accuracy_score([r["true_label"] for r in rows], [r["predicted_label"] for r in rows])
    assert results["results"][0]["trials"][0]["balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert results["name"] == f"pretrain_{method}"
    # inference: features of every record, as computed here from models/model.pt
    _run(bundle, ("inference",), dataset_dir=str(manifest.parent), data=str(manifest), workers=0, **TINY)
    out = np.load(bundle / "runs" / "inference" / "features.npz")
    ids, reference = _features_of(bundle, manifest)
    assert list(out["ids"]) == ids
    np.testing.assert_allclose(out["features"], reference.numpy(), atol=1e-5, rtol=0)
    if modality == "xray":  # TorchScript from models/model.pt alone (no runs/ folder)
        import shutil

        from monai.bundle import ckpt_export

        shutil.rmtree(bundle / "runs")
        ts_file = bundle / "models" / "model.ts"
        ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(bundle / "models" / "model.pt"),
                    key_in_ckpt="model", meta_file=str(bundle / "configs" / "metadata.json"),
                    config_file=str(bundle / "configs" / "inference.yaml"), bundle_root=str(bundle), **TINY)
        exported = torch.jit.load(str(ts_file))
        from monai.bundle import ConfigParser

        from medssl.data.manifest import read_manifest

        p = ConfigParser()
        p.read_config(str(bundle / "configs" / "inference.yaml"))
        p.update({"bundle_root": str(bundle), **TINY})
        transform = p.get_parsed_content("preprocessing")
        images = torch.stack([transform(dict(r))["image"] for r in read_manifest(manifest)])
        with torch.no_grad():
            torch.testing.assert_close(exported(images), reference, atol=1e-5, rtol=0)


def test_tracking_patch_finds_the_trainer_and_its_handlers() -> None:
    """``--tracking mlflow`` (MONAI's patch) appends its handler to train#handlers of train#trainer."""
    from monai.bundle import ConfigParser, ConfigWorkflow
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    for modality in MODALITIES:
        parser = ConfigParser()
        parser.read_config(str(bundle_path(modality) / "configs" / "train.yaml"))
        before = len(parser["train#handlers"])
        ConfigWorkflow.patch_bundle_tracking(parser, copy.deepcopy(DEFAULT_MLFLOW_SETTINGS))
        assert parser["train#trainer#train_handlers"].replace("::", "#") == "@train#handlers"
        assert len(parser["train#handlers"]) == before + 1
        assert parser["train#handlers"][-1]["_target_"] == "MLFlowHandler"


def test_dermatoscopy_refuses_data_without_lu_et_al_splits(data: dict[str, Path], tmp_path: Path) -> None:
    from medssl.errors import MedsslError

    bundle = _copy("dermatoscopy", tmp_path)
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps the error of a config expression
        _run(bundle, ("train",), **_train_overrides("dermatoscopy", data["ultrasound"]))
    cause = info.value
    while cause is not None and not isinstance(cause, MedsslError):
        cause = cause.__cause__
    assert cause is not None and "\n" not in str(cause)
    assert str(data["ultrasound"]) in str(cause) and "pretrain" in str(cause)
    assert not (bundle / "runs").exists()


def test_resume_from_the_bundle_equals_an_uninterrupted_run(data: dict[str, Path], tmp_path: Path) -> None:
    """4 steps (crossing an epoch boundary: 8 images, batch 4) in one go, or stopped after 2 and resumed."""
    overrides = {**_train_overrides("ultrasound", data["ultrasound"]), "iterations": 4, "knn_every": 0}
    whole = _copy("ultrasound", tmp_path / "a")
    _run(whole, ("train",), **overrides)
    parts = _copy("ultrasound", tmp_path / "b")
    _run(parts, ("train",), **overrides, stop_after=2)
    assert not (parts / "models" / "model.pt").exists()
    _run(parts, ("train",), **overrides, resume=True)
    a = torch.load(whole / "models" / "model.pt", weights_only=True)["model"]
    b = torch.load(parts / "models" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0
    losses = [[json.loads(x)["loss"] for x in (root / "runs" / "pretrain_simclr" / "metrics.jsonl").read_text()
               .splitlines()] for root in (whole, parts)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_torchrun_two_cpu_processes_write_one_set_of_outputs(data: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy("ultrasound", tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run",
           "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']",
           "--bundle_root", str(bundle), "--data", str(data["ultrasound"]), "--method", "simsiam",
           "--init", "random", "--iterations", "2", "--batch_size", "2", "--image_size", "32", "--arch", "resnet18",
           "--small_stem", "True", "--widen_factor", "0.25", "--workers", "0", "--knn_every", "0",
           "--method_options", json.dumps(HEADS["simsiam"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = bundle / "runs" / "pretrain_simsiam"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == pytest.approx(0.05 * 4 / 256)  # SimSiam: 0.05 x global batch (2 x 2) / 256
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in lines if "loss" in s] == [1, 2]
    assert len(list((run_dir / "tb").iterdir())) == 1
    assert sorted(p.name for p in bundle.rglob("*.pt")) == ["checkpoint_00000002.pt", "model.pt"]


def test_bundle_init_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medssl.cli import main

    dest = tmp_path / "mine"
    assert main(["bundle", "init", "mri", str(dest)]) == 0
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(bundle_path("mri")).as_posix() for p in bundle_path("mri").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert written == shipped and set(FILES) <= set(written)
    assert all((dest / f).read_bytes() == (bundle_path("mri") / f).read_bytes() for f in written)
    assert main(["bundle", "init", "mri", str(dest)]) == 2  # not empty: refused, nothing changed
    assert "not an empty folder" in capsys.readouterr().err


def test_package_data_ships_every_bundle_file() -> None:
    """Every file of every bundle matches a package-data pattern of pyproject.toml (the wheel carries it)."""
    import fnmatch

    import tomllib

    repo = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medssl"]
    package = repo / "medssl"
    for modality in MODALITIES:
        for path in (package / "bundles" / modality).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(package).as_posix()
                assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


@pytest.mark.parametrize("modality", ["histology", "dermatoscopy"])
def test_start_weights_are_prepared_as_the_recipe_says(modality: str, data: dict[str, Path], tmp_path: Path) -> None:
    """init = a checkpoint: Ciga et al.'s bundles apply Frobenius scaling (paper rule) and dead-filter copy; Lu
    et al.'s converts GroupNorm -> BatchNorm and nothing else. The written backbone records what was done."""
    from medssl.models import build_backbone
    from medssl.weights import load_checkpoint, save_medssl_file

    torch.manual_seed(0)
    if modality == "histology":
        net = build_backbone("resnet18", small_stem=True, widen_factor=0.25)
        with torch.no_grad():
            net.conv1.weight.mul_(10.0)  # Frobenius norm well above 1
            net.layer1[0].conv1.weight[0].zero_()  # a dead filter
        overrides = {**_train_overrides(modality, data[modality])}
    else:
        net = build_backbone("resnetv2_50x1", widen_factor=0.125)
        overrides = {**_train_overrides(modality, data[modality]), "arch": "resnetv2_50x1", "small_stem": False,
                     "widen_factor": 0.125}
    init = tmp_path / "start.safetensors"
    save_medssl_file(init, net.state_dict(), arch=net.arch, arch_kwargs=net.arch_kwargs,
                     input_normalization={"mean": [0.5] * 3, "std": [0.25] * 3, "description": "test"},
                     provenance={"format": "torchvision"})
    bundle = _copy(modality, tmp_path)
    _run(bundle, ("train",), **{**overrides, "init": str(init), "knn_every": 0})
    out = load_checkpoint(bundle / "models" / "backbone.safetensors")
    done = {op["operation"]: op for op in out.provenance["operations"]}
    assert out.input_normalization["std"] == [0.25] * 3  # the init checkpoint's normalisation is kept
    if modality == "histology":
        assert done["frobenius_scaling"]["rule"] == "paper" and done["frobenius_scaling"]["count"] >= 1
        assert done["dead_filter_repair"]["mode"] == "copy" and done["dead_filter_repair"]["count"] >= 1
    else:
        assert set(done) == {"gn_to_bn"}
        assert done["gn_to_bn"]["count"] == sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
        assert out.arch == "resnetv2_50x1" and out.arch_kwargs["norm"] == "bn"


def _medssl_error(error: BaseException) -> BaseException | None:
    """The MedsslError a ``monai.bundle`` run wrapped (config expressions re-raise as RuntimeError)."""
    from medssl.errors import MedsslError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, MedsslError):
        cause = cause.__cause__
    return cause


class _Evil:
    """Unpickling it creates a folder: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def test_bundle_resume_verifies_the_run_folder_like_the_cli(data: dict[str, Path], tmp_path: Path) -> None:
    """A bundle resume reads config.json and the newest checkpoint only and checks that they belong together: an
    edited config.json pointing at a malicious pickle with trust on is refused in one line and no code runs; a
    setting a resume cannot change is refused; a resumable one (lr) is applied and logged to resumes.jsonl."""
    import pickle

    from medssl.engines.runlock import RunLock

    overrides = {**_train_overrides("ultrasound", data["ultrasound"]), "iterations": 4, "knn_every": 0}
    bundle = _copy("ultrasound", tmp_path)
    _run(bundle, ("train",), **overrides, stop_after=2)
    run_dir = bundle / "runs" / "pretrain_simclr"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_00000002.pt"]
    original = (run_dir / "config.json").read_text()
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil(marker)))
    edited = {**json.loads(original), "init": str(evil), "trust": True}
    (run_dir / "config.json").write_text(json.dumps(edited))
    with pytest.raises(RuntimeError) as info:
        _run(bundle, ("train",), **overrides, resume=True)
    error = _medssl_error(info.value)
    assert error is not None and "\n" not in str(error)
    assert str(run_dir / "config.json") in str(error) and "checkpoint_00000002.pt" in str(error)
    assert not marker.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert not (bundle / "models" / "model.pt").exists()
    with RunLock(run_dir):  # the refused resume released the lock
        pass
    (run_dir / "config.json").write_text(original)
    # a setting a resume cannot apply (the batch size) is refused, naming it
    with pytest.raises(RuntimeError) as info:
        _run(bundle, ("train",), **{**overrides, "batch_size": 2}, resume=True)
    error = _medssl_error(info.value)
    assert error is not None and "--batch-size" in str(error) and "\n" not in str(error)
    # a resumable one is applied from the current step and recorded; the run finishes its 4 steps
    _run(bundle, ("train",), **{**overrides, "lr": 0.25}, resume=True)
    resumes = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["checkpoint"], r["applied"]) for r in resumes] == \
        [(2, "checkpoint_00000002.pt", {"lr": 0.25})]
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(original)  # the run-start record
    state = torch.load(run_dir / "checkpoints" / "checkpoint_00000004.pt", weights_only=True)
    assert json.loads(state["run"])["overrides"] == {"lr": 0.25} and state["config"]["lr"] == 0.25
    assert [json.loads(x)["iteration"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (bundle / "models" / "model.pt").is_file()


def test_second_bundle_run_on_a_locked_folder_fails_naming_the_holder(data: dict[str, Path], tmp_path: Path) -> None:
    from medssl.engines.runlock import RunLock

    bundle = _copy("ultrasound", tmp_path)
    run_dir = bundle / "runs" / "pretrain_simclr"
    overrides = {**_train_overrides("ultrasound", data["ultrasound"]), "knn_every": 0}
    with RunLock(run_dir):  # another run holds the folder (flock is per open file: this process counts)
        with pytest.raises(RuntimeError) as info:
            _run(bundle, ("train",), **overrides)
    error = _medssl_error(info.value)
    assert error is not None and "\n" not in str(error)
    assert f"in use by another run (pid {os.getpid()} on host" in str(error) and str(run_dir) in str(error)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written by the refused run
    assert not (bundle / "models").exists()
    _run(bundle, ("train",), **overrides)  # once the holder is gone the folder is free
    assert (bundle / "models" / "model.pt").is_file()


def test_trainer_counts_epochs_of_the_schedule_and_iterations_stop_mid_epoch(data: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """8 images at batch 4 are 2 steps per epoch; ``iterations: 3`` ends in the middle of epoch 2. What MONAI's
    StatsHandler prints as ``Epoch: e/E`` (``state.epoch`` / ``state.max_epochs``) reads e/2 at every step
    (ceil(3 / 2) epochs, not ``None``), and the run still stops after step 3 (Ignite's max_iters)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    bundle = _copy("ultrasound", tmp_path)
    overrides = {**_train_overrides("ultrasound", data["ultrasound"]), "iterations": 3, "knn_every": 0}
    train = ConfigWorkflow(config_file=str(bundle / "configs" / "train.yaml"), workflow_type="train",
                           meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                           **overrides)
    train.initialize()
    seen: list[tuple[int, int | None, int]] = []
    trainer = train.trainer
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append((e.state.epoch, e.state.max_epochs, e.state.iteration)))
    train.run()
    train.finalize()
    assert seen == [(1, 2, 1), (1, 2, 2), (2, 2, 3)]
    metrics = (bundle / "runs" / "pretrain_simclr" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in metrics if "loss" in json.loads(x)] == [1, 2, 3]


def _knn_check(bundle: Path, overrides: dict) -> object:
    """The bundle's KnnCheck handler of train#handlers, parsed with ``overrides``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(bundle), **overrides})
    handlers = parser.get("train#handlers")
    index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith("KnnCheck"))
    return parser.get_parsed_content(f"train#handlers#{index}")


def test_knn_monitor_reads_its_images_through_validate_preprocessing(data: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle's kNN monitor reads its labelled images through validate#preprocessing: each image it holds is
    that pipeline's output for the record (quantised to uint8), and overriding a parameter of the pipeline
    (force_gray on the RGB histology tiles) changes the monitor's images (one channel instead of three)."""
    from medssl.engines.handlers import split_reference_query
    from medssl.engines.knn import quantize_unit
    from medssl.engines.loaders import build_knn_images

    bundle = _copy("histology", tmp_path)
    overrides = {**_train_overrides("histology", data["histology"]), "knn_every": 1}
    images = {}
    for gray in (False, True):
        check = _knn_check(bundle, {**overrides, "validate#preprocessing#transforms#1#force_gray": gray})
        ref, _, _ = build_knn_images(check.config, check.records, check.transform)
        first = split_reference_query([r for r in check.records if r.get("label") is not None],
                                      check.config.seed)[0][0]
        expected = quantize_unit(torch.as_tensor(check.transform(dict(first))["image"]))
        images[gray] = ref.tensors()[0]
        assert torch.equal(images[gray][0].expand_as(expected), expected)
    assert images[False].shape[1] == 3 and images[True].shape[1] == 1
    assert not torch.equal(images[False][:, :1], images[True])
    # the handler hands its transform to the image reader
    seen: list[object] = []
    monkeypatch.setattr("medssl.engines.loaders.build_knn_images",
                        lambda config, records, transform=None: seen.append(transform))
    check.attach(object())
    assert seen == [check.transform]
