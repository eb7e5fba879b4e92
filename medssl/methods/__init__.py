"""Self-supervised methods: SimCLR, SwAV, BYOL, SimSiam (losses as pure functions + training modules).

``build_method(name, backbone, **cfg)`` builds one; see :class:`medssl.methods.base.SSLMethod` for the
interface the training engine uses.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from medssl.errors import MedsslError
from medssl.methods.base import HEAD_NAMES, SSLMethod
from medssl.methods.byol import BYOL, byol_loss, cosine_tau, ema_update_
from medssl.methods.simclr import SimCLR, nt_xent_loss
from medssl.methods.simsiam import SimSiam, simsiam_loss
from medssl.methods.swav import SwAV, sinkhorn_knopp, swav_loss, swav_schedule

#: method name -> class
METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "swav": SwAV, "byol": BYOL, "simsiam": SimSiam}


def method_options(name: str) -> list[str]:
    """Keyword options accepted by :func:`build_method` for method ``name``."""
    if name not in METHODS:
        raise MedsslError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    params = inspect.signature(METHODS[name].__init__).parameters
    return [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]


def build_method(name: str, backbone: nn.Module, **cfg: Any) -> SSLMethod:
    """Build an SSL method around ``backbone``; heads are sized from ``backbone.num_features``.

    Args:
        name: ``"simclr"``, ``"swav"``, ``"byol"`` or ``"simsiam"``.
        backbone: a medssl backbone (``forward_features``, ``num_features``).
        **cfg: the method's keyword options (see :func:`method_options` and each class), e.g.
            ``projector_hidden_dim``, ``projector_out_dim``, ``temperature``, ``num_prototypes``; plus
            ``heads`` (``{"projector"|"predictor"|"prototypes": state_dict}`` from an imported checkpoint, used
            when given) and ``heads_source`` (its path, for messages).

    Raises:
        MedsslError: unknown method or option, or imported heads that do not fit.
    """
    options = method_options(name)
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise MedsslError(f"unknown option(s) {', '.join(unknown)} for method {name}; accepted: {', '.join(options)}")
    heads = cfg.get("heads")
    if heads is not None:
        odd = sorted(set(heads) - set(HEAD_NAMES))
        if odd:
            raise MedsslError(f"unknown head name(s) {', '.join(odd)}; expected some of {', '.join(HEAD_NAMES)}",
                              cfg.get("heads_source"))
    return METHODS[name](backbone, **cfg)


__all__ = [
    "BYOL",
    "HEAD_NAMES",
    "METHODS",
    "SSLMethod",
    "SimCLR",
    "SimSiam",
    "SwAV",
    "build_method",
    "byol_loss",
    "cosine_tau",
    "ema_update_",
    "method_options",
    "nt_xent_loss",
    "simsiam_loss",
    "sinkhorn_knopp",
    "swav_loss",
    "swav_schedule",
]
