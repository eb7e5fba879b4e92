"""``RunFolder``: the run folder of a config-driven pretraining run (a bundle's ``configs/train.yaml``), with the
same guarantees as ``medssl pretrain``:

- **one writer**: the folder is locked (:class:`~medssl.engines.runlock.RunLock`, rank 0) by :meth:`RunFolder.open`
  (a bundle's ``initialize``, after the data check and before any component writes) until the run ends; a
  second run fails with one line naming the holder. Temporaries left by a killed atomic write are removed once
  the lock is held. Parsing a config (e.g. its transforms) takes no lock.
- **a new run** needs an empty folder (``overwrite``: its old outputs are removed) and writes ``config.json``
  (the resolved settings, atomically); every checkpoint carries the run record
  (:func:`medssl.engines.resume.make_run_record`: SHA-256 of those settings, the backbone's layout and origin).
- **a resume never escalates trust**: it reads ``config.json`` and the newest checkpoint (weights only) and
  nothing else; :func:`medssl.engines.resume.resume_config` checks that they belong together. The settings
  this invocation gives that differ from both the defaults and the recorded ones
  (:func:`medssl.engines.resume.given_options`) are applied when a resume can apply them
  (:data:`~medssl.engines.resume.RESUMABLE`: iterations, lr, workers, ...; logged to ``resumes.jsonl``) or
  refused in one line. The backbone is rebuilt from the run record (:meth:`RunFolder.rebuilt_backbone`): the
  init file is not read again, so ``init`` and ``trust`` are never acted upon. The skipped-record state
  (``--skip-bad-records``) continues from the checkpoint.

Use (``train.yaml``): ``initialize: $@records and @run_folder.open()`` (the data checked, then the folder
taken); ``resolved: $@run_folder.settings(@pretrain_config, num_images=len(@records))`` is the run's
configuration; ``@run_folder`` is the first of ``train#handlers`` (restores the checkpoint, writes
``config.json`` / ``resumes.jsonl``, attaches :class:`~medssl.engines.run_handlers.RunCheckpointer`, releases
the lock when the run fails); ``finalize: $@run_folder.close()`` releases it after the run. Rank and world size
come from ``ignite.distributed``; only which process locks is decided from the launcher
(:mod:`medssl.engines.launch`), as the lock is taken before anything else touches the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Events
from torch import nn

from medssl.engines.config import PretrainConfig
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.engines.run_folder")


class RunFolder:
    """The run folder ``run_dir`` of one invocation (see the module docstring).

    Args:
        run_dir: RUN_DIR.
        resume: continue the run in ``run_dir`` from its newest checkpoint.
        overwrite: allow a non-empty ``run_dir`` for a new run (its old checkpoints and logs are removed).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.checkpoint: Path | None = None
        self.state: dict[str, Any] | None = None
        self.record: dict[str, Any] | None = None
        self.given: dict[str, Any] = {}
        self.config: PretrainConfig | None = None
        self._lock: Any = None
        self._opened = False
        self._skipped: set[Any] | None = None

    @property
    def start_step(self) -> int:
        """Optimizer steps already done: the resumed checkpoint's iteration, else 0."""
        return int(self.state["iteration"]) if self.state is not None else 0

    @property
    def skipped_records(self) -> set[Any]:
        """Ids of the unreadable records skipped so far (from the resumed checkpoint), updated by the loader."""
        if self._skipped is None:
            self._skipped = set(self.state.get("skipped_records") or []) if self.state is not None else set()
        return self._skipped

    def open(self) -> RunFolder:
        """Take the folder before anything writes to it (the bundle's ``initialize``; idempotent): the lock (rank
        0), stale temporaries removed, and for a new run the check that the folder is empty (``overwrite``: old
        outputs removed). Under ``torchrun`` every rank waits until rank 0 has done so.

        Raises:
            MedsslError: folder locked by another run (names the holder), a new run in a non-empty folder, a
                resume without ``config.json``.
        """
        if self._opened:
            return self
        from medssl.engines.launch import is_launch_main_process
        from medssl.engines.runlock import LOCK_NAME, RunLock
        from medssl.io import clean_stale_tmp

        if self.resume and not (self.run_dir / "config.json").is_file():
            raise MedsslError("no config.json: not a medssl pretraining run folder", self.run_dir)
        main = is_launch_main_process()
        if main:
            self._lock = RunLock(self.run_dir).acquire()
        try:
            if main:
                for folder in (self.run_dir, self.run_dir / "checkpoints"):
                    clean_stale_tmp(folder, any_writer=True)  # we hold the lock: nobody else writes here
                if not self.resume and any(p.name != LOCK_NAME for p in self.run_dir.iterdir()):
                    if not self.overwrite:
                        raise MedsslError("run folder is not empty; use --resume True to continue it or "
                                          "--overwrite True", self.run_dir)
                    from medssl.engines.run import clear_run_outputs

                    clear_run_outputs(self.run_dir)
            if idist.get_world_size() > 1:
                idist.barrier()  # no rank goes on before rank 0 has checked and cleared the folder
        except BaseException:
            self.release()
            raise
        self._opened = True
        return self

    def settings(self, config: PretrainConfig, *, num_images: int) -> PretrainConfig:
        """The run's configuration (read-only: parsing a config takes no lock; :meth:`open` does).

        New run: ``config`` with every method default filled in for ``num_images`` images
        (:func:`medssl.engines.components.resolve_pretrain_config`). Resume: the newest checkpoint is loaded
        (weights only) and the recorded settings are verified against it, with the resumable options of
        ``config`` applied (``iterations`` re-spans the schedule: ``epochs = ceil(iterations / steps_per_epoch)``).

        Raises:
            MedsslError: nothing to resume, config.json not belonging to the checkpoint, options a resume cannot
                apply, fewer images than one global batch.
        """
        if self.config is not None:
            return self.config
        if not self.resume:
            from medssl.engines.components import resolve_pretrain_config

            self.config = resolve_pretrain_config(config, num_images=num_images)
            return self.config
        from medssl.engines.checkpoint import latest_checkpoint, load_checkpoint_file
        from medssl.engines.config import steps_per_epoch
        from medssl.engines.resume import resume_config

        try:  # a refused resume releases the folder at once
            if not (self.run_dir / "config.json").is_file():
                raise MedsslError("no config.json: not a medssl pretraining run folder", self.run_dir)
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise MedsslError("no checkpoint to resume from in checkpoints/", self.run_dir)
            self.checkpoint, self.state = ckpt, load_checkpoint_file(ckpt)
            resumed, self.record, self.given = resume_config(self.run_dir, self.state, ckpt,
                                                             requested=dataclasses.replace(config, out=""))
        except BaseException:
            self.release()
            raise
        if "iterations" in self.record["overrides"]:
            per_epoch = steps_per_epoch(num_images, resumed.batch_size, idist.get_world_size())
            resumed = dataclasses.replace(resumed, epochs=-(-int(resumed.iterations) // max(per_epoch, 1)))
        self.config = resumed
        logger.info("resuming %s from iteration %d", self.run_dir, self.start_step)
        return resumed

    def rebuilt_backbone(self) -> nn.Module:
        """The resumed run's backbone (layout only: the weights come from the checkpoint) with its input
        normalisation, imported heads, preparation reports and init source as ``medssl_origin``, rebuilt from
        the checkpoint's run record (:func:`medssl.engines.resume.rebuild_backbone`) without reading the init
        file."""
        from medssl.engines.components import NetworkOrigin
        from medssl.engines.resume import rebuild_backbone

        if self.record is None:
            raise MedsslError("the run's settings must be read (RunFolder.settings) before its backbone is rebuilt",
                              self.run_dir)
        backbone, spec, heads, reports, source = rebuild_backbone(self.record, self.state, self.checkpoint)
        backbone.medssl_origin = NetworkOrigin(spec, heads, reports, source)
        return backbone

    def attach(self, engine: Any) -> None:
        """First handler of the trainer: restore the checkpoint (resume) or make the run record (new run), write
        ``config.json`` / ``resumes.jsonl`` and truncate the logs after the resumed step (rank 0), then attach
        the exact-resume :class:`~medssl.engines.run_handlers.RunCheckpointer` (and release the lock if the
        run fails)."""
        from medssl.engines.checkpoint import latest_checkpoint, restore_training_state
        from medssl.engines.components import network_origin, record_network
        from medssl.engines.handlers import MetricsJsonl
        from medssl.engines.resume import log_resume, make_run_record
        from medssl.engines.run_handlers import RunCheckpointer
        from medssl.io import atomic_write_json

        if self.config is None:
            raise MedsslError("the run's settings must be read (RunFolder.settings) before the trainer is built",
                              self.run_dir)
        self.open()
        schedule = getattr(engine, "method_schedule", None)
        config = dataclasses.replace(self.config, method_schedule=schedule or self.config.method_schedule)
        rank, world = idist.get_rank(), idist.get_world_size()
        start = self.start_step
        if self.resume:
            restore_training_state(self.state, method=engine.method, optimizer=engine.optimizer,
                                   scaler=engine.grad_scaler, schedule=engine.schedule, rank=rank, world_size=world)
            engine.state.iteration = start
            engine.state.epoch = start // engine.state.epoch_length
            record = self.record
        else:
            origin = network_origin(engine.method.backbone)
            config = record_network(config, engine.method.backbone)  # the layout built
            record = make_run_record(config, backbone=engine.method.backbone, spec=origin.input_normalization,
                                     heads=origin.heads if config.use_checkpoint_heads else None,
                                     reports=origin.reports, source=origin.source)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume:  # config.json stays the run-start record; this resume's changes go to resumes.jsonl
                MetricsJsonl(self.run_dir / "metrics.jsonl").truncate_after(start)
                MetricsJsonl(self.run_dir / "errors.jsonl").truncate_after(start)
                log_resume(self.run_dir, iteration=start, checkpoint=self.checkpoint, applied=self.given)
            else:
                atomic_write_json(self.run_dir / "config.json", config.to_dict())
        if world > 1:
            idist.barrier()  # logs truncated before any rank appends to them
        engine.last_checkpoint = lambda: latest_checkpoint(self.run_dir)  # named by the non-finite loss guard
        RunCheckpointer(self.run_dir, config, record).attach(engine)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        self.config = config

    def _failed(self, engine: Any, error: BaseException) -> None:
        """A failed run releases the lock at once, then the error goes on (Ignite re-raises nothing itself once
        an ``EXCEPTION_RAISED`` handler exists)."""
        self.release()
        raise error

    def close(self) -> None:
        """Wait for every process (``torchrun``: no rank exits while rank 0 writes), then release the lock."""
        if self._opened and idist.get_world_size() > 1:
            idist.barrier()
        self._opened = False
        self.release()

    def release(self) -> None:
        """Release the lock (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __del__(self) -> None:  # an instantiation error after the lock was taken: the object's end frees it
        with contextlib.suppress(Exception):
            self.release()
