"""Frozen-backbone feature extraction with a two-level cache (in memory and ``.npy`` files on disk).

The cache key combines a SHA-256 of the backbone's parameters and buffers (and its input normalisation), the
manifest hash, a description of the eval transform and the ordered record ids, so a cached array is only reused
for exactly the same network, data and preprocessing. Files: ``<cache_dir>/<key>.npy`` (float32, (N, D)) and
``<key>.json`` (the ids, in row order, and what the key was built from).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn
from tqdm.auto import tqdm

from medssl.io import atomic_open, atomic_write_json

log = logging.getLogger("medssl.evaluation.features")

_MEMORY_CACHE: dict[str, np.ndarray] = {}


def module_sha256(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``module``."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def feature_cache_key(model_hash: str, manifest_hash: str, transform_desc: str, ids: Sequence[str]) -> str:
    """A 24-hex-digit key for one (network, manifest, transform, record list) combination."""
    digest = hashlib.sha256()
    for part in (model_hash, manifest_hash, transform_desc, "\n".join(ids)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def make_loader(
    records: Sequence[Mapping[str, Any]],
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A MONAI DataLoader over ``records`` mapped by ``transform`` (record -> {"image", "label", "id"}).

    A record that fails to load stops the iteration with one line naming its id and file
    (:class:`~medssl.evaluation.loading.RecordLoader`), with or without loader workers.
    """
    from medssl.evaluation.loading import RecordLoader

    return RecordLoader(records, transform, batch_size, shuffle=shuffle, num_workers=num_workers)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> np.ndarray:
    """Run ``model`` in eval mode over ``loader``; returns float32 features (N, D) in loader order.

    The model's training flag is restored afterwards; no parameter or buffer changes (no grad, eval-mode BN).
    """
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            images = batch["image"] if isinstance(batch, Mapping) else batch[0]
            chunks.append(model(torch.as_tensor(images).to(device).float()).cpu().numpy().astype(np.float32))
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks, axis=0)


@dataclass
class FeatureArray:
    """Features (N, D) of a record list, their cache key, and whether they still have to be stored."""

    feats: np.ndarray
    ids: list[str]
    key: str
    meta: dict[str, Any]
    computed: bool


def load_or_compute_features(
    model: nn.Module,
    records: Sequence[Mapping[str, Any]],
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    *,
    cache_dir: str | Path | None,
    model_hash: str,
    manifest_hash: str,
    transform_desc: str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> FeatureArray:
    """Features of ``records`` in order, from memory, from ``cache_dir`` or computed; nothing is written.

    Computed features come back with ``computed=True``; :func:`store_features` writes them (so a caller can
    check every split before writing any file).
    """
    ids = [str(r["id"]) for r in records]
    key = feature_cache_key(model_hash, manifest_hash, transform_desc, ids)
    meta = {"ids": ids, "model_sha256": model_hash, "manifest_sha256": manifest_hash, "transform": transform_desc}
    if key in _MEMORY_CACHE:
        return FeatureArray(_MEMORY_CACHE[key], ids, key, meta, computed=False)
    npy = Path(cache_dir) / f"{key}.npy" if cache_dir is not None else None
    if npy is not None and npy.is_file():
        try:
            stored = json.loads(npy.with_suffix(".json").read_text())
            feats = np.load(npy, allow_pickle=False)
            if stored.get("ids") == ids and feats.shape[0] == len(ids):
                log.info("features loaded from cache %s", npy.name)
                _MEMORY_CACHE[key] = feats
                return FeatureArray(feats, ids, key, meta, computed=False)
        except (OSError, ValueError):
            log.warning("ignoring unreadable feature cache %s", npy.name)
    feats = extract_features(model, make_loader(records, transform, batch_size, num_workers=num_workers),
                             device, desc=desc)
    return FeatureArray(feats, ids, key, meta, computed=True)


def store_features(entry: FeatureArray, cache_dir: str | Path | None) -> None:
    """Keep computed features in memory and, with ``cache_dir``, as ``<key>.npy`` + ``<key>.json`` (atomic)."""
    if not entry.computed:
        return
    _MEMORY_CACHE[entry.key] = entry.feats
    if cache_dir is not None:
        npy = Path(cache_dir) / f"{entry.key}.npy"
        with atomic_open(npy, "wb") as fh:
            np.save(fh, entry.feats, allow_pickle=False)
        atomic_write_json(npy.with_suffix(".json"), {**entry.meta, "shape": list(entry.feats.shape)})
    entry.computed = False


def cached_features(
    model: nn.Module,
    records: Sequence[Mapping[str, Any]],
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    *,
    cache_dir: str | Path | None,
    **options: Any,
) -> np.ndarray:
    """Features (N, D) of ``records`` in order, from memory, from ``cache_dir`` or computed (then stored).

    ``options``: the keyword arguments of :func:`load_or_compute_features` (``model_hash``, ``manifest_hash``,
    ``transform_desc``, ``batch_size``, ``device``, ``num_workers``, ``desc``).
    """
    entry = load_or_compute_features(model, records, transform, cache_dir=cache_dir, **options)
    store_features(entry, cache_dir)
    return entry.feats


def clear_memory_cache() -> None:
    """Forget the in-memory feature arrays (the ``.npy`` files stay)."""
    _MEMORY_CACHE.clear()
