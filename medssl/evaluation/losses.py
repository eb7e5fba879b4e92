"""Classification losses for the evaluation protocols: focal loss (MONAI), cross-entropy, class-weighted CE.

Focal loss (Lin et al. 2017) per image with true class y and softmax probability p_y:
``FL = -(1 - p_y) ** gamma * log(p_y)``, averaged over the batch; gamma = 0 is cross-entropy. Lu et al. use
gamma = 4 for the linear probe, the default here. It is computed by ``monai.losses.FocalLoss(use_softmax=True)``
with ``reduction="none"``: MONAI's "mean" would also divide by the number of classes, so we sum over classes
and average over the batch ourselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.losses import FocalLoss
from torch import nn

LOSS_KINDS = ("focal", "ce", "weighted_ce")

LOSS_DEFINITIONS = {
    "focal": "mean over the batch of -(1-p_y)^gamma * log p_y (softmax probabilities; MONAI FocalLoss)",
    "ce": "mean over the batch of -log p_y (cross-entropy)",
    "weighted_ce": "cross-entropy with class weights w_c = N / (K * n_c) from the training labels, "
    "normalised by the sum of the weights of the batch (PyTorch weighted mean)",
}


class SoftmaxFocalLoss(nn.Module):
    """Multi-class focal loss on logits (N, K) and integer targets (N,), mean over the batch.

    Args:
        gamma: focusing parameter (>= 0), default 4 (Lu et al.); 0 gives cross-entropy.
        class_weight: optional per-class weights (K,) applied to each image's term.
    """

    def __init__(self, gamma: float = 4.0, class_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.focal = FocalLoss(
            use_softmax=True,
            gamma=self.gamma,
            to_onehot_y=True,
            reduction="none",
            weight=None if class_weight is None else list(class_weight),
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_element = self.focal(logits, targets.long().view(-1, 1))  # (N, K), zero off the true class
        return per_element.sum(dim=1).mean()


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Weights N / (K * n_c) per class (sklearn's "balanced"); classes absent from ``labels`` get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def build_loss(
    kind: str, num_classes: int, *, gamma: float = 4.0, train_labels: np.ndarray | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``(logits (N,K), targets (N,) int) -> scalar`` named by ``kind`` (see :data:`LOSS_DEFINITIONS`).

    ``weighted_ce`` needs ``train_labels`` to compute the class weights.
    """
    if kind == "focal":
        return SoftmaxFocalLoss(gamma=gamma)
    if kind == "ce":
        return nn.CrossEntropyLoss()
    if kind == "weighted_ce":
        if train_labels is None:
            raise ValueError("weighted_ce needs the training labels")
        weights = torch.as_tensor(balanced_class_weights(train_labels, num_classes), dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weights)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
