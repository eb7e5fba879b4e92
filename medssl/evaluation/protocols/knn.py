"""The kNN evaluation protocol: weighted kNN classification on cached frozen features (InstDisc/DINO style,
Wu et al. 2018).

Each test image takes its ``k`` nearest training features by cosine similarity; neighbour j votes for its
class with weight ``exp(sim_j / T)``; class probabilities are the normalised votes; defaults k = 20, T = 0.07.

This is evaluation's kNN API: :func:`knn_predict_proba` (NumPy in and out) and :func:`weighted_knn_predict`
(tensors). The vote has one implementation, :func:`medssl.engines.knn.weighted_knn_predict`, re-exported
here: the pretraining kNN monitor (engines) uses it too, and engines may not import evaluation (imports run
data -> models/weights -> methods -> engines -> evaluation -> cli/bundles), so it is defined in the lower layer.
"""

from __future__ import annotations

import numpy as np
import torch

from medssl.engines.knn import weighted_knn_predict

__all__ = ["KNN_DEFINITION", "knn_predict_proba", "weighted_knn_predict"]

KNN_DEFINITION = ("k nearest training features by cosine similarity vote with weight exp(sim / T); "
                  "probabilities = votes normalised per test image; prediction = argmax")


def knn_predict_proba(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Class probabilities (M, K) of ``query_x`` (M, D) from ``train_x`` (N, D) with labels (N,)."""
    _, probs = weighted_knn_predict(
        torch.as_tensor(train_x, dtype=torch.float32),
        torch.as_tensor(train_y, dtype=torch.long),
        torch.as_tensor(query_x, dtype=torch.float32),
        k=k, temperature=temperature, num_classes=num_classes,
    )
    return probs.numpy().astype(np.float64)
