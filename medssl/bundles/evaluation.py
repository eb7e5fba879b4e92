"""The ``run`` of a bundle's ``configs/evaluate.yaml``: :func:`medssl.evaluation.run.run_evaluation` with the
bundle's deterministic pipeline (``validate#preprocessing`` of ``train.yaml``) and its split requirements."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

logger = logging.getLogger("medssl.bundles.evaluation")


def evaluate(data: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str | os.PathLike[str],
             arch: str, small_stem: bool = False, widen_factor: float = 1.0, required_splits: Sequence[str] = (),
             transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, trust: bool = False,
             fractions: Sequence[float] = (1.0,), **options: Any) -> Path:
    """Evaluate ``backbone`` on ``data`` into EVAL_DIR ``out``.

    Args:
        backbone: the bundle's ``models/backbone.safetensors``, any checkpoint file, a weights-registry name or
            ``random`` (then ``arch``, ``small_stem`` and ``widen_factor`` build it).
        required_splits: splits ``data`` must have (dermatoscopy: Lu et al.'s pretrain/train/test).
        transform: the record -> ``{"image": (3, S, S) in [0, 1]}`` pipeline (the bundle's
            ``validate#preprocessing``, a MONAI ``Compose``); None = the modality preset's.
        **options: :class:`medssl.evaluation.run.EvalConfig` fields (protocol, trials, norm, recalibrate_bn,
            cluster_by, ...).

    Raises:
        MedsslError: missing split, or the bundle's own backbone not written yet (train first).
    """
    from medssl.bundles.pretraining import pretraining_records, resolve_weights
    from medssl.evaluation.run import run_evaluation

    if required_splits:
        pretraining_records(data, required_splits)  # raises naming the data and the missing split
    if Path(backbone).name == "backbone.safetensors" and not Path(backbone).is_file():
        raise MedsslError("backbone to evaluate not found (run configs/train.yaml first, or set --backbone)",
                          backbone)
    backbone = resolve_weights(backbone, what="backbone")
    extra: dict[str, Any] = {}
    if backbone == "random":
        kwargs: dict[str, Any] = {}
        if small_stem:
            kwargs["small_stem"] = True
        if float(widen_factor) != 1.0:
            kwargs["widen_factor"] = float(widen_factor)
        extra = {"arch": arch, "arch_kwargs": kwargs}
    if transform is not None:
        extra.update(transform=transform, transform_desc=describe_transform(transform))
    logger.info("evaluating %s on %s (%s) -> %s", backbone, data, options.get("protocol", "linear"), out)
    return run_evaluation(data, out, backbone=backbone, trust=trust, fractions=[float(f) for f in fractions],
                          **extra, **options)


def describe_transform(transform: Any) -> str:
    """A stable text of a ``Compose``: each step's class and its scalar/str/tuple settings (the feature-cache
    key of a custom pipeline: an edited parameter gives another key)."""
    steps = getattr(transform, "transforms", [transform])
    parts = []
    for step in steps:
        settings = {k: v for k, v in sorted(vars(step).items()) if not k.startswith("_") and k != "R"
                    and isinstance(v, (int, float, str, bool, tuple, type(None)))}
        parts.append(f"{type(step).__module__}.{type(step).__name__}{settings}")
    return "bundle validate#preprocessing: " + "; ".join(parts)
