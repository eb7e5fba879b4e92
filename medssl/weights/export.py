"""Checkpoint -> :class:`~medssl.models.FeatureExtractor`: the network bundles export and run inference with.

- :func:`load_feature_extractor`: any checkpoint medssl reads (a pretraining run's ``backbone.safetensors``, a
  torchvision/BiT/SimCLR/... file) as ``FeatureExtractor(backbone, its input normalisation)`` in eval mode:
  (N, 3, H, W) images in [0, 1] -> (N, num_features) features.
- :func:`write_model_file`: its plain ``state_dict`` (keys ``normalization.mean``, ``normalization.std``,
  ``backbone.<name>``; CPU tensors, readable with ``torch.load(..., weights_only=True)``), written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medssl.errors import MedsslError
from medssl.io import atomic_torch_save
from medssl.models import FeatureExtractor, InputNormalization

logger = logging.getLogger("medssl.weights.export")


def load_feature_extractor(checkpoint: str | os.PathLike[str], *, trust: bool = False) -> FeatureExtractor:
    """The network ``checkpoint`` describes with its input normalisation inside, in eval mode.

    Args:
        checkpoint: any file :func:`medssl.weights.load_checkpoint` reads.
        trust: allow pickled checkpoints that need arbitrary classes.

    Raises:
        MedsslError: missing or unreadable file.
    """
    from medssl.weights.checkpoint import build_from_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise MedsslError("checkpoint not found (pretrain first, or name a checkpoint file)", path)
    backbone, loaded = build_from_checkpoint(path, trust=trust, num_classes=0)
    return FeatureExtractor(backbone, InputNormalization.from_spec(loaded.input_normalization)).eval()


def write_model_file(checkpoint: str | os.PathLike[str], model_file: str | os.PathLike[str], *,
                     trust: bool = False) -> Path | None:
    """Write ``model_file`` (e.g. ``models/model.pt``): the plain ``state_dict`` of :func:`load_feature_extractor`.

    Returns:
        The written path, or None when ``checkpoint`` does not exist (an unfinished run, e.g. one stopped with
        ``stop_after``; a message is logged). The caller decides which process writes (rank 0 under torchrun).
    """
    if not Path(checkpoint).is_file():
        logger.warning("no %s yet (run not finished?): %s not written", checkpoint, model_file)
        return None
    network = load_feature_extractor(checkpoint, trust=trust)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    out = Path(model_file)
    atomic_torch_save(out, state)
    logger.info("wrote %s (%d tensors) from %s", out, len(state), checkpoint)
    return out
