"""Ignite handlers of a pretraining run: metrics.jsonl (every line stamped with its UTC wall clock),
TensorBoard, progress bar, images/s + ETA log lines (:class:`Throughput`), kNN and collapse monitors (threshold
measured: :data:`COLLAPSE_THRESHOLD`), and the non-finite loss guard.

Only rank 0 writes files; every handler here is attached by :mod:`medssl.engines.run` on rank 0 only. The kNN
monitor runs on rank 0 alone as well (its forward pass uses the backbone directly, no collective operation; the
other ranks wait at their next step); it reads its labelled images once per run invocation and then only runs the
forward pass (:class:`~medssl.engines.knn.LabelledImages`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from medssl.engines.diskfull import DiskFullGuardedWriter, raise_if_disk_full
from medssl.engines.knn import LabelledImages, image_features, weighted_knn_predict
from medssl.engines.scores import balanced_accuracy
from medssl.errors import MedsslError
from medssl.io import atomic_write_text
from medssl.models.extractor import FeatureExtractor

logger = logging.getLogger("medssl.engines.handlers")

#: keys of the per-iteration engine output written to metrics.jsonl / TensorBoard when present
#: (``queue_filled``: SwAV's queue; ``skipped_step``: 1 when the fp16 GradScaler skipped the optimizer step)
SCALAR_KEYS = ("loss", "lr", "tau", "collapse_std", "queue_filled", "skipped_step")


class NonFiniteLossError(MedsslError):
    """The loss became NaN or infinite; the run stopped before applying the step."""


def check_finite_loss(loss: torch.Tensor, *, iteration: int, epoch: int, last_checkpoint: Path | None) -> None:
    """Raise :class:`NonFiniteLossError` naming the iteration when ``loss`` is NaN or +-Inf.

    Called before ``backward``/``optimizer.step``, so the weights in memory and on disk stay finite.
    """
    value = float(loss.detach().float())
    if math.isfinite(value):
        return
    where = (f"the last good checkpoint {last_checkpoint} is untouched; continue from it with --resume "
             "(after lowering the learning rate or using fp32/bf16)") if last_checkpoint else \
        "no checkpoint had been written yet"
    raise NonFiniteLossError(f"loss is {value} at iteration {iteration} (epoch {epoch}); training stopped "
                             f"before updating the weights; {where}")


def collapse_statistic(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised embeddings (SimSiam paper, Fig. 2).

    For embeddings (N, D): about ``1/sqrt(D)`` when they spread over the sphere, 0 when collapsed to one
    point. Uses the unbiased std (``torch.std``), like the SimSiam paper's monitor.
    """
    z = F.normalize(embeddings.detach().float().flatten(1), dim=1)
    return float(z.std(dim=0).mean())


#: warning threshold of :class:`CollapseMonitor`, as a fraction of the healthy value ``1/sqrt(D)``. Measured
#: (``collapse_statistic * sqrt(D)``, 256 embeddings, D = 64, 128, 512, 2048; the figures barely move with D):
#: healthy: isotropic Gaussian 0.999; projections at initialisation of the four methods' heads on a ResNet-18
#: (widen 0.25, small stem, 32-px images) 0.82-0.85 (SimCLR, BYOL, SwAV) and 1.01 (SimSiam, BatchNorm last);
#: collapsed: constant embeddings (+1e-3 relative noise) 0.001; rank-1 ``a_i v`` (a_i in [0.5, 1.5]) plus
#: isotropic noise of 1 % / 10 % / 30 % of the signal norm: 0.012 / 0.11 / 0.32. The threshold 0.3 is the
#: geometric mean of the highest collapsed value with at most 10 % noise (0.114) and the lowest healthy value
#: (0.816), rounded: it flags embeddings within about 30 % of one direction and never a healthy head.
COLLAPSE_THRESHOLD = 0.3


class CollapseMonitor:
    """Flag collapse: warn when :func:`collapse_statistic` < ``threshold / sqrt(D)``.

    Args:
        threshold: fraction of the healthy value ``1/sqrt(D)`` below which a warning is logged (default
            :data:`COLLAPSE_THRESHOLD` = 0.3, set from the measurement documented there).
        sink: called with a dict ``{"iteration", "epoch", "warning": "collapse", "collapse_std",
            "healthy_std"}`` for every flagged iteration (metrics.jsonl).
    """

    def __init__(self, threshold: float = COLLAPSE_THRESHOLD,
                 sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.threshold = threshold
        self.sink = sink
        self.flags: list[dict[str, Any]] = []

    def update(self, embeddings: torch.Tensor, *, iteration: int, epoch: int) -> float:
        """Compute the statistic for one batch; record and log a warning when it is below the threshold."""
        value = collapse_statistic(embeddings)
        healthy = 1.0 / math.sqrt(embeddings.shape[1])
        if value < self.threshold * healthy:
            event = {"iteration": iteration, "epoch": epoch, "warning": "collapse", "collapse_std": value,
                     "healthy_std": healthy}
            if not self.flags or self.flags[-1]["iteration"] < iteration - 1:
                logger.warning("possible collapse at iteration %d: embedding std %.3g (healthy about %.3g)",
                               iteration, value, healthy)
            self.flags.append(event)
            if self.sink is not None:
                self.sink(event)
        return value


def utc_timestamp() -> str:
    """Now, wall clock, ISO 8601 in UTC with milliseconds (``2026-01-31T12:00:00.123+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def format_duration(seconds: float) -> str:
    """Seconds -> ``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class Throughput:
    """Images/s and ETA of a loop, as log lines that do not need a progress bar.

    :meth:`update` is called after each step with the images it processed; it returns (and logs at INFO on
    ``logger``) ``"<what> step i/N: R images/s, ETA H:MM:SS"`` every ``every_steps`` steps, or sooner once
    ``every_seconds`` (default 30 s) have passed since the last line, and after the last step. R: images since
    the previous line / seconds since then; ETA: remaining steps x mean seconds per step since the first update.

    Args:
        what: label of the loop (``pretraining``, ``train features``, ...).
        total_steps: N; ``start_step``: steps already done before this invocation (a resumed run).
        clock: seconds (default :func:`time.monotonic`; tests pass a fake one).
    """

    def __init__(self, what: str, total_steps: int, *, start_step: int = 0, every_steps: int = 50,
                 every_seconds: float = 30.0, log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total_steps, self.start_step = what, int(total_steps), int(start_step)
        self.every_steps, self.every_seconds = max(1, int(every_steps)), float(every_seconds)
        self.log = log or logger
        self.clock = clock
        self.t0 = self.t_last = clock()
        self.step_last = self.start_step
        self.images = 0

    def update(self, step: int, images: int, extra: str = "") -> str | None:
        """Count ``images`` for (1-based, cumulative) ``step``; the log line when one is due, else None."""
        self.images += int(images)
        now = self.clock()
        due = (step - self.step_last >= self.every_steps or now - self.t_last >= self.every_seconds
               or step >= self.total_steps)
        if not due:
            return None
        rate = self.images / max(now - self.t_last, 1e-9)
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        line = (f"{self.what} step {step}/{self.total_steps}: {rate:.1f} images/s, "
                f"ETA {format_duration(per_step * max(self.total_steps - step, 0))}{extra}")
        self.log.info("%s", line)
        self.t_last, self.step_last, self.images = now, step, 0
        return line


def batch_images(batch: Any) -> int:
    """Images in one batch: the first dimension of its first tensor (views of a dict / list), 0 if none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 0
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_images(value)
        if n:
            return n
    return 0


def engine_total_steps(engine: Engine) -> int:
    """Steps of the whole run: ``engine.max_iterations`` (medssl trainer), else ``state.max_iters``, else
    ``epoch_length * max_epochs`` (0 when unknown)."""
    state = engine.state
    total = getattr(engine, "max_iterations", None) or getattr(state, "max_iters", None)
    if not total and state.epoch_length and state.max_epochs:
        total = state.epoch_length * state.max_epochs
    return int(total or 0)


def attach_throughput_log(engine: Engine, *, total_steps: int | None = None, world_size: int = 1,
                          every_steps: int = 50, every_seconds: float = 30.0, what: str = "pretraining") -> None:
    """Log images/s (all processes: one batch x ``world_size``) and ETA of a training engine (``what``:
    pretraining, fine-tuning) through :class:`Throughput`, starting at the step the invocation begins from (a
    resume). ``total_steps`` None: :func:`engine_total_steps` at the first step."""
    state: dict[str, Throughput] = {}

    @engine.on(Events.ITERATION_COMPLETED)
    def _tick(eng: Engine) -> None:
        if "meter" not in state:
            total = total_steps if total_steps is not None else engine_total_steps(eng)
            state["meter"] = Throughput(what, total, start_step=eng.state.iteration - 1,
                                        every_steps=every_steps, every_seconds=every_seconds)
        out = eng.state.output or {}
        loss = f", loss {float(out['loss']):.4g}" if isinstance(out, dict) and out.get("loss") is not None else ""
        state["meter"].update(eng.state.iteration, batch_images(eng.state.batch) * world_size, extra=loss)


class MetricsJsonl:
    """Append JSON lines to ``RUN_DIR/metrics.jsonl`` (one object per event, docs/architecture.md)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line, stamped with ``"time"`` (wall clock, ISO 8601 UTC to the millisecond, e.g.
        ``2026-01-31T12:00:00.123+00:00``) unless it has one; a full disk raises one line ``disk full writing
        PATH`` (a partial last line is dropped by :meth:`truncate_after` when the run resumes)."""
        record = {**record, "time": record.get("time") or utc_timestamp()}
        line = json.dumps(record) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            raise_if_disk_full(self.path, exc)
            raise

    def truncate_after(self, iteration: int) -> None:
        """Drop lines logged after ``iteration`` (a resumed run re-does those steps)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("iteration", 0)) <= iteration:
                    kept.append(line)
            except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
                continue
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))


def attach_iteration_logging(engine: Engine, metrics: MetricsJsonl, every: int = 1) -> None:
    """Write ``{"iteration", "epoch", "loss", "lr", "tau", ...}`` to metrics.jsonl every ``every`` steps."""

    @engine.on(Events.ITERATION_COMPLETED(every=max(1, every)))
    def _log(eng: Engine) -> None:
        out = eng.state.output or {}
        record: dict[str, Any] = {"iteration": eng.state.iteration, "epoch": eng.state.epoch}
        record.update({k: float(out[k]) for k in SCALAR_KEYS if out.get(k) is not None})
        record.setdefault("tau", None)
        metrics.write(record)


def attach_tensorboard(engine: Engine, log_dir: str | Path, every: int = 1) -> Any:
    """Log loss, lr, tau and the collapse statistic to TensorBoard under ``train/``; returns the logger.

    Its writer is a :class:`~medssl.engines.diskfull.DiskFullGuardedWriter`: a full disk stops the run with
    ``disk full writing FILE``.
    """
    from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger

    try:
        tb = TensorboardLogger(log_dir=str(log_dir))
    except OSError as exc:
        raise_if_disk_full(log_dir, exc)
        raise
    tb.writer = DiskFullGuardedWriter(tb.writer, log_dir)
    tb.attach(
        engine,
        log_handler=OutputHandler(
            tag="train",
            output_transform=lambda out: {k: float(out[k]) for k in SCALAR_KEYS if out.get(k) is not None},
        ),
        event_name=Events.ITERATION_COMPLETED(every=max(1, every)),
    )
    return tb


def attach_progress_bar(engine: Engine) -> None:
    """A tqdm progress bar (stderr) showing the loss."""
    from ignite.handlers import ProgressBar

    ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": float(out["loss"])})


class KnnMonitor:
    """Weighted-kNN balanced accuracy of the backbone's features on a labelled reference/query pair.

    Args:
        backbone: the network being trained (put in eval mode during the forward pass, then restored).
        normalization: the run's :class:`~medssl.models.InputNormalization`.
        reference, query: :class:`~medssl.engines.knn.LabelledImages`; read once, at the first check of the
            run invocation, then kept in memory (each check only runs the forward pass).
        num_classes: number of classes.
        device: where to run.
        k, temperature: kNN settings (default 20, 0.07; see :func:`~medssl.engines.knn.weighted_knn_predict`).
        channels_last: feed channels-last tensors like the training step.
        batch_size: images per forward pass (default 64).
    """

    def __init__(self, backbone: nn.Module, normalization: nn.Module, reference: LabelledImages,
                 query: LabelledImages, *, num_classes: int, device: torch.device, k: int = 20,
                 temperature: float = 0.07, channels_last: bool = False, batch_size: int = 64) -> None:
        self.featurizer = FeatureExtractor(backbone, normalization, channels_last=channels_last)
        self.reference = reference
        self.query = query
        self.num_classes = num_classes
        self.device = device
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size

    def __call__(self) -> float:
        """Balanced accuracy (:func:`medssl.engines.scores.balanced_accuracy`) of the kNN predictions on the queries."""
        ref_images, ref_y = self.reference.tensors()
        qry_images, qry_y = self.query.tensors()
        ref_x = image_features(self.featurizer, ref_images, self.device, batch_size=self.batch_size)
        qry_x = image_features(self.featurizer, qry_images, self.device, batch_size=self.batch_size)
        pred, _ = weighted_knn_predict(ref_x, ref_y, qry_x, k=self.k, temperature=self.temperature,
                                       num_classes=self.num_classes)
        return balanced_accuracy(qry_y, pred, self.num_classes)


def attach_knn_monitor(engine: Engine, monitor: KnnMonitor, *, every_epochs: int, max_iterations: int,
                       sinks: Sequence[Callable[[dict[str, Any]], None]]) -> None:
    """Run ``monitor`` every ``every_epochs`` epochs and at the end of the run; send the result to ``sinks``."""
    done: set[int] = set()

    def _run(eng: Engine) -> None:
        if eng.state.iteration in done:
            return
        done.add(eng.state.iteration)
        value = monitor()
        record = {"iteration": eng.state.iteration, "epoch": eng.state.epoch, "knn_balanced_accuracy": value}
        logger.info("kNN balanced accuracy at iteration %d: %.4f", eng.state.iteration, value)
        for sink in sinks:
            sink(record)

    engine.add_event_handler(Events.EPOCH_COMPLETED(every=max(1, every_epochs)), _run)

    @engine.on(Events.COMPLETED)
    def _final(eng: Engine) -> None:
        if eng.state.iteration >= max_iterations:
            _run(eng)


def label_index(labels: Sequence[str]) -> dict[str, int]:
    """Map label strings to class indices 0..K-1 in sorted order."""
    return {name: i for i, name in enumerate(sorted(set(labels)))}


def split_reference_query(records: Sequence[dict[str, Any]], seed: int) -> tuple[list[dict], list[dict]]:
    """Reference (kNN memory) and query records of a labelled set.

    Records with ``split == "val"`` are the queries when there are any (test records are never used);
    otherwise a stratified 80/20 split with ``seed`` (scikit-learn ``train_test_split``).
    """
    from sklearn.model_selection import train_test_split

    usable = [r for r in records if r.get("label") is not None and r.get("split") != "test"]
    queries = [r for r in usable if r.get("split") == "val"]
    if queries:
        return [r for r in usable if r.get("split") != "val"], queries
    labels = [str(r["label"]) for r in usable]
    try:
        ref, qry = train_test_split(usable, test_size=0.2, random_state=seed, stratify=labels)
    except ValueError:  # a class with one image, or fewer queries than classes: plain random split
        ref, qry = train_test_split(usable, test_size=0.2, random_state=seed)
    return list(ref), list(qry)
