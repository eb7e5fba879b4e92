"""Pretraining engine: MONAI/Ignite trainer, checkpoints with exact resume, monitors, optimizers, schedules.

Modules (import what you need; nothing heavy is imported here):

- :mod:`medssl.engines.config`: :class:`~medssl.engines.config.PretrainConfig` (every knob, paper defaults).
- :mod:`medssl.engines.components`: the builders of a run's components (network, SSL method, optimizer,
  schedule, dataset, loader, trainer) that the CLI and the bundles share; :mod:`medssl.engines.data_builders`
  holds the data ones.
- :mod:`medssl.engines.run_handlers`: run-folder handlers with ``attach(engine)`` (checkpoints, logs, backbone).
- :mod:`medssl.engines.launch`: the launcher's rank/world size before the process group exists.
- :mod:`medssl.engines.run`: :func:`~medssl.engines.run.run_pretraining` (config -> RUN_DIR).
- :mod:`medssl.engines.trainer`: :class:`~medssl.engines.trainer.PretrainingTrainer` (one SSL step per iteration).
- :mod:`medssl.engines.checkpoint`: atomic checkpoints, RNG capture, resume.
- :mod:`medssl.engines.sampling`: data order and augmentation seeds as pure functions of (seed, epoch, index).
- :mod:`medssl.engines.handlers`: metrics.jsonl, TensorBoard, progress bar, kNN and collapse monitors, NaN guard.
- :mod:`medssl.engines.diskfull`: a full disk while appending metrics.jsonl or TensorBoard events as one line
  ``disk full writing PATH``.
- :mod:`medssl.engines.loaders`: the SSL view loader and the guard that names (or, with ``skip_bad_records``,
  skips and logs) a record that fails to load.
- :mod:`medssl.engines.resume`: ``--resume`` without trust escalation (the run record, config/checkpoint hashes,
  options applied or refused).
- :mod:`medssl.engines.runlock`: the run-folder lock (a second run gets one line naming the holder).
- :mod:`medssl.engines.scores`: the one balanced accuracy (sklearn's) used by the kNN monitor and evaluation.
- :mod:`medssl.engines.optim`: SGD/Adam/AdamW/LARS over each method's groups (weight decay and LARS exclusions as
  the method's paper or code sets them).
- :mod:`medssl.engines.schedules`: per-iteration warmup + cosine learning rate.
- :mod:`medssl.engines.knn`: ``weighted_knn_predict`` (the one kNN vote; evaluation re-exports it) and the kNN
  monitor's images read once per run (``LabelledImages``).
"""
