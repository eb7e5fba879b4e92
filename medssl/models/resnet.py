"""ResNet v1.5 backbones (ResNet-18/34/50) on MONAI's ResNet with torchvision parameter names.

MONAI's ``ResNet`` built with ``spatial_dims=2, shortcut_type='B', bias_downsample=False, conv1_t_stride=2``
has exactly torchvision's module tree (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1,2,3}/bn{1,2,3}``,
``layer{k}.0.downsample.{0,1}``, ``fc``) and the v1.5 placement of the stride on the 3x3 conv, so a
torchvision state_dict loads with ``strict=True`` and gives the same logits (checked in tests/test_models.py).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets.resnet import ResNet as _MonaiResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

#: blocks per stage and block type for each supported depth
RESNET_SPECS: dict[str, tuple[type[ResNetBlock] | type[ResNetBottleneck], list[int]]] = {
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
    "resnet101": (ResNetBottleneck, [3, 4, 23, 3]),
    "resnet152": (ResNetBottleneck, [3, 8, 36, 3]),
}


class ResNet(_MonaiResNet):
    """A 2D ResNet v1.5 with torchvision names and medssl's backbone interface.

    Args:
        arch: one of :data:`RESNET_SPECS` (``resnet18``, ``resnet34``, ``resnet50``, ...).
        small_stem: use a 3x3 stride-1 stem without max-pool (for 32-96 px images, Lu et al.) instead of
            the 7x7 stride-2 stem followed by a 3x3 stride-2 max-pool. Default False.
        in_channels: input channels. Default 3.
        num_classes: size of the ``fc`` classifier; 0 (default) builds no classifier.
        widen_factor: multiplies every stage width (64-128-256-512); values < 1 give narrow test networks.

    Attributes:
        num_features: width of ``forward_features`` output (512 for ResNet-18/34, 2048 for ResNet-50).
        arch, arch_kwargs: how to rebuild this network with :func:`medssl.models.build_backbone`.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        small_stem: bool = False,
        in_channels: int = 3,
        num_classes: int = 0,
        widen_factor: float = 1.0,
    ) -> None:
        if arch not in RESNET_SPECS:
            raise ValueError(f"unknown ResNet arch {arch!r}; choose one of {sorted(RESNET_SPECS)}")
        block, layers = RESNET_SPECS[arch]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3 if small_stem else 7,
            conv1_t_stride=1 if small_stem else 2,
            no_max_pool=small_stem,
            shortcut_type="B",
            widen_factor=widen_factor,
            num_classes=max(num_classes, 1),
            feed_forward=num_classes > 0,
            bias_downsample=False,
        )
        self.arch = arch
        self.arch_kwargs: dict[str, Any] = {
            "small_stem": small_stem,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "widen_factor": widen_factor,
        }
        self.num_features = int(512 * widen_factor) * block.expansion

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape (N, num_features), for input (N, C, H, W)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) when a classifier exists, else the features (N, num_features)."""
        feats = self.forward_features(x)
        return self.fc(feats) if self.fc is not None else feats
