"""Label fractions x trials: nested, stratified subsets of the labelled training split.

Trial t draws its subsets with ``medssl.data.splits.nested_subsamples(train_records, fractions, seed=seed + t)``:
per class a random order from that seed, fraction f keeping the first ``max(1, floor(f * n_c + 0.5))`` images
of each class c. Subsets of one trial are nested (1 % inside 10 % inside 100 %) and stratified (every class
present); different trials draw different subsets. Fraction 1.0 is the whole split in every trial (trials then
differ only by the classifier's initialisation and batch order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medssl.data.splits import nested_subsamples

FRACTIONS_DEFINITION = (
    "per trial t, each class's training images are put in a random order drawn from seed (seed + t); fraction "
    "f keeps the first max(1, floor(f * n_c + 0.5)) images of every class c (stratified, nested across fractions)"
)


def parse_fractions(text: str | Sequence[float]) -> list[float]:
    """``"0.01,0.1,1.0"`` (or a sequence) -> sorted unique fractions in (0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(v) for v in items if str(v).strip()]
    except ValueError as exc:
        raise ValueError(f"label fractions must be numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"label fractions must be in (0, 1], got {text!r}")
    return sorted(set(values))


def label_fraction_subsets(
    train_records: Sequence[Mapping[str, Any]], fractions: Sequence[float], trials: int, seed: int = 0
) -> dict[tuple[int, float], np.ndarray]:
    """Indices into ``train_records`` (sorted int64) for every (trial, fraction); see the module docstring."""
    out: dict[tuple[int, float], np.ndarray] = {}
    for trial in range(trials):
        subsets = nested_subsamples(train_records, fractions, seed=seed + trial, stratify_key="label")
        for fraction, indices in subsets.items():
            out[(trial, float(fraction))] = np.asarray(indices, dtype=np.int64)
    return out
