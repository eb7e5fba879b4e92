"""``run_evaluation``: one backbone, one dataset, one protocol, every label fraction and trial -> EVAL_DIR.

EVAL_DIR receives ``results.json`` (config, versions, data hash, backbone description, every number with its
definition), ``predictions.csv`` (see :mod:`medssl.evaluation.predictions`), ``report.md``, ``plots/*.png``
(confusion matrix per fraction, t-SNE of the test embeddings) and ``cache/`` (frozen features as ``.npy``).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.engines.config import default_workers
from medssl.engines.handlers import Throughput
from medssl.errors import MedsslError
from medssl.evaluation.bootstrap import BOOTSTRAP_DEFINITION, CLUSTER_BY_CHOICES
from medssl.evaluation.checks import (
    DEGENERATE_DEFINITION,
    check_degenerate,
    require_finite,
    single_class_predictions,
)
from medssl.evaluation.features import (
    load_or_compute_features,
    module_sha256,
    store_features,
)
from medssl.evaluation.fractions import FRACTIONS_DEFINITION, label_fraction_subsets
from medssl.evaluation.losses import LOSS_DEFINITIONS, LOSS_KINDS
from medssl.evaluation.metrics import METRIC_DEFINITIONS
from medssl.evaluation.plots import plot_confusion_matrix, plot_tsne
from medssl.evaluation.predictions import (
    SUMMARY_DEFINITIONS,
    PredictionTable,
    prediction_rows,
    summarize_predictions,
    write_predictions,
)
from medssl.evaluation.sanity import FLAG_DEFINITIONS, evaluation_flags
from medssl.evaluation.setup import (
    EvalData,
    load_backbone,
    load_eval_data,
    prepare_norm,
    recalibrate_backbone,
    resolve_input_settings,
)
from medssl.io import atomic_write_json
from medssl.models import FeatureExtractor, InputNormalization

log = logging.getLogger("medssl.evaluation.run")

PROTOCOLS = ("linear", "finetune", "knn")


@dataclass
class EvalConfig:
    """Every knob of an evaluation (defaults: Lu et al. for the linear probe, Ciga et al. for fine-tuning)."""

    protocol: str = "linear"
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=lambda: [1.0])
    trials: int = 3
    modality: str | None = None  # None: the backbone's pretraining preset (provenance), else required
    image_size: int | None = None  # None: the backbone's pretraining image size (provenance), else required
    batch_size: int = 64
    norm: str = "keep"  # "bn": GroupNorm -> BatchNorm (Lu et al.), statistics recalibrated on the train images
    recalibrate_bn: bool = False  # estimate BatchNorm statistics on the train images (implied by norm="bn")
    recalibrate_batches: int | None = None  # given: recalibrate on N batches; None: one pass over the train
    # split (torch.optim.swa_utils.update_bn) when recalibrating
    epochs: int | None = None  # linear 100, finetune 20
    loss: str = "focal"
    gamma: float = 4.0
    lr: float | None = None  # linear 1e-3, finetune 3e-4
    weight_decay: float | None = None  # linear 0, finetune 1e-4
    k: int = 20
    temperature: float = 0.07
    seed: int = 0
    bootstrap: int = 1000
    cluster_by: str = "auto"  # bootstrap unit: auto = lesion_id if present, else patient_id, else image
    name: str | None = None
    device: str = "cpu"
    num_workers: int | None = None  # None: medssl.engines.config.default_workers(), min(8, available cores - 1)

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MedsslError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.loss not in LOSS_KINDS:
            raise MedsslError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_KINDS)}")
        if self.cluster_by not in CLUSTER_BY_CHOICES:
            raise MedsslError(f"unknown --cluster-by {self.cluster_by!r}; choose one of "
                              f"{', '.join(CLUSTER_BY_CHOICES)}")
        if self.trials < 1 or self.bootstrap < 1000 or (self.image_size is not None and self.image_size < 8):
            raise MedsslError("need --trials >= 1, --bootstrap >= 1000 and --image-size >= 8")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise MedsslError(f"label fractions must lie in (0, 1], got {self.fractions}")

    def resolved(self) -> dict[str, Any]:
        finetune = self.protocol == "finetune"
        out = asdict(self)
        out["epochs"] = self.epochs if self.epochs is not None else (20 if finetune else 100)
        out["lr"] = self.lr if self.lr is not None else (3e-4 if finetune else 1e-3)
        out["weight_decay"] = self.weight_decay if self.weight_decay is not None else (1e-4 if finetune else 0.0)
        out["fractions"] = sorted(float(f) for f in self.fractions)
        out["num_workers"] = self.num_workers if self.num_workers is not None else default_workers()
        return out


class IndexedLabels:
    """Wrap an eval transform so ``"label"`` becomes the class index (int64) expected by the protocols."""

    def __init__(self, transform: Callable[[Mapping[str, Any]], Mapping[str, Any]], classes: Sequence[str]):
        self.transform = transform
        self.index = {c: i for i, c in enumerate(classes)}

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(self.transform(record))
        out["label"] = torch.tensor(self.index[str(record["label"])], dtype=torch.long)
        out["id"] = str(record["id"])
        return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the numbers."""
    import ignite
    import monai
    import sklearn

    import medssl

    return {"medssl": medssl.__version__, "torch": torch.__version__, "monai": monai.__version__,
            "ignite": ignite.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def run_evaluation(
    data: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str] | nn.Module = "random",
    records: Sequence[Mapping[str, Any]] | None = None,
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    transform_desc: str | None = None,
    input_normalization: Mapping[str, Any] | None = None,
    trust: bool = False,
    **options: Any,
) -> Path:
    """Evaluate ``backbone`` on ``data`` and write EVAL_DIR ``out``; returns its path.

    Args:
        data: manifest or folder (``medssl.data.sources.records_from_path``); or a label when ``records``
            is given directly.
        backbone: ``"random"``, a checkpoint file, or an ``nn.Module`` with ``forward_features``.
        transform: record -> {"image": (3,H,W) in [0,1], ...}; default
            ``medssl.transforms.presets.build_eval_transform(modality, image_size)``.
        transform_desc: text identifying a custom transform in the feature-cache key.
        **options: fields of :class:`EvalConfig`.

    Nothing is written to ``out`` until every check has passed and every prediction is made: degenerate
    splits (:mod:`medssl.evaluation.checks`), uncalibrated BatchNorm statistics, missing image size/preset and
    non-finite features stop with a one-line error and leave ``out`` untouched.
    """
    cfg = EvalConfig(**options)
    cfg.validate()
    resolved = cfg.resolved()
    out = Path(out)
    torch.manual_seed(cfg.seed)
    eval_data = load_eval_data(data, records=records, seed=cfg.seed,
                               cluster_by=None if cfg.cluster_by == "auto" else cfg.cluster_by)
    degenerate, degenerate_notes = check_degenerate(
        eval_data.classes, {s: getattr(eval_data, s) for s in ("train", "val", "test")}, data)
    eval_data.notes.extend(degenerate_notes)
    loaded = load_backbone(backbone, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, seed=cfg.seed, trust=trust,
                           input_normalization=input_normalization)
    norm_record = prepare_norm(loaded, norm=cfg.norm, protocol=cfg.protocol,
                               recalibrate=cfg.recalibrate_bn or cfg.recalibrate_batches is not None)
    settings = resolve_input_settings(loaded, image_size=cfg.image_size, modality=cfg.modality,
                                      custom_transform=transform is not None)
    resolved["image_size"], resolved["modality"] = settings["image_size"]["value"], settings["modality"]["value"]
    if transform is None:
        from medssl.transforms.presets import build_eval_transform

        transform = build_eval_transform(resolved["modality"], resolved["image_size"])
        transform_desc = f"build_eval_transform({resolved['modality']!r}, {resolved['image_size']})"
    transform_desc = transform_desc or repr(transform)
    labelled_transform = IndexedLabels(transform, eval_data.classes)
    if norm_record["recalibrate"]:
        norm_record["recalibration"] = recalibrate_backbone(
            loaded, eval_data.train, labelled_transform, num_batches=cfg.recalibrate_batches,
            batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, num_workers=resolved["num_workers"])
        norm_record["bn_statistics"] = "recalibrated"
    log.info("evaluating %s on %s: %d train / %d val / %d test, classes %s", loaded.info.get("source"),
             eval_data.dataset, len(eval_data.train), len(eval_data.val), len(eval_data.test), eval_data.classes)
    runner = _run_finetune if cfg.protocol == "finetune" else _run_frozen
    table, test_embeddings, extra = runner(eval_data, loaded, labelled_transform, transform_desc, resolved, out)
    summary = summarize_predictions(table, n_resamples=cfg.bootstrap, seed=cfg.seed, cluster_by=cfg.cluster_by)
    degenerate["single_class_predictions"], single_notes = single_class_predictions(summary, eval_data.classes)
    eval_data.notes.extend(single_notes)
    extra.pop("store_features", lambda: None)()  # frozen features go to cache/ once all checks have passed
    write_predictions(out / "predictions.csv", table)
    plots = _write_plots(out, eval_data, table, summary, test_embeddings, cfg)
    results = {
        "name": cfg.name or _default_name(loaded.info),
        "protocol": cfg.protocol,
        "config": resolved,
        "versions": library_versions(),
        "data": {"dataset": eval_data.dataset, "manifest_sha256": eval_data.manifest_sha256,
                 "classes": eval_data.classes,
                 "split_sizes": {s: len(getattr(eval_data, s)) for s in ("train", "val", "test")},
                 "transform": transform_desc, "notes": eval_data.notes, **degenerate},
        "input_settings": settings,
        "backbone": {**loaded.info, "input_normalization": loaded.input_normalization, "norm": norm_record},
        "definitions": {**METRIC_DEFINITIONS, **SUMMARY_DEFINITIONS, "bootstrap": BOOTSTRAP_DEFINITION,
                        "fractions": FRACTIONS_DEFINITION, "loss": LOSS_DEFINITIONS[cfg.loss],
                        "n_train": "labelled training images of the trial's label-fraction subset",
                        "best_epoch": "epoch (1-based) whose weights had the best validation balanced accuracy",
                        "val_balanced_accuracy": "balanced accuracy on the val split of the selected model",
                        "n": "test images scored", "n_test": "test images scored",
                        "degenerate": DEGENERATE_DEFINITION,
                        "input_settings": "image size, preset (modality) and input normalisation used, each with "
                                          "its source: given, the checkpoint's pretraining provenance or metadata, "
                                          "or a default",
                        **extra.pop("definitions", {})},
        "results": _merge_training_records(summary, extra.get("training", {})),
        "plots": plots,
    }
    results["flags"] = evaluation_flags(results, results["results"], backbone)  # medssl.evaluation.sanity
    results["definitions"]["flags"] = "; ".join(f"{k}: {v}" for k, v in FLAG_DEFINITIONS.items())
    for flag in results["flags"]:
        log.warning("sanity flag %s: %s", flag["flag"], flag["message"])
    atomic_write_json(out / "results.json", results)
    from medssl.evaluation.report import write_eval_report

    write_eval_report(out)
    log.info("evaluation written to %s", out)
    return out


def _default_name(info: Mapping[str, Any]) -> str:
    return "Random" if info.get("source") == "random" else str(info.get("file_name", info.get("arch", "model")))


def _merge_training_records(summary: list[dict], training: Mapping[tuple[int, float], dict]) -> list[dict]:
    """Attach each trial's training record (subset size, best epoch, val balanced accuracy) to the summary."""
    for block in summary:
        for trial in block["trials"]:
            trial.update(training.get((trial["trial"], block["fraction"]), {}))
    return summary


def _run_frozen(data: EvalData, loaded: Any, transform: IndexedLabels, transform_desc: str,
                cfg: Mapping[str, Any], out: Path) -> tuple[PredictionTable, np.ndarray, dict]:
    """Linear probe or weighted kNN on features of the frozen backbone, computed once per split."""
    from medssl.evaluation.protocols.knn import KNN_DEFINITION, knn_predict_proba
    from medssl.evaluation.protocols.linear import train_linear_probe

    extractor = FeatureExtractor(loaded.model, InputNormalization.from_spec(loaded.input_normalization))
    extractor.to(cfg["device"]).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    model_hash = module_sha256(extractor)
    arrays = {}
    for split in ("train", "val", "test"):
        start = time.monotonic()
        arrays[split] = load_or_compute_features(
            extractor, getattr(data, split), transform, cache_dir=out / "cache", model_hash=model_hash,
            manifest_hash=data.manifest_sha256, transform_desc=transform_desc, batch_size=cfg["batch_size"],
            device=cfg["device"], num_workers=cfg["num_workers"], desc=f"{split} features")
        seconds = time.monotonic() - start
        log.info("%s features: %d images in %.1f s (%.1f images/s)", split, len(getattr(data, split)), seconds,
                 len(getattr(data, split)) / max(seconds, 1e-9))
    for split, array in arrays.items():
        require_finite(array.feats, f"{split} features", loaded.info)
    feats = {split: array.feats for split, array in arrays.items()}
    labels = {s: np.asarray(data.labels(s), dtype=np.int64) for s in ("train", "val", "test")}
    k = len(data.classes)
    subsets = label_fraction_subsets(data.train, cfg["fractions"], cfg["trials"], seed=cfg["seed"])
    tables, training = [], {}
    meter = Throughput(f"{cfg['protocol']} trials (fraction x trial)", len(subsets), every_steps=1, log=log)
    for step, ((trial, fraction), idx) in enumerate(sorted(subsets.items()), start=1):
        x, y = feats["train"][idx], labels["train"][idx]
        record: dict[str, Any] = {"n_train": int(len(idx))}
        if cfg["protocol"] == "knn":
            probs = knn_predict_proba(x, y, feats["test"], k, k=cfg["k"], temperature=cfg["temperature"])
            val_probs = knn_predict_proba(x, y, feats["val"], k, k=cfg["k"], temperature=cfg["temperature"])
            from medssl.evaluation.metrics import balanced_accuracy

            record["val_balanced_accuracy"] = balanced_accuracy(labels["val"], val_probs.argmax(1), k)
        else:
            probe = train_linear_probe(x, y, feats["val"], labels["val"], k, loss=cfg["loss"], gamma=cfg["gamma"],
                                       epochs=cfg["epochs"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                       batch_size=cfg["batch_size"], seed=cfg["seed"] + 1000 * trial)
            probs = probe.predict_proba(feats["test"])
            record.update(best_epoch=probe.best_epoch, val_balanced_accuracy=probe.best_val_balanced_accuracy)
        training[(trial, float(fraction))] = record
        tables.append(prediction_rows(data.test, data.classes, labels["test"], probs, trial, fraction))
        meter.update(step, len(idx))
    definitions = {"protocol": KNN_DEFINITION if cfg["protocol"] == "knn" else
                   "linear classifier on frozen, standardised features; Adam; the epoch with the best "
                   "validation balanced accuracy is tested once"}
    from medssl.evaluation.predictions import concat_tables

    def store() -> None:
        for array in arrays.values():
            store_features(array, out / "cache")

    return concat_tables(tables), feats["test"], {"training": training, "definitions": definitions,
                                                  "store_features": store}


def _run_finetune(data: EvalData, loaded: Any, transform: IndexedLabels, transform_desc: str,
                  cfg: Mapping[str, Any], out: Path) -> tuple[PredictionTable, np.ndarray, dict]:
    from medssl.evaluation.protocols.finetune import FINETUNE_DEFINITION, finetune_trials

    table, embeddings, training = finetune_trials(data, loaded, transform, cfg)
    return table, embeddings, {"training": training, "definitions": {"protocol": FINETUNE_DEFINITION}}


def _write_plots(out: Path, data: EvalData, table: PredictionTable, summary: list[dict],
                 embeddings: np.ndarray, cfg: EvalConfig) -> dict[str, str]:
    plots: dict[str, str] = {}
    title = cfg.name or ""
    for block in summary:
        name = f"plots/confusion_matrix_fraction_{block['fraction']:g}.png"
        plot_confusion_matrix(np.asarray(block["confusion_matrix_sum"]), data.classes, out / name,
                              title=f"{title} {block['fraction']:.0%} labels, {len(block['trials'])} trials summed")
        plots[f"confusion_matrix_{block['fraction']:g}"] = name
    if len(embeddings) >= 5 and float(np.var(np.asarray(embeddings, dtype=np.float64), axis=0).sum()) <= 1e-12:
        log.warning("no t-SNE plot: every test embedding is the same point (a collapsed backbone)")
    elif len(embeddings) >= 5:
        labels = np.asarray(data.labels("test"))
        plot_tsne(embeddings, labels, data.classes, out / "plots/tsne_test.png",
                  title=f"t-SNE of test embeddings {title}".strip(), seed=cfg.seed)
        plots["tsne_test"] = "plots/tsne_test.png"
    return plots
