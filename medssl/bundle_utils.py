"""Small helpers that the MONAI bundles in ``bundles/<modality>/configs`` call.

The bundle configs build every object from installed ``medssl.*`` targets; this module holds the few glue
functions they need:

- :class:`NormalizedFeatureExtractor`: the exported network, ``[0,1]`` images -> backbone features, with the
  checkpoint's input normalisation inside the module (``models/model.ts`` takes the same inputs as every
  medssl transform produces).
- :func:`export_network` builds it from any checkpoint medssl reads (a run's ``backbone.safetensors`` by
  default); it is the bundles' ``network_def`` for ``python -m monai.bundle ckpt_export``.
- :func:`write_model_file` writes ``models/model.pt``, the plain ``state_dict`` that ``ckpt_export`` loads.
- :func:`pretrain` / :func:`evaluate` run the pretraining / evaluation of a bundle and write ``model.pt``;
  both first check the data's splits (:func:`check_splits`) and resolve weight names
  (:func:`resolve_weights`: a file, a weights-registry name fetched into the cache, or ``random``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.io import atomic_torch_save

logger = logging.getLogger("medssl.bundle_utils")


class NormalizedFeatureExtractor(nn.Module):
    """``features = backbone(normalization(x))``.

    Args:
        backbone: a medssl backbone built with ``num_classes=0`` (its ``forward`` returns the pooled
            features, shape (N, ``num_features``)).
        normalization: :class:`medssl.models.InputNormalization` mapping [0,1] images to what the weights
            expect (buffers ``mean``/``std``, shape (1, C, 1, 1)).

    Input: (N, 3, H, W) float images in [0, 1], any H, W that the backbone accepts.
    Output: (N, num_features) float features.
    """

    def __init__(self, backbone: nn.Module, normalization: nn.Module) -> None:
        super().__init__()
        self.normalization = normalization
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalization(x))


def export_network(checkpoint: str | os.PathLike[str], *, trust: bool = False) -> NormalizedFeatureExtractor:
    """The network a checkpoint describes, wrapped with its input normalisation, in eval mode.

    Args:
        checkpoint: any file :func:`medssl.weights.load_checkpoint` reads (a pretraining run's
            ``backbone.safetensors``, a torchvision/BiT/SimCLR/... file).
        trust: allow pickled checkpoints that need arbitrary classes.

    Raises:
        MedsslError: missing or unreadable file.
    """
    from medssl.models import InputNormalization
    from medssl.weights import build_from_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise MedsslError("checkpoint not found (pretrain first, or set export_backbone to a checkpoint file)",
                          path)
    backbone, loaded = build_from_checkpoint(path, trust=trust, num_classes=0)
    network = NormalizedFeatureExtractor(backbone, InputNormalization.from_spec(loaded.input_normalization))
    return network.eval()


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a ``torchrun`` launch (``RANK`` environment variable)."""
    return int(os.environ.get("RANK", "0")) == 0


def write_model_file(checkpoint: str | os.PathLike[str], model_file: str | os.PathLike[str], *,
                     trust: bool = False) -> Path | None:
    """Write ``model_file`` (e.g. ``models/model.pt``): the plain ``state_dict`` of :func:`export_network`.

    Keys are ``normalization.mean``, ``normalization.std`` and ``backbone.<medssl name>``; values are CPU
    tensors, readable with ``torch.load(..., weights_only=True)``. Only rank 0 writes under ``torchrun``.

    Returns:
        The written path, or None on a non-zero rank or when ``checkpoint`` does not exist (an unfinished run,
        e.g. one stopped with ``stop_after``; a message is logged).
    """
    if not is_main_process():
        return None
    if not Path(checkpoint).is_file():
        logger.warning("no %s yet (run not finished?): models/model.pt not written", checkpoint)
        return None
    network = export_network(checkpoint, trust=trust)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    out = Path(model_file)
    atomic_torch_save(out, state)
    logger.info("wrote %s (%d tensors) from %s", out, len(state), checkpoint)
    return out


def resolve_weights(value: str | os.PathLike[str], *, what: str) -> str:
    """``"random"``, an existing checkpoint file, or a weights-registry name (fetched into the cache).

    Args:
        value: what the bundle gives (``init`` or ``backbone``).
        what: the bundle key, for the error message.

    Raises:
        MedsslError: neither a file nor a registry name (one line naming the path and the choices);
            :class:`medssl.weights.registry.OfflineError` when a registry file cannot be downloaded.
    """
    from medssl.weights.registry import fetch, registry

    if str(value) == "random":
        return "random"
    if Path(value).is_file():
        return str(value)
    if str(value) in registry():
        return str(fetch(str(value)))
    raise MedsslError(f"{what}: no such checkpoint file; give a checkpoint file, a weights registry name "
                      f"(e.g. {', '.join(sorted(registry())[:3])}, ...) or random", value)


def check_splits(data: str | os.PathLike[str], required: Sequence[str]) -> None:
    """Raise unless every split named in ``required`` has at least one record in ``data``.

    A bundle whose protocol depends on a split layout (dermatoscopy: Lu et al.'s ``pretrain``/``train``/``test``
    60/20/20) lists it in ``required_splits``; an empty list accepts any data.

    Raises:
        MedsslError: names the data, the missing splits and the command that makes them.
    """
    if not required:
        return
    from medssl.data.sources import records_from_path

    present = {r.get("split") for r in records_from_path(data)}
    missing = [s for s in required if s not in present]
    if missing:
        raise MedsslError(f"no record in split(s) {', '.join(missing)}; this bundle's protocol needs splits "
                          f"{', '.join(required)} (make them with `medssl manifest split MANIFEST -o OUT --names "
                          f"{','.join(required)} --ratios ...`, or pass --required_splits \"[]\")", data)


def pretrain(config: Any, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             model_file: str | os.PathLike[str] | None = None, required_splits: Sequence[str] = ()) -> Path:
    """Run :func:`medssl.engines.run.run_pretraining`, then write ``model_file`` from the run's backbone.

    Args:
        config: a :class:`medssl.engines.config.PretrainConfig` (the bundle's ``pretrain_config``); its
            ``init`` may be a weights-registry name (see :func:`resolve_weights`).
        resume, overwrite, progress: as in ``run_pretraining``.
        model_file: where to write the plain ``state_dict`` for ``ckpt_export`` (None = not written).
        required_splits: splits the data must have (:func:`check_splits`).

    Returns:
        The run folder.
    """
    from medssl.engines.run import run_pretraining

    check_splits(config.data, required_splits)
    config = dataclasses.replace(config, init=resolve_weights(config.init, what="init"))
    logger.info("pretraining %s (%s, init %s) on %s -> %s", config.arch or "backbone", config.method, config.init,
                config.data, config.out)
    run_dir = run_pretraining(config, resume=resume, overwrite=overwrite, progress=progress)
    if model_file:
        write_model_file(run_dir / "backbone.safetensors", model_file)
    return run_dir


def network_options(arch: str, small_stem: bool, widen_factor: float) -> dict[str, Any]:
    """``arch_kwargs`` of a randomly initialised backbone as the bundles describe it (defaults dropped)."""
    options: dict[str, Any] = {}
    if small_stem:
        options["small_stem"] = True
    if float(widen_factor) != 1.0:
        options["widen_factor"] = float(widen_factor)
    return options


def evaluate(data: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str | os.PathLike[str],
             arch: str, small_stem: bool = False, widen_factor: float = 1.0,
             fractions: Sequence[float] = (1.0,), trust: bool = False, required_splits: Sequence[str] = (),
             **options: Any) -> Path:
    """Run :func:`medssl.evaluation.run.run_evaluation` as a bundle describes it.

    Args:
        data: labelled manifest or folder.
        out: EVAL_DIR.
        backbone: a checkpoint file, a weights-registry name, or ``"random"`` (then ``arch``, ``small_stem`` and
            ``widen_factor`` build it).
        fractions: label fractions of the training split, each in (0, 1].
        required_splits: splits the data must have (:func:`check_splits`).
        **options: other :class:`medssl.evaluation.run.EvalConfig` fields (protocol, trials, epochs, ...).
    """
    from medssl.evaluation.run import run_evaluation

    check_splits(data, required_splits)
    if Path(backbone).name == "backbone.safetensors" and not Path(backbone).is_file():
        raise MedsslError("backbone to evaluate not found (run the pretrain config first, or set backbone)",
                          backbone)
    backbone = resolve_weights(backbone, what="backbone")
    extra: dict[str, Any] = {}
    if backbone == "random":
        extra = {"arch": arch, "arch_kwargs": network_options(arch, small_stem, widen_factor)}
    elif options.get("name") is None and Path(backbone).name == "backbone.safetensors":
        options["name"] = Path(backbone).resolve().parent.name  # the run folder, e.g. pretrain_simclr
    logger.info("evaluating %s on %s (%s) -> %s", backbone, data, options.get("protocol", "linear"), out)
    return run_evaluation(data, out, backbone=backbone, trust=trust, fractions=[float(f) for f in fractions],
                          **extra, **options)

