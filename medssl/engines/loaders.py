"""Data loader pieces of a pretraining run: the SSL view options, the bad-record guard of the SSL loader (built
by :mod:`medssl.engines.data_builders`) and the kNN monitor's labelled images (read once per run,
:func:`build_knn_images`).

Two augmentation paths (``PretrainConfig.augment_on``):

- ``"loader"`` (default): every view is cut and augmented per sample in the loader workers by the modality's
  MONAI pipeline (:func:`~medssl.transforms.presets.build_ssl_transform`); batches are
  ``{"views": [Tensor(B, 3, S, S)] * V}``.
- ``"device"``: the workers only read, scale, shrink (never enlarge) to at most ``base_size = 2 * image_size``
  and centre-crop each image (:func:`~medssl.transforms.batched.build_batched_base_transform`); batches are
  ``{"image": Tensor(B, C, s, s)}`` (C = 1 for grayscale, s <= 2S the batch's smallest stored side,
  :func:`~medssl.transforms.batched.stack_images`) and the trainer cuts the views on the training device with
  one kornia call per augmentation
  (:class:`~medssl.transforms.batched.BatchedSSLAugment`), seeded per optimizer step and rank so resumed runs
  stay exact. Worth it on a GPU when the workers cannot keep up; on CPU the per-sample path is usually faster.
  Non-square images lose their borders outside the centre square.

Unreadable records (:class:`GuardedRecords`, :class:`BadRecordGate`): a worker never raises for a record that
fails to load; it tries the next records ``(index + 1) mod N, (index + 2) mod N, ...`` (at most
``skip_bad_records`` of them, each with its own ``(epoch, index)`` key, so the replacement is deterministic and
resumed runs stay exact) and hands the failures to the main process with the batch. There, each distinct bad
record is counted and logged to ``RUN_DIR/errors.jsonl`` as ``{"iteration", "id", "reason"}`` (no path); once
more than ``skip_bad_records`` were skipped the run stops with one line naming the record's id and file
(with the default 0: at the first one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import label_index, split_reference_query
from medssl.engines.knn import LabelledImages
from medssl.engines.sampling import SeededSampleDataset
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.engines.loaders")


def view_options(config: PretrainConfig, method: nn.Module) -> dict[str, Any]:
    """Keyword arguments (``num_views``, ``multicrop``, ``view_recipe``) of the view pipelines for the method's
    number of views and view recipe (BYOL: its asymmetric pair)."""
    views = int(getattr(method, "views_required", 2))
    recipe = str(getattr(method, "view_recipe", "symmetric"))
    if config.method == "swav" and views > 2:
        local_size = int(config.method_options.get("local_crop_size", max(8, round(config.image_size * 96 / 224))))
        return {"num_views": 2, "multicrop": {"num_local": views - 2, "local_size": local_size},
                "view_recipe": recipe}
    return {"num_views": views, "view_recipe": recipe}


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``{"image": Tensor(C, s, s)}`` samples into ``{"image": Tensor(B, C, S, S)}`` (labels/ids dropped;
    :func:`~medssl.transforms.batched.stack_images`: the smallest side, nothing enlarged)."""
    from medssl.transforms.batched import stack_images

    return {"image": stack_images([s["image"] for s in samples])}


_BAD = "_bad_records"
_FAILED = "_load_failed"


def describe_load_failure(record: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """``{"id", "path", "reason"}`` of a record whose transform raised ``exc``; the reason holds no path."""
    from medssl.data.readers.load import find_record_error

    found = find_record_error(exc)
    if found is not None:
        reason = found.detail
    else:
        while exc.__cause__ is not None:  # MONAI's "applying transform ..." wrappers
            exc = exc.__cause__
        text = " ".join(str(getattr(exc, "reason", exc)).split())[:300]
        reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    path = record.get("image")
    if isinstance(path, str) and path:
        reason = reason.replace(path, "<file>").replace(Path(path).name, "<file>")
    return {"id": record.get("id"), "path": path, "reason": reason}


class GuardedRecords(Dataset):
    """``base[(epoch, index)]``, or the next loadable record when it fails (see the module docstring).

    Args:
        base: the seeded dataset.
        max_replacements: records tried after a failing one (``skip_bad_records``; 0 = none).

    A sample that needed replacements carries the failures under a private key; when every try failed the
    sample is only that report (:class:`BadRecordGate` raises in the main process).
    """

    def __init__(self, base: SeededSampleDataset, max_replacements: int = 0) -> None:
        self.base = base
        self.max_replacements = max(0, int(max_replacements))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        size = len(self.base)
        bad: list[dict[str, Any]] = []
        for offset in range(min(self.max_replacements + 1, size)):
            j = (index + offset) % size
            try:
                sample = self.base[(epoch, j)]
            except Exception as exc:  # noqa: BLE001 - reported (not raised) so the main process names the record
                bad.append(describe_load_failure(self.base.records[j], exc))
                continue
            return {**sample, _BAD: bad} if bad else sample
        return {_BAD: bad, _FAILED: True}


class GuardedCollate:
    """Collate with ``inner`` and pass the samples' load failures along under a private key."""

    def __init__(self, inner: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        bad = [entry for s in samples for entry in s.get(_BAD, ())]
        if any(s.get(_FAILED) for s in samples):
            return {_BAD: bad, _FAILED: True}
        batch = self.inner([{k: v for k, v in s.items() if k != _BAD} for s in samples])
        batch[_BAD] = bad
        return batch


class BadRecordGate:
    """Iterate a guarded loader in the main process: log and count skipped records, stop past the limit.

    Args:
        loader: a DataLoader over :class:`GuardedRecords` with :class:`GuardedCollate`.
        limit: ``skip_bad_records``.
        start_step: optimizer steps already done (the first batch is iteration ``start_step + 1``).
        errors_path: the run's ``errors.jsonl`` (None: not logged).
        skipped: ids already skipped (restored from the checkpoint); updated in place.
        rank: written with each line when several processes train.
    """

    def __init__(self, loader: DataLoader, *, limit: int = 0, start_step: int = 0,
                 errors_path: str | Path | None = None, skipped: set[Any] | None = None,
                 rank: int | None = None) -> None:
        self.loader = loader
        self.limit = int(limit)
        self.step = int(start_step)
        self.errors_path = Path(errors_path) if errors_path is not None else None
        self.skipped = skipped if skipped is not None else set()
        self.rank = rank

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.step += 1
            bad = batch.pop(_BAD, [])
            for entry in bad:
                self._count(entry)
            if batch.get(_FAILED):
                raise self._error(bad[-1], "no loadable replacement found")
            yield batch

    def _count(self, entry: dict[str, Any]) -> None:
        key = entry["id"] if entry.get("id") is not None else entry.get("path")
        if key in self.skipped:
            return
        self.skipped.add(key)
        if self.errors_path is not None:
            line = {"iteration": self.step, "id": entry.get("id"), "reason": entry["reason"]}
            if self.rank is not None:
                line["rank"] = self.rank
            with self.errors_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        if len(self.skipped) > self.limit:
            raise self._error(entry, None)

    def _error(self, entry: dict[str, Any], why: str | None) -> MedsslError:
        what = f"record {entry.get('id')!r} cannot be loaded ({entry['reason']})"
        if self.limit > 0:
            what = (f"more than {self.limit} unreadable records (--skip-bad-records {self.limit})"
                    f"{'; ' + why if why else ''}; the last: {what}")
        return MedsslError(what, entry.get("path"))


def build_knn_images(config: PretrainConfig, records: list[dict[str, Any]],
                     transform: Callable[[dict[str, Any]], Any] | None = None,
                     ) -> tuple[LabelledImages, LabelledImages, int] | None:
    """The kNN monitor's reference and query images and the number of classes, or None when there are not two
    labelled classes and five labelled images.

    Args:
        config: ``knn_data``, ``knn_max_images``, ``seed``, ``workers``, ``batch_size``, ``modality``,
            ``image_size``.
        records: the run's records (their labelled ones are used unless ``config.knn_data`` is set).
        transform: the deterministic pipeline ``record -> {"image": float Tensor(C, S, S) in [0, 1], "label",
            ...}`` (C = 1 or 3; one S for all), e.g. a bundle's ``validate#preprocessing``, so editing that
            pipeline changes what the monitor sees; None = the library preset
            :func:`~medssl.transforms.presets.build_eval_transform` of ``config.modality`` at ``image_size``.

    Each :class:`~medssl.engines.knn.LabelledImages` reads its records through ``transform`` once, at the
    monitor's first check (a loader with ``config.workers`` workers; an unreadable record stops the run with its
    id and file), and keeps them in memory as uint8 (at most ``knn_max_images`` images, N x 3 x S x S bytes).
    """
    from medssl.data.sources import records_from_path
    from medssl.transforms.presets import build_eval_transform

    labelled = records_from_path(config.knn_data) if config.knn_data else records
    labelled = [r for r in labelled if r.get("label") is not None]
    if len({str(r["label"]) for r in labelled}) < 2 or len(labelled) < 5:
        logger.warning("kNN monitor off: fewer than two labelled classes or five labelled images")
        return None
    if len(labelled) > config.knn_max_images:
        keep = np.random.default_rng(config.seed).choice(len(labelled), config.knn_max_images, replace=False)
        labelled = [labelled[i] for i in sorted(keep)]
    ref, qry = split_reference_query(labelled, config.seed)
    classes = label_index([str(r["label"]) for r in labelled])
    if transform is None:
        transform = build_eval_transform(config.modality, config.image_size)

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([torch.as_tensor(s["image"]) for s in samples]),
                "label": torch.tensor([classes[str(s["label"])] for s in samples])}

    def images(recs: list[dict[str, Any]]) -> LabelledImages:
        def batches() -> BadRecordGate:  # an unreadable record stops with its id and file
            ds = GuardedRecords(SeededSampleDataset(recs, transform, seed=config.seed))
            return BadRecordGate(DataLoader(ds, batch_size=max(config.batch_size, 64), shuffle=False,
                                            num_workers=config.workers, collate_fn=GuardedCollate(collate),
                                            generator=torch.Generator().manual_seed(config.seed)))

        return LabelledImages(batches, len(recs))

    return images(ref), images(qry), len(classes)
