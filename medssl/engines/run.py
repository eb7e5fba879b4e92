"""``run_pretraining(config) -> RUN_DIR``: build data, model, method, optimizer and handlers, then train.

Run folder: ``config.json`` (resolved, with the backbone built: ``components.record_network``),
``checkpoints/``, ``tb/``, ``metrics.jsonl``, and at the end ``backbone.safetensors`` (a medssl file with the
heads and the provenance of the run). Several processes (``torchrun``) go through
``ignite.distributed.Parallel``; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch

from medssl.engines import components
from medssl.engines.checkpoint import latest_checkpoint, load_checkpoint_file, restore_training_state
from medssl.engines.config import PretrainConfig, steps_per_epoch
from medssl.engines.handlers import MetricsJsonl
from medssl.engines.launch import is_launch_main_process, launch_world_size
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
    rank0 = is_launch_main_process()  # before the process group exists: under torchrun only rank 0 locks, cleans
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
                clear_run_outputs(run_dir)
        world = launch_world_size()
        backend = None if world <= 1 else ("nccl" if torch.cuda.is_available() else "gloo")
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(_train, config, resumed, progress)
    return run_dir


def clear_run_outputs(run_dir: Path) -> None:
    """Remove the outputs of an earlier run from ``run_dir`` (for ``--overwrite``); other files stay."""
    for name in ("metrics.jsonl", "config.json", "backbone.safetensors", "errors.jsonl", "resumes.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    for sub in ("checkpoints", "tb"):
        folder = run_dir / sub
        if folder.is_dir():
            for p in sorted(folder.rglob("*"), reverse=True):
                p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
            folder.rmdir()


def _train(local_rank: int, config: PretrainConfig, resumed: tuple | None, progress: bool) -> None:
    """One process of the run: build every component with :mod:`medssl.engines.components`, then train."""
    rank, world = idist.get_rank(), idist.get_world_size()
    device = torch.device(config.device) if config.device else idist.device()
    run_dir = Path(config.out)
    records = components.pretraining_records(config.data)
    per_epoch = steps_per_epoch(len(records), config.batch_size, world)
    if per_epoch < 1:
        raise MedsslError(f"{len(records)} images are fewer than one batch of {config.batch_size * world}",
                          config.data)
    resume = resumed is not None
    if not resume:
        config = components.resolve_pretrain_config(config, num_images=len(records), world_size=world)
    elif "iterations" in resumed[2]["overrides"]:
        config = dataclasses.replace(config, epochs=-(-int(config.iterations) // per_epoch))
    components.seed_everything(config.seed)  # identical initialisation on every rank
    if resume:  # the layout comes from the checkpoint's run record: the init file is never read again
        from medssl.engines.resume import rebuild_backbone

        backbone, spec, heads, reports, source = rebuild_backbone(resumed[2], resumed[1], resumed[0])
        backbone.medssl_origin = components.NetworkOrigin(spec, heads, reports, source)
        use_heads = bool(heads)
    else:
        backbone = components.build_network(**components.config_kwargs(config, components.build_network))
        origin = backbone.medssl_origin
        spec, reports, source = origin.input_normalization, origin.reports, origin.source
        use_heads = config.use_checkpoint_heads
        heads = origin.heads if use_heads else None
    method = components.build_ssl_method(**components.config_kwargs(
        config, components.build_ssl_method, network=backbone, use_checkpoint_heads=use_heads, device=device))
    optimizer = components.build_optimizer(method, **components.config_kwargs(
        config, components.build_optimizer, world_size=world))
    schedule = components.build_lr_scheduler(optimizer, **components.config_kwargs(
        config, components.build_lr_scheduler, steps_per_epoch=per_epoch, method=config.method))
    start = 0
    state = None
    if resume:
        ckpt, state, run_record = resumed[0], resumed[1], resumed[2]
        start = int(state["iteration"])
        logger.info("resuming %s from iteration %d", run_dir, start)
    components.seed_everything(config.seed + rank)  # per-rank randomness from here on
    skipped = set(state.get("skipped_records") or []) if state is not None else set()
    dataset = components.build_pretraining_dataset(**components.config_kwargs(
        config, components.build_pretraining_dataset, ssl_method=method, records=records))
    loader = components.build_pretraining_dataloader(dataset, **components.config_kwargs(
        config, components.build_pretraining_dataloader, start_step=start, device=device,
        errors_path=run_dir / "errors.jsonl", skipped=skipped))
    view_augment = components.build_view_augment(method, **components.config_kwargs(
        config, components.build_view_augment, device=device))
    metrics = MetricsJsonl(run_dir / "metrics.jsonl") if rank == 0 else None
    trainer = components.build_pretraining_trainer(
        method, optimizer, schedule, loader, **components.config_kwargs(
            config, components.build_pretraining_trainer, steps_per_epoch=per_epoch, device=device,
            view_augment=view_augment, collapse_sink=metrics.write if metrics else None,
            last_checkpoint=lambda: latest_checkpoint(run_dir)))
    # epoch-based method knobs (SwAV prototype freezing, queue start/length) as steps of this run: recorded
    config = dataclasses.replace(config, method_schedule=trainer.method_schedule)
    if state is not None:
        restore_training_state(state, method=method, optimizer=optimizer, scaler=trainer.grad_scaler,
                               schedule=schedule, rank=rank, world_size=world)
        trainer.state.iteration = start
        trainer.state.epoch = start // per_epoch
    if not resume:  # the run record (hash of config.json as written here) goes into every checkpoint
        from medssl.engines.resume import make_run_record

        config = components.record_network(config, backbone)  # the layout built (a checkpoint's real arch)
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
    writer = _attach_handlers(trainer, config, records, run_dir, metrics, rank, progress, spec=spec,
                              reports=reports, source=source, run_record=run_record)
    trainer.run()
    if writer is not None and trainer.state.iteration >= trainer.max_iterations \
            and not (run_dir / "backbone.safetensors").is_file():
        # killed after its last checkpoint but before the backbone file: a resume finishes the job
        writer.write(method, trainer.state.iteration, trainer.method_schedule)
    if world > 1:
        # rank 0 may still be in the kNN check or writing the backbone file: no rank tears the process group
        # down under another one's feet (gloo aborts a peer whose group vanishes mid-teardown)
        idist.barrier()


def _attach_handlers(trainer: PretrainingTrainer, config: PretrainConfig, records: list[dict[str, Any]],
                     run_dir: Path, metrics: MetricsJsonl | None, rank: int, progress: bool, *, spec: dict,
                     reports: list[dict], source: dict, run_record: dict[str, Any]) -> Any:
    """Checkpoints, kNN monitor, logs and the final backbone file (:mod:`medssl.engines.run_handlers`); returns
    rank 0's ``BackboneWriter`` (None on other ranks)."""
    from medssl.engines.run_handlers import BackboneWriter, KnnCheck, RunCheckpointer, RunLogs

    RunCheckpointer(run_dir, config, run_record).attach(trainer)
    logs = RunLogs(run_dir, metrics=metrics, log_every=config.log_every, progress=progress) if rank == 0 else None
    # the kNN monitor (rank 0 only), attached before the logs so its final check reaches TensorBoard
    KnnCheck(config, records, logs=logs).attach(trainer)
    if logs is None:
        return None
    logs.attach(trainer)
    writer = BackboneWriter(run_dir, config, spec=spec, reports=reports, source=source)
    writer.attach(trainer)
    return writer
