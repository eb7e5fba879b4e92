"""``prepare_backbone``: the weight preparation steps before a second stage of pretraining, in a fixed order.

Order (each step optional):

1. GroupNorm -> BatchNorm (Lu et al.), so that the conv -> norm pairs the surgery needs are BatchNorms;
2. weight-standardisation folding, only when asked (``fold_ws``): it is exact, and it is required before
   Frobenius scaling of a weight-standardised network (a standardised conv is scale-invariant, so scaling its
   weight while dividing the BatchNorm statistics would change the outputs; :func:`surgery.scalable_pairs`
   refuses it);
3. dead-filter repair (Ciga et al.), judged on the weights' own scale as in the paper (norm < 0.1);
4. BatchNorm recalibration on target images (``calibrate``), after every step that changes what the
   BatchNorms see (conversion leaves them at 0/1, random repair resets the repaired channels) and before
   scaling, which keeps the eval-mode function and so carries calibrated statistics over;
5. Frobenius scaling last (paper rule by default), on the repaired, calibrated network.

Every check that can fail (options, "no conv+BN pairs", "weight-standardised convs need --fold-ws") runs
before the model is touched. The log line and :func:`preparation_summary` say how many layers were scaled and
how many filters repaired; :func:`bn_statistics_state` says where the BatchNorm statistics come from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import MedsslError
from medssl.weights import surgery
from medssl.weights.norm import convert_gn_to_bn, fold_weight_standardization

logger = logging.getLogger("medssl.weights.prepare")

NORM_CHOICES = ("keep", "bn")
DEAD_FILTER_CHOICES = ("none", "copy", "random")
FROBENIUS_RULES = surgery.RULES
#: values of the provenance key ``bn_statistics`` (medssl files): where the BatchNorm running statistics come from
BN_STATISTICS = ("uncalibrated", "recalibrated", "trained", "original")


def prepare_backbone(
    model: nn.Module,
    *,
    norm: str = "keep",
    fold_ws: bool = False,
    scale_frobenius: bool = False,
    frobenius_rule: str = "paper",
    dead_filters: str = "none",
    seed: int = 0,
    calibrate: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Apply the selected preparation steps to ``model`` in place, in the order of the module docstring.

    Args:
        model: backbone (e.g. from ``medssl.weights.build_from_checkpoint``).
        norm: ``"keep"`` (default) or ``"bn"`` (replace every GroupNorm by a default-initialised BatchNorm).
        fold_ws: fold weight standardisation into plain convs. Default False (required for scaling a
            weight-standardised network).
        scale_frobenius: Frobenius scaling of conv+BN pairs with norm > 1. Default False.
        frobenius_rule: ``"paper"`` (default: Ciga et al., divide by ``sqrt(s)``) or ``"unit_norm"`` (divide by
            ``s``); formulas in :func:`medssl.weights.surgery.scale_frobenius`.
        dead_filters: ``"none"`` (default), ``"copy"`` or ``"random"`` repair of filters with norm < 0.1.
        seed: seed of the generator used by dead-filter repair (default 0).
        calibrate: optional function that re-estimates the BatchNorm statistics of the model it is given and
            returns a report with ``"operation"`` (e.g. ``lambda m: recalibrate_bn(m, batches, n)``); run at
            step 4.

    Returns:
        The reports of the steps that ran, in order (each with an ``"operation"`` key), for provenance records.

    Raises:
        MedsslError: a bad option, or Frobenius scaling of a network that cannot be scaled (no conv+BN pairs
            after the norm step: "add --norm bn"; weight-standardised convs without folding: "add --fold-ws").
    """
    if norm not in NORM_CHOICES:
        raise MedsslError(f"norm must be one of {', '.join(NORM_CHOICES)}, not {norm!r}")
    if dead_filters not in DEAD_FILTER_CHOICES:
        raise MedsslError(f"dead_filters must be one of {', '.join(DEAD_FILTER_CHOICES)}, not {dead_filters!r}")
    if frobenius_rule not in FROBENIUS_RULES:
        raise MedsslError(f"Frobenius rule must be one of {', '.join(FROBENIUS_RULES)}, not {frobenius_rule!r}")
    for option, value in (("fold_ws", fold_ws), ("scale_frobenius", scale_frobenius)):
        if not isinstance(value, bool):
            raise MedsslError(f"{option} must be True or False, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MedsslError(f"seed must be an integer, not {seed!r}")
    if scale_frobenius:
        surgery.scalable_pairs(model, norm_to_bn=norm == "bn", folds_ws=fold_ws)
    records: list[dict[str, Any]] = []
    if norm == "bn":
        records.append(convert_gn_to_bn(model))
    if fold_ws:
        records.append(fold_weight_standardization(model))
    if dead_filters != "none":
        generator = torch.Generator().manual_seed(seed)
        record = surgery.repair_dead_filters(model, mode=dead_filters, generator=generator)
        record["seed"] = seed
        records.append(record)
    if calibrate is not None:
        records.append(calibrate(model))
    if scale_frobenius:
        records.append(surgery.scale_frobenius(model, rule=frobenius_rule))
    summary = preparation_summary(records)
    if records:
        logger.info("weight preparation: %s; %d conv+BN layers scaled (%s rule), %d dead filters repaired",
                    ", ".join(r["operation"] for r in records), summary["layers_scaled"],
                    summary["frobenius_rule"] or "no", summary["filters_repaired"])
    return records


def preparation_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts of a preparation for provenance and logs.

    Returns:
        ``{"layers_scaled": int, "frobenius_rule": str | None, "filters_repaired": int,
        "layers_repaired": int, "gn_to_bn_layers": int, "ws_folded_layers": int}`` (0 / None for steps that
        did not run).
    """
    out: dict[str, Any] = {"layers_scaled": 0, "frobenius_rule": None, "filters_repaired": 0,
                           "layers_repaired": 0, "gn_to_bn_layers": 0, "ws_folded_layers": 0}
    for record in records:
        op = record.get("operation")
        if op == "frobenius_scaling":
            out["layers_scaled"] += int(record["count"])
            out["frobenius_rule"] = record["rule"]
        elif op == "dead_filter_repair":
            out["filters_repaired"] += int(record["count"])
            out["layers_repaired"] += len(record["layers"])
        elif op == "gn_to_bn":
            out["gn_to_bn_layers"] += int(record["count"])
        elif op == "fold_weight_standardization":
            out["ws_folded_layers"] += int(record["count"])
    return out


def has_batchnorm_statistics(model: nn.Module) -> bool:
    """True when ``model`` has a BatchNorm that tracks running statistics (used in eval mode)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def bn_statistics_state(model: nn.Module, records: Sequence[Mapping[str, Any]],
                        parent: str | None = None) -> str | None:
    """The provenance value ``bn_statistics`` of a prepared model (one of :data:`BN_STATISTICS`), or None.

    - None: the model has no BatchNorm with running statistics (nothing to calibrate);
    - ``"recalibrated"``: a ``bn_recalibration`` step ran;
    - ``"uncalibrated"``: GroupNorm -> BatchNorm conversion (statistics 0/1) or random dead-filter repair (the
      repaired channels' statistics reset to 0/1) ran without recalibration;
    - else ``parent`` when given (the source medssl file's own ``bn_statistics``, e.g. ``"trained"``), or
      ``"original"``: the checkpoint's own statistics (Frobenius scaling and copy repair carry them over).
    """
    if not has_batchnorm_statistics(model):
        return None
    ops = {r.get("operation"): r for r in records}
    if "bn_recalibration" in ops:
        return "recalibrated"
    repair = ops.get("dead_filter_repair") or {"layers": [], "mode": "none"}
    reset = any(row["norm"] and isinstance(model.get_submodule(row["norm"]), _BatchNorm)
                and (repair["mode"] == "random" or row["fallback"]) for row in repair["layers"])
    if ops.get("gn_to_bn", {}).get("count") or reset:
        return "uncalibrated"
    if parent in BN_STATISTICS:
        return parent
    return "original"
