"""The stages of a study in dependency order, each with the settings that define its outputs and their hash.

Stages: ``pretrain`` (a first stage per method, then P1X / P2X per method), ``evaluate`` (one per
initialisation, method and protocol) and ``report`` (one per protocol). A stage's hash is the SHA-256 of its
settings (paths left out), the content hash of its data and of any checkpoint file it starts from, and the hashes
of the stages it depends on: a changed setting changes the hash of that stage and of everything downstream.
Folders: ``runs/<row>[_<method>]``, ``eval/<row>[_<method>][_<protocol>]``, ``report[/<protocol>]`` (the method
suffix only when the study has several methods, the protocol suffix only with several protocols).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.study.config import StudyConfig, p2x_source, slug

#: default checkpoints per pretraining stage when the study gives ``iterations`` and no ``checkpoint_every``:
#: a kill loses at most a tenth of a stage
CHECKPOINTS_PER_STAGE = 10


@dataclass
class Stage:
    """One unit of work: ``kind`` (pretrain / evaluate / report), ``label`` (log text), ``folder`` (output),
    ``settings`` (hashed), ``call`` (keyword arguments of the library call, paths included), ``deps``
    (indices of earlier stages), ``units`` (work for the ETA: iterations, or trials x fractions)."""

    kind: str
    label: str
    folder: Path
    settings: dict[str, Any]
    call: dict[str, Any]
    deps: list[int] = field(default_factory=list)
    units: float = 1.0
    hash: str = ""


def data_sha256(path: str | Path) -> str:
    """Hash of a dataset: the bytes of a manifest / npz file (a prepared store: its manifest.jsonl), else, for
    a folder, :func:`medssl.evaluation.setup.records_sha256` of the records found in it (ids, labels, splits,
    file names) and the size in bytes of every image file (pixels are not read: a file rewritten with the
    same size and name counts as unchanged)."""
    from medssl.weights.medssl_file import sha256_of

    p = Path(path)
    if p.is_file():
        return sha256_of(p)
    if (p / "manifest.jsonl").is_file():
        return sha256_of(p / "manifest.jsonl")
    from medssl.data.sources import records_from_path
    from medssl.evaluation.setup import records_sha256

    records = records_from_path(str(p))
    sizes = [Path(str(r["image"])).stat().st_size if Path(str(r.get("image", ""))).is_file() else None
             for r in records]
    return _hash([records_sha256(records), sizes])


def data_name(path: str | Path) -> str:
    """A dataset's name in log lines: the file name, or the folder of a ``manifest.jsonl``."""
    p = Path(path)
    return p.parent.name if p.name == "manifest.jsonl" else p.name


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _weights_file(value: str) -> tuple[str, dict[str, str]]:
    """A checkpoint file or registry name (fetched into the cache) -> (path, its hashed description)."""
    from medssl.weights.medssl_file import sha256_of
    from medssl.weights.registry import resolve_weights

    path = resolve_weights(value, what="initialisation")
    return path, {"file": Path(path).name, "sha256": sha256_of(path)}


def _n_records(data: str) -> int:
    from medssl.engines.components import pretraining_records

    return len(pretraining_records(data))


def _pretrain_settings(cfg: StudyConfig, method: str, overrides: dict[str, Any], n_images: int) -> dict[str, Any]:
    """PretrainConfig fields of one stage before data/out/init: study budget, method overrides, checkpoints."""
    from medssl.engines.config import PretrainConfig, steps_per_epoch

    layers = (cfg.pretrain, cfg.methods[method], overrides)
    settings = {k: v for layer in layers for k, v in layer.items()}
    options = {k: v for layer in layers for k, v in (layer.get("method_options") or {}).items()}
    if options:  # method options merge key by key (study, then the method's, then the first stage's)
        settings["method_options"] = options
    if "checkpoint_every" not in settings and settings.get("iterations"):
        settings["checkpoint_every"] = max(1, math.ceil(settings["iterations"] / CHECKPOINTS_PER_STAGE))
    settings["seed"] = cfg.seed
    iterations = settings.get("iterations") or settings.get("epochs", PretrainConfig.epochs) * max(
        steps_per_epoch(n_images, settings.get("batch_size", PretrainConfig.batch_size)), 1)
    settings["_units"] = iterations
    return settings


def build_plan(cfg: StudyConfig) -> list[Stage]:
    """Every stage of ``cfg`` in dependency order, with hashes filled in."""
    stages: list[Stage] = []
    multi = len(cfg.methods) > 1
    data_hash = {str(cfg.data): data_sha256(cfg.data)}
    net = {"arch": cfg.network["arch"], "small_stem": bool(cfg.network["small_stem"]),
           "widen_factor": float(cfg.network["widen_factor"])}
    if cfg.network.get("norm") == "bn":  # ResNetV2 with BatchNorm (Lu et al.); gn is the architecture's default
        net["norm"] = "bn"
    common = {"device": cfg.device}

    def add(stage: Stage) -> int:
        stage.units = float(stage.settings.pop("_units", stage.units))
        stage.hash = _hash({"kind": stage.kind, "settings": stage.settings,
                            "deps": [stages[d].hash for d in stage.deps]})
        stages.append(stage)
        return len(stages) - 1

    def suffix(method: str) -> str:
        return f"_{method}" if multi else ""

    def title(name: str, method: str) -> str:
        return f"{name} ({method})" if multi else name

    first: dict[str, int] = {}
    trained: dict[tuple[str, str], int] = {}  # (row name, method) -> pretrain stage
    if cfg.first_stage is not None and any(
            i.kind == "first_stage" or (i.kind == "p2x" and "first_stage" in [p2x_source(i, m) for m in cfg.methods])
            for i in cfg.initialisations):
        fs = dict(cfg.first_stage)
        fs_data, fs_modality = fs.pop("data"), fs.pop("modality", cfg.modality)
        data_hash.setdefault(fs_data, data_sha256(fs_data))
        n = _n_records(fs_data)
        for method in cfg.methods:
            s = _pretrain_settings(cfg, method, fs, n)
            settings = {**s, **net, "method": method, "init": "random", "modality": fs_modality,
                        "data_sha256": data_hash[fs_data]}
            first[method] = add(Stage("pretrain", f"first stage {method} on {data_name(fs_data)}",
                                      cfg.out / "runs" / f"first_stage{suffix(method)}", settings,
                                      {"data": fs_data, "init": "random", **common}))
    n_target = _n_records(str(cfg.data))
    for init in cfg.initialisations:
        if init.kind not in ("p1x", "p2x"):
            continue
        for method in cfg.methods:
            s = _pretrain_settings(cfg, method, {}, n_target)
            settings = {**s, "method": method, "modality": cfg.modality, "data_sha256": data_hash[str(cfg.data)]}
            deps: list[int] = []
            if init.kind == "p1x":
                settings.update(net, init="random")
                init_path = "random"
            else:
                for k in ("scale_frobenius", "dead_filters", "frobenius_rule", "norm", "fold_ws"):
                    if k in init.options:
                        settings[k] = init.options[k]
                settings["small_stem"], settings["widen_factor"] = net["small_stem"], net["widen_factor"]
                source = p2x_source(init, method)
                if source == "first_stage":
                    deps = [first[method]]
                    init_path = str(stages[first[method]].folder / "backbone.safetensors")
                    settings["init"] = "first_stage"
                else:
                    init_path, settings["init"] = _weights_file(source)
            trained[(init.name, method)] = add(Stage(
                "pretrain", f"{title(init.name, method)}: {method} on {data_name(cfg.data)}",
                cfg.out / "runs" / f"{slug(init.name)}{suffix(method)}", settings,
                {"data": str(cfg.data), "init": init_path, **common}, deps=deps))
    eval_common = {**cfg.evaluation}
    eval_common.setdefault("image_size", cfg.pretrain.get("image_size"))
    eval_common["modality"] = cfg.modality
    units = len(eval_common.get("fractions", [1.0])) * eval_common.get("trials", 3)
    for protocol in cfg.protocols:
        psuffix = f"_{protocol}" if len(cfg.protocols) > 1 else ""
        evals: list[int] = []
        for init in cfg.initialisations:
            per_method = init.kind in ("first_stage", "p1x", "p2x")
            for method in (cfg.methods if per_method else [None]):
                name = title(init.name, method) if method else init.name
                folder = cfg.out / "eval" / f"{slug(init.name)}{suffix(method) if method else ''}{psuffix}"
                settings = {**eval_common, "protocol": protocol, "name": name,
                            "data_sha256": data_hash[str(cfg.data)], "seed": eval_common.get("seed", cfg.seed)}
                call: dict[str, Any] = {"data": str(cfg.data), **common}
                deps = []
                if init.kind == "random":
                    settings.update(net, backbone="random")
                    if net.get("norm") == "bn":  # untrained BatchNorm statistics (0, 1) are not the data's
                        settings["recalibrate_bn"] = True
                    call["backbone"] = "random"
                elif init.kind == "checkpoint":
                    settings.update({k: v for k, v in init.options.items() if k != "path"})
                    call["backbone"], settings["backbone"] = _weights_file(init.options["path"])
                else:
                    source = first[method] if init.kind == "first_stage" else trained[(init.name, method)]
                    deps = [source]
                    settings["backbone"] = "pretrained"
                    call["backbone"] = str(stages[source].folder / "backbone.safetensors")
                evals.append(add(Stage("evaluate", f"evaluate {name} ({protocol})", folder, settings, call,
                                       deps=deps, units=units)))
        if cfg.baselines and evals:  # the sanity rows once per protocol, next to the random row if there is one
            host = next((e for e in evals if stages[e].settings.get("backbone") == "random"), evals[0])
            stages[host].settings["baselines"] = True
            stages[host].hash = _hash({"kind": "evaluate", "settings": stages[host].settings,
                                       "deps": [stages[d].hash for d in stages[host].deps]})
            stages[host].label += " + sanity rows"
        pretrains = sorted({d for e in evals for d in stages[e].deps}
                           | {d for e in evals for s in stages[e].deps for d in stages[s].deps})
        report_folder = cfg.out / "report" / (protocol if len(cfg.protocols) > 1 else "")
        add(Stage("report", f"report ({protocol})", report_folder,
                  {"seed": cfg.seed, "bootstrap": cfg.evaluation.get("bootstrap", 1000),
                   "cluster_by": cfg.evaluation.get("cluster_by", "auto"), "protocol": protocol,
                   "pretrain_runs": [stages[p].folder.name for p in pretrains]},
                  {"evals": evals, "pretrain_runs": pretrains}, deps=evals + pretrains))
    return stages
