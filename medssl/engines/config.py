"""``PretrainConfig``: every knob of a pretraining run, with paper defaults (the SimCLR, SwAV, BYOL
and SimSiam papers; see ``METHOD_DEFAULTS``).

A config is first filled by the user (CLI, bundle or Python), then :meth:`PretrainConfig.resolve` replaces
the ``None`` "method default" values by the method's published settings and records the result in
``RUN_DIR/config.json``, so a run is reproducible from that file alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

METHODS = ("simclr", "swav", "byol", "simsiam")
PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENT_ON = ("loader", "device")

#: per-method optimisation defaults from the papers: optimizer, lr per 256 images, weight decay, warmup epochs
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"optimizer": "lars", "lr_per_256": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10},
    "swav": {"optimizer": "lars", "lr_per_256": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10},
    "byol": {"optimizer": "lars", "lr_per_256": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10},
    "simsiam": {"optimizer": "sgd", "lr_per_256": 0.05, "weight_decay": 1e-4, "warmup_epochs": 0},
}


def method_default(method: str, key: str) -> Any:
    """``METHOD_DEFAULTS[method][key]`` (``optimizer``, ``lr_per_256``, ``weight_decay``, ``warmup_epochs``).

    Raises:
        MedsslError: unknown method.
    """
    if method not in METHOD_DEFAULTS:
        raise MedsslError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_DEFAULTS[method][key]


def default_lr(method: str, batch_size: int, world_size: int = 1) -> float:
    """The paper's linear scaling rule: ``lr = lr_per_256 * batch_size * world_size / 256`` (global batch)."""
    return float(method_default(method, "lr_per_256")) * batch_size * world_size / 256


def default_warmup_epochs(method: str, total_steps: int, steps_per_epoch: int) -> float:
    """The paper's warmup (epochs), cut to a tenth of a short run: ``min(paper, 0.1 * total / steps_per_epoch)``."""
    return min(float(method_default(method, "warmup_epochs")), 0.1 * total_steps / max(steps_per_epoch, 1))


def default_workers() -> int:
    """Data-loading processes when none are given: ``min(8, cores - 1)`` (at least 0), ``cores`` = the CPUs this
    process may run on (``len(os.sched_getaffinity(0))``, which honours ``taskset``/container CPU sets; else
    ``os.cpu_count()``). One core is left to the training loop; beyond 8 workers image decoding at these sizes
    rarely speeds up and each worker costs memory (a medssl rule of thumb, not from the papers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not available on macOS / Windows
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: ``num_images // (batch_size * world_size)`` (the last partial batch dropped)."""
    return int(num_images) // (int(batch_size) * int(world_size))


@dataclass
class PretrainConfig:
    """All settings of one pretraining run.

    Data: ``data`` (manifest .jsonl or image folder), ``modality`` (transform preset), ``image_size`` (px),
    ``knn_data`` (labelled folder/manifest for the kNN monitor; None = labelled records of ``data``).
    Model: ``method``, ``init`` (``"random"`` or a checkpoint path), ``arch`` (None = the checkpoint's,
    ``resnet50`` for random init), ``norm`` (``keep``|``bn``), ``scale_frobenius``, ``frobenius_rule``
    (``paper``: Ciga et al.'s division by sqrt(s), default; ``unit_norm``: division by s, see
    :func:`medssl.weights.surgery.scale_frobenius`), ``fold_ws`` (fold weight standardisation; required to
    scale a weight-standardised BiT), ``dead_filters`` (``copy``|``random``|``none``), ``use_checkpoint_heads``, ``trust`` (allow pickles), ``small_stem``,
    ``widen_factor``, ``method_options`` (passed to ``build_method``, e.g. temperature, head sizes; the heads'
    widths scale with the backbone's feature width unless ``{"paper_heads": true}``, see
    :func:`medssl.methods.base.head_width`).
    Schedule: ``epochs`` or ``iterations`` (optimizer steps; ``iterations`` wins), ``batch_size`` (images per
    optimizer step and process), ``accumulate`` (micro-batches per step: each forward sees
    ``batch_size // accumulate`` images), ``lr`` (None = ``lr_per_256 * batch_size * world_size / 256``),
    ``optimizer``, ``weight_decay``, ``momentum``, ``lars_eta``, ``warmup_epochs`` (None = paper value,
    clipped to a tenth of the run), ``final_lr``.
    Runtime: ``precision`` (``fp32``|``bf16``|``fp16``; AMP only on CUDA), ``channels_last``, ``compile``,
    ``workers`` (loader processes; default :func:`default_workers`, from the cores available), ``seed``,
    ``device`` (None = cuda when available), ``sync_bn``, ``augment_on`` (``loader``:
    per-sample augmentation in the loader workers; ``device``: batched kornia augmentation on the training
    device, see :mod:`medssl.engines.loaders`).
    Monitoring: ``knn_every`` (epochs, 0 = off), ``knn_k``, ``knn_temperature``, ``knn_max_images``,
    ``collapse_threshold`` (warn when the mean per-dimension std of normalised embeddings falls below this
    fraction of 1/sqrt(D); default 0.3, measured between collapsed and healthy embeddings, see
    :data:`medssl.engines.handlers.COLLAPSE_THRESHOLD`), ``log_every`` (iterations between TensorBoard/metrics.jsonl lines).
    Checkpoints: ``checkpoint_every`` (iterations, 0 = off), ``checkpoint_every_epochs`` (0 = off),
    ``keep_checkpoints`` (last K kept), ``stop_after`` (end this invocation after that many total steps
    with a checkpoint, keeping the schedule of the full run; continue with ``--resume``).
    Bad data: ``skip_bad_records`` (records; 0 = the first record that fails to load stops the run with its id
    and path): replace up to that many distinct unreadable records by the next loadable one (deterministic, so
    resumes stay exact), logging each to ``RUN_DIR/errors.jsonl``; one more stops the run.
    Record: ``method_schedule`` is written by the engine, not read: the method's epoch-based knobs converted to
    this run's steps (SwAV: ``freeze_prototypes_steps``, ``queue_length``, ``queue_start_step``, ...; see
    ``SSLMethod.configure_run``). The backbone actually built is recorded too
    (:func:`medssl.engines.components.record_network`): ``arch``, ``small_stem`` and ``widen_factor`` are
    overwritten with the built network's (a checkpoint's own layout when ``arch`` was None), and ``arch_kwargs``
    (written, not read) holds all its build options, ``build_backbone(arch, **arch_kwargs)``.
    """

    data: str = ""
    out: str = ""
    method: str = "simclr"
    init: str = "random"
    arch: str | None = None
    norm: str = "keep"
    scale_frobenius: bool = False
    frobenius_rule: str = "paper"
    fold_ws: bool = False
    dead_filters: str = "none"
    use_checkpoint_heads: bool = False
    trust: bool = False
    small_stem: bool = False
    widen_factor: float = 1.0
    method_options: dict[str, Any] = field(default_factory=dict)
    modality: str = "generic"
    image_size: int = 224
    knn_data: str | None = None
    epochs: int = 100
    iterations: int | None = None
    batch_size: int = 128
    accumulate: int = 1
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    lars_eta: float = 1e-3
    warmup_epochs: float | None = None
    final_lr: float = 0.0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    device: str | None = None
    sync_bn: bool = False
    augment_on: str = "loader"
    knn_every: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_images: int = 5000
    collapse_threshold: float = 0.3  # measured: medssl.engines.handlers.COLLAPSE_THRESHOLD
    log_every: int = 1
    checkpoint_every: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    stop_after: int | None = None
    skip_bad_records: int = 0
    method_schedule: dict[str, Any] = field(default_factory=dict)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`MedsslError` for values that cannot work."""
        if self.method not in METHODS:
            raise MedsslError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise MedsslError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.norm not in ("keep", "bn"):
            raise MedsslError(f"--norm must be keep or bn, not {self.norm!r}")
        if self.augment_on not in AUGMENT_ON:
            raise MedsslError(f"--augment-on must be one of {', '.join(AUGMENT_ON)}, not {self.augment_on!r}")
        if self.dead_filters not in ("copy", "random", "none"):
            raise MedsslError(f"--dead-filters must be copy, random or none, not {self.dead_filters!r}")
        if self.frobenius_rule not in ("paper", "unit_norm"):
            raise MedsslError(f"--frobenius-rule must be paper or unit_norm, not {self.frobenius_rule!r}")
        if self.batch_size < 2:
            raise MedsslError("batch size must be at least 2 (BatchNorm and contrastive losses need pairs)")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise MedsslError(f"batch size {self.batch_size} must be a multiple of --accumulate {self.accumulate}")
        if self.iterations is not None and self.iterations < 1:
            raise MedsslError("--iterations must be positive")
        if self.iterations is None and self.epochs < 1:
            raise MedsslError("--epochs must be positive")
        if self.skip_bad_records < 0:
            raise MedsslError("--skip-bad-records must be 0 or more")
        if self.image_size < 8:
            raise MedsslError("--image-size must be at least 8 pixels")

    def resolve(self, *, steps_per_epoch: int, world_size: int = 1) -> PretrainConfig:
        """Copy with every method default filled in.

        Args:
            steps_per_epoch: optimizer steps per epoch (images // (batch_size * world_size)).
            world_size: number of processes (the default lr scales with the global batch).
        """
        self.validate()
        total = self.iterations if self.iterations is not None else self.epochs * steps_per_epoch
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = default_warmup_epochs(self.method, total, steps_per_epoch)
        return dataclasses.replace(
            self,
            arch=self.arch,
            optimizer=(self.optimizer or method_default(self.method, "optimizer")).lower(),
            lr=self.lr if self.lr is not None else default_lr(self.method, self.batch_size, world_size),
            weight_decay=(self.weight_decay if self.weight_decay is not None
                          else method_default(self.method, "weight_decay")),
            warmup_epochs=warmup,
            iterations=total,
            epochs=math.ceil(total / max(steps_per_epoch, 1)),
        )

    def warmup_iterations(self, steps_per_epoch: int) -> int:
        """Warmup length in optimizer steps (``warmup_epochs * steps_per_epoch``, rounded)."""
        return int(round((self.warmup_epochs or 0.0) * steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str | Path | None = None) -> PretrainConfig:
        """Build from a dict (e.g. config.json); unknown keys raise :class:`MedsslError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise MedsslError(f"unknown pretraining settings: {', '.join(unknown)}", path)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> PretrainConfig:
        """Read a ``config.json`` written by a run."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise MedsslError("no config.json: not a medssl pretraining run folder", path) from exc
        except json.JSONDecodeError as exc:
            raise MedsslError(f"config.json is not valid JSON ({exc})", path) from exc
        if not isinstance(values, dict):
            raise MedsslError("config.json must hold a JSON object", path)
        return cls.from_dict(values, path)
