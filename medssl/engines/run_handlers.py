"""Handlers of a pretraining run folder, each an object with ``attach(engine)`` (the MONAI/Ignite handler
convention) so that :func:`medssl.engines.run.run_pretraining` and a bundle's ``train#handlers`` list attach the
same ones:

- :class:`RunCheckpointer`: exact-resume checkpoints in ``RUN_DIR/checkpoints`` every ``checkpoint_every``
  steps and/or ``checkpoint_every_epochs`` epochs, at ``stop_after`` steps (then the invocation ends) and at
  the end of the run. Collective under several processes (every rank's method extra state, generator states and
  skipped records are gathered with ``idist.all_gather``); rank 0 writes. Each checkpoint carries the run
  record (:mod:`medssl.engines.resume`) that a resume checks.
- :class:`RunLogs`: ``metrics.jsonl`` (one line per ``log_every`` steps), TensorBoard under ``RUN_DIR/tb``
  (tags ``train/loss``, ``train/lr``, ...; ``knn/balanced_accuracy`` through :meth:`RunLogs.knn_sink`) a
  progress bar and log lines with images/s and ETA (without a progress bar too); rank 0 only.
- :class:`BackboneWriter`: ``RUN_DIR/backbone.safetensors`` (backbone, SSL heads, input normalisation and the
  provenance of the run) when the run reaches its last step, optionally with a MONAI ``model.pt``; rank 0 only.
- :class:`KnnCheck` and :class:`CollapseGuard`: the kNN monitor and the collapse monitor as handlers.
- :class:`~medssl.engines.run_folder.RunFolder` (its own module): lock, resume verification, ``config.json`` and
  the run record of a config-driven run (a bundle's ``train.yaml``); it attaches :class:`RunCheckpointer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import nn

from medssl.engines.config import PretrainConfig


class RunCheckpointer:
    """Exact-resume checkpoints of ``engine`` (a :class:`~medssl.engines.trainer.PretrainingTrainer`).

    Args:
        run_dir: RUN_DIR (checkpoints go to ``RUN_DIR/checkpoints``).
        config: the resolved run settings (stored in every checkpoint; ``checkpoint_every`` (steps, 0 = off),
            ``checkpoint_every_epochs`` (0 = off), ``keep_checkpoints`` (newest K kept) and ``stop_after``
            (steps) are read from it).
        run_record: the run record (:func:`medssl.engines.resume.make_run_record`) stored in every checkpoint.
    """

    def __init__(self, run_dir: str | Path, config: PretrainConfig, run_record: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.run_record = run_record
        self._saved: set[int] = set()

    def save(self, engine: Any) -> None:
        """Checkpoint the current step (once per step). Collective over ranks; rank 0 writes."""
        from medssl.engines.checkpoint import build_checkpoint_state, capture_rng_state, save_checkpoint
        from medssl.engines.resume import encode_run_record

        it = engine.state.iteration
        if it in self._saved:
            return
        self._saved.add(it)
        per_rank = None
        skipped = set(getattr(engine.data_loader, "skipped", ()))
        if idist.get_world_size() > 1:
            mine = {"method_extra": engine.method.extra_state(), "rng": capture_rng_state(),
                    "skipped": sorted(skipped, key=str)}
            per_rank = list(idist.all_gather(mine))  # one entry per rank, in rank order
            skipped = {i for r in per_rank for i in r.pop("skipped")}
        if idist.get_rank() == 0:
            save_checkpoint(self.run_dir, build_checkpoint_state(
                iteration=it, epoch=engine.state.epoch, method=engine.method, optimizer=engine.optimizer,
                scaler=engine.grad_scaler, schedule=engine.schedule, config=self.config.to_dict(),
                per_rank=per_rank, run=encode_run_record(self.run_record),
                skipped_records=sorted(skipped, key=str)), keep_last=self.config.keep_checkpoints)

    def _stop(self, engine: Any) -> None:
        if engine.state.iteration >= int(self.config.stop_after):
            self.save(engine)
            engine.terminate()

    def _final(self, engine: Any) -> None:
        if engine.state.iteration >= engine.max_iterations:
            self.save(engine)

    def attach(self, engine: Engine) -> None:
        cfg = self.config
        if cfg.checkpoint_every > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.checkpoint_every), self.save)
        if cfg.checkpoint_every_epochs > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=cfg.checkpoint_every_epochs), self.save)
        if cfg.stop_after is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop)
        engine.add_event_handler(Events.COMPLETED, self._final)


class RunLogs:
    """``metrics.jsonl``, TensorBoard and the progress bar of a run (rank 0; nothing on the other ranks).

    Args:
        run_dir: RUN_DIR.
        metrics: the run's :class:`~medssl.engines.handlers.MetricsJsonl` (None: a new one on RUN_DIR).
        log_every: steps between lines (``PretrainConfig.log_every``).
        progress: show a tqdm progress bar.
        tensorboard: write ``RUN_DIR/tb`` (off where another handler does, e.g. MONAI's
            ``TensorBoardStatsHandler`` in a bundle).
        throughput_every_steps, throughput_every_seconds: an INFO log line ``pretraining step i/N: R images/s,
            ETA H:MM:SS, loss L`` every that many steps or seconds, whichever comes first, and at the last step
            (:class:`~medssl.engines.handlers.Throughput`; default 50 steps / 30 s). Every metrics.jsonl line
            carries its wall-clock ``time`` (ISO 8601, UTC).
    """

    def __init__(self, run_dir: str | Path, *, metrics: Any = None, log_every: int = PretrainConfig.log_every,
                 progress: bool = True, tensorboard: bool = True, throughput_every_steps: int = 50,
                 throughput_every_seconds: float = 30.0) -> None:
        from medssl.engines.handlers import MetricsJsonl

        self.run_dir = Path(run_dir)
        self.metrics = metrics if metrics is not None else MetricsJsonl(self.run_dir / "metrics.jsonl")
        self.log_every = int(log_every)
        self.progress = bool(progress)
        self.tensorboard = bool(tensorboard)
        self.throughput_every_steps = int(throughput_every_steps)
        self.throughput_every_seconds = float(throughput_every_seconds)
        self.tb: Any = None

    def knn_sink(self, record: dict[str, Any]) -> None:
        """Write a kNN monitor record to TensorBoard (``knn/balanced_accuracy`` at its iteration)."""
        if self.tb is not None:
            self.tb.writer.add_scalar("knn/balanced_accuracy", record["knn_balanced_accuracy"], record["iteration"])

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        from medssl.engines.handlers import (
            attach_iteration_logging,
            attach_progress_bar,
            attach_tensorboard,
            attach_throughput_log,
        )

        self.run_dir.mkdir(parents=True, exist_ok=True)
        attach_iteration_logging(engine, self.metrics, every=self.log_every)
        attach_throughput_log(engine, total_steps=None, world_size=idist.get_world_size(),
                              every_steps=self.throughput_every_steps, every_seconds=self.throughput_every_seconds)
        if self.tensorboard:
            self.tb = attach_tensorboard(engine, self.run_dir / "tb", every=self.log_every)
            engine.add_event_handler(Events.COMPLETED, lambda _: self.tb.close())
        if self.progress:
            attach_progress_bar(engine)


class BackboneWriter:
    """``RUN_DIR/backbone.safetensors`` at the end of a finished run (rank 0): a medssl file with the backbone,
    the SSL heads, the input normalisation ``spec`` and the provenance (init ``source``, preparation
    ``reports``, the pretraining settings of ``config``).

    Args:
        out_dir: folder of ``backbone.safetensors`` (None = ``run_dir``; a bundle's ``models/``).
        model_file: also write this file: ``{"model": FeatureExtractor state_dict}`` (keys
            ``normalization.mean``, ``normalization.std``, ``backbone.<name>``) of the written medssl file
            (:func:`medssl.weights.export.load_feature_extractor`), what MONAI's ``CheckpointLoader(load_dict=
            {"model": net})`` and ``ckpt_export --key_in_ckpt model`` read. None = not written.
    """

    def __init__(self, run_dir: str | Path, config: PretrainConfig, *, spec: dict[str, Any],
                 reports: list[dict[str, Any]], source: dict[str, Any], out_dir: str | Path | None = None,
                 model_file: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.spec, self.reports, self.source = spec, reports, source
        self.out_dir = Path(out_dir) if out_dir is not None else self.run_dir
        self.model_file = Path(model_file) if model_file is not None else None

    def write(self, method: nn.Module, iteration: int, method_schedule: dict[str, Any] | None = None) -> Path:
        from medssl.methods import HEAD_NAMES
        from medssl.weights import save_medssl_file
        from medssl.weights.prepare import has_batchnorm_statistics, preparation_summary

        cfg = self.config
        backbone = method.backbone

        def plain(module: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

        heads = {name: plain(getattr(method, name)) for name in HEAD_NAMES
                 if isinstance(getattr(method, name, None), nn.Module)}
        provenance = {
            **self.source,
            "operations": self.reports,
            "pretraining": {"method": cfg.method, "iterations": iteration, "epochs": cfg.epochs,
                            "batch_size": cfg.batch_size, "image_size": cfg.image_size, "lr": cfg.lr,
                            "optimizer": cfg.optimizer, "seed": cfg.seed, "modality": cfg.modality,
                            "data": Path(cfg.data).name,
                            "method_schedule": cfg.method_schedule or method_schedule},
        }
        if self.reports:
            provenance["preparation"] = preparation_summary(self.reports)
        if has_batchnorm_statistics(backbone):
            provenance["bn_statistics"] = "trained"  # running statistics of the SSL training batches
        path = self.out_dir / "backbone.safetensors"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_medssl_file(path, plain(backbone), arch=backbone.arch, arch_kwargs=backbone.arch_kwargs, heads=heads,
                         input_normalization=self.spec, provenance=provenance)
        if self.model_file is not None:
            from medssl.io import atomic_torch_save
            from medssl.weights.export import load_feature_extractor

            atomic_torch_save(self.model_file, {"model": plain(load_feature_extractor(path))})
        return path

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return

        def _done(eng: Any) -> None:
            if eng.state.iteration >= eng.max_iterations:
                self.write(eng.method, eng.state.iteration, getattr(eng, "method_schedule", None))
        engine.add_event_handler(Events.COMPLETED, _done)


class KnnCheck:
    """The kNN monitor as a handler (rank 0 only): every ``config.knn_every`` epochs and at the end of the run,
    the weighted-kNN balanced accuracy (Wu et al. 2018 vote, ``knn_k`` neighbours, temperature
    ``knn_temperature``; :class:`~medssl.engines.handlers.KnnMonitor`) of the trained backbone's features
    (``engine.method.backbone`` after ``engine.normalization``) on the labelled images of ``records`` (or of
    ``config.knn_data``), read once per invocation (:func:`medssl.engines.loaders.build_knn_images`).
    Results go to ``metrics.jsonl`` and TensorBoard through ``logs``. Off with ``knn_every`` 0, or with fewer
    than two labelled classes / five labelled images (a warning). ``transform``: the deterministic pipeline
    the images are read through (a bundle passes its ``validate#preprocessing``); None = the library preset of
    ``config.modality``."""

    def __init__(self, config: PretrainConfig, records: list[dict[str, Any]], *, logs: RunLogs | None = None,
                 transform: Any = None) -> None:
        self.config = config
        self.records = records
        self.logs = logs
        self.transform = transform

    def attach(self, engine: Any) -> None:
        from medssl.engines.handlers import KnnMonitor, attach_knn_monitor
        from medssl.engines.loaders import build_knn_images

        cfg = self.config
        if cfg.knn_every <= 0 or idist.get_rank() != 0:
            return
        knn = build_knn_images(cfg, self.records, self.transform)
        if knn is None:
            return
        ref, qry, num_classes = knn
        monitor = KnnMonitor(engine.method.backbone, engine.normalization, ref, qry, num_classes=num_classes,
                             device=engine.state.device, k=cfg.knn_k, temperature=cfg.knn_temperature,
                             channels_last=cfg.channels_last, batch_size=max(cfg.batch_size, 64))
        sinks = [self.logs.metrics.write, self.logs.knn_sink] if self.logs is not None else []
        attach_knn_monitor(engine, monitor, every_epochs=cfg.knn_every, max_iterations=engine.max_iterations,
                           sinks=sinks)


class CollapseGuard:
    """The collapse monitor as a handler: gives the trainer a :class:`~medssl.engines.handlers.CollapseMonitor`
    (mean per-dimension std of the L2-normalised embeddings; a warning, and a ``metrics.jsonl`` line through
    ``logs`` on rank 0, below ``threshold / sqrt(D)``; default 0.3, ``PretrainConfig.collapse_threshold``,
    measured: see :data:`~medssl.engines.handlers.COLLAPSE_THRESHOLD`).
    The non-finite loss guard is part of every step and names the newest checkpoint
    (:class:`~medssl.engines.run_folder.RunFolder`)."""

    def __init__(self, threshold: float = PretrainConfig.collapse_threshold, *, logs: RunLogs | None = None) -> None:
        self.threshold = float(threshold)
        self.logs = logs

    def attach(self, engine: Any) -> None:
        from medssl.engines.handlers import CollapseMonitor

        sink = self.logs.metrics.write if self.logs is not None and idist.get_rank() == 0 else None
        engine.collapse_monitor = CollapseMonitor(self.threshold, sink=sink)

