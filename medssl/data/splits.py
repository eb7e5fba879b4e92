"""Leakage-proof splits and nested label-fraction subsamples of manifest records.

:func:`split_records` assigns whole groups (patients, lesions, studies) to splits, stratified by label, with a
greedy rule: groups are taken largest first (ties in a seeded random order) and each goes to the split whose
per-class deficit ``target - count``, weighted by the group's class counts, is largest. For single-image groups
this is, per class, "give the next image to the split furthest below its target", which keeps every per-class
count within one image of its ideal ``n_class * ratio``.

:func:`nested_subsamples` draws, per class, one seeded random order and takes its first
``max(1, round(fraction * n_class))`` images, so for one seed the 1 % subset lies inside the 10 % subset,
which lies inside the 25 % one.

Both refuse a grouping or class field that no record has (:func:`require_field`): a typo such as
``--group patinet_id`` would otherwise put each image in its own group and leak patients across splits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medssl.data.manifest import MANIFEST_FIELDS, SPLITS
from medssl.errors import MedsslError

_NONE_CLASS = "\x00none"


def _class_of(record: Mapping[str, Any], stratify_key: str | None) -> str:
    if stratify_key is None:
        return ""
    value = record.get(stratify_key)
    return _NONE_CLASS if value is None else str(value)


def require_field(records: Sequence[Mapping[str, Any]], key: str | None, option: str) -> None:
    """Raise :class:`MedsslError` (one line, naming ``key`` and the fields available) when ``key`` is neither a
    manifest field (:data:`~medssl.data.manifest.MANIFEST_FIELDS`, null when absent) nor a key of any record.

    Args:
        option: how the user gave ``key`` (e.g. ``"--group"``), for the message.
    """
    if key is None or key in MANIFEST_FIELDS or any(key in record for record in records):
        return
    present = {k for record in records for k, v in record.items() if v is not None}
    raise MedsslError(f"{option} field {key!r} is in no record; fields available: {', '.join(sorted(present))}")


def _check_ratios(ratios: Sequence[float], names: Sequence[str]) -> list[float]:
    if len(ratios) != len(names):
        raise MedsslError(f"{len(ratios)} ratios for {len(names)} split names ({', '.join(names)})")
    if len(set(names)) != len(names):
        raise MedsslError(f"split names repeat: {', '.join(names)}")
    unknown = [n for n in names if n not in SPLITS]
    if unknown:
        raise MedsslError(f"unknown split name(s) {', '.join(unknown)}: use {', '.join(SPLITS)}")
    if any(not math.isfinite(r) or r < 0 for r in ratios) or sum(ratios) <= 0:
        raise MedsslError(f"split ratios must be >= 0 with a positive sum, got {list(ratios)}")
    total = float(sum(ratios))
    return [float(r) / total for r in ratios]


def split_records(
    records: Sequence[Mapping[str, Any]],
    *,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    names: Sequence[str] = ("train", "val", "test"),
    group_key: str | None = "patient_id",
    stratify_key: str | None = "label",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Copies of ``records`` (same order) with ``"split"`` set, grouped and stratified.

    Args:
        records: manifest records.
        ratios: split fractions (normalised to sum 1), one per name.
        names: split names, each one of ``train``, ``val``, ``test``, ``pretrain``.
        group_key: records sharing a non-null value of this key land in the same split (``None``: no
            grouping); records whose value is null are their own group.
        stratify_key: the class key (``None``: no stratification); null values form one class.
        seed: seed of the tie-breaking order; the same input and seed always give the same output.

    Raises :class:`MedsslError` when ``group_key`` or ``stratify_key`` is in no record (:func:`require_field`).

    Guarantees: no group in two splits; with single-image groups each split's count of each class is within
    one image of ``n_class * ratio`` (strictly less than one away).
    """
    fractions = _check_ratios(ratios, names)
    require_field(records, group_key, "--group")
    require_field(records, stratify_key, "--stratify")
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        value = record.get(group_key) if group_key else None
        groups[("g", str(value)) if value is not None else ("r", index)].append(index)
    classes = sorted({_class_of(r, stratify_key) for r in records})
    class_index = {c: i for i, c in enumerate(classes)}
    per_class = np.zeros(len(classes))
    for record in records:
        per_class[class_index[_class_of(record, stratify_key)]] += 1
    target = np.outer(fractions, per_class)  # (splits, classes)
    target_total = np.asarray(fractions) * len(records)
    count = np.zeros_like(target)
    count_total = np.zeros(len(names))

    rng = np.random.default_rng(seed)
    keys = sorted(groups, key=lambda k: (k[0], str(k[1])))
    order = rng.permutation(len(keys))
    shuffled = [keys[i] for i in order]
    shuffled.sort(key=lambda k: -len(groups[k]))  # stable: largest groups first, random order within a size

    assignment: dict[int, str] = {}
    for key in shuffled:
        members = groups[key]
        vector = np.zeros(len(classes))
        for index in members:
            vector[class_index[_class_of(records[index], stratify_key)]] += 1
        deficit = target - count
        score = deficit @ vector
        total_deficit = target_total - count_total
        # largest weighted class deficit; ties -> largest total deficit -> first split name
        best = max(range(len(names)), key=lambda s: (round(score[s], 9), round(total_deficit[s], 9), -s))
        count[best] += vector
        count_total[best] += len(members)
        for index in members:
            assignment[index] = names[best]
    out = []
    for index, record in enumerate(records):
        copy = dict(record)
        copy["split"] = assignment[index]
        out.append(copy)
    return out


def nested_subsamples(
    records: Sequence[Mapping[str, Any]],
    fractions: Sequence[float],
    *,
    seed: int = 0,
    stratify_key: str | None = "label",
) -> dict[float, list[int]]:
    """Stratified, nested label-fraction subsets: ``{fraction: sorted indices into records}``.

    Each class ``c`` (``n_c`` records) contributes ``min(n_c, max(1, floor(fraction * n_c + 0.5)))`` records,
    the first ones of a per-class random order drawn from ``seed``; so every class keeps at least one image
    and, for one seed, a smaller fraction's subset is contained in every larger fraction's subset.
    """
    for fraction in fractions:
        if not (0 < float(fraction) <= 1):
            raise MedsslError(f"subsample fractions must be in (0, 1], got {fraction}")
    require_field(records, stratify_key, "--stratify")
    by_class: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_class[_class_of(record, stratify_key)].append(index)
    rng = np.random.default_rng(seed)
    orders = {c: [by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in sorted(by_class)}
    result: dict[float, list[int]] = {}
    for fraction in fractions:
        chosen: list[int] = []
        for members in orders.values():
            take = min(len(members), max(1, math.floor(float(fraction) * len(members) + 0.5)))
            chosen.extend(members[:take])
        result[float(fraction)] = sorted(chosen)
    return result


def leakage_problems(records: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("patient_id", "lesion_id")) -> list[str]:
    """One message per (key, value) whose records lie in more than one non-null split."""
    problems = []
    for key in keys:
        splits_of: dict[str, set[str]] = defaultdict(set)
        for record in records:
            value, split = record.get(key), record.get("split")
            if value is not None and split is not None:
                splits_of[str(value)].add(str(split))
        problems.extend(
            f"{key} {value} appears in several splits: {', '.join(sorted(found))}"
            for value, found in sorted(splits_of.items())
            if len(found) > 1
        )
    return problems


def class_counts(records: Sequence[Mapping[str, Any]], stratify_key: str = "label") -> dict[str, dict[str, int]]:
    """``{split: {label: count}}`` (``split`` ``"none"`` for unassigned records, label ``"none"`` for null)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in records:
        split = record.get("split") or "none"
        label = record.get(stratify_key)
        table[str(split)]["none" if label is None else str(label)] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(table.items())}


def require_splits(data: str, required: Sequence[str]) -> None:
    """Raise unless every split named in ``required`` has at least one record in ``data`` (manifest or folder).

    A protocol that depends on a split layout (Lu et al.'s dermatoscopy: ``pretrain``/``train``/``test``
    60/20/20) lists it; an empty list accepts any data.

    Raises:
        MedsslError: names the data, the missing splits and the command that makes them.
    """
    if not required:
        return
    from medssl.data.sources import records_from_path

    present = {r.get("split") for r in records_from_path(data)}
    missing = [s for s in required if s not in present]
    if missing:
        raise MedsslError(f"no record in split(s) {', '.join(missing)}; this protocol needs splits "
                          f"{', '.join(required)} (make them with `medssl manifest split MANIFEST -o OUT --names "
                          f"{','.join(required)} --ratios ...`, or pass --required_splits \"[]\")", data)
