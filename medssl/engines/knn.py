"""Weighted kNN: the one implementation of the vote, and the kNN monitor's labelled images decoded once per run.

The vote (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", §3.4;
the same rule as DINO's ``eval_knn.py``): a query takes its ``k`` nearest reference features by cosine
similarity; neighbour ``j`` votes for its class with weight ``exp(sim_j / T)``; class probabilities are the votes
normalised per query; the prediction is their argmax. Defaults ``k = 20``, ``T = 0.07`` (InstDisc / DINO).

Where it lives: two layers use the vote, the pretraining kNN monitor (engines, :class:`~medssl.engines.handlers.
KnnMonitor`) and the kNN evaluation protocol (evaluation, :mod:`medssl.evaluation.protocols.knn`). The project's
imports run one way (data -> models/weights -> methods -> engines -> evaluation -> cli/bundles), so the vote is
defined here, in the lowest layer that needs it, as a pure tensor function, and the evaluation protocol
re-exports it (``from medssl.evaluation.protocols.knn import weighted_knn_predict``): users find the kNN
classifier with the other evaluation protocols, and there is exactly one implementation of it.

The monitor's images (:class:`LabelledImages`): the first kNN check of a run invocation reads each labelled
image once through the deterministic eval pipeline and keeps it in memory as ``uint8`` (values
``round(255 * x)`` of the pipeline's [0, 1] float output, error at most 1/510 per pixel); every later check only
runs the forward pass. Memory: ``N x C x S x S`` bytes for ``N`` images (at most ``knn_max_images``) of
``S x S`` pixels, with ``C = 1`` when every image is grayscale (its three channels equal, expanded back to 3
as a view at forward time) and ``C = 3`` otherwise; e.g. 5,000 RGB images at 224 px take 753 MB, grayscale
251 MB. A resumed run is a new invocation: it reads the images once more, at its first check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def weighted_knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted kNN votes with cosine similarity (the formula is in the module docstring).

    Args:
        train_feats: (N, C) features of the labelled reference set.
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        query_feats: (M, C) features to classify.
        k: neighbours (clipped to N), default 20 (InstDisc / DINO).
        temperature: T in ``exp(sim / T)``, default 0.07 (InstDisc / DINO).
        num_classes: number of classes K.
        chunk_size: queries per similarity block (memory bound), default 1024.

    Returns:
        ``pred`` (M,) int64 (argmax of the votes) and ``probs`` (M, K) float32: the votes normalised
        to sum to one per query.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("weighted_knn_predict needs at least one training feature")
    k = min(k, train_feats.shape[0])
    ref = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(ref.device)
    probs_all = []
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start:start + chunk_size].float().to(ref.device), dim=1)
        sim, idx = (q @ ref.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=ref.device)
        votes.scatter_add_(1, labels[idx], weights)
        probs_all.append(votes / votes.sum(dim=1, keepdim=True))
    probs = torch.cat(probs_all) if probs_all else torch.zeros(0, num_classes)
    return probs.argmax(dim=1), probs


def quantize_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> ``uint8`` ``round(255 * clamp(x, 0, 1))``."""
    return x.detach().float().clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)


def dequantize_unit(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` -> float32 ``x / 255`` in [0, 1] (the inverse of :func:`quantize_unit` up to 1/510)."""
    return x.float().div_(255.0)


class LabelledImages:
    """A labelled image set read once (at the first :meth:`tensors` call) and kept as ``uint8`` in memory.

    Args:
        batches: called once; returns an iterable of ``{"image": float (B, C, S, S) in [0, 1], "label": (B,)
            int}`` batches (the deterministic eval pipeline over the records, in record order).
        num_images: number of images N the batches hold (the buffer is allocated once, N x 3 x S x S bytes).

    After the read the buffer shrinks to one channel when every image is grayscale (see the module docstring).
    """

    def __init__(self, batches: Callable[[], Iterable[dict[str, Any]]], num_images: int) -> None:
        self._batches = batches
        self.num_images = int(num_images)
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    @property
    def loaded(self) -> bool:
        """Whether the images have been read."""
        return self._images is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the images (0 before the read)."""
        return 0 if self._images is None else self._images.numel()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` uint8 (N, C, S, S) with C in {1, 3} and ``labels`` int64 (N,), read on the first call."""
        if self._images is None:
            self._images, self._labels = self._read()
        assert self._labels is not None
        return self._images, self._labels

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        images: torch.Tensor | None = None
        labels = torch.zeros(self.num_images, dtype=torch.long)
        gray = True
        filled = 0
        for batch in self._batches():
            x = torch.as_tensor(batch["image"])
            y = torch.as_tensor(batch["label"]).long().view(-1)
            n = x.shape[0]
            if filled + n > self.num_images:
                raise ValueError(f"the labelled batches hold more than the {self.num_images} images announced")
            if images is None:
                images = torch.empty((self.num_images, *x.shape[1:]), dtype=torch.uint8)
            q = quantize_unit(x)
            images[filled:filled + n] = q
            labels[filled:filled + n] = y
            if gray and q.shape[1] > 1:
                gray = bool((q == q[:, :1]).all())
            filled += n
        if images is None or filled != self.num_images:
            raise ValueError(f"the labelled batches held {filled} images, {self.num_images} were announced")
        if gray and images.shape[1] > 1:
            images = images[:, :1].clone()  # grayscale: one channel, expanded to three at forward time
        return images, labels


@torch.no_grad()
def image_features(model: nn.Module, images: torch.Tensor, device: torch.device | str, *, channels: int = 3,
                   batch_size: int = 64) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of ``uint8`` images (N, C, S, S) in eval mode.

    Each batch goes to ``device`` as ``uint8``, becomes ``x / 255`` there, and a one-channel image is expanded
    (a view) to ``channels``. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    try:
        for start in range(0, images.shape[0], max(1, batch_size)):
            x = dequantize_unit(images[start:start + batch_size].to(device, non_blocking=True))
            if x.shape[1] == 1 and channels != 1:
                x = x.expand(-1, channels, -1, -1)
            feats.append(model(x).float().flatten(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0, 0)
