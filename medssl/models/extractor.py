"""``FeatureExtractor``: the one "images in [0, 1] -> backbone features" network of medssl.

``features = backbone.forward_features(normalization(x))``: the checkpoint's input normalisation
(:class:`~medssl.models.heads.InputNormalization`, ``(x - mean) / std`` per channel) followed by the backbone's
pooled features. Evaluation features, the kNN monitor, fine-tuning, bundle inference and the TorchScript export
all use it, so every consumer feeds the backbone the same inputs.

State-dict keys: ``normalization.mean``, ``normalization.std`` (shape (1, C, 1, 1)) and ``backbone.<name>``
(the layout of a bundle's ``models/model.pt``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from medssl.models.heads import InputNormalization


class FeatureExtractor(nn.Module):
    """``features = backbone.forward_features(normalization(x))``.

    Args:
        backbone: a medssl backbone (``forward_features(x) -> (N, num_features)``, ``num_features``).
        normalization: an :class:`InputNormalization`, or a ``{"mean": [...], "std": [...]}`` spec (None =
            ImageNet statistics, :data:`~medssl.models.heads.IMAGENET_NORMALIZATION`).
        channels_last: give the backbone channels-last tensors (as a training step run with channels_last).

    Input: (N, C, H, W) float images in [0, 1]. Output: (N, ``num_features``) float features.
    """

    __jit_unused_properties__ = ["num_features"]

    def __init__(self, backbone: nn.Module, normalization: nn.Module | Mapping | None = None, *,
                 channels_last: bool = False) -> None:
        super().__init__()
        if not isinstance(normalization, nn.Module):
            normalization = InputNormalization.from_spec(normalization)
        self.normalization = normalization
        self.backbone = backbone
        self.channels_last = bool(channels_last)

    @property
    def num_features(self) -> int:
        """Feature dimension D of the output (the backbone's ``num_features``)."""
        return int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalization(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(x)
