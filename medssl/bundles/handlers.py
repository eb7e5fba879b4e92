"""Handlers of a bundle's ``train#handlers`` (each with ``attach(engine)``), besides MONAI's ``StatsHandler`` and
``TensorBoardStatsHandler``:

- :class:`RunCheckpointer`: exact-resume checkpoints in ``<run_dir>/checkpoints``;
- :class:`ModelWriter`: ``models/model.pt`` (MONAI ``CheckpointLoader`` / ``ckpt_export``) and
  ``models/backbone.safetensors`` at the end of the run;
- :class:`MetricsWriter`: ``<run_dir>/metrics.jsonl``;
- :class:`CollapseGuard`: collapse monitor and the checkpoint named by the non-finite loss guard;
- :class:`KnnHandler`: kNN balanced-accuracy monitor.

Only rank 0 writes files under ``torchrun``; checkpoints gather every rank's generator states first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from torch import nn

from medssl.engines.trainer import PretrainingTrainer

logger = logging.getLogger("medssl.bundles.handlers")


def _is_rank0() -> bool:
    return idist.get_rank() == 0


class RunCheckpointer:
    """Exact-resume checkpoints: ``<run_dir>/checkpoints/checkpoint_<iteration:08d>.pt`` every
    ``every_epochs`` epochs, at ``stop_after`` steps (then the run ends) and at the end of the run.

    A checkpoint holds the method (backbone, heads, target network), optimizer, schedule, GradScaler, the
    method's extra state (SwAV queue) and every rank's generator states (:mod:`medssl.engines.checkpoint`);
    with ``resume: true`` the train config restores it (:func:`restore`) and the loader continues at the next
    step, so a stopped and resumed run equals an uninterrupted one. Collective under ``torchrun``; rank 0
    writes. ``keep_last`` newest files are kept.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, every_epochs: int = 1, keep_last: int = 3,
                 stop_after: int | None = None, config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.every_epochs = int(every_epochs)
        self.keep_last = int(keep_last)
        self.stop_after = stop_after
        self.config = dict(config or {})
        self._saved: set[int] = set()

    def save(self, engine: PretrainingTrainer) -> None:
        from medssl.engines.checkpoint import build_checkpoint_state, capture_rng_state, save_checkpoint

        it = engine.state.iteration
        if it in self._saved:
            return
        self._saved.add(it)
        per_rank = None
        if idist.get_world_size() > 1:
            mine = {"method_extra": engine.method.extra_state(), "rng": capture_rng_state()}
            per_rank = [None] * idist.get_world_size()
            torch.distributed.all_gather_object(per_rank, mine)
        if _is_rank0():
            save_checkpoint(self.run_dir, build_checkpoint_state(
                iteration=it, epoch=engine.state.epoch, method=engine.method, optimizer=engine.optimizer,
                scaler=engine.grad_scaler, schedule=engine.schedule, config=self.config, per_rank=per_rank),
                keep_last=self.keep_last)

    def attach(self, engine: PretrainingTrainer) -> None:
        if self.every_epochs > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_epochs), self.save)
        if self.stop_after is not None:
            def _stop(eng: PretrainingTrainer) -> None:
                if eng.state.iteration >= int(self.stop_after):
                    self.save(eng)
                    eng.terminate()
            engine.add_event_handler(Events.ITERATION_COMPLETED, _stop)

        def _final(eng: PretrainingTrainer) -> None:
            if eng.state.iteration >= eng.max_iterations:
                self.save(eng)
        engine.add_event_handler(Events.COMPLETED, _final)




class ModelWriter:
    """At the end of a finished run (rank 0): ``<ckpt_dir>/model.pt`` and ``<ckpt_dir>/backbone.safetensors``.

    ``model.pt`` = ``{"model": FeatureExtractor state_dict}`` (keys ``normalization.mean``,
    ``normalization.std``, ``backbone.<name>``), what MONAI's ``CheckpointLoader(load_dict={"model": net})``
    and ``ckpt_export --key_in_ckpt model`` read into the inference config's ``network_def``.
    ``backbone.safetensors`` is the medssl file (backbone, heads, input normalisation, provenance) that
    ``configs/evaluate.yaml`` and ``medssl evaluate`` read. Both written atomically.
    """

    def __init__(self, ckpt_dir: str | os.PathLike[str], *, normalization: nn.Module,
                 provenance: dict[str, Any] | None = None) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.normalization = normalization
        self.provenance = dict(provenance or {})

    def write(self, method: nn.Module, iteration: int) -> Path:
        from medssl.io import atomic_torch_save
        from medssl.methods import HEAD_NAMES
        from medssl.models import FeatureExtractor
        from medssl.weights import save_medssl_file

        backbone = method.backbone

        def plain(module: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

        spec = {"mean": self.normalization.mean.flatten().tolist(), "std": self.normalization.std.flatten().tolist(),
                "description": "input normalisation of the pretraining run"}
        extractor = FeatureExtractor(backbone, self.normalization)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.ckpt_dir / "model.pt", {"model": plain(extractor)})
        heads = {name: plain(getattr(method, name)) for name in HEAD_NAMES
                 if isinstance(getattr(method, name, None), nn.Module)}
        provenance = {**self.provenance, "pretraining": {**self.provenance.get("pretraining", {}),
                                                         "iterations": int(iteration)}}
        save_medssl_file(self.ckpt_dir / "backbone.safetensors", plain(backbone), arch=backbone.arch,
                         arch_kwargs=backbone.arch_kwargs, heads=heads, input_normalization=spec,
                         provenance=provenance)
        logger.info("wrote %s and backbone.safetensors (iteration %d)", self.ckpt_dir / "model.pt", iteration)
        return self.ckpt_dir / "model.pt"

    def attach(self, engine: PretrainingTrainer) -> None:
        def _done(eng: PretrainingTrainer) -> None:
            if eng.state.iteration >= eng.max_iterations and _is_rank0():
                self.write(eng.method, eng.state.iteration)
        engine.add_event_handler(Events.COMPLETED, _done)


class MetricsWriter:
    """``<run_dir>/metrics.jsonl``: one line per step ``{"iteration", "epoch", "loss", "lr", ...}`` (rank 0);
    on a resume, lines after the resumed step are dropped first (those steps run again)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, every: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.every = int(every)

    def attach(self, engine: PretrainingTrainer) -> None:
        if not _is_rank0():
            return
        from medssl.engines.handlers import MetricsJsonl, attach_iteration_logging

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsJsonl(self.run_dir / "metrics.jsonl")

        def _truncate(eng: PretrainingTrainer) -> None:
            metrics.truncate_after(eng.state.iteration)
        engine.add_event_handler(Events.STARTED, _truncate)
        attach_iteration_logging(engine, metrics, every=self.every)


class CollapseGuard:
    """Collapse monitor as a handler: gives the trainer a :class:`~medssl.engines.handlers.CollapseMonitor`
    (mean per-dimension std of the normalised embeddings; a warning below ``threshold / sqrt(D)``); the loss
    guard (a non-finite loss stops the run naming the last checkpoint) is part of every step."""

    def __init__(self, threshold: float = 0.2, run_dir: str | os.PathLike[str] | None = None) -> None:
        self.threshold = float(threshold)
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def attach(self, engine: PretrainingTrainer) -> None:
        from medssl.engines.checkpoint import latest_checkpoint
        from medssl.engines.handlers import CollapseMonitor

        engine.collapse_monitor = CollapseMonitor(self.threshold)
        if self.run_dir is not None:
            run_dir = self.run_dir
            engine.last_checkpoint = lambda: latest_checkpoint(run_dir)


class KnnHandler:
    """kNN monitor as a handler: every ``every_epochs`` epochs and at the end (rank 0), the weighted-kNN
    balanced accuracy (Wu et al. 2018 vote, k 20, T 0.07; :func:`medssl.engines.knn.weighted_knn_predict`,
    :func:`medssl.engines.scores.balanced_accuracy`) of the backbone's features on the labelled records, half
    of each class as reference and half as queries (:func:`medssl.engines.handlers.split_reference_query`).
    Logged, written to ``metrics.jsonl`` and TensorBoard (``knn/balanced_accuracy``). Off with
    ``every_epochs: 0`` or fewer than two labelled classes / five labelled images."""

    def __init__(self, records: Sequence[dict[str, Any]], transform: Any, backbone: nn.Module,
                 normalization: nn.Module, device: torch.device, *, every_epochs: int = 1,
                 run_dir: str | os.PathLike[str] | None = None, seed: int = 0, k: int = 20,
                 temperature: float = 0.07, max_images: int = 5000, batch_size: int = 64) -> None:
        self.records = [r for r in records if r.get("label") is not None]
        self.transform = transform
        self.backbone = backbone
        self.normalization = normalization
        self.device = device
        self.every_epochs = int(every_epochs)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed, self.k, self.temperature = int(seed), int(k), float(temperature)
        self.max_images, self.batch_size = int(max_images), int(batch_size)
        self._images: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._done: set[int] = set()

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        import numpy as np

        from medssl.engines.handlers import label_index, split_reference_query

        records = self.records
        if len(records) > self.max_images:
            keep = np.random.default_rng(self.seed).choice(len(records), self.max_images, replace=False)
            records = [records[i] for i in sorted(keep)]
        classes = label_index([str(r["label"]) for r in records])
        ref, qry = split_reference_query(records, self.seed)

        def read(recs: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.stack([torch.as_tensor(self.transform(dict(r))["image"]) for r in recs])
            return images, torch.tensor([classes[str(r["label"])] for r in recs])

        return (*read(ref), *read(qry))

    @torch.no_grad()
    def __call__(self) -> float:
        from medssl.engines.knn import weighted_knn_predict
        from medssl.engines.scores import balanced_accuracy
        from medssl.models import FeatureExtractor

        if self._images is None:
            self._images = self._load()
        ref_x, ref_y, qry_x, qry_y = self._images
        extractor = FeatureExtractor(self.backbone, self.normalization)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            def features(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([extractor(x[i:i + self.batch_size].to(self.device)).float().cpu()
                                  for i in range(0, len(x), self.batch_size)])
            num_classes = int(max(ref_y.max(), qry_y.max())) + 1
            pred, _ = weighted_knn_predict(features(ref_x), ref_y, features(qry_x), k=self.k,
                                           temperature=self.temperature, num_classes=num_classes)
        finally:
            self.backbone.train(was_training)
        return float(balanced_accuracy(qry_y, pred, num_classes))

    def attach(self, engine: PretrainingTrainer) -> None:
        if self.every_epochs <= 0 or not _is_rank0():
            return
        if len({str(r["label"]) for r in self.records}) < 2 or len(self.records) < 5:
            logger.warning("kNN monitor off: fewer than two labelled classes or five labelled images")
            return

        def _run(eng: PretrainingTrainer) -> None:
            if eng.state.iteration in self._done:
                return
            self._done.add(eng.state.iteration)
            value = self()
            logger.info("kNN balanced accuracy at iteration %d: %.4f", eng.state.iteration, value)
            eng.state.metrics["knn_balanced_accuracy"] = value
            if self.run_dir is not None:
                from medssl.engines.handlers import MetricsJsonl

                MetricsJsonl(self.run_dir / "metrics.jsonl").write(
                    {"iteration": eng.state.iteration, "epoch": eng.state.epoch, "knn_balanced_accuracy": value})

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_epochs), _run)

        def _final(eng: PretrainingTrainer) -> None:
            if eng.state.iteration >= eng.max_iterations:
                _run(eng)
        engine.add_event_handler(Events.COMPLETED, _final)
