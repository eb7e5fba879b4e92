"""Pieces of a bundle's ``configs/inference.yaml``: image records -> backbone features in ``output_dir``.

The inference config is a MONAI ``SupervisedEvaluator`` over the bundle's deterministic pipeline whose network
is :class:`medssl.models.FeatureExtractor` (input normalisation + backbone) loaded from ``models/model.pt`` by
MONAI's ``CheckpointLoader``; :class:`FeatureWriter` collects the per-image features (``engine.state.output
["pred"]``, shape (B, D)) with the records' ids and writes ``<output_dir>/features.npz`` at the end:
``ids`` (N,) strings (pseudonymous record ids, never paths) and ``features`` (N, D) float32, in record order,
atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medssl.io import atomic_write_bytes


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``[{"image": (C, S, S), "id": ...}] -> {"image": (B, C, S, S), "id": [ids]}`` (labels are not needed)."""
    images = [s["image"] for s in samples]
    images = [torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x, dtype=torch.float32) for x in images]
    return {"image": torch.stack(images), "id": [str(s.get("id")) for s in samples]}


class FeatureWriter:
    """Collect ``pred`` (B, D) and the batch's ``id`` list each iteration; write ``features.npz`` at the end.

    Args:
        output_dir: folder of ``features.npz`` (created).
        filename: file name inside ``output_dir`` (default ``features.npz``).
    """

    def __init__(self, output_dir: str | os.PathLike[str], filename: str = "features.npz") -> None:
        self.path = Path(output_dir) / filename
        self.ids: list[str] = []
        self.features: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.ids, self.features = [], []

    def _collect(self, engine: Engine) -> None:
        pred = engine.state.output["pred"]
        self.features.append(torch.as_tensor(pred).detach().float().flatten(1).cpu().numpy())
        self.ids.extend(str(i) for i in engine.state.batch["id"])

    def _write(self, engine: Engine) -> None:
        features = np.concatenate(self.features) if self.features else np.zeros((0, 0), np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.asarray(self.ids, dtype=str), features=features.astype(np.float32))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buffer.getvalue())
