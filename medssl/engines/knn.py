"""Feature extraction and weighted kNN classification (InstDisc / DINO monitor).

``weighted_knn_predict`` scores each query by its ``k`` nearest training features under cosine
similarity, each neighbour voting for its label with weight ``exp(sim / T)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable[Any], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` in eval mode and collect features and labels on the CPU.

    Args:
        model: maps images (N, C, H, W) to features (N, C') (``forward_features`` is used when present).
        loader: yields dicts with ``"image"`` (N, C, H, W) and ``"label"`` (N,) integer tensors, or
            ``(image, label)`` tuples.
        device: where the model runs.

    Returns:
        ``feats`` (N, C') float32 and ``labels`` (N,) int64, both on the CPU. The model's previous
        train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    forward = getattr(model, "forward_features", model)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            image, label = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
            out = forward(torch.as_tensor(image).to(device, non_blocking=True))
            feats.append(out.float().flatten(1).cpu())
            labels.append(torch.as_tensor(label).long().view(-1).cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


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
    """Weighted kNN votes with cosine similarity.

    Args:
        train_feats: (N, C) features of the labelled reference set.
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        query_feats: (M, C) features to classify.
        k: neighbours (clipped to N), default 20.
        temperature: T in ``exp(sim / T)``, default 0.07.
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
