"""Grouped, label-stratified assignment of adapter records to splits by ratios (``--split-ratios``).

Official splits that a dataset publishes (val/test) are kept; only records whose split is null or ``train``
(the official training pool) are redistributed, by :func:`medssl.data.splits.split_records` (groups largest
first, each to the split with the largest per-class deficit; per-class counts within one image of the ideal
for one-image groups). Records sharing a lesion pseudonym (datasets with lesions) or else a patient pseudonym
always land in the same split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medssl.data.splits import split_records
from medssl.errors import MedsslError

ALLOWED = ("pretrain", "train", "val", "test")


def parse_ratios(text: str) -> dict[str, float]:
    """Parse ``"train=0.7,val=0.1,test=0.2"`` (or ``"0.7,0.1,0.2"`` meaning train,val,test) into a dict.

    Ratios are normalised to sum to 1. Raises MedsslError on unknown split names or non-positive values.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    ratios: dict[str, float] = {}
    try:
        if parts and all("=" not in p for p in parts):
            if len(parts) > 3:
                raise MedsslError(f"give at most 3 unnamed ratios (train,val,test), got {text!r}")
            ratios = {name: float(v) for name, v in zip(("train", "val", "test"), parts)}
        else:
            for part in parts:
                name, _, value = part.partition("=")
                ratios[name.strip()] = float(value)
    except ValueError:
        raise MedsslError(f"split ratios must be numbers, got {text!r}") from None
    bad = [n for n in ratios if n not in ALLOWED]
    if bad or not ratios or any(v <= 0 for v in ratios.values()):
        raise MedsslError(f"split ratios must be positive values for {', '.join(ALLOWED)}, got {text!r}")
    total = sum(ratios.values())
    return {name: value / total for name, value in ratios.items()}


def grouping_field(records: list[dict[str, Any]]) -> str:
    """``"lesion_id"`` when any record has a lesion pseudonym, else ``"patient_id"``."""
    return "lesion_id" if any(r.get("lesion_id") for r in records) else "patient_id"


def assign_splits(records: list[dict[str, Any]], ratios: Mapping[str, float], seed: int = 0) -> list[dict[str, Any]]:
    """Set ``split`` in place on the pool (split null or ``train``) by ``ratios``; returns ``records``.

    Args:
        records: adapter records (need ``label`` and the grouping fields).
        ratios: split name -> fraction (normalised to sum 1), e.g. ``{"pretrain": .6, "train": .2, "test": .2}``.
        seed: seed of the tie-breaking order; the same seed gives the same assignment.

    Raises:
        MedsslError: a lesion/patient has images both in an official val/test split and in the pool.
    """
    pool = [r for r in records if r.get("split") in (None, "train")]
    if not pool:
        return records
    field = grouping_field(pool)
    fixed = {r.get(field) for r in records if r.get("split") not in (None, "train") and r.get(field)}
    crossing = fixed & {r.get(field) for r in pool if r.get(field)}
    if crossing:
        raise MedsslError(f"{len(crossing)} {field.split('_')[0]} groups have images both in an official split "
                          "and in the pool to re-split")
    names = list(ratios)
    assigned = split_records(pool, ratios=[ratios[n] for n in names], names=names, group_key=field, seed=seed)
    for rec, new in zip(pool, assigned):
        rec["split"] = new["split"]
    return records
