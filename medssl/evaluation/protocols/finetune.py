"""Fine-tuning protocol (Ciga et al.): the whole network plus a linear head trained on MONAI engines.

Per (trial, label fraction): a fresh copy of the backbone, ``InputNormalization`` in front and a
``Linear(num_features, K)`` head, trained with ``monai.engines.SupervisedTrainer`` (Adam, lr 3e-4, weight decay
1e-4 by default, the configured loss) for ``epochs`` epochs; after every epoch a
``monai.engines.SupervisedEvaluator`` computes the validation balanced accuracy
(:func:`medssl.engines.scores.balanced_accuracy`: mean recall over the classes present in the val labels, the
same number the results report); the weights of the first epoch reaching the best value are restored and the
test set is predicted once. Images go through the deterministic eval transform (no augmentation).

Each trial is a function of its seed alone: ``torch.manual_seed(seed)`` is set before the head is initialised,
so the head's initial weights and the batch order do not depend on earlier trials.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from torch import nn

from medssl.engines.handlers import attach_throughput_log
from medssl.engines.scores import balanced_accuracy
from medssl.errors import MedsslError
from medssl.evaluation.checks import require_finite
from medssl.evaluation.features import extract_features, make_loader
from medssl.evaluation.fractions import label_fraction_subsets
from medssl.evaluation.losses import build_loss
from medssl.evaluation.predictions import PredictionTable, concat_tables, prediction_rows
from medssl.models import FeatureExtractor, InputNormalization

log = logging.getLogger("medssl.evaluation.finetune")

FINETUNE_DEFINITION = (
    "whole network + linear head trained with Adam (MONAI SupervisedTrainer) on the label-fraction subset; "
    "validation balanced accuracy (mean recall over the classes present in val) after every epoch; the best "
    "epoch's weights "
    "predict the test set once; eval transform without augmentation"
)


class FineTuneClassifier(nn.Module):
    """[0,1] images (N,3,H,W) -> logits (N,K): :class:`~medssl.models.FeatureExtractor` (normalisation +
    backbone features), then a linear head."""

    def __init__(self, backbone: nn.Module, normalization: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, normalization)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


def _val_output(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return output["pred"], output["label"].long().view(-1)


class BalancedAccuracy(Metric):
    """Ignite metric: :func:`medssl.engines.scores.balanced_accuracy` of argmax(logits) over a whole epoch."""

    def __init__(self, num_classes: int, output_transform: Any = lambda x: x) -> None:
        self.num_classes = num_classes
        self._true: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._true, self._pred = [], []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        logits, labels = output
        self._pred.append(logits.detach().argmax(dim=1).cpu())
        self._true.append(labels.detach().long().view(-1).cpu())

    def compute(self) -> float:
        if not self._true:
            raise MedsslError("no validation images to compute the balanced accuracy on")
        return balanced_accuracy(torch.cat(self._true), torch.cat(self._pred), self.num_classes)


def finetune_once(
    model: FineTuneClassifier,
    train_records: list[dict],
    val_records: list[dict],
    transform: Any,
    cfg: Mapping[str, Any],
    train_labels: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """Train ``model`` in place; afterwards it holds the best-validation weights. Returns the training record."""
    device = torch.device(cfg["device"])
    model.to(device)
    torch.manual_seed(seed)
    train_loader = make_loader(train_records, transform, cfg["batch_size"], shuffle=True,
                               num_workers=cfg["num_workers"])
    val_loader = make_loader(val_records, transform, cfg["batch_size"], num_workers=cfg["num_workers"])
    num_classes = model.head.out_features
    criterion = build_loss(cfg["loss"], num_classes, gamma=cfg["gamma"], train_labels=train_labels)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=val_loader, network=model, decollate=False,
        key_val_metric={"val_balanced_accuracy": BalancedAccuracy(num_classes, output_transform=_val_output)})
    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg["epochs"], train_data_loader=train_loader, network=model,
        optimizer=optimizer, loss_function=lambda pred, label: criterion(pred, label.long().view(-1)),
        decollate=False, train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)])
    attach_throughput_log(trainer, what="fine-tuning")  # images/s and ETA log lines, with or without a bar
    best: dict[str, Any] = {"value": -1.0, "epoch": 0, "state": copy.deepcopy(model.state_dict())}

    @evaluator.on(Events.COMPLETED)
    def _keep_best(engine: Any) -> None:
        value = float(engine.state.metrics["val_balanced_accuracy"])
        if value > best["value"]:
            best.update(value=value, epoch=int(trainer.state.epoch),
                        state=copy.deepcopy(model.state_dict()))

    trainer.run()
    model.load_state_dict(best["state"])
    model.eval()
    return {"best_epoch": best["epoch"], "val_balanced_accuracy": best["value"]}


@torch.no_grad()
def predict_proba(model: nn.Module, records: list[dict], transform: Any, cfg: Mapping[str, Any]) -> np.ndarray:
    """Softmax probabilities (N, K) of ``records`` in order."""
    model.eval()
    loader = make_loader(records, transform, cfg["batch_size"], num_workers=cfg["num_workers"])
    logits = extract_features(model, loader, cfg["device"], desc="test predictions")
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def finetune_trials(data: Any, loaded: Any, transform: Any,
                    cfg: Mapping[str, Any]) -> tuple[PredictionTable, np.ndarray, dict]:
    """Every (trial, fraction) fine-tuning run; returns predictions, test embeddings and training records.

    The embeddings for the t-SNE plot are the features of the run with trial 0 at the largest fraction.
    """
    k = len(data.classes)
    labels = np.asarray(data.labels("train"), dtype=np.int64)
    test_labels = np.asarray(data.labels("test"), dtype=np.int64)
    subsets = label_fraction_subsets(data.train, cfg["fractions"], cfg["trials"], seed=cfg["seed"])
    tables, training, embeddings = [], {}, np.zeros((0, 0))
    largest = max(cfg["fractions"])
    for (trial, fraction), idx in sorted(subsets.items()):
        seed = cfg["seed"] + 1000 * trial
        torch.manual_seed(seed)  # the head's initialisation belongs to the trial's seed
        model = FineTuneClassifier(copy.deepcopy(loaded.model),
                                   InputNormalization.from_spec(loaded.input_normalization), k)
        log.info("fine-tuning trial %d, fraction %g: %d training images", trial, fraction, len(idx))
        record = finetune_once(model, [data.train[i] for i in idx], data.val, transform, cfg, labels[idx], seed)
        record["n_train"] = int(len(idx))
        training[(trial, float(fraction))] = record
        probs = predict_proba(model, data.test, transform, cfg)
        require_finite(probs, f"test predictions after fine-tuning (trial {trial}, fraction {fraction:g})",
                       loaded.info)
        tables.append(prediction_rows(data.test, data.classes, test_labels, probs, trial, fraction))
        if trial == 0 and fraction == largest:
            loader = make_loader(data.test, transform, cfg["batch_size"], num_workers=cfg["num_workers"])
            embeddings = extract_features(model.extractor, loader, cfg["device"], desc="test embeddings")
    return concat_tables(tables), embeddings, training
