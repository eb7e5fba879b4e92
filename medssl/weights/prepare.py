"""``prepare_backbone``: the weight preparation steps before a second stage of pretraining, in a fixed order.

Order (each step optional):

1. GroupNorm -> BatchNorm (Lu et al.), so that the conv -> norm pairs the surgery needs are BatchNorms;
2. weight-standardisation folding, so that the filters the surgery measures and scales are the ones actually
   convolved (a standardised conv is scale-invariant: scaling it would be meaningless);
3. dead-filter repair (Ciga et al.), judged on the weights' own scale as in the paper (norm < 0.1);
4. Frobenius scaling last, so that every scaled layer ends with norm <= 1 even after repaired filters
   changed its norm.

Note that scaling a wide layer to unit norm leaves its average filter norm at ``1/sqrt(out_channels)``, so
filter statistics taken after step 4 count many filters below 0.1; repair is therefore done before scaling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.weights import surgery
from medssl.weights.norm import convert_gn_to_bn, fold_weight_standardization

NORM_CHOICES = ("keep", "bn")
DEAD_FILTER_CHOICES = ("none", "copy", "random")


def prepare_backbone(
    model: nn.Module,
    *,
    norm: str = "keep",
    fold_ws: bool = False,
    scale_frobenius: bool = False,
    dead_filters: str = "none",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Apply the selected preparation steps to ``model`` in place, in the order of the module docstring.

    Args:
        model: backbone (e.g. from ``medssl.weights.build_from_checkpoint``).
        norm: ``"keep"`` (default) or ``"bn"`` (replace every GroupNorm by a default-initialised BatchNorm).
        fold_ws: fold weight standardisation into plain convs. Default False.
        scale_frobenius: Frobenius scaling of conv+BN pairs with norm > 1 (``unit_norm`` rule). Default False.
        dead_filters: ``"none"`` (default), ``"copy"`` or ``"random"`` repair of filters with norm < 0.1.
        seed: seed of the generator used by dead-filter repair (default 0).

    Returns:
        The reports of the steps that ran, in order (each with an ``"operation"`` key), for provenance records.
    """
    if norm not in NORM_CHOICES:
        raise MedsslError(f"norm must be one of {', '.join(NORM_CHOICES)}, not {norm!r}")
    if dead_filters not in DEAD_FILTER_CHOICES:
        raise MedsslError(f"dead_filters must be one of {', '.join(DEAD_FILTER_CHOICES)}, not {dead_filters!r}")
    for option, value in (("fold_ws", fold_ws), ("scale_frobenius", scale_frobenius)):
        if not isinstance(value, bool):
            raise MedsslError(f"{option} must be True or False, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MedsslError(f"seed must be an integer, not {seed!r}")
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
    if scale_frobenius:
        records.append(surgery.scale_frobenius(model))
    return records
