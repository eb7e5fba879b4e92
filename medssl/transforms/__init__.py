"""Transforms: SSL augmentations MONAI lacks, multi-view wrappers, per-modality presets, batched kornia path."""

from medssl.transforms.presets import MODALITIES, AugmentSpec, build_eval_transform, build_ssl_transform

__all__ = ["MODALITIES", "AugmentSpec", "build_eval_transform", "build_ssl_transform"]
