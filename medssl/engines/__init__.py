"""Pretraining engine: MONAI/Ignite trainer, checkpoints with exact resume, monitors, optimizers, schedules.

Modules (import what you need; nothing heavy is imported here):

- :mod:`medssl.engines.config`: :class:`~medssl.engines.config.PretrainConfig` (every knob, paper defaults).
- :mod:`medssl.engines.run`: :func:`~medssl.engines.run.run_pretraining` (config -> RUN_DIR).
- :mod:`medssl.engines.trainer`: :class:`~medssl.engines.trainer.PretrainingTrainer` (one SSL step per iteration).
- :mod:`medssl.engines.checkpoint`: atomic checkpoints, RNG capture, resume.
- :mod:`medssl.engines.sampling`: data order and augmentation seeds as pure functions of (seed, epoch, index).
- :mod:`medssl.engines.handlers`: metrics.jsonl, TensorBoard, progress bar, kNN and collapse monitors, NaN guard.
- :mod:`medssl.engines.optim`: SGD/Adam/AdamW/LARS with bias and norm parameters excluded.
- :mod:`medssl.engines.schedules`: per-iteration warmup + cosine learning rate.
- :mod:`medssl.engines.knn`: ``extract_features`` and ``weighted_knn_predict`` (shared with evaluation).
"""
