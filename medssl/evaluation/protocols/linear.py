"""Linear probe on frozen, cached features (Lu et al.): focal loss, Adam, best-validation model selection.

The classifier is ``Linear(D, K)`` applied to features standardised with the training subset's per-dimension
mean and std (a fixed affine map, equivalent to a re-parametrised linear classifier on the raw features; it
only makes Adam's step size independent of the feature scale). After every epoch the validation balanced
accuracy is computed; the weights of the first epoch reaching the best value are kept and used for the single
test prediction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medssl.engines.scores import balanced_accuracy
from medssl.evaluation.losses import build_loss


@dataclass
class LinearProbe:
    """A trained probe: standardisation statistics, the classifier and its selection record."""

    mean: np.ndarray
    std: np.ndarray
    classifier: nn.Linear
    best_epoch: int
    best_val_balanced_accuracy: float
    history: list[dict] = field(default_factory=list)

    @torch.no_grad()
    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        """Softmax class probabilities (N, K) for features (N, D)."""
        x = torch.as_tensor((feats - self.mean) / self.std, dtype=torch.float32)
        return torch.softmax(self.classifier(x), dim=1).numpy().astype(np.float64)


def train_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    *,
    loss: str = "focal",
    gamma: float = 4.0,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearProbe:
    """Train ``Linear(D, K)`` with Adam on features (N, D) and integer labels (N,).

    Args:
        loss: ``focal`` (gamma, default 4), ``ce`` or ``weighted_ce`` (weights from ``train_y``).
        epochs: passes over the training features (default 100).
        lr, weight_decay: Adam settings (defaults 1e-3, 0).
        batch_size: mini-batch size (default 256).
        seed: torch seed of the initialisation and of the batch order.

    Returns:
        the :class:`LinearProbe` of the epoch with the best validation balanced accuracy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation cost
    try:
        return _train(train_x, train_y, val_x, val_y, num_classes, loss, gamma, epochs, lr, weight_decay,
                      batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _train(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
           loss: str, gamma: float, epochs: int, lr: float, weight_decay: float, batch_size: int,
           seed: int) -> LinearProbe:
    gen = torch.Generator().manual_seed(seed)
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    xs = torch.as_tensor((train_x - mean) / std, dtype=torch.float32)
    ys = torch.as_tensor(train_y, dtype=torch.long)
    xv = torch.as_tensor((val_x - mean) / std, dtype=torch.float32)
    classifier = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1.0 / np.sqrt(train_x.shape[1])
        classifier.weight.uniform_(-bound, bound, generator=gen)
        classifier.bias.uniform_(-bound, bound, generator=gen)
    criterion = build_loss(loss, num_classes, gamma=gamma, train_labels=np.asarray(train_y))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    best_state, best_epoch, best_val = copy.deepcopy(classifier.state_dict()), 0, -1.0
    history = []
    for epoch in range(1, epochs + 1):
        classifier.train()
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for start in range(0, len(xs), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            value = criterion(classifier(xs[idx]), ys[idx])
            value.backward()
            optimizer.step()
            total += float(value.detach()) * len(idx)
        classifier.eval()
        with torch.no_grad():
            val_pred = classifier(xv).argmax(dim=1).numpy()
        val_bacc = balanced_accuracy(val_y, val_pred, num_classes)
        history.append({"epoch": epoch, "train_loss": total / len(xs), "val_balanced_accuracy": val_bacc})
        if val_bacc > best_val:
            best_val, best_epoch = val_bacc, epoch
            best_state = copy.deepcopy(classifier.state_dict())
    classifier.load_state_dict(best_state)
    classifier.eval()
    return LinearProbe(mean, std, classifier, best_epoch, best_val, history)
