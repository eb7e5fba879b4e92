"""The evaluation of one backbone as both front doors build it: ``medssl evaluate`` and the bundles'
``configs/evaluate.yaml`` call :func:`evaluate_backbone`, whose settings are the fields of
:class:`~medssl.evaluation.run.EvalConfig` (the one set of evaluation defaults: Lu et al. for the linear probe,
Ciga et al. for fine-tuning). A setting given as None takes that default.

Stable API:

- ``evaluation_arch_kwargs(small_stem=False, widen_factor=1.0)`` -> ``arch_kwargs`` of a random backbone.
- ``evaluate_backbone(data, out, *, backbone="random", arch=None, small_stem=False, widen_factor=1.0,
  trust=False, required_splits=(), **settings)`` -> EVAL_DIR.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

logger = logging.getLogger("medssl.evaluation.components")


def evaluation_arch_kwargs(small_stem: bool = False, widen_factor: float = 1.0,
                           norm: str | None = None) -> dict[str, Any]:
    """``arch_kwargs`` of a randomly initialised backbone (options at their default are left out; ``norm``:
    ``"bn"`` builds a ResNetV2 with BatchNorm instead of GroupNorm)."""
    options: dict[str, Any] = {}
    if norm == "bn":
        options["norm"] = "bn"
    if small_stem:
        options["small_stem"] = True
    if float(widen_factor) != 1.0:
        options["widen_factor"] = float(widen_factor)
    return options


def evaluate_backbone(data: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      backbone: str | os.PathLike[str] = "random", arch: str | None = None, small_stem: bool = False,
                      widen_factor: float = 1.0, norm: str | None = None, trust: bool = False,
                      required_splits: Sequence[str] = (),
                      **settings: Any) -> Path:
    """Evaluate ``backbone`` on ``data`` into EVAL_DIR ``out`` (:func:`medssl.evaluation.run.run_evaluation`).

    Args:
        data: labelled manifest or folder.
        out: EVAL_DIR.
        backbone: a checkpoint file, a weights-registry name (fetched into the cache) or ``"random"`` (then
            ``arch`` (default resnet50), ``small_stem``, ``widen_factor`` and ``norm`` build it).
        arch: forces the architecture of a checkpoint, or names the random one.
        norm: random ResNetV2: ``"bn"`` builds it with BatchNorm instead of GroupNorm; otherwise
            :class:`~medssl.evaluation.run.EvalConfig` ``norm`` (``"bn"``: GroupNorm -> BatchNorm, recalibrated).
        trust: allow pickled checkpoints that need arbitrary classes.
        required_splits: splits ``data`` must have (:func:`medssl.data.splits.require_splits`).
        **settings: other :class:`~medssl.evaluation.run.EvalConfig` fields (``protocol``, ``fractions``,
            ``trials``, ``epochs``, ...) and ``input_normalization``; None = the default.

    Raises:
        MedsslError: missing splits, a run's ``backbone.safetensors`` that does not exist yet, unknown weights.
    """
    from medssl.data.splits import require_splits
    from medssl.evaluation.run import run_evaluation
    from medssl.weights.registry import resolve_weights

    require_splits(str(data), required_splits)
    if Path(backbone).name == "backbone.safetensors" and not Path(backbone).is_file():
        raise MedsslError("backbone to evaluate not found (pretrain first, or name another backbone)", backbone)
    backbone = resolve_weights(backbone, what="backbone")
    settings = {k: v for k, v in settings.items() if v is not None}
    if "fractions" in settings:
        settings["fractions"] = [float(f) for f in settings["fractions"]]
    if arch is not None:
        settings["arch"] = arch
    if backbone == "random":
        v2 = str(arch or "").startswith("resnetv2")  # random ResNetV2: norm picks its layers (GN or BN)
        settings["arch_kwargs"] = evaluation_arch_kwargs(small_stem, widen_factor, norm if v2 else None)
        if norm is not None and not v2:
            settings["norm"] = norm
    elif norm is not None:
        settings["norm"] = norm
    elif settings.get("name") is None and Path(backbone).name == "backbone.safetensors":
        settings["name"] = Path(backbone).resolve().parent.name  # the run folder, e.g. pretrain_simclr
    logger.info("evaluating %s on %s (%s) -> %s", backbone, data, settings.get("protocol", "linear"), out)
    return run_evaluation(data, out, backbone=backbone, trust=trust, **settings)
