"""Backbones (ResNet v1.5 on MONAI, BiT ResNetV2), SSL heads, and ``FeatureExtractor`` (normalisation + backbone)."""

from medssl.models.extractor import FeatureExtractor
from medssl.models.heads import IMAGENET_NORMALIZATION, InputNormalization, MLPHead, Prototypes
from medssl.models.registry import ARCHITECTURES, build_backbone
from medssl.models.resnet import ResNet
from medssl.models.resnetv2 import ResNetV2, StdConv2d

__all__ = [
    "ARCHITECTURES",
    "FeatureExtractor",
    "IMAGENET_NORMALIZATION",
    "InputNormalization",
    "MLPHead",
    "Prototypes",
    "ResNet",
    "ResNetV2",
    "StdConv2d",
    "build_backbone",
]
