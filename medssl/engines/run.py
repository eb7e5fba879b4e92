"""``run_pretraining(config) -> RUN_DIR``: build data, model, method, optimizer and handlers, then train.

Run folder: ``config.json`` (resolved), ``checkpoints/``, ``tb/``, ``metrics.jsonl``, and at the end
``backbone.safetensors`` (a medssl file with the heads and the provenance of the run). Several processes
(``torchrun``) go through ``ignite.distributed.Parallel``; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from torch import nn

from medssl.engines.checkpoint import (
    build_checkpoint_state,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint_file,
    restore_training_state,
    save_checkpoint,
)
from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import (
    CollapseMonitor,
    KnnMonitor,
    MetricsJsonl,
    attach_iteration_logging,
    attach_knn_monitor,
    attach_progress_bar,
    attach_tensorboard,
)
from medssl.engines.loaders import build_labelled_loaders, build_pretraining_loader
from medssl.engines.optim import build_optimizer
from medssl.engines.schedules import WarmupCosineSchedule
from medssl.engines.trainer import PretrainingTrainer
from medssl.errors import MedsslError
from medssl.io import atomic_write_json

logger = logging.getLogger("medssl.engines.run")


def run_pretraining(config: PretrainConfig, *, resume: bool = False, overwrite: bool = False,
                    progress: bool = True, resume_options: dict[str, Any] | None = None) -> Path:
    """Pretrain as ``config`` says and return the run folder.

    Args:
        config: the run's settings (``config.out`` is RUN_DIR). With ``resume=True`` the settings are read from
            RUN_DIR/config.json (checked against the checkpoint's run record, see :mod:`medssl.engines.resume`);
            fields of ``config`` that differ from both the defaults and the recorded settings are the options
            given to the resume (applied or refused).
        resume: continue the run in ``config.out`` from its newest checkpoint.
        overwrite: allow a non-empty RUN_DIR for a new run (its old checkpoints and logs are removed).
        progress: show a tqdm progress bar on rank 0.
        resume_options: with ``resume``, the options given (field -> value; the CLI passes exactly what was on
            its command line) instead of the fields of ``config`` that differ from the defaults.

    The run folder is locked while the run writes to it (:class:`~medssl.engines.runlock.RunLock`, rank 0), and
    temporaries left by a killed atomic write are removed at start.

    Raises:
        MedsslError: non-empty RUN_DIR without resume/overwrite, folder locked by another run, nothing to resume,
            resume options that cannot be applied, config.json not matching the checkpoint, bad data, NaN loss.
    """
    import contextlib

    from medssl.engines.resume import resume_config
    from medssl.engines.runlock import LOCK_NAME, RunLock
    from medssl.io import clean_stale_tmp

    run_dir = Path(config.out)
    if not config.out:
        raise MedsslError("no output folder given (--out RUN_DIR)")
    if resume and not (run_dir / "config.json").is_file():
        raise MedsslError("no config.json: not a medssl pretraining run folder", run_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 locks, cleans and deletes
    with RunLock(run_dir) if rank0 else contextlib.nullcontext():
        if rank0:
            for folder in (run_dir, run_dir / "checkpoints"):
                clean_stale_tmp(folder, any_writer=True)  # we hold the lock: nobody else writes here
        resumed = None
        if resume:
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise MedsslError("no checkpoint to resume from in checkpoints/", run_dir)
            state = load_checkpoint_file(ckpt)
            config, record, given = resume_config(run_dir, state, ckpt, resume_options, requested=config)
            resumed = (ckpt, state, record, given)
        elif run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            if not overwrite:
                raise MedsslError("output folder is not empty; use --resume to continue it or --overwrite",
                                  run_dir)
            if rank0:
                _clear_run_outputs(run_dir)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        backend = None if world <= 1 else ("nccl" if torch.cuda.is_available() else "gloo")
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(_train, config, resumed, progress)
    return run_dir


def _clear_run_outputs(run_dir: Path) -> None:
    for name in ("metrics.jsonl", "config.json", "backbone.safetensors", "errors.jsonl", "resumes.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    for sub in ("checkpoints", "tb"):
        folder = run_dir / sub
        if folder.is_dir():
            for p in sorted(folder.rglob("*"), reverse=True):
                p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
            folder.rmdir()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_pretraining_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records used for SSL: the ``pretrain`` split when the data has one, else all but ``val``/``test``."""
    if any(r.get("split") == "pretrain" for r in records):
        return [r for r in records if r.get("split") == "pretrain"]
    return [r for r in records if r.get("split") not in ("val", "test")]


def _build_backbone(config: PretrainConfig) -> tuple[nn.Module, dict[str, Any], dict | None, list[dict], dict]:
    """Backbone, input-normalisation spec, imported heads (or None), preparation reports, source record."""
    from medssl.models import IMAGENET_NORMALIZATION, build_backbone

    extra: dict[str, Any] = {}
    if config.small_stem:
        extra["small_stem"] = True
    if config.widen_factor != 1.0:
        extra["widen_factor"] = config.widen_factor
    heads = None
    if config.init == "random":
        arch = config.arch or "resnet50"
        if arch.startswith("resnetv2") and config.norm == "bn":
            extra["norm"] = "bn"
        backbone = build_backbone(arch, **extra)
        spec = dict(IMAGENET_NORMALIZATION)
        source = {"format": "random_init"}
    else:
        from medssl.weights import build_from_checkpoint, sha256_of

        backbone, loaded = build_from_checkpoint(config.init, trust=config.trust, arch=config.arch, num_classes=0,
                                                 **extra)
        spec = dict(loaded.input_normalization)
        heads = loaded.heads if config.use_checkpoint_heads else None
        source = {"format": loaded.format, "file": Path(config.init).name, "sha256": sha256_of(config.init)}
    reports: list[dict] = []
    wants_prep = (config.norm == "bn" and config.init != "random") or config.scale_frobenius or \
        config.dead_filters != "none" or config.fold_ws
    if wants_prep:
        from medssl.weights.prepare import prepare_backbone

        # weight standardisation is folded only when asked (--fold-ws); scaling a still-standardised network
        # (or one without conv+BN pairs) is refused by prepare_backbone with a one-line error
        try:
            reports = prepare_backbone(backbone, norm=config.norm if config.init != "random" else "keep",
                                       fold_ws=config.fold_ws, scale_frobenius=config.scale_frobenius,
                                       frobenius_rule=config.frobenius_rule, dead_filters=config.dead_filters,
                                       seed=config.seed)
        except MedsslError as exc:
            if exc.path is None and config.init != "random":  # name the checkpoint that was refused
                raise MedsslError(exc.reason, config.init) from exc
            raise
    return backbone.train(), spec, heads, reports, source


def _train(local_rank: int, config: PretrainConfig, resumed: tuple | None, progress: bool) -> None:
    from medssl.data.sources import records_from_path
    from medssl.methods import HEAD_NAMES, build_method
    from medssl.models import InputNormalization

    rank, world = idist.get_rank(), idist.get_world_size()
    device = torch.device(config.device) if config.device else idist.device()
    run_dir = Path(config.out)
    records = select_pretraining_records(records_from_path(config.data))
    if not records:
        raise MedsslError("no images to pretrain on", config.data)
    steps_per_epoch = len(records) // (config.batch_size * world)
    if steps_per_epoch < 1:
        raise MedsslError(f"{len(records)} images are fewer than one batch of {config.batch_size * world}",
                          config.data)
    resume = resumed is not None
    if not resume:
        config = config.resolve(steps_per_epoch=steps_per_epoch, world_size=world)
    elif "iterations" in resumed[2]["overrides"]:
        config = dataclasses.replace(config, epochs=-(-int(config.iterations) // steps_per_epoch))
    _seed_everything(config.seed)  # identical initialisation on every rank
    if resume:  # the layout comes from the checkpoint's run record: the init file is never read again
        from medssl.engines.resume import rebuild_backbone

        backbone, spec, heads, reports, source = rebuild_backbone(resumed[2], resumed[1], resumed[0])
    else:
        backbone, spec, heads, reports, source = _build_backbone(config)
    method_opts = dict(config.method_options)
    if heads:
        method_opts.update(heads=heads, heads_source=str(resumed[0] if resume else config.init))
    method = build_method(config.method, backbone, **method_opts)
    if config.sync_bn and world > 1:
        if device.type == "cuda":
            from medssl.weights.norm import convert_to_sync_bn

            method = convert_to_sync_bn(method)
        else:
            logger.warning("--sync-bn needs CUDA (torch SyncBatchNorm); BatchNorm stays per-process on %s", device)
    method = method.to(device)
    if config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    # epoch-based method knobs (SwAV prototype freezing, queue start/length) -> steps of this run; recorded
    method_schedule = method.configure_run(steps_per_epoch=steps_per_epoch,
                                           global_batch_size=config.batch_size * world,
                                           max_iterations=int(config.iterations))
    config = dataclasses.replace(config, method_schedule=method_schedule)
    normalization = InputNormalization.from_spec(spec).to(device)
    optimizer = build_optimizer(config.optimizer or "sgd", method.param_groups(config.weight_decay, config.lr),
                                lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
                                eta=config.lars_eta)
    max_iterations = int(config.iterations)
    schedule = WarmupCosineSchedule(optimizer, base_lr=config.lr, max_iterations=max_iterations,
                                    warmup_iterations=config.warmup_iterations(steps_per_epoch),
                                    final_lr=config.final_lr)
    start = 0
    state = None
    if resume:
        ckpt, state, run_record = resumed[0], resumed[1], resumed[2]
        start = int(state["iteration"])
        logger.info("resuming %s from iteration %d", run_dir, start)
    _seed_everything(config.seed + rank)  # per-rank randomness from here on
    skipped = set(state.get("skipped_records") or []) if state is not None else set()
    loader, view_augment = build_pretraining_loader(config, records, method, rank=rank, world_size=world,
                                                    start_step=start, device=device,
                                                    errors_path=run_dir / "errors.jsonl", skipped=skipped)
    network: nn.Module = method
    if world > 1:
        network = idist.auto_model(method, sync_bn=False, find_unused_parameters=config.method == "swav")
    if config.compile:
        network = torch.compile(network)
    metrics = MetricsJsonl(run_dir / "metrics.jsonl") if rank == 0 else None
    collapse = CollapseMonitor(config.collapse_threshold, sink=metrics.write if metrics else None)
    trainer = PretrainingTrainer(
        method=method, optimizer=optimizer, schedule=schedule, normalization=normalization, data_loader=loader,
        max_iterations=max_iterations, epoch_length=steps_per_epoch, device=device, precision=config.precision,
        channels_last=config.channels_last, accumulate=config.accumulate, network=network,
        collapse_monitor=collapse, last_checkpoint=lambda: latest_checkpoint(run_dir), view_augment=view_augment,
        augment_seed=config.seed, rank=rank)
    if state is not None:
        restore_training_state(state, method=method, optimizer=optimizer, scaler=trainer.grad_scaler,
                               schedule=schedule, rank=rank, world_size=world)
        trainer.state.iteration = start
        trainer.state.epoch = start // steps_per_epoch
    if not resume:  # the run record (hash of config.json as written here) goes into every checkpoint
        from medssl.engines.resume import make_run_record

        run_record = make_run_record(config, backbone=backbone, spec=spec, heads=heads, reports=reports,
                                     source=source)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # config.json stays the run-start record; what this resume changed goes to resumes.jsonl
            from medssl.engines.resume import log_resume

            metrics.truncate_after(start)
            MetricsJsonl(run_dir / "errors.jsonl").truncate_after(start)
            log_resume(run_dir, iteration=start, checkpoint=ckpt, applied=resumed[3])
        else:
            atomic_write_json(run_dir / "config.json", config.to_dict())
    if world > 1:
        idist.barrier()  # logs truncated before any rank appends to them
    _attach_handlers(trainer, config, method, normalization, records, device, run_dir, metrics, rank, progress,
                     spec=spec, reports=reports, source=source, head_names=HEAD_NAMES, run_record=run_record)
    trainer.run()


def _attach_handlers(trainer: PretrainingTrainer, config: PretrainConfig, method: nn.Module,
                     normalization: nn.Module, records: list[dict[str, Any]], device: torch.device, run_dir: Path,
                     metrics: MetricsJsonl | None, rank: int, progress: bool, *, spec: dict, reports: list[dict],
                     source: dict, head_names: tuple[str, ...], run_record: dict[str, Any]) -> None:
    from ignite.engine import Events

    from medssl.engines.resume import encode_run_record

    max_iterations = trainer.max_iterations
    saved: set[int] = set()

    def save(engine: Any) -> None:
        """Collective over ranks (per-rank queues and generators are gathered); rank 0 writes."""
        it = engine.state.iteration
        if it in saved:
            return
        saved.add(it)
        per_rank = None
        skipped = set(trainer.data_loader.skipped)
        if idist.get_world_size() > 1:
            mine = {"method_extra": method.extra_state(), "rng": capture_rng_state(), "skipped": sorted(skipped)}
            per_rank = [None] * idist.get_world_size()
            torch.distributed.all_gather_object(per_rank, mine)
            skipped = {i for r in per_rank for i in r.pop("skipped")}
        if rank == 0:
            save_checkpoint(run_dir, build_checkpoint_state(
                iteration=it, epoch=engine.state.epoch, method=method, optimizer=trainer.optimizer,
                scaler=trainer.grad_scaler, schedule=trainer.schedule, config=config.to_dict(), per_rank=per_rank,
                run=encode_run_record(run_record), skipped_records=sorted(skipped, key=str)),
                keep_last=config.keep_checkpoints)

    if config.checkpoint_every > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=config.checkpoint_every), save)
    if config.checkpoint_every_epochs > 0:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=config.checkpoint_every_epochs), save)
    if config.stop_after is not None:

        @trainer.on(Events.ITERATION_COMPLETED)
        def _stop(engine: Any) -> None:
            if engine.state.iteration >= config.stop_after:
                save(engine)
                engine.terminate()

    knn = build_labelled_loaders(config, records) if config.knn_every > 0 else None
    if knn is not None:
        ref, qry, num_classes = knn
        monitor = KnnMonitor(method.backbone, normalization, ref, qry, num_classes=num_classes, device=device,
                             k=config.knn_k, temperature=config.knn_temperature,
                             channels_last=config.channels_last)
        sinks = []
        if metrics is not None:
            sinks.append(metrics.write)
        attach_knn_monitor(trainer, monitor, every_epochs=config.knn_every, max_iterations=max_iterations,
                           sinks=sinks)

    @trainer.on(Events.COMPLETED)
    def _final_checkpoint(engine: Any) -> None:
        if engine.state.iteration >= max_iterations:
            save(engine)

    if rank != 0:
        return
    attach_iteration_logging(trainer, metrics, every=config.log_every)
    tb = attach_tensorboard(trainer, run_dir / "tb", every=config.log_every)
    if knn is not None:
        def tb_sink(record: dict[str, Any]) -> None:
            tb.writer.add_scalar("knn/balanced_accuracy", record["knn_balanced_accuracy"], record["iteration"])
        sinks.append(tb_sink)
    if progress:
        attach_progress_bar(trainer)

    @trainer.on(Events.COMPLETED)
    def _finish(engine: Any) -> None:
        if engine.state.iteration < max_iterations:
            tb.close()
            return
        _write_backbone(run_dir, config, method, spec=spec, reports=reports, source=source,
                        head_names=head_names, iteration=engine.state.iteration)
        tb.close()


def _write_backbone(run_dir: Path, config: PretrainConfig, method: nn.Module, *, spec: dict, reports: list[dict],
                    source: dict, head_names: tuple[str, ...], iteration: int) -> None:
    """``RUN_DIR/backbone.safetensors``: backbone + heads + provenance of the run."""
    from medssl.weights import save_medssl_file

    backbone = method.backbone

    def plain(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    heads = {name: plain(getattr(method, name)) for name in head_names
             if isinstance(getattr(method, name, None), nn.Module)}
    provenance = {
        **source,
        "operations": reports,
        "pretraining": {"method": config.method, "iterations": iteration, "epochs": config.epochs,
                        "batch_size": config.batch_size, "image_size": config.image_size, "lr": config.lr,
                        "optimizer": config.optimizer, "seed": config.seed, "modality": config.modality,
                        "data": Path(config.data).name, "method_schedule": config.method_schedule},
    }
    from medssl.weights.prepare import has_batchnorm_statistics, preparation_summary

    if reports:
        provenance["preparation"] = preparation_summary(reports)
    if has_batchnorm_statistics(backbone):
        provenance["bn_statistics"] = "trained"  # running statistics of the SSL training batches
    save_medssl_file(run_dir / "backbone.safetensors", plain(backbone), arch=backbone.arch,
                     arch_kwargs=backbone.arch_kwargs, heads=heads, input_normalization=spec,
                     provenance=provenance)
