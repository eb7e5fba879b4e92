"""Degenerate evaluations and non-finite features: refused with a one-line error, or flagged in the results.

Rules (checked before anything is written to EVAL_DIR):

- fewer than two classes in the labelled data, or a **val or test split holding images of one class only**:
  refused (balanced accuracy would be trivially 1.0 or undefined, and model selection meaningless);
- a class **absent from val or test** (with at least two classes present): evaluated over the classes present,
  and a note says which class is missing and that balanced accuracy, macro F1 and macro AUROC are over the
  present classes only (the absent class is neither scored 0 nor counted);
- a class with fewer than :data:`MIN_IMAGES_PER_CLASS` (5) images in a split: evaluated, with a note (its recall
  moves in steps of 1/n, so the balanced accuracy is coarse); 5 is where one image changes a class's recall by
  at most 20 points;
- after prediction: a trial whose classifier predicts one class for every test image is noted.

Non-finite (NaN/inf) features or predictions stop the evaluation with an error naming the backbone, before any
output is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medssl.errors import MedsslError

#: a class with fewer images than this in a split is flagged (one image moves its recall by >= 1/5)
MIN_IMAGES_PER_CLASS = 5

DEGENERATE_DEFINITION = (
    "class_counts: labelled images per class and split; absent_classes: classes without images in a split "
    "(metrics over that split use the present classes only); small_classes: classes with fewer than "
    f"{MIN_IMAGES_PER_CLASS} images in a split; single_class_predictions: (fraction, trial) whose classifier "
    "predicted one class for every test image"
)


def class_counts(classes: Sequence[str], splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict]:
    """``{split: {class: number of images}}`` with every class listed (0 where absent)."""
    out = {}
    for split, records in splits.items():
        counts = Counter(str(r["label"]) for r in records)
        out[split] = {c: int(counts.get(c, 0)) for c in classes}
    return out


def check_degenerate(classes: Sequence[str], splits: Mapping[str, Sequence[Mapping[str, Any]]],
                     source: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Refuse or flag degenerate splits (module docstring); returns (structured record, notes).

    Raises:
        MedsslError: one class overall, or a val/test split with images of one class only.
    """
    if len(classes) < 2:
        raise MedsslError(f"only one class ({', '.join(classes)}) in the labelled data: a classification "
                          "evaluation needs at least two", source)
    counts = class_counts(classes, splits)
    for split in ("val", "test"):
        present = [c for c, n in counts.get(split, {}).items() if n > 0]
        if len(present) < 2:
            raise MedsslError(f"the {split} split holds images of one class only ({', '.join(present) or 'none'}) "
                              f"of {len(classes)} classes: its balanced accuracy would be trivially 1.0; "
                              f"give a {split} split with at least two classes", source)
    absent: dict[str, list[str]] = {}
    small: dict[str, dict[str, int]] = {}
    notes = []
    for split, per_class in counts.items():
        missing = [c for c, n in per_class.items() if n == 0]
        few = {c: n for c, n in per_class.items() if 0 < n < MIN_IMAGES_PER_CLASS}
        if missing:
            absent[split] = missing
            if split != "train":
                notes.append(f"class {', '.join(missing)} has no {split} images: {split} metrics (balanced accuracy, "
                             f"macro F1, macro AUROC) are over the {len(classes) - len(missing)} present classes "
                             "only; the absent class is not scored")
        if few:
            small[split] = few
            notes.append(f"few {split} images for class " + ", ".join(f"{c} ({n})" for c, n in few.items()) +
                         f" (< {MIN_IMAGES_PER_CLASS}): the recall of such a class moves in steps of 1/n")
    return {"class_counts": counts, "absent_classes": absent, "small_classes": small}, notes


def single_class_predictions(summary: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> tuple[list, list[str]]:
    """(fraction, trial, class) of every trial that predicted one class for all test images, and notes."""
    found, notes = [], []
    for block in summary:
        for trial in block["trials"]:
            predicted = np.asarray(trial["confusion_matrix"]).sum(axis=0)
            if np.count_nonzero(predicted) == 1:
                cls = classes[int(np.flatnonzero(predicted)[0])]
                found.append({"fraction": block["fraction"], "trial": trial["trial"], "class": cls})
                notes.append(f"{100 * block['fraction']:g}% labels, trial {trial['trial']}: the classifier "
                             f"predicted {cls} for every test image")
    return found, notes


def backbone_label(info: Mapping[str, Any]) -> str:
    """How an error names the backbone: its file name, or ``random <arch>`` / ``module <arch>``."""
    if info.get("file_name"):
        return str(info["file_name"])
    return f"{info.get('source', 'backbone')} {info.get('arch', '')}".strip()


def require_finite(values: np.ndarray, what: str, info: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`MedsslError` naming the backbone when ``values`` holds NaN or inf."""
    values = np.asarray(values)
    if values.size and not np.isfinite(values).all():
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        raise MedsslError(f"the backbone {backbone_label(info)} gives non-finite {what} ({n_nan} NaN, {n_inf} inf "
                          f"of {values.size} values); nothing was written (check the checkpoint, its input "
                          "normalisation, and BatchNorm statistics: --norm bn / --recalibrate-bn)")
