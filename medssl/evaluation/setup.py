"""Inputs of an evaluation: labelled records with train/val/test splits, and the backbone to evaluate."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import MedsslError
from medssl.models import IMAGENET_NORMALIZATION, FeatureExtractor, InputNormalization, build_backbone

log = logging.getLogger("medssl.evaluation.setup")

EVAL_SPLITS = ("train", "val", "test")


@dataclass
class EvalData:
    """Labelled records split for evaluation; ``classes`` sorted, labels mapped to their index."""

    classes: list[str]
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    manifest_sha256: str
    dataset: str
    notes: list[str] = field(default_factory=list)

    def labels(self, split: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[str(r["label"])] for r in getattr(self, split)]


def records_sha256(records: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the records' ids, labels, splits and image file names (a hash for data given as a folder)."""
    rows = [[str(r.get("id")), r.get("label"), r.get("split"), os.path.basename(str(r.get("image", "")))]
            for r in records]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def cluster_key(records: Sequence[Mapping[str, Any]], cluster_by: str | None = None) -> str | None:
    """The unit of independence of ``records``: ``cluster_by`` when given (``"none"``: each image), else
    ``lesion_id`` when any record has one, else ``patient_id`` when any record has one, else None (images).

    Splits drawn here, the validation carve-out and the bootstrap statistics all group by this unit.
    """
    if cluster_by is not None:
        return None if cluster_by in ("none", "image") else cluster_by
    for key in ("lesion_id", "patient_id"):
        if any(r.get(key) not in (None, "") for r in records):
            return key
    return None


def load_eval_data(
    data: str | os.PathLike[str] | None,
    *,
    records: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    cluster_by: str | None = None,
) -> EvalData:
    """Read ``data`` (manifest ``.jsonl`` or anything ``records_from_path`` accepts) and split it.

    Records without a label are dropped. If no record has a train/val/test split, a 60/20/20 split stratified
    by label and grouped by the unit of :func:`cluster_key` (lesion, else patient, else image) is drawn with
    ``seed``; if there is no val split, 20 % of train is carved out the same way (no lesion or patient in both
    train and val). Either case is written to ``notes`` (and so to results.json).
    """
    from medssl.data.splits import split_records

    if records is None:
        if data is None:
            raise MedsslError("no data given")
        from medssl.data.sources import records_from_path

        path = Path(data)
        if not path.exists():
            raise MedsslError("data not found", path)
        records = records_from_path(path)
        if path.is_file() and path.suffix == ".jsonl":
            from medssl.data.manifest import manifest_sha256

            digest = manifest_sha256(path)
        else:
            digest = records_sha256(records)
        dataset = path.stem if path.is_file() else path.name
    else:
        digest = records_sha256(records)
        dataset = Path(data).name if data is not None else "records"
    labelled = [dict(r) for r in records if r.get("label") is not None]
    if not labelled:
        raise MedsslError("no labelled records: evaluation needs a label per image", data)
    notes: list[str] = []
    dropped = len(records) - len(labelled)
    if dropped:
        notes.append(f"{dropped} records without a label were ignored")
    unit = cluster_key(labelled, cluster_by)
    unit_text = f"grouped by {unit}" if unit else "per image (no lesion_id or patient_id)"
    if not any(r.get("split") in EVAL_SPLITS for r in labelled):
        labelled = split_records(labelled, ratios=(0.6, 0.2, 0.2), names=EVAL_SPLITS, group_key=unit, seed=seed)
        notes.append(f"no train/val/test split in the data: drew a 60/20/20 split stratified by label, "
                     f"{unit_text}, with seed {seed}")
    by_split = {s: [r for r in labelled if r.get("split") == s] for s in EVAL_SPLITS}
    if not by_split["train"] or not by_split["test"]:
        raise MedsslError("evaluation needs labelled records in both the train and the test split", data)
    if not by_split["val"]:
        carved = split_records(by_split["train"], ratios=(0.8, 0.2), names=("train", "val"), group_key=unit,
                               seed=seed)
        by_split = {**by_split, "train": [r for r in carved if r["split"] == "train"],
                    "val": [r for r in carved if r["split"] == "val"]}
        notes.append(f"no val split in the data: carved 20 % of train as val, stratified by label, {unit_text}, "
                     f"seed {seed}")
    classes = sorted({str(r["label"]) for r in labelled})
    missing = sorted(set(classes) - {str(r["label"]) for r in by_split["train"]})
    if missing:
        raise MedsslError(f"classes without training images: {', '.join(missing)}", data)
    return EvalData(classes, by_split["train"], by_split["val"], by_split["test"], digest, dataset, notes)


@dataclass
class LoadedBackbone:
    """The network to evaluate, the input normalisation it expects and a JSON-able description."""

    model: nn.Module
    input_normalization: dict[str, Any]
    info: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


def load_backbone(
    backbone: str | os.PathLike[str] | nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    trust: bool = False,
    input_normalization: Mapping[str, Any] | None = None,
) -> LoadedBackbone:
    """``"random"`` (``build_backbone(arch)`` with torch seed ``seed``, ImageNet input normalisation), a
    checkpoint file (any format ``medssl.weights.load_checkpoint`` reads; its own input normalisation), or an
    ``nn.Module`` backbone (Python API; ``input_normalization`` or ImageNet statistics)."""
    kwargs = dict(arch_kwargs or {})
    if isinstance(backbone, nn.Module):
        spec = dict(input_normalization or IMAGENET_NORMALIZATION)
        info = {"source": "module", "arch": getattr(backbone, "arch", type(backbone).__name__),
                "input_normalization_source": "given" if input_normalization else "default: ImageNet mean/std",
                "arch_kwargs": getattr(backbone, "arch_kwargs", {})}
        return LoadedBackbone(backbone, spec, info)
    if str(backbone) == "random":
        torch.manual_seed(seed)
        model = build_backbone(arch or "resnet50", **kwargs)
        spec = dict(input_normalization or IMAGENET_NORMALIZATION)
        return LoadedBackbone(model, spec, {"source": "random", "arch": model.arch, "arch_kwargs": model.arch_kwargs,
                                            "init_seed": seed, "input_normalization_source": "given" if
                                            input_normalization else "default: ImageNet mean/std"})
    path = Path(backbone)
    if not path.is_file():
        raise MedsslError("backbone checkpoint not found (give a file or 'random')", path)
    from medssl.weights import build_from_checkpoint, load_checkpoint

    loaded = load_checkpoint(path, arch=arch, trust=trust)
    model, loaded = build_from_checkpoint(loaded)  # the file carries its own architecture options
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    spec = dict(input_normalization or loaded.input_normalization or IMAGENET_NORMALIZATION)
    spec_source = "given" if input_normalization else (
        "checkpoint metadata (medssl file)" if loaded.format == "medssl" else
        f"checkpoint format {loaded.format} (its published preprocessing)")
    info = {"source": "checkpoint", "input_normalization_source": spec_source, "file_name": path.name, "sha256": digest.hexdigest(),
            "format": loaded.format, "arch": model.arch, "arch_kwargs": model.arch_kwargs,
            "notes": list(getattr(loaded, "notes", []))}
    return LoadedBackbone(model, spec, info, dict(getattr(loaded, "provenance", None) or {}))


#: named input normalisations of ``medssl evaluate --input-normalization``
INPUT_NORMALIZATIONS: dict[str, dict[str, Any]] = {
    "imagenet": dict(IMAGENET_NORMALIZATION),
    "half": {"mean": [0.5] * 3, "std": [0.5] * 3, "description": "[0,1] then (x - 0.5) / 0.5 (BiT, Inception)"},
    "none": {"mean": [0.0] * 3, "std": [1.0] * 3, "description": "[0,1] unchanged"},
}


def parse_input_normalization(text: str) -> dict[str, Any]:
    """``imagenet`` | ``half`` | ``none`` | ``m1,m2,m3/s1,s2,s3`` (per-channel mean and std of [0,1] inputs)."""
    if text in INPUT_NORMALIZATIONS:
        return dict(INPUT_NORMALIZATIONS[text])
    try:
        mean_text, std_text = text.split("/")
        mean, std = [float(v) for v in mean_text.split(",")], [float(v) for v in std_text.split(",")]
    except ValueError:
        mean, std = [], []
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise MedsslError(f"--input-normalization {text!r}: give {', '.join(INPUT_NORMALIZATIONS)} or "
                          "'m1,m2,m3/s1,s2,s3' with positive stds")
    return {"mean": mean, "std": std, "description": f"[0,1] then (x - {mean}) / {std}"}


def resolve_input_settings(loaded: LoadedBackbone, *, image_size: int | None, modality: str | None,
                           custom_transform: bool) -> dict[str, dict[str, Any]]:
    """Image size, preset (modality) and input normalisation of the evaluation, each with where it came from.

    A value given explicitly wins; otherwise it is inherited from the checkpoint: image size and preset from
    the pretraining record of a medssl file (``provenance["pretraining"]``, written by ``medssl pretrain``), the
    input normalisation from the file itself. A backbone without that record (published checkpoints, random
    init) needs ``--image-size`` and ``--modality`` (one-line error naming them), unless a custom transform is
    given (Python API). Returns ``{name: {"value", "source"}}`` (plus ``"pretrained"`` when a given value
    differs from the pretraining one).
    """
    pretraining = loaded.provenance.get("pretraining") or {}
    settings: dict[str, dict[str, Any]] = {}
    missing = []
    for key, flag, given in (("image_size", "--image-size", image_size), ("modality", "--modality", modality)):
        recorded = pretraining.get(key)
        if given is not None:
            settings[key] = {"value": given, "source": "given"}
            if recorded is not None and recorded != given:
                settings[key]["pretrained"] = recorded
                log.warning("evaluating with %s %s although the backbone was pretrained with %s", key, given,
                            recorded)
        elif recorded is not None:
            settings[key] = {"value": recorded, "source": "checkpoint provenance (pretraining run)"}
        elif custom_transform:
            settings[key] = {"value": None, "source": "custom transform"}
        else:
            missing.append(flag)
    if missing:
        what = loaded.info.get("file_name") or f"a {loaded.info.get('source')} backbone"
        raise MedsslError(f"{what} records no pretraining image size or preset: give {' and '.join(missing)} "
                          "(e.g. --image-size 224 --modality xray)")
    settings["input_normalization"] = {"value": loaded.input_normalization,
                                       "source": loaded.info.get("input_normalization_source", "given")}
    return settings


def prepare_norm(loaded: LoadedBackbone, *, norm: str = "keep", recalibrate: bool = False,
                 protocol: str = "linear") -> dict[str, Any]:
    """``--norm bn``: GroupNorm -> BatchNorm (Lu et al.'s BiT baseline) and the BatchNorm-statistics check.

    With ``norm="bn"`` every GroupNorm becomes a default-initialised BatchNorm
    (:func:`medssl.weights.norm.convert_gn_to_bn`) whose statistics must then be estimated
    (:func:`recalibrate_backbone`), so recalibration is implied. A medssl file whose provenance says
    ``bn_statistics == "uncalibrated"`` (``medssl weights convert --norm bn`` without ``--recalibrate``) is
    refused by the frozen protocols (linear, kNN: eval-mode BatchNorm with mean 0 / var 1 gives features of
    1e30 on BiT) unless recalibration is asked for; fine-tuning trains the statistics and only gets a note.
    Returns the record for results.json; ``record["recalibrate"]`` says whether to recalibrate.
    """
    if norm not in ("keep", "bn"):
        raise MedsslError(f"unknown --norm {norm!r}; choose keep or bn")
    what = loaded.info.get("file_name") or f"the {loaded.info.get('source')} backbone"
    state = loaded.provenance.get("bn_statistics")
    record: dict[str, Any] = {"norm": norm, "bn_statistics": state}
    if (norm == "bn" or recalibrate) and loaded.info.get("source") == "module":
        loaded.model = copy.deepcopy(loaded.model)  # never change the caller's module
    if norm == "bn":
        n_gn = sum(isinstance(m, nn.GroupNorm) for m in loaded.model.modules())
        if n_gn:
            from medssl.weights.norm import convert_gn_to_bn

            record["gn_to_bn"] = convert_gn_to_bn(loaded.model)["count"]
            loaded.info["arch_kwargs"] = dict(getattr(loaded.model, "arch_kwargs", loaded.info.get("arch_kwargs", {})))
            state = record["bn_statistics"] = "uncalibrated"
        elif state != "uncalibrated":
            raise MedsslError(f"--norm bn: {what} has no GroupNorm layers to convert; drop --norm bn (or give "
                              "--recalibrate-bn to re-estimate its BatchNorm statistics on the train images)")
        recalibrate = True
    if recalibrate and not any(isinstance(m, _BatchNorm) for m in loaded.model.modules()):
        raise MedsslError(f"--recalibrate-bn: {what} has no BatchNorm layers")
    if state == "uncalibrated" and not recalibrate:
        if protocol != "finetune":
            raise MedsslError(f"{what} has uncalibrated BatchNorm statistics ({_uncalibrated_cause(loaded)} without "
                              "--recalibrate): give --recalibrate-bn to estimate them on the train images")
        record["note"] = "uncalibrated BatchNorm statistics: fine-tuning estimates them during training"
    record["recalibrate"] = bool(recalibrate)
    return record


def _uncalibrated_cause(loaded: LoadedBackbone) -> str:
    """What left a file's BatchNorm statistics uncalibrated, from its provenance operations (for error messages)."""
    ops = {op.get("operation"): op for op in loaded.provenance.get("operations") or [] if isinstance(op, dict)}
    causes = ["GroupNorm -> BatchNorm conversion"] if "gn_to_bn" in ops else []
    if "dead_filter_repair" in ops:
        causes.append(f"{ops['dead_filter_repair'].get('mode', '')} dead-filter repair".strip())
    return " and ".join(causes) or "GroupNorm -> BatchNorm conversion or random dead-filter repair"


def recalibrate_backbone(loaded: LoadedBackbone, records: Sequence[Mapping[str, Any]], transform: Any, *,
                         num_batches: int | None, batch_size: int, seed: int, device: str = "cpu",
                         num_workers: int = 0) -> dict[str, Any]:
    """Estimate the BatchNorm statistics of ``loaded.model`` on ``records`` (the evaluation's train images).

    Runs :func:`medssl.weights.norm.recalibrate_bn` (BatchNorms in train mode, no gradient) on the input
    normalisation + backbone over ``num_batches`` batches of ``batch_size`` images in a random order drawn
    from ``seed`` (the eval transform, no augmentation; labels unused). Default ``num_batches=None``: one pass
    over all train images, as ``torch.optim.swa_utils.update_bn`` does. Returns the operation record.
    """
    from medssl.evaluation.loading import RecordLoader
    from medssl.weights.norm import recalibrate_bn

    if num_batches is not None and num_batches < 1:
        raise MedsslError(f"--recalibrate-batches must be >= 1, got {num_batches}")
    extractor = FeatureExtractor(loaded.model, InputNormalization.from_spec(loaded.input_normalization))
    extractor.to(device)
    loader = RecordLoader(records, transform, batch_size, shuffle=True, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(seed), drop_last=len(records) > batch_size)
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    report = recalibrate_bn(extractor, loader, n, device=device)
    return {key: report[key] for key in ("operation", "num_batches", "num_samples", "count") if key in report}
