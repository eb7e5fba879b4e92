"""Filter statistics of a backbone, as in Ciga et al.'s Fig. 1: how many conv filters have a Frobenius norm
above 1 (candidates for scaling) and below 0.1 ("dead"), per layer type and overall.

A filter is one output channel of a conv layer; its norm is the Frobenius norm of its stored weight over
(in, kh, kw) (for a weight-standardised ``StdConv2d`` the raw, unstandardised weight). Layer types:
``stem conv`` (the first conv in definition order), ``downsample conv`` (names containing ``downsample``),
otherwise ``<kh>x<kw> conv`` (``1x1 conv``, ``3x3 conv``). Classifier heads are excluded (see
:func:`medssl.weights.surgery.filter_layers`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from torch import nn

from medssl.errors import MedsslError
from medssl.io import atomic_write_bytes
from medssl.models.resnetv2 import StdConv2d
from medssl.weights.surgery import filter_layers, filter_norms

#: default thresholds of the paper: norm > 1 is "large", norm < 0.1 is "dead"
LARGE_NORM = 1.0
DEAD_NORM = 0.1


def layer_type(name: str, conv: nn.Conv2d, is_first: bool) -> str:
    """The Fig. 1 layer type of a conv: ``stem conv``, ``downsample conv`` or ``<kh>x<kw> conv``."""
    if is_first:
        return "stem conv"
    if "downsample" in name.split("."):
        return "downsample conv"
    kh, kw = conv.kernel_size
    return f"{kh}x{kw} conv"


def _norms_by_layer(model: nn.Module) -> list[tuple[str, str, nn.Conv2d, np.ndarray]]:
    layers = filter_layers(model)
    return [(name, layer_type(name, conv, i == 0), conv, filter_norms(conv).cpu().numpy())
            for i, (name, conv) in enumerate(layers)]


def _summary(norms: np.ndarray, large: float, dead: float) -> dict[str, Any]:
    n = int(norms.size)
    above = int((norms > large).sum())
    below = int((norms < dead).sum())
    return {
        "filters": n,
        "above": above,
        "below": below,
        "share_above": above / n if n else 0.0,
        "share_below": below / n if n else 0.0,
        "median_norm": float(np.median(norms)) if n else 0.0,
    }


def filter_statistics(model: nn.Module, *, large: float = LARGE_NORM, dead: float = DEAD_NORM) -> dict[str, Any]:
    """Per-filter Frobenius norm statistics of every conv layer of ``model`` (JSON-able).

    Args:
        model: backbone.
        large: "large norm" threshold (default 1.0); ``above``/``share_above`` count filters with norm > large.
        dead: "dead filter" threshold (default 0.1); ``below``/``share_below`` count filters with norm < dead.

    Returns:
        ``{"thresholds": {"large", "dead"}, "overall": summary, "by_type": {type: summary},
        "layers": [row]}``; a summary has ``filters``, ``above``, ``below``, ``share_above``, ``share_below``
        (fractions in [0, 1]) and ``median_norm``; a row adds ``name``, ``type``, ``shape`` (OIHW),
        ``weight_standardized``, ``frobenius_norm`` (whole layer), ``min_norm`` and ``max_norm``.
    """
    per_layer = _norms_by_layer(model)
    if not per_layer:
        raise MedsslError("the model has no convolution layers to analyse")
    rows, by_type_norms = [], {}
    for name, kind, conv, norms in per_layer:
        row = {"name": name, "type": kind, "shape": list(conv.weight.shape),
               "weight_standardized": bool(isinstance(conv, StdConv2d) and conv.standardize),
               "frobenius_norm": float(np.sqrt((norms ** 2).sum())),
               "min_norm": float(norms.min()), "max_norm": float(norms.max())}
        row.update(_summary(norms, large, dead))
        rows.append(row)
        by_type_norms.setdefault(kind, []).append(norms)
    return {
        "thresholds": {"large": float(large), "dead": float(dead)},
        "overall": _summary(np.concatenate([n for *_, n in per_layer]), large, dead),
        "by_type": {k: _summary(np.concatenate(v), large, dead) for k, v in by_type_norms.items()},
        "layers": rows,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def format_stats_table(stats: dict[str, Any], *, layers: bool = False) -> str:
    """An aligned text table of :func:`filter_statistics` output: one row per layer type and one overall row
    (filters, count and share with norm > large, with norm < dead, median norm); with ``layers=True`` a second
    table lists every layer."""
    large, dead = stats["thresholds"]["large"], stats["thresholds"]["dead"]
    header = ["layer type", "filters", f"norm > {large:g}", "share", f"norm < {dead:g}", "share", "median norm"]

    def cells(label: str, s: dict[str, Any]) -> list[str]:
        return [label, str(s["filters"]), str(s["above"]), f"{100 * s['share_above']:.1f}%", str(s["below"]),
                f"{100 * s['share_below']:.1f}%", f"{s['median_norm']:.4g}"]

    rows = [cells(k, s) for k, s in stats["by_type"].items()] + [cells("overall", stats["overall"])]
    lines = _table(header, rows)
    if layers:
        lheader = ["layer", "type", "shape", "layer norm", "min", "median", "max", f"> {large:g}", f"< {dead:g}"]
        lrows = [[r["name"], r["type"], "x".join(map(str, r["shape"])), f"{r['frobenius_norm']:.4g}",
                  f"{r['min_norm']:.4g}", f"{r['median_norm']:.4g}", f"{r['max_norm']:.4g}", str(r["above"]),
                  str(r["below"])] for r in stats["layers"]]
        lines += ["", *_table(lheader, lrows)]
    return "\n".join(lines) + "\n"


def plot_filter_histogram(
    model: nn.Module, path: str | os.PathLike[str], *, large: float = LARGE_NORM, dead: float = DEAD_NORM
) -> None:
    """Write a PNG histogram of filter norms per layer type (log x-axis, thresholds marked) to ``path``.

    Uses matplotlib's Agg canvas (no display needed) and writes atomically. Norms below 1e-8 (e.g. all-zero
    filters) are drawn at 1e-8 so that they stay visible on the log axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_layer = _norms_by_layer(model)
    if not per_layer:
        raise MedsslError("the model has no convolution layers to plot")
    floor = 1e-8
    groups: dict[str, list[np.ndarray]] = {}
    for _, kind, _, norms in per_layer:
        groups.setdefault(kind, []).append(np.maximum(norms, floor))
    data = {k: np.concatenate(v) for k, v in groups.items()}
    everything = np.concatenate(list(data.values()))
    lo = min(everything.min(), dead) / 1.5
    hi = max(everything.max(), large) * 1.5
    bins = np.geomspace(lo, hi, 60)
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, norms in data.items():
        ax.hist(norms, bins=bins, histtype="step", linewidth=1.5, label=f"{kind} (n={norms.size})")
    ax.axvline(dead, color="dimgray", linestyle="--", label=f"dead < {dead:g}")
    ax.axvline(large, color="black", linestyle=":", label=f"large > {large:g}")
    ax.set_xscale("log")
    ax.set_xlabel("filter Frobenius norm")
    ax.set_ylabel("filters")
    ax.set_title(f"Filter norms ({everything.size} filters)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise MedsslError(f"cannot write the histogram ({exc.strerror or exc})", path) from exc
