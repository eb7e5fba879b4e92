"""Inputs of an evaluation: labelled records with train/val/test splits, and the backbone to evaluate."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import IMAGENET_NORMALIZATION, build_backbone

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


def load_eval_data(
    data: str | os.PathLike[str] | None,
    *,
    records: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> EvalData:
    """Read ``data`` (manifest ``.jsonl`` or anything ``records_from_path`` accepts) and split it.

    Records without a label are dropped. If no record has a train/val/test split, a 60/20/20 split stratified
    by label (grouped by patient where known) is drawn with ``seed``; if there is no val split, 20 % of train
    is carved out the same way. Either case is written to ``notes`` (and so to results.json).
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
    if not any(r.get("split") in EVAL_SPLITS for r in labelled):
        labelled = split_records(labelled, ratios=(0.6, 0.2, 0.2), names=EVAL_SPLITS, seed=seed)
        notes.append(f"no train/val/test split in the data: drew a 60/20/20 split stratified by label "
                     f"(grouped by patient_id where known) with seed {seed}")
    by_split = {s: [r for r in labelled if r.get("split") == s] for s in EVAL_SPLITS}
    if not by_split["train"] or not by_split["test"]:
        raise MedsslError("evaluation needs labelled records in both the train and the test split", data)
    if not by_split["val"]:
        carved = split_records(by_split["train"], ratios=(0.8, 0.2), names=("train", "val"), seed=seed)
        by_split = {**by_split, "train": [r for r in carved if r["split"] == "train"],
                    "val": [r for r in carved if r["split"] == "val"]}
        notes.append(f"no val split in the data: carved 20 % of train as val, stratified by label, seed {seed}")
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
                "arch_kwargs": getattr(backbone, "arch_kwargs", {})}
        return LoadedBackbone(backbone, spec, info)
    if str(backbone) == "random":
        torch.manual_seed(seed)
        model = build_backbone(arch or "resnet50", **kwargs)
        spec = dict(input_normalization or IMAGENET_NORMALIZATION)
        return LoadedBackbone(model, spec, {"source": "random", "arch": model.arch, "arch_kwargs": model.arch_kwargs,
                                            "init_seed": seed})
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
    info = {"source": "checkpoint", "file_name": path.name, "sha256": digest.hexdigest(),
            "format": loaded.format, "arch": model.arch, "arch_kwargs": model.arch_kwargs,
            "notes": list(getattr(loaded, "notes", []))}
    return LoadedBackbone(model, spec, info)
